"""The im2col, Winograd and dense convolutions equal XLA's, values and gradients,
for every shape used; 'auto' picks per layer by backend, layer and feature-map size."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import calibrated_variables, relative_error

import repvgg_jax
from repvgg_jax import perf
from repvgg_jax.perf import conv_kernels as conv


@pytest.mark.parametrize('kernel_size', [(1, 1), (3, 3), (1, 3), (3, 1)])
@pytest.mark.parametrize('strides', [1, 2])
@pytest.mark.parametrize('groups', [1, 2, 4])
def test_im2col_matches_xla(kernel_size, strides, groups):
  padding = ((kernel_size[0] // 2,) * 2, (kernel_size[1] // 2,) * 2)
  kwargs = conv_kwargs(kernel_size, strides, padding, groups)
  assert_matches_xla(kwargs, 'im2col', (2, 7, 8, 16))  # Odd and even sides.


def conv_kwargs(kernel_size, strides, padding, groups) -> dict:
  """The arguments of a `nn.Conv` with 8 features at true float32 precision."""
  return dict(
    features=8,
    kernel_size=kernel_size,
    strides=strides,
    padding=padding,
    feature_group_count=groups,
    precision='highest',
  )


def assert_matches_xla(kwargs, conv_impl, shape):
  """``conv.KernelConv`` with ``conv_impl`` gives `nn.Conv`'s variables, values and gradients."""
  xla, other = nn.Conv(**kwargs), conv.KernelConv(**kwargs, conv_impl=conv_impl)
  x = jax.random.normal(jax.random.key(0), shape)
  variables = jax.jit(xla.init)(jax.random.key(1), x)
  variables = jax.tree.map(lambda a: a + 0.1, variables)  # A non-zero bias too.
  assert jax.tree.map(jnp.shape, jax.eval_shape(other.init, jax.random.key(1), x)) == jax.tree.map(
    jnp.shape, variables
  )
  expected, actual = jax.jit(xla.apply)(variables, x), jax.jit(other.apply)(variables, x)
  assert actual.shape == expected.shape
  assert relative_error(actual, expected) <= 1e-6

  def loss(module, v, inputs):
    return jnp.sum(jnp.sin(module.apply(v, inputs)))

  gradients = lambda module: jax.jit(jax.grad(lambda v, i: loss(module, v, i), argnums=(0, 1)))
  grads_xla, grads_other = gradients(xla)(variables, x), gradients(other)(variables, x)
  for a, b in zip(jax.tree.leaves(grads_other), jax.tree.leaves(grads_xla), strict=True):
    assert relative_error(a, b) <= 1e-5


@pytest.mark.parametrize(
  'shape, padding, groups',
  [
    ((2, 7, 8, 16), ((1, 1), (1, 1)), 1),  # Odd and even sides: partial tiles.
    ((2, 7, 8, 16), ((1, 1), (1, 1)), 4),
    ((2, 6, 5, 16), ((0, 0), (0, 0)), 2),  # 'VALID', as in the DBB 1x1-3x3 branch.
    ((2, 6, 6, 16), ((2, 0), (0, 1)), 1),  # Uneven padding.
    ((3, 2, 2, 16), ((1, 1), (1, 1)), 1),  # A 2x2 map is one tile...
    ((3, 1, 1, 16), ((1, 1), (1, 1)), 1),  # ...and a 1x1 map a cropped one.
  ],
)
def test_winograd_matches_xla(shape, padding, groups):
  assert_matches_xla(conv_kwargs((3, 3), 1, padding, groups), 'winograd', shape)


@pytest.mark.parametrize(
  'shape, kernel_size, strides, padding, groups',
  [
    ((3, 2, 2, 16), (3, 3), 1, ((1, 1), (1, 1)), 1),  # A0's 2x2 stage at 32x32...
    ((3, 2, 2, 16), (3, 3), 2, ((1, 1), (1, 1)), 1),  # ...and its last, 2x2 -> 1x1.
    ((3, 1, 1, 16), (3, 3), 1, ((1, 1), (1, 1)), 4),  # One pixel, grouped.
    ((2, 2, 2, 16), (3, 3), 1, ((2, 0), (1, 2)), 2),  # Uneven padding: some pairs join by no tap.
    ((2, 2, 1, 16), (3, 3), 2, ((2, 0), (1, 1)), 2),
    ((2, 1, 2, 16), (1, 3), 1, ((0, 0), (1, 1)), 1),  # A 1x3 kernel.
  ],
)
def test_dense_matches_xla(shape, kernel_size, strides, padding, groups):
  assert_matches_xla(conv_kwargs(kernel_size, strides, padding, groups), 'dense', shape)


