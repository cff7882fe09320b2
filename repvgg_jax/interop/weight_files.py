"""Reading a PyTorch state dict from a file: .pth/.pt/.bin (through torch),
.safetensors or .npz, local or on the Hugging Face Hub, out of the containers that
training scripts wrap it in. Nothing that runs a file's code is ever used."""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from repvgg_jax.interop import hub
from repvgg_jax.interop.torch_layout import ConversionError

WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict', 'module')


def _read_file(path: pathlib.Path) -> Mapping[str, Any]:
  """The raw key -> array mapping stored in ``path``, by its suffix."""
  suffix = path.suffix.lower()
  try:
    if suffix == '.npz':
      with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}
    if suffix == '.safetensors':
      from safetensors.numpy import load_file

      return load_file(str(path))
    if suffix in ('.pth', '.pt', '.bin'):
      try:
        import torch
      except ImportError:
        raise ConversionError(
          f'Reading {path.name} needs PyTorch (pip install torch); or save the state dict '
          'as .safetensors or .npz, which need no torch.'
        ) from None
      if (why := _not_torch_file(path)) is not None:
        raise ConversionError(f'Cannot read {path}: it is not a PyTorch file ({why}).')
      with warnings.catch_warnings():  # On a plain pickle: two lines before the error.
        warnings.simplefilter('ignore', UserWarning)
        return torch.load(path, map_location='cpu', weights_only=True)
  except ConversionError:
    raise
  except Exception as error:  # noqa: BLE001 (safetensors raises its own SafetensorError)
    raise ConversionError(
      f'Cannot read {path}: it is not a valid {suffix} weights file ({_read_reason(error)}). '
      'Is the file complete?'
    ) from None
  raise ConversionError(
    f'Unknown weight file type {suffix!r}: use .pth, .pt, .bin, .safetensors or .npz.'
  )


def _read_reason(error: Exception) -> str:
  """A short reason a weights file did not load. torch's and numpy's own messages
  advise loading with ``weights_only=False`` or ``allow_pickle=True``, which run the
  file's code: never repeated for a file that may not be trusted."""
  text = ' '.join(str(error).split())
  if 'weights_only' in text or 'Weights only load failed' in text:
    return 'PyTorch found no state dict it can load without running code'
  if 'allow_pickle' in text:  # numpy's reading of anything that is not an .npy or .npz.
    return 'numpy found no arrays it can load without running code'
  return text[:200] if len(text) > 8 else f'{type(error).__name__}: {text}'


def _not_torch_file(path: pathlib.Path) -> str | None:
  """Why ``path`` cannot be a torch.save file (a zip archive, or a pickle), or None."""
  with open(path, 'rb') as f:
    head = f.read(2)
  if head == b'PK' or head[:1] == b'\x80':
    return None
  return f'it starts with {head!r}, as neither a zip archive nor a pickle does'


def _unwrap(tree: Any, path: pathlib.Path) -> dict[str, np.ndarray]:
  """The state dict inside training-script containers (`WRAPPER_KEYS`, nested in any
  order), without ``module.`` prefixes; floats other than float16/32/64 as float32."""
  if not isinstance(tree, Mapping):
    raise ConversionError(f'{path} holds a {type(tree).__name__}, not a state dict.')
  while inner := next((tree[k] for k in WRAPPER_KEYS if isinstance(tree.get(k), Mapping)), None):
    tree = inner
  out = {}
  for key, value in tree.items():
    if not hasattr(value, 'shape'):
      continue  # Epoch counters, optimizer names and the like.
    key = key.removeprefix('module.')
    if hasattr(value, 'numpy'):  # A torch tensor; numpy has no bfloat16.
      value = value.float() if value.is_floating_point() else value
      value = value.numpy()
    value = np.asarray(value)
    if value.dtype.kind == 'V' or value.dtype.name == 'bfloat16':  # safetensors' bfloat16.
      value = value.astype(np.float32)
    out[key] = value
  if not out:
    raise ConversionError(
      f'{path} holds no arrays at its top level or inside {"/".join(WRAPPER_KEYS)}; its keys: '
      f'{sorted(map(str, tree))[:10]}. Save the state dict itself (an EMA copy under another '
      'key: save that one).'
    )
  return out


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a reference state dict from .pth/.pt/.bin (torch), .safetensors or .npz, a
  local file or a hub reference (``hf-hub:ORG/NAME``, `repvgg_jax.interop.hub`).

  Raises:
    FileNotFoundError: no such file.
    ConversionError: unreadable, truncated or of an unknown type; a hub
      reference that cannot be fetched.
  """
  path = hub.resolve(path)
  if not path.is_file():
    raise FileNotFoundError(f'No weight file at {path}.')
  return _unwrap(_read_file(path), path)
