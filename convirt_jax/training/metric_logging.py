"""Where a run's numbers go: `metrics.jsonl` and TensorBoard event files in the workdir, and the progress
shown while a job runs (a bar on a terminal, plain timed lines in a log file).

Only the main process writes; the others get a logger that does nothing, so call sites need no checks.
A resumed run appends to the same files; rows past the resume step (logged after the last checkpoint of the
interrupted run) are dropped first, so every step appears once.

A remote (gs://) workdir cannot be appended to, and tensorboardX would rewrite its event file at every
flush: both files are written into a local temporary directory and uploaded whole (each file one object
write) by `flush` (the jobs call it after each checkpoint save, so the bucket's metrics cover every
checkpointed step), at most every SYNC_EVERY_S seconds while logging, and by `close`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping

import jax
import tqdm

from convirt_jax import storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
SYNC_EVERY_S = 60.0  # GCS allows about one write per second to one object: stay well below


class MetricLogger:

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self._workdir = workdir
    self._tb = None
    self._local = None  # remote workdirs: the local directory uploaded by flush()
    if not enabled:
      return
    directory = workdir
    if storage.is_remote(workdir):
      directory = self._local = tempfile.mkdtemp(prefix="convirt_metrics_")
      remote = os.path.join(workdir, METRICS_FILE)
      if storage.exists(remote):
        with open(os.path.join(directory, METRICS_FILE), "w") as f:
          f.write(storage.path(remote).read_text())
    else:
      os.makedirs(workdir, exist_ok=True)
    self._path = os.path.join(directory, METRICS_FILE)
    _truncate_after(self._path, resume_step)
    self._synced = time.monotonic()
    import tensorboardX  # pylint: disable=g-import-not-at-top  (only the main process needs it)
    self._tb = tensorboardX.SummaryWriter(os.path.join(directory, TENSORBOARD_DIR))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    with open(self._path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()
    if self._local is not None and time.monotonic() - self._synced >= SYNC_EVERY_S:
      self.flush()

  def flush(self) -> None:
    """Uploads metrics.jsonl and the event files of a remote workdir (a no-op for a local one)."""
    if self._local is None:
      return
    if self._tb is not None:
      self._tb.flush()
    storage.copy_tree(self._local, self._workdir)
    self._synced = time.monotonic()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._local is not None:
      self.flush()
      shutil.rmtree(self._local, ignore_errors=True)
      self._local = None


def read_metrics(metrics_jsonl_path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (one JSON object per line; blank lines skipped)."""
  records = []
  text = storage.path(metrics_jsonl_path).read_text()
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{metrics_jsonl_path}:{number}: not valid JSON ({e})") from e
    if not isinstance(record, dict) or "step" not in record:
      raise ValueError(f"{metrics_jsonl_path}:{number}: expected an object with a 'step' key")
    records.append(record)
  return records


class Progress:
  """A job's progress: a tqdm bar on a terminal; in a log file (stderr not a terminal, as under SLURM or
  `> run.log 2>&1`) one plain line every `every_seconds` and at each `line()` (the jobs call it after a
  validation), never a carriage return:

    train 120/1000 (12%)  loss 3.3217  lr 1.00e-03  2.31 steps/s  73.9 images/s  ETA 6m21s

  Rates are over the steps since the previous line. Quiet on non-main processes (`enabled=False`)."""

  def __init__(self, total: int, initial: int, enabled: bool, *, desc: str = "train",
               every_seconds: float = 60.0, batch_size: int = 0, stream=None):
    self.total, self.n, self.enabled, self.desc = total, initial, enabled, desc
    self.every_seconds, self.batch_size = every_seconds, batch_size
    self._stream = stream or sys.stderr
    self._fields: dict[str, str] = {}
    self._bar = None
    if enabled and _is_terminal(self._stream):
      self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                            smoothing=0.1, file=self._stream)
    self._last_time, self._last_n = time.monotonic(), initial

  def update(self, n: int = 1) -> None:
    self.n += n
    if self._bar is not None:
      self._bar.update(n)
    elif self.enabled and time.monotonic() - self._last_time >= self.every_seconds:
      self.line()

  def set_postfix(self, **fields: str) -> None:
    self._fields = dict(fields)
    if self._bar is not None:
      self._bar.set_postfix(**fields)

  def line(self) -> None:
    """Prints the progress line now (a log file only: a terminal's bar is always current)."""
    if not self.enabled or self._bar is not None:
      return
    now = time.monotonic()
    rate = (self.n - self._last_n) / max(now - self._last_time, 1e-9)
    parts = [f"{self.desc} {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"]
    parts += [f"{k} {v}" for k, v in self._fields.items()]
    parts.append(f"{rate:.3g} steps/s")
    if self.batch_size:
      parts.append(f"{rate * self.batch_size:.4g} images/s")
    if rate > 0 and self.n < self.total:
      parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
    print("  ".join(parts), file=self._stream, flush=True)
    self._last_time, self._last_n = now, self.n

  def write(self, message: str) -> None:
    """A message between progress updates (a terminal's bar is redrawn below it)."""
    if self._bar is not None:
      self._bar.write(message, file=self._stream)
    else:
      print(message, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    elif self.enabled and self.n > self._last_n:
      self.line()


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
  with open(path, "w") as f:
    f.writelines(rows)


def _to_python(value: Any) -> Any:
  if hasattr(value, "item") and getattr(value, "size", 1) == 1:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep the fact visible
  return value


def announce(message: str) -> None:
  """Prints a line for the user, once: on process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)


def jsonable(value: Any) -> Any:
  """`value` as JSON reads it back (tuples become lists, unknown objects strings): what a saved config
  is compared with."""
  return json.loads(json.dumps(value, default=str))