def test_winograd_refuses_other_kernels():
  with pytest.raises(ValueError, match='needs a 3x3 kernel, got \\(1, 3\\)'):
    conv.winograd_conv(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 3, 2, 2)), ((0, 0), (1, 1)), 1)


@pytest.mark.parametrize(
  'out_pixels, strides, in_channels, train, expected',
  [
    # Dense for 3x3 kernels on 2x2 and 1x1 inputs; after the bar, the choice for
    # a 1x1 kernel there: im2col, since XLA's collapses on small maps.
    (2 * 2, (1, 1), 192, False, 'dense|im2col'),
    (2 * 2, (1, 1), 192, True, 'dense|im2col'),
    (1 * 1, (2, 2), 192, True, 'dense|im2col'),
    (1 * 1, (2, 2), 192, False, 'dense|im2col'),
    (2 * 2, (2, 2), 96, True, 'im2col'),  # A 4x4 input: dense would multiply more.
    (2 * 2, (2, 2), 96, False, 'xla'),  # Inference: XLA's for strided layers...
    (8 * 8, (2, 2), 48, False, 'xla'),
    (8 * 8, (2, 2), 48, True, 'im2col'),  # ...not in training (below).
    # Winograd for 3x3 kernels on 8x8 and 4x4, and in inference up to 56x56;
    # after the bar, the choice for a 1x1 kernel there.
    (8 * 8, (1, 1), 48, False, 'winograd|im2col'),
    (8 * 8, (1, 1), 48, True, 'winograd|im2col'),
    (4 * 4, (1, 1), 96, False, 'winograd|im2col'),
    (4 * 4, (1, 1), 96, True, 'winograd|im2col'),
    (14 * 14, (1, 1), 192, False, 'winograd|xla'),
    (14 * 14, (1, 1), 192, True, 'xla'),
    (4 * 4, (2, 2), 96, True, 'im2col'),  # Winograd is for stride 1 only.
    (28 * 28, (1, 1), 96, False, 'winograd|xla'),
    (56 * 56, (1, 1), 48, False, 'winograd|xla'),
    (112 * 112, (1, 1), 32, False, 'xla'),
    (56 * 56, (2, 2), 48, False, 'xla'),
    (56 * 56, (2, 2), 192, True, 'im2col'),  # XLA's backward is slow at stride 2...
    (56 * 56, (1, 1), 48, True, 'im2col'),  # ...and on narrow layers.
  ],
)
def test_auto_choice_on_cpu(out_pixels, strides, in_channels, train, expected):
  in_pixels = out_pixels * strides[0] * strides[1]
  choose = lambda impl, backend='cpu', kernel_size=(3, 3): conv.choose_conv_impl(
    impl,
    in_pixels=in_pixels,
    out_pixels=out_pixels,
    strides=strides,
    in_channels=in_channels,
    train=train,
    kernel_size=kernel_size,
    backend=backend,
  )
  expected, _, other_kernels = expected.partition('|')
  between_xla_and_im2col = other_kernels or expected
  assert choose('auto') == expected
  assert choose('auto', kernel_size=(1, 1)) == between_xla_and_im2col
  assert choose('auto', backend='gpu') == 'xla'
  assert choose('xla') == 'xla' and choose('im2col') == 'im2col'
  # Explicit 'winograd' and 'dense' wherever they apply, on any backend; elsewhere
  # 'auto's choice between XLA's convolution and im2col.
  for impl, applies in (('winograd', strides == (1, 1)), ('dense', in_pixels < 9)):
    if applies:
      assert choose(impl) == choose(impl, backend='gpu') == impl
    else:
      assert choose(impl) == between_xla_and_im2col and choose(impl, backend='gpu') == 'xla'


@pytest.mark.parametrize(
  'side, groups, expected',
  [(56, 1, 'winograd'), (28, 1, 'winograd'), (28, 2, 'xla'), (56, 4, 'xla'), (14, 2, 'winograd')],
)
def test_auto_gives_grouped_layers_winograd_up_to_14x14_in_inference(side, groups, expected):
  choice = conv.choose_conv_impl(
    'auto',
    in_pixels=side * side,
    out_pixels=side * side,
    strides=(1, 1),
    in_channels=128,
    train=False,
    groups=groups,
    backend='cpu',
  )
  assert choice == expected


