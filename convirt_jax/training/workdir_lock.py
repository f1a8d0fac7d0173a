"""One job at a time per workdir: an exclusive `flock` on <workdir>/.lock, held while the job runs.

The kernel drops an flock when the process holding it ends, however it ends (kill -9, OOM kill, a
crashed host's NFS lease expiring), so a dead job never leaves the workdir locked: there is no stale
lock to delete by hand. The file itself stays and is reused; the holder writes its host, pid and start
time into it, so a second job can say which job it found. On a file system that has no flock (some FUSE
mounts), the lock is skipped with a warning: nothing stops two jobs there.

A gs:// workdir has no lock either, with a one-line warning: GCS has no flock, and a lock object
could not tell a live job from a killed one (it would stay behind after kill -9, which is how a
preempted TPU VM ends, and block the resume until deleted by hand). Start one job per gs:// workdir.

  with WorkdirLock(workdir):   # WorkdirBusy when another job holds it
    ...

Several processes of one job: only process 0 takes it (`enabled=False` on the others).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging

from convirt_jax import storage
from convirt_jax.errors import WorkdirBusy

LOCK_FILE = ".lock"


class WorkdirLock:
  """Context manager holding the lock of `workdir` (which must exist)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self.enabled = enabled
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock, or raises WorkdirBusy naming the job that holds it."""
    if not self.enabled or self._fd is not None:
      return self
    if storage.is_remote(self.workdir):
      logging.warning("%s is on GCS, which has no file locks: nothing stops a second job in the same "
                      "workdir", self.workdir)
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _describe_holder(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirBusy(
            f"{self.workdir} is in use by another job ({holder}; lock file {self.path}): wait for it "
            "to end or stop it, or use another --workdir") from None
      logging.warning("cannot lock %s (%s): this file system has no flock, so nothing stops a second "
                      "job in the same workdir", self.path, e)
      return self
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)  # the file stays: unlinking it would let two jobs lock two different files

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()


def holder_info() -> dict[str, object]:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _describe_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "host, pid and start time not written yet"
