"""Where a run's files live: a local path or gs://, through one path layer (etils.epath).

Everything the jobs read or write in a workdir or a TFDS data dir goes through here or through epath
(which orbax, TFDS and grain use too): local paths go to the OS, gs:// to gcsfs (tensorstore and
ArrayRecord reach GCS by themselves). Any other scheme (s3://, http://, hdfs://, ...) is refused with a
one-line ConfigError naming the flag, before anything is built or compiled.

GCS has no directories, no appends and no atomic rename of a prefix; a single object upload is atomic
(readers see the old object or the new one). So `write_text` writes a temporary file and renames it on
local disks, and uploads the object directly on GCS; directories are created only on local disks.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterator

from etils import epath

from convirt_jax.errors import ConfigError

REMOTE_SCHEMES = ("gs",)
SUPPORTED = "a local path or gs://bucket/path"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(value: str | os.PathLike) -> str | None:
  """The scheme of a URL ("gs" for gs://bucket/x); None for a local path."""
  match = _SCHEME.match(os.fspath(value))
  return match[1].lower() if match else None


def check(value: str | os.PathLike, flag: str) -> str:
  """`value` as a string, or a one-line ConfigError naming `flag` for a scheme this project cannot use."""
  value = os.fspath(value)
  found = scheme(value)
  if found is not None and found not in REMOTE_SCHEMES:
    raise ConfigError(f"{flag}={value}: {found}:// is not supported; give {SUPPORTED}")
  if found == "gs":
    if importlib.util.find_spec("gcsfs") is None:  # epath's gs:// backend
      raise ConfigError(f"{flag}={value}: gs:// needs the gcsfs package (pip install -r requirements.txt)")
  return value


def is_remote(value: str | os.PathLike) -> bool:
  return scheme(value) is not None


def path(value: str | os.PathLike) -> epath.Path:
  """An epath.Path; a local one absolute (orbax and tensorstore want that)."""
  return epath.Path(value) if is_remote(value) else epath.Path(os.path.abspath(os.fspath(value)))


def makedirs(directory: str | os.PathLike) -> None:
  """Creates a local directory; a no-op on GCS, where a "directory" is only a name prefix."""
  if not is_remote(directory):
    os.makedirs(directory, exist_ok=True)


def exists(value: str | os.PathLike) -> bool:
  return path(value).exists()


def rmtree(directory: str | os.PathLike) -> None:
  """Deletes a directory (on GCS: every object under the prefix); quiet when it is not there."""
  if is_remote(directory):
    path(directory).rmtree(missing_ok=True)
  else:
    shutil.rmtree(directory, ignore_errors=True)


def write_text(file: str | os.PathLike, text: str) -> None:
  """Writes a small file so that a killed job never leaves half of it: on a local disk a temporary file
  beside it renamed into place; on GCS one object upload, which is atomic by itself."""
  target = path(file)
  if is_remote(file):
    target.write_text(text)
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp"
  tmp.write_text(text)
  tmp.replace(target)


def write_json(file: str | os.PathLike, value: Any) -> None:
  write_text(file, json.dumps(value, indent=2, default=str))


def read_json(file: str | os.PathLike) -> Any:
  return json.loads(path(file).read_text())


def copy_tree(source: str | os.PathLike, target: str | os.PathLike, *, last: str | None = None) -> None:
  """Copies the files under `source` to `target` (either may be remote), streaming; the file named
  `last` (at any depth) is copied after all others, so its presence says the copy is complete."""
  source, target = path(source), path(target)
  files = sorted(_files(source), key=lambda f: f.name == last)
  for file in files:
    destination = target / file.relative_to(source)
    if not is_remote(destination):
      destination.parent.mkdir(parents=True, exist_ok=True)
    with file.open("rb") as reader, destination.open("wb") as writer:
      shutil.copyfileobj(reader, writer, 16 << 20)


def _files(directory: epath.Path) -> Iterator[epath.Path]:
  for child in directory.iterdir():
    if child.is_dir():
      yield from _files(child)
    else:
      yield child


@contextlib.contextmanager
def local_copy(directory: str | os.PathLike) -> Iterator[str]:
  """A local directory with the files of `directory`: itself when local, else a temporary download (for
  readers that open local files only, such as Hugging Face tokenizers)."""
  if not is_remote(directory):
    yield os.fspath(directory)
    return
  with tempfile.TemporaryDirectory(prefix="convirt_download_") as local:
    copy_tree(directory, local)
    yield local


@contextlib.contextmanager
def local_staging(directory: str | os.PathLike) -> Iterator[str]:
  """A local directory to write `directory`'s files into: itself when local, else a temporary one
  uploaded to `directory` when the block ends without an error (for writers of local files only)."""
  if not is_remote(directory):
    os.makedirs(directory, exist_ok=True)
    yield os.fspath(directory)
    return
  with tempfile.TemporaryDirectory(prefix="convirt_upload_") as local:
    yield local
    copy_tree(local, directory)