def test_auto_mixes_implementations_in_one_model():
  """At 32x32 A0 computes its 16x16 stem and stride-2 layers with XLA's conv, its
  4x4 stage with Winograd and its 2x2 stage dense; at 224x224 its stride-1 layers
  with Winograd."""
  model = repvgg_jax.create_model('A0', deploy=True, conv=perf.conv_layer('auto', train=False))
  images = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  hlo = jax.jit(model.apply).lower(variables, images).as_text()
  assert hlo.count('convolution') == 4  # The stem, 16->8, 8->4 and 4->2; 2->1 is dense.
  # Four Winograd layers (8->8 and three at 4x4: 16 matmuls and a kernel transform
  # each), 14 dense ones (13 at 2x2 and 2->1), and the head.
  assert hlo.count('dot_general') == 4 * 17 + 14 + 1
  # At 224 the seventeen stride-1 layers (56x56, 28x28, 14x14) run by Winograd,
  # 16 matmuls each.
  images = jnp.zeros((1, 224, 224, 3))
  hlo = jax.jit(model.apply).lower(variables, images).as_text()
  assert hlo.count('convolution(') == 5  # The stride-2 layers.
  assert hlo.count('dot_general') == 17 * 17 + 1  # And a kernel transform each; the head.
  with pytest.raises(ValueError, match="conv_impl must be one of .* got 'cudnn'"):
    perf.conv_layer('cudnn', train=False)


@pytest.mark.parametrize('deploy, layers', [(True, 22), (False, 22 + 22)])
def test_default_model_convolves_with_lax(deploy, layers):
  """By default every convolution layer is one ``conv_general_dilated``, on any
  backend: what quantizers, exporters and profilers look for."""
  model = repvgg_jax.create_model('A0', num_classes=10, deploy=deploy)
  images = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  jaxpr = str(jax.make_jaxpr(model.apply)(variables, images))
  assert jaxpr.count('conv_general_dilated') == layers  # A0's 22 3x3 (and 22 1x1) layers.


@pytest.mark.parametrize('train', [False, True])
def test_conv_layer_is_flax_conv_off_cpus(train):
  assert perf.conv_layer('auto', train=train, backend='gpu') is nn.Conv
  assert perf.conv_layer('xla', train=train, backend='cpu') is nn.Conv
  on_cpu = perf.conv_layer('auto', train=train, backend='cpu')
  assert on_cpu.func is conv.KernelConv
  assert on_cpu.keywords == {'conv_impl': 'auto', 'train': train}


def test_models_agree_across_conv_impls():
  """Same parameters, same logits; and a model fused from one runs in the other."""
  # A0 shrunk to one block per stage (compiles in seconds); grouped convs are
  # compared layer by layer above.
  variant = dataclasses.replace(
    repvgg_jax.get_variant('A0'), num_blocks=(1, 2, 1, 1), width_multipliers=(0.25, 0.25)
  )
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  make = lambda impl, deploy=False: repvgg_jax.create_model(
    variant, deploy=deploy, conv=perf.conv_layer(impl, train=False), precision='highest'
  )
  variables = calibrated_variables(make('im2col'), images)
  train_xla = jax.jit(make('xla').apply)(variables, images)
  fused = repvgg_jax.fuse_params(variables)
  for impl in ('im2col', 'winograd', 'dense'):
    train_other = jax.jit(make(impl).apply)(variables, images)
    assert relative_error(train_other, train_xla) <= 1e-5
    deploy_other = jax.jit(make(impl, deploy=True).apply)(fused, images)
    assert relative_error(deploy_other, train_xla) <= 1e-5
    assert np.all(np.isfinite(np.asarray(deploy_other)))


@pytest.mark.parametrize(
  'branches', [repvgg_jax.PAPER_BRANCHES, ('conv3x3', 'dbb_1x1_3x3', 'conv1x3')]
)
def test_both_implementations_initialise_the_same_variables(branches):
  """The trainer initialises through XLA's conv, whatever the model computes with."""
  variant = dataclasses.replace(
    repvgg_jax.get_variant('A0'), num_blocks=(1, 2, 1, 1), width_multipliers=(0.25, 0.25)
  )
  images = jnp.zeros((1, 16, 16, 3))
  model = lambda impl: repvgg_jax.create_model(
    variant, num_classes=4, conv=perf.conv_layer(impl, train=True), branches=branches
  )
  init = {
    impl: jax.jit(model(impl).init)(jax.random.key(7), images)
    for impl in ('xla', 'im2col', 'winograd', 'dense')
  }
  for impl in ('im2col', 'winograd', 'dense'):
    assert jax.tree.structure(init['xla']) == jax.tree.structure(init[impl])
    for a, b in zip(jax.tree.leaves(init['xla']), jax.tree.leaves(init[impl]), strict=True):
      np.testing.assert_array_equal(a, b)
