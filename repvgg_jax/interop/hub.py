"""Weights on the Hugging Face Hub: ``hf-hub:ORG/NAME[@REVISION]`` references.

timm publishes RepVGG weights there (``hf-hub:timm/repvgg_a0.rvgg_in1k``: timm's
keys, training-time). `resolve` turns such a reference into the path of its
weight file in the Hugging Face cache, downloading it when the hub can be
reached; ``HF_HUB_OFFLINE=1`` (or no network) uses the cache alone, and
``HF_HUB_CACHE`` chooses the cache directory. Any other source is a local path
and comes back as it is.
"""

from __future__ import annotations

import os
import pathlib

from repvgg_jax.interop.torch_layout import ConversionError

PREFIX = 'hf-hub:'
WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')  # In the order tried.
_TRUE = ('1', 'ON', 'YES', 'TRUE')


def is_reference(source) -> bool:
  return isinstance(source, str) and source.startswith(PREFIX)


def resolve(source: str | os.PathLike) -> pathlib.Path:
  """The local weight file of ``source``: a path as it is, a hub reference fetched.

  Raises:
    ConversionError: a malformed reference, a repository or revision the hub
      does not have, no weight file in it, or (offline) nothing cached; the
      message says what to download and where to put it.
  """
  if not is_reference(source):
    return pathlib.Path(source)
  repo, at, revision = source[len(PREFIX) :].partition('@')
  malformed = ConversionError(
    f'{source!r} is not a hub reference: write hf-hub:ORG/NAME[@REVISION].'
  )
  if repo.count('/') != 1 or not all(repo.split('/')) or (at and not revision):
    raise malformed
  from huggingface_hub import errors as hub_errors
  from huggingface_hub import hf_hub_download
  from huggingface_hub.utils import validate_repo_id

  try:
    validate_repo_id(repo)  # The hub's own rules (characters, '--', '..').
  except hub_errors.HFValidationError:
    raise malformed from None

  offline = os.environ.get('HF_HUB_OFFLINE', '').upper() in _TRUE
  cache = os.environ.get('HF_HUB_CACHE') or None
  not_cached = []
  for filename in WEIGHT_FILES:
    try:
      path = hf_hub_download(
        repo, filename, revision=revision or None, cache_dir=cache, local_files_only=offline
      )
      return pathlib.Path(path)
    except hub_errors.LocalEntryNotFoundError:
      not_cached.append(filename)  # Offline or unreachable, and not in the cache.
    except hub_errors.EntryNotFoundError:
      continue  # The repository has no such file: try the next name.
    except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as error:
      raise ConversionError(f'{source}: {type(error).__name__} on the Hugging Face Hub.') from None
    except hub_errors.HfHubHTTPError as error:  # Rate limits, server errors, disabled repos.
      reason = ' '.join(str(error).split())[:200]
      raise ConversionError(f'{source}: the Hugging Face Hub answered {reason}') from None
  if not_cached:
    from huggingface_hub import constants

    where = cache or constants.HF_HUB_CACHE
    raise ConversionError(
      f'{source} is not in the Hugging Face cache ({where}) and the hub cannot be reached'
      f'{" (HF_HUB_OFFLINE is set)" if offline else ""}: where there is a network, run '
      f'`hf download {repo} {WEIGHT_FILES[0]}{f" --revision {revision}" if revision else ""}` '
      'and copy its cache folder '
      f'models--{repo.replace("/", "--")} into {where}, or download the file and give its path.'
    )
  raise ConversionError(f'{source} holds none of {", ".join(WEIGHT_FILES)}.')
