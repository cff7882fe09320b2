"""The API examples of the README and the docs run and do what they say."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'


def first_python_block(path: pathlib.Path) -> dict:
  """The names the first python block of ``path`` defines, once run."""
  blocks = re.findall(r'```python\n(.*?)```', path.read_text(), flags=re.S)
  assert blocks, f'{path.name} has no python example'
  namespace = {}
  exec(compile(blocks[0], path.name, 'exec'), namespace)
  return namespace


def test_api_example_runs_and_fused_logits_match():
  ns = first_python_block(README)
  expected = ns['model'].apply(ns['variables'], ns['images'])
  assert ns['logits'].shape == (8, 1000)
  assert np.abs(expected).max() > 0.1  # Not all zero: a wrong fusion would show.
  np.testing.assert_allclose(ns['logits'], expected, rtol=1e-4, atol=1e-4)


def test_the_api_notes_example_fuses_to_the_same_logits():
  ns = first_python_block(ROOT / 'docs' / 'api.md')
  expected = ns['model'].apply(ns['variables'], ns['images'])
  assert np.abs(expected).max() > 0.1  # Not all zero: a wrong fusion would show.
  np.testing.assert_allclose(ns['logits'], expected, rtol=1e-4, atol=1e-4)


def test_the_composition_example_fuses_to_the_same_outputs():
  ns = first_python_block(ROOT / 'docs' / 'composition.md')
  expected = ns['model'].apply(ns['variables'], ns['images'])
  fused = ns['Segmenter'](11, deploy=True).apply(ns['deploy_variables'], ns['images'])
  assert expected.shape == (8, 8, 8, 11) and np.abs(expected).max() > 0.1
  np.testing.assert_allclose(fused, expected, rtol=1e-4, atol=1e-4)
