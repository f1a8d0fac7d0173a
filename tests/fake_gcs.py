"""An in-memory GCS for tests: gcp-storage-emulator's JSON API served from a thread on 127.0.0.1.

Each client the jobs use is pointed at it through its own documented switch, so gs:// paths work with no
network and no credentials: gcsfs (epath's gs:// backend) STORAGE_EMULATOR_HOST, tensorstore (orbax's
arrays) TENSORSTORE_GCS_HTTP_URL with the fixed token GOOGLE_AUTH_TOKEN_FOR_TESTING, google-cloud-cpp
(ArrayRecord's reader) CLOUD_STORAGE_EMULATOR_ENDPOINT.

  with fake_gcs.serve("bucket"):
    ...  # gs://bucket/... works

gcp-storage-emulator leaves out what tensorstore's OCDBT (orbax's format) needs: an object's generation in
the x-goog-generation header of a read, and the preconditions ifGenerationMatch (412 when it fails; 0:
the object must not exist) and ifGenerationNotMatch (304). `_generations` adds them to its object calls.
"""
import contextlib
import functools
from http import HTTPStatus
import logging
import os
import socket

from etils.epath import backend
import gcsfs
from gcp_storage_emulator import exceptions
from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.handlers import objects

_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def serve(bucket: str):
  """Serves an empty `bucket` and points the clients at it while the block runs."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  saved = {k: os.environ.get(k) for k in (*_ENV, "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
  os.environ.update({k: url for k in _ENV}, GOOGLE_AUTH_TOKEN_FOR_TESTING="fake-token")
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # every 404 is logged otherwise
  # Without credentials, gcsfs warns at each file system it makes that it cannot ask for the bucket type.
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  _forget_clients()
  originals = _add_generations()
  server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  # A client that hangs up before reading the whole answer is no error worth a traceback here.
  server._api._httpd.handle_error = lambda *args: None  # pylint: disable=protected-access
  try:
    yield url
  finally:
    server.stop()
    _restore(originals)
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    _forget_clients()


def _forget_clients() -> None:
  """gcsfs and epath cache their file system, with the endpoint it was made for."""
  gcsfs.GCSFileSystem.clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def _generation(storage, bucket: str, name: str | None) -> str:
  """The object's generation, "0" when there is none (GCS's own convention for preconditions)."""
  try:
    return str(storage.get_file_obj(bucket, name)["generation"]) if name else "0"
  except exceptions.NotFound:
    return "0"


def _generations(handler):
  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    bucket = request.params["bucket_name"]
    name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
    current = _generation(storage, bucket, name)
    if_match, if_not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
    if if_match and if_match[0] != current:
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
    if if_not_match and if_not_match[0] == current:
      response.status = HTTPStatus.NOT_MODIFIED
      return None
    result = handler(request, response, storage, *args, **kwargs)
    generation = _generation(storage, bucket, name)
    if generation != "0":
      response["x-goog-generation"] = generation
      response["x-goog-metageneration"] = "1"
    return result
  return wrapped


_WRAPPED = ("get", "download", "insert", "delete")


def _add_generations() -> dict:
  """Wraps the emulator's object handlers (in its routing table and its module); returns the originals."""
  originals = {name: getattr(objects, name) for name in _WRAPPED}
  wrapped = {fn: _generations(fn) for fn in originals.values()}
  for name, fn in originals.items():
    setattr(objects, name, wrapped[fn])  # get() calls download() through the module
  for _, methods in emulator.HANDLERS:
    for method, fn in methods.items():
      methods[method] = wrapped.get(fn, fn)
  return originals


def _restore(originals: dict) -> None:
  unwrap = {getattr(objects, name): fn for name, fn in originals.items()}
  for name, fn in originals.items():
    setattr(objects, name, fn)
  for _, methods in emulator.HANDLERS:
    for method, fn in methods.items():
      methods[method] = unwrap.get(fn, fn)
