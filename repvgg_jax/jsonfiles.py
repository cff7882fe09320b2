"""The JSON files the package writes: whole documents atomically, records as JSON lines."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys


def write_json(path: str | os.PathLike, value) -> None:
  """Writes ``value`` as indented JSON, atomically (a temporary file renamed into place)."""
  _replace(path, json.dumps(value, indent=2, sort_keys=True) + '\n')


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
  """Appends ``record`` as one line of JSON."""
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def write_jsonl(path: str | os.PathLike, records) -> None:
  """Replaces a JSON-lines file with ``records``, atomically."""
  _replace(path, ''.join(json.dumps(record) + '\n' for record in records))


def _replace(path: str | os.PathLike, text: str) -> None:
  """``path`` with the content ``text``, written to a temporary file renamed into
  place; a failed write (a full disk) leaves ``path`` as it was and no temporary file.

  Raises:
    OSError: the write failed; its ``filename`` is ``path`` (not the temporary file's,
      which no longer exists, nor none, as a write's own error has), its type and
      errno the failure's.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + '.tmp')
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  except BaseException as error:
    with contextlib.suppress(OSError):  # The write's own error is the one to report.
      tmp.unlink(missing_ok=True)
    if isinstance(error, OSError) and error.errno and error.filename in (None, str(tmp)):
      raise OSError(error.errno, error.strerror, str(path)) from error  # None: a full disk.
    raise


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The records of a JSON-lines file, blank lines skipped. A line cut short (the
  append of a crash or a full disk) is dropped with a warning on stderr."""
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        print(f'warning: {path}:{number} is cut short; dropped: {line[:80]}', file=sys.stderr)
  return records
