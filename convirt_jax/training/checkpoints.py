"""Orbax checkpoints of a run: train state, data-iterator state and run metadata, saved together.

One `CheckpointManager` in `<workdir>/checkpoints` keeps the last `keep` steps and, in addition, the step
with the best validation metric (an orbax preservation policy, so neither evicts the other). Saves are
asynchronous: training continues while the arrays are written, and a save interrupted by kill -9 is an
unfinished temporary directory that orbax ignores, so the last complete checkpoint is never lost.

Faults: a complete step that no longer reads back (a truncated or missing file) is named and skipped by
`restore_newest`, which resumes from the next older step and moves the bad one to
<workdir>/unreadable_checkpoints/; when no step reads back it stops with a CheckpointError naming them,
never starting from scratch. A full disk while saving is a one-line DiskFull naming the workdir; the
steps completed before it stay intact.

On GCS (gs:// workdirs) there is no atomic rename: orbax writes a step in place and marks it complete
with a commit_success.txt object written last (a step without it is ignored and cleaned up), and deletes
the steps it drops object by object (it does not use DELETING_DIR there). A kill in the middle of such
a deletion can leave a step that looks complete but does not read back: `restore_newest` then names it,
skips it and sets it aside (a copy and delete per object, which a kill may leave half done: what stays
behind in checkpoints/ is still skipped as unreadable), so resuming stays correct there too.

Items of one step:
  state  the train-state pytree (StandardSave; restored into the shapes and shardings of a fresh state)
  data   the grain iterator (one small JSON file per process)
  meta   JSON: the config and the step
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import threading
from typing import Any, Callable

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from convirt_jax import storage
from convirt_jax.errors import CheckpointError, DiskFull

STATE, DATA, META = "state", "data", "meta"
# Beside the checkpoints, written once per run: what rebuilds the model without the original files.
TEXT_CONFIG_FILE = "text_config.json"   # the BertConfig (HF config.json format)
TOKENIZER_DIR = "tokenizer"             # the tokenizer's files
UNREADABLE_DIR = "unreadable_checkpoints"  # beside checkpoints/: complete steps that did not read back
# Inside checkpoints/: steps the keep policy dropped are renamed here (one atomic step), then emptied.
# orbax's own deletion removes a step's files one by one, so a kill -9 in the middle left a step
# directory that still looked complete but was not.
DELETING_DIR = "deleting"


def checkpoint_dir(workdir: str) -> str:
  return os.fspath(storage.path(workdir) / "checkpoints")


def _one_replica_writes_on_cpu() -> None:
  """On CPU, orbax's replica-parallel saving (each replica writes a slice of a replicated array) only adds
  work: every "device" is the same host memory, and slicing compiles a program per array shape (measured
  with 300 arrays on 8 CPU devices: the first save 62 s, with one replica writing 0.4 s). Accelerators
  keep orbax's default, where the replicas' hosts share the writing. The files are the same either way."""
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def make_manager(workdir: str, *, keep: int = 3, best_metric: str = "val/loss",
                 read_only: bool = False) -> ocp.CheckpointManager:
  _one_replica_writes_on_cpu()

  def metric(metrics):  # lower is better; a step saved without it never counts as the best
    return metrics.get(best_metric, math.inf)

  policies = [checkpoint_managers.LatestN(n=keep),
              checkpoint_managers.BestN(get_metric_fn=metric, reverse=True, n=1)]
  options = ocp.CheckpointManagerOptions(
      best_fn=metric, best_mode="min",  # makes orbax store each step's metrics
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=not read_only, read_only=read_only, create=not read_only,
      cleanup_tmp_directories=not read_only, todelete_subdir=None if read_only else DELETING_DIR)
  manager = _Manager(checkpoint_dir(workdir), options=options, item_names=(STATE, DATA, META))
  manager.writable = not read_only
  manager.empty_deleted(wait=True)  # what a killed run was deleting
  return manager


class _Manager(ocp.CheckpointManager):
  """orbax's manager, except that a full disk while saving is a one-line DiskFull naming the workdir.

  An async save fails in orbax's background thread; the error comes out of the next save,
  wait_until_finished or close, which are the calls translated here. Also empties DELETING_DIR, where
  orbax moves the steps it drops, in a background thread after each save and at open and close.
  """
  writable = False
  _emptier = None

  def save(self, step, *args, **kwargs):
    with self._disk_full_is_a_user_error():
      saved = super().save(step, *args, **kwargs)
    self.empty_deleted()
    return saved

  def wait_until_finished(self):
    with self._disk_full_is_a_user_error():
      return super().wait_until_finished()

  def close(self):
    with self._disk_full_is_a_user_error():
      super().close()
    self.empty_deleted(wait=True)

  def empty_deleted(self, wait: bool = False) -> None:
    """Deletes what is in DELETING_DIR (process 0 of a writer): whole steps, renamed there at once,
    so a kill while deleting leaves no half-deleted step among the checkpoints."""
    if not self.writable or jax.process_index() != 0 or storage.is_remote(self.directory):
      return  # on GCS orbax deletes in place, nothing is moved into DELETING_DIR
    directory = os.path.join(os.fspath(self.directory), DELETING_DIR)
    if wait:
      if self._emptier is not None:
        self._emptier.join()
      _empty(directory)
    elif self._emptier is None or not self._emptier.is_alive():
      self._emptier = threading.Thread(target=_empty, args=(directory,), daemon=True,
                                       name="empty_deleted_checkpoints")
      self._emptier.start()

  @contextlib.contextmanager
  def _disk_full_is_a_user_error(self):
    try:
      yield
    except DiskFull:
      raise
    except Exception as e:  # pylint: disable=broad-except
      failed = _disk_full(e)
      if failed is None:
        raise
      directory = os.fspath(self.directory)
      steps = _complete_steps_on_disk(directory)
      match = re.search(r"/(\d+)\.orbax-checkpoint-tmp", failed)
      raise DiskFull(
          f"no space left on the device of workdir {os.path.dirname(directory)} (ENOSPC) while saving "
          f"checkpoint {'step ' + match[1] if match else 'a step'}: "
          + (f"the complete checkpoints (steps {', '.join(map(str, steps))}) are intact. " if steps
             else "no checkpoint was complete yet. ")
          + "Free space there (or use another --workdir), then run the same command to resume") from e


def _disk_full(error: BaseException) -> str | None:
  """The file (or "") of an ENOSPC in `error`, its causes or its group; None if there is none."""
  todo, seen = [error], set()
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return str(e.filename or "")
    if "No space left on device" in str(e):  # tensorstore's errors carry only the text
      return str(e)
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return None


def _empty(directory: str) -> None:
  try:
    entries = list(storage.path(directory).iterdir())
  except FileNotFoundError:
    return
  for entry in entries:  # entries only: orbax may be renaming another step in right now
    storage.rmtree(entry)


def _complete_steps_on_disk(directory: str) -> list[int]:
  try:
    return sorted(int(p.name) for p in storage.path(directory).iterdir() if p.name.isdigit())
  except OSError:
    return []


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, data_iterator=None,
         meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
  """Starts an async save of one step (a no-op if that step is already saved)."""
  if step in manager.all_steps():
    return
  items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics or {}, force=True)


def best_step(manager: ocp.CheckpointManager, metric: str) -> int | None:
  """The kept step with the lowest `metric`, or None when no kept step has it."""
  scored = []
  for step in manager.all_steps():
    metrics = manager.metrics(step) or {}
    if metric in metrics:
      scored.append((metrics[metric], step))
  return min(scored)[1] if scored else None


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, *,
            data_iterator=None) -> tuple[Any, dict[str, Any]]:
  """Restores `state` (into the shapes/shardings of `abstract_state`), the data iterator in place, meta."""
  try:
    return _restore_step(manager, step, abstract_state, data_iterator)
  except (ValueError, KeyError, TypeError) as e:
    raise _does_not_fit(manager, step, e) from e


def _restore_step(manager, step: int, abstract_state: Any, data_iterator) -> tuple[Any, dict[str, Any]]:
  items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE], restored[META]


def _does_not_fit(manager, step: int, error: BaseException) -> CheckpointError:
  return CheckpointError(
      f"the checkpoint at step {step} in {manager.directory} does not fit this model/config "
      f"(was it written with another config?): {_one_line(error)}")


# orbax's words for a checkpoint that reads back but holds other arrays than the model's: that is the
# config, not a damaged step, and an older step of the same run would not fit either.
_MISFIT = ("tree structures do not match", "is not compatible with the stored shape")


def restore_newest(manager: ocp.CheckpointManager, abstract_state: Any, *, data_iterator=None,
                   announce: Callable[[str], None] = print) -> tuple[int, Any, dict[str, Any]]:
  """(step, state, meta) of the newest step that reads back, as `restore` gives them.

  A step that does not (a truncated or missing file) is announced as "checkpoint step N in DIR is
  unreadable (reason): skipping it" and the next older step is tried. Once one restores, a writable
  manager (`make_manager` without read_only) moves the skipped steps to <workdir>/unreadable_checkpoints/
  so that the resumed run saves those steps anew. With several processes a step counts as read only
  if every process read it; that covers damage every process sees (the shared array and meta files).
  Damage only some processes see (one process's data-iterator file) desynchronises orbax's own
  collectives: the job then stops with a collective error rather than skipping the step.

  Raises:
    CheckpointError: no step at all; no step reads back (each named with its reason: a run with
      checkpoints never silently starts from scratch); or at once, a step whose arrays do not fit
      `abstract_state` (another model/config).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"no checkpoint in {manager.directory}")
  skipped = []
  for step in steps:
    error = None
    try:
      state, meta = _restore_step(manager, step, abstract_state, data_iterator)
    except Exception as e:  # pylint: disable=broad-except  (tensorstore, JSON, missing items, ...)
      if any(words in str(e) for words in _MISFIT):
        raise _does_not_fit(manager, step, e) from e
      error = e
    if _on_every_process(error is None):
      if skipped:
        _set_aside(manager, [s for s, _ in skipped], announce)
      return step, state, meta
    reason = _one_line(error) if error is not None else "another process could not read it"
    announce(f"checkpoint step {step} in {manager.directory} is unreadable ({reason}): skipping it")
    skipped.append((step, reason))
  raise _none_readable(manager, skipped)


