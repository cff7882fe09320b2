"""Start-up of the command-line entry points (train.py, ablate, bench).

TensorFlow only feeds data here, so its C++ logs and oneDNN kernels are off.
Without an NVIDIA driver the CUDA plugin that ``jax[cuda12]`` installs cannot
start; JAX then uses the CPU after logging a long traceback that helps nobody,
so on such a machine that one message is filtered out (`hide_cuda_probe`;
``import repvgg_jax`` does this too). Call `quiet_startup` before JAX picks its
backend and before TensorFlow is imported. `parse_flags` turns the mistakes a
person makes on an absl command line into one line each.
"""

import difflib
import glob
import logging
import os
import re
import sys

HELP_FLAGS = ('-h', '-?', '--help', '--helpshort', '--helpfull', '--helpxml')


def _not_cuda_probe(record: logging.LogRecord) -> bool:
  return 'xla_cuda12' not in record.getMessage()


def hide_cuda_probe() -> None:
  """Filters out the CUDA plugin's start-up traceback on a machine without an NVIDIA GPU."""
  if not glob.glob('/dev/nvidia[0-9]*'):
    logger = logging.getLogger('jax._src.xla_bridge')
    if _not_cuda_probe not in logger.filters:
      logger.addFilter(_not_cuda_probe)


# The level the user set, if any: JAX sets 1 when it is imported, so this is read
# before (``repvgg_jax`` imports this module first).
_USER_TF_LOG_LEVEL = os.environ.get('TF_CPP_MIN_LOG_LEVEL')


def quiet_startup(log_level: str = '2') -> None:
  """Quiets TensorFlow and the CUDA probe; call it before either starts.

  Args:
    log_level: ``TF_CPP_MIN_LOG_LEVEL`` unless the user set one: '2' keeps the C++
      errors (XLA's and TensorFlow's share it: XLA's cuDNN errors that an exception
      refers to), '3' drops them too.
  """
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = _USER_TF_LOG_LEVEL or log_level
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  hide_cuda_probe()


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (pass as ``app.run(..., flags_parser=parse_flags)``), with
  ``--help`` exiting 0 and a bad flag, config file or ``--config.FIELD`` override
  exiting 2 after one line that says what is wrong and how to fix it."""
  from absl import flags

  try:
    remaining = flags.FLAGS(argv)
    for name in list(flags.FLAGS):
      # A config file that failed to load reports it only when its value is first used.
      getattr(flags.FLAGS[name].value, 'to_dict', None)
    return remaining
  except SystemExit as exit_:
    if exit_.code == 1 and any(arg in HELP_FLAGS for arg in argv[1:]):
      sys.exit(0)  # absl exits 1 after printing the help.
    raise
  except Exception as error:  # noqa: BLE001 (every parse error becomes one line)
    print(f'error: {flag_error_line(error, argv)}', file=sys.stderr)
    sys.exit(2)


def flag_error_line(error: Exception, argv: list[str]) -> str:
  """One line for an error raised while parsing ``argv``."""
  text = ' '.join(str(error).split())
  path = _config_path(argv)
  if 'Failed loading config file' in text:
    return f'cannot load the config file {path!r}: {_last_reason(text)}; check the path.'
  if 'Error whilst parsing config file' in text:  # get_config raised; its traceback follows.
    frames, reason = _traceback_end(str(error))
    called = bool(frames) and 'config_flags' in frames[-1]  # The call itself failed.
    if path and ':' in path and called and reason.startswith('TypeError: get_config()'):
      return f"the config file {path.split(':')[0]!r} takes no preset after ':' ({reason})."
    return f'the config file {path!r} failed in get_config: {reason}'
  if isinstance(error, SyntaxError):  # The file's name is in the message: it may be an import.
    return f'the config file {path!r} does not load: {text}.'
  if isinstance(error, AttributeError) and "has no attribute 'get_config'" in text:
    return f'the config file {path!r} has no get_config(), which returns the config.'
  if isinstance(error, AttributeError | KeyError):
    override = _unknown_override(argv)
    if override:
      return override
  return text


def _traceback_end(text: str) -> tuple[list[str], str]:
  """The frame lines of a formatted traceback and its exception, in one line: from the
  last line that names an exception (``ValueError: ...``) to the end."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  starts = [i for i, line in enumerate(lines) if re.match(r'[\w.]*(Error|Exception)\b', line)]
  start = starts[-1] if starts else len(lines) - 1
  frames = [line for line in lines[:start] if line.startswith('File ')]
  return frames, ' '.join(lines[start:])


def _last_reason(text: str) -> str:
  reasons = re.findall(r'\[Errno \d+\] [^:]+', text)
  return reasons[-1] if reasons else text


def _config_path(argv: list[str]) -> str | None:
  for index, arg in enumerate(argv):
    if arg == '--config' and index + 1 < len(argv):
      return argv[index + 1]
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
  return None


def _unknown_override(argv: list[str]) -> str | None:
  """The first ``--config.a.b=v`` whose field the config lacks, with the closest field."""
  config = _load_config(_config_path(argv))
  if config is None:
    return None
  for arg in argv[1:]:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.') :].split('=', 1)[0]
    node, parents = config, []
    for key in path.split('.'):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if key not in keys:
        where = '.'.join(parents) or 'the config'
        closest = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
        hint = f'; the closest is {".".join([*parents, closest[0]])!r}' if closest else ''
        return f'--config.{path}: {where} has no field {key!r}{hint}.'
      node, parents = node[key], [*parents, key]
  return None


def _load_config(path: str | None):
  """The ConfigDict of a config file (its ``get_config()``), or None if it cannot load."""
  if not path:
    return None
  import importlib.util

  try:
    spec = importlib.util.spec_from_file_location('_config_for_error', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
  except Exception:  # noqa: BLE001 (the original error is reported instead)
    return None