def newest_meta(manager: ocp.CheckpointManager) -> tuple[int | None, dict[str, Any] | None]:
  """(step, meta) of the newest step whose meta reads back, or (None, None) when there is no step.

  Quiet about the steps it passes over (`restore_newest` names them when it restores); raises
  CheckpointError naming every step when there are steps and none of their metas reads back.
  """
  failed = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return step, restore_meta(manager, step)
    except Exception as e:  # pylint: disable=broad-except
      failed.append((step, _one_line(e)))
  if failed:
    raise _none_readable(manager, failed)
  return None, None


def _none_readable(manager, failed: list[tuple[int, str]]) -> CheckpointError:
  listed = "; ".join(f"step {step}: {reason}" for step, reason in failed)
  return CheckpointError(
      f"none of the checkpoints in {manager.directory} can be read ({listed}). Nothing was trained over "
      f"them: move them out of {manager.directory} to start from scratch, or use another --workdir")


def _set_aside(manager, steps: list[int], announce: Callable[[str], None]) -> None:
  """Moves the (complete but unreadable) `steps` out of the manager's directory (process 0)."""
  if not getattr(manager, "writable", False):
    return
  directory = storage.path(manager.directory)
  aside = directory.parent / UNREADABLE_DIR
  if jax.process_index() == 0:
    storage.makedirs(aside)
    for step in steps:
      source, target, n = directory / str(step), aside / str(step), 1
      while target.exists():
        target, n = aside / f"{step}.{n}", n + 1
      if source.is_dir():
        _move(source, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("convirt_jax: unreadable checkpoints set aside")
  manager.reload()
  announce(f"moved the unreadable checkpoint step(s) {', '.join(map(str, steps))} to {aside}")


def _move(source, target) -> None:
  """A rename on a local disk; on GCS a copy and delete of each object (see the module docstring)."""
  if storage.is_remote(source):
    storage.copy_tree(source, target)
    storage.rmtree(source)
  else:
    source.rename(target)


def _on_every_process(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  first = text[0] if text else ""
  if len(first) > 200:
    first = first[:200] + "..."
  return f"{type(error).__name__}: {first}" if first else type(error).__name__


def chosen_step(workdir: str, which: str | int) -> tuple[int, dict[str, Any]]:
  """(step, meta) of the checkpoint of `workdir` that `which` names (see `resolve_step`), read-only."""
  manager = make_manager(workdir, read_only=True)
  try:
    step = resolve_step(manager, which)
    return step, restore_meta(manager, step)
  finally:
    manager.close()


def resolve_step(manager: ocp.CheckpointManager, which: str | int) -> int:
  """The step that `which` names: "best" (lowest validation metric; the latest step, with a warning,
  when no kept step has one), "latest" / "last", or a step number (int or digits)."""
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint in {manager.directory}: train first with "
                          "python -m convirt_jax.main --config=... --workdir=...")
  name = str(which).strip().lower()
  if name in ("latest", "last"):
    return manager.latest_step()
  if name == "best":
    metric = restore_meta(manager, manager.latest_step())["config"]["checkpoint"]["keep_best_metric"]
    step = best_step(manager, metric)
    if step is None:
      logging.warning("no checkpoint in %s has %s (no validation split?): using the latest, step %d",
                      manager.directory, metric, manager.latest_step())
      return manager.latest_step()
    return step
  if name.isdigit():
    if int(name) not in steps:
      raise CheckpointError(f"no checkpoint at step {name} in {manager.directory}; it has steps {steps}")
    return int(name)
  raise CheckpointError(f"checkpoint {which!r}: use 'best', 'latest' (or 'last') or a step number "
                        f"({steps} in {manager.directory})")


def restore_variables(workdir: str, step: int) -> dict[str, Any]:
  """{"params", "batch_stats"} of a step, onto the default device, read without an optimizer template.

  The shapes come from the checkpoint's own metadata and only those two subtrees are read, so loading
  a model for inference or export depends neither on the optimizer settings nor on their state's size.
  """
  reader = ocp.CheckpointManager(
      checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()})
  try:
    tree = reader.item_metadata(step)[STATE]
    tree = getattr(tree, "tree", tree)
    missing = [k for k in ("params", "batch_stats") if k not in tree]
    if missing:
      raise CheckpointError(f"the checkpoint at step {step} in {reader.directory} has no {missing}: "
                            "it was not written by convirt_jax")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # every process its own copy
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            {"params": tree["params"], "batch_stats": tree["batch_stats"]})
    args = ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)})
    return reader.restore(step, args=args)[STATE]
  finally:
    reader.close()


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding description of a pytree of arrays, for restoring without holding two copies."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
