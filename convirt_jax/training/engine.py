"""The training engine both jobs run: one data-parallel update step and one training loop.

`make_update_step` turns a per-device gradient function into the jitted `train_step(state, batch)`:
the gradient runs under `jax.shard_map` over the mesh axis "data" (each job's function differentiates
its own loss there and sums the float32 gradient in one psum, `steps.summed_gradient`), then the
optimizer updates the replicated state. Pretraining (`steps.make_train_step`: the contrastive loss of
the ConVIRT model) and fine-tuning (`classifier_steps.make_finetune_step`: the classifier's loss) differ
only in that function.

`train` is the loop: steps, the learning rate of each step when the job gives one, summaries of the
metrics (a non-finite loss stops the job, nothing after the last good save saved), validation at
`eval_every` steps and at the end, keep-best (`Stopping`, lower is better) and the stopping rule,
checkpoints with the data iterator, and the SIGTERM stop (saved, then resumable exactly).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from convirt_jax import parallel
from convirt_jax.errors import TrainingDiverged
from convirt_jax.training import checkpoints
from convirt_jax.training import optimizer as optimizer_lib

Metrics = dict[str, jax.Array]
# (params, batch_stats, rng, step, batch shard) -> (gradient summed over the axis, batch_stats, metrics)
GradientFn = Callable[[Any, Any, jax.Array, jax.Array, dict], tuple[Any, Any, Metrics]]


def make_update_step(per_device: GradientFn, optimizer: optax.GradientTransformation, mesh: Mesh,
                     select: Callable[[dict], dict] = lambda batch: batch) -> Callable:
  """jit(train_step(state, batch) -> (state, metrics)); the replicated state is donated.

  `per_device` runs per device under shard_map (state replicated, `select(batch)` sharded over
  "data"). Metrics: the gradient function's (means over the global batch), grad_norm (before clipping)
  and lr."""
  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(), P(parallel.DATA_AXIS)),
                          out_specs=(P(), P(), P()))

  def train_step(state, batch):
    grads, batch_stats, metrics = sharded(state["params"], state["batch_stats"], state["rng"],
                                          state["step"], select(batch))
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new_state = dict(state, step=state["step"] + 1, params=optax.apply_updates(state["params"], updates),
                     batch_stats=batch_stats, opt_state=opt_state)
    return new_state, dict(metrics, grad_norm=optax.global_norm(grads),
                           lr=optimizer_lib.get_learning_rate(opt_state))

  replicated, data = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(train_step, in_shardings=(replicated, data), out_shardings=replicated,
                 donate_argnums=0)


@dataclasses.dataclass
class Stopping:
  """Keep-best and the stopping rule: stop after `patience` validations (0: never) without a value
  below the best. Lower is better; a validation without a value (no validation split) counts for
  nothing. The job saves or derives it with its checkpoints, so a resumed run decides as the
  uninterrupted one."""
  patience: int
  best: float | None = None
  best_step: int | None = None
  bad_evals: int = 0
  stopped: bool = False

  def update(self, step: int, value: float | None, last: bool) -> None:
    if value is None:
      return
    if self.best is None or value < self.best:
      self.best, self.best_step, self.bad_evals = float(value), int(step), 0
    else:
      self.bad_evals += 1
    if self.patience and self.bad_evals >= self.patience and not last:
      self.stopped = True


class Validation(NamedTuple):
  metrics: dict[str, float]       # written to the metric log
  value: float | None             # the keep-best value (lower is better), None without one
  shown: dict[str, str]           # shown on the progress bar


class Schedule(NamedTuple):
  steps: int                      # the run's planned steps
  log_every: int                  # summaries (and at every save)
  eval_every: int                 # validation (and at the last step)
  save_every: int                 # checkpoints (and at every validation, the last step and a stop)


def summarise(window: list[Metrics], prefix: str, diverged: Callable[[dict], str]) -> dict[str, float]:
  """Means over the window's steps, keys prefixed; a non-finite loss raises TrainingDiverged with
  `diverged(that step's metrics)`."""
  values = parallel.fetch(window)
  for metrics in values:
    if not np.isfinite(metrics["loss"]):
      raise TrainingDiverged(diverged(metrics))
  return {f"{prefix}{key}": float(np.mean([m[key] for m in values])) for key in values[0]}


def train(state: Any, step: int, train_step: Callable, batches: Iterator, *, schedule: Schedule,
          stopping: Stopping, manager, mesh: Mesh, inputs: Callable[[dict], dict],
          validate: Callable[[Any], tuple[Any, Validation]], best_metric: str,
          checkpoint_meta: Callable[[int], dict], host_copies: bool, prefix: str,
          diverged: Callable[[dict], str], logger=None, bar=None, preempted=None, log_offset: int = 0,
          learning_rates: np.ndarray | None = None,
          tag: Mapping[str, str] | None = None) -> tuple[Any, int, bool]:
  """Trains from `step` to schedule.steps or until `stopping` stops; returns (state, step, preempted).

  `inputs(batch)` selects what the step takes from a host batch; `validate(state) -> (state,
  Validation)` may adjust the state (a plateau schedule). `checkpoint_meta(step)` is saved with each
  checkpoint, the keep-best value under `best_metric`; `host_copies` saves host copies of the state
  (no per-device slicing of replicated arrays). The logger writes at `log_offset + step`, which the
  SIGTERM flag (`preempted`) reads too."""
  window, shown = [], dict(tag or {})
  while step < schedule.steps and not stopping.stopped:
    if learning_rates is not None:
      state["opt_state"] = optimizer_lib.set_learning_rate(state["opt_state"], learning_rates[step])
    state, metrics = train_step(state, parallel.shard_batch(inputs(next(batches)), mesh))
    step += 1
    window.append(metrics)
    if bar is not None:
      bar.update(1)
    last = step == schedule.steps
    stopping_now = preempted is not None and preempted.is_set(manager, log_offset + step)
    save_now = last or stopping_now or step % schedule.save_every == 0
    if window and (save_now or step % schedule.log_every == 0):
      summary = summarise(window, prefix, diverged)
      window = []
      _write(logger, log_offset + step, summary)
      shown.update(loss=f"{summary[prefix + 'loss']:.4f}", lr=f"{summary[prefix + 'lr']:.2e}")
      if bar is not None:
        bar.set_postfix(**shown)
    validation = Validation({}, None, {})
    if last or step % schedule.eval_every == 0:
      state, validation = validate(state)
      stopping.update(step, validation.value, last)
      if validation.metrics:
        _write(logger, log_offset + step, validation.metrics)
        if bar is not None:
          bar.set_postfix(**shown, **validation.shown)
          bar.line()
    if save_now or validation.metrics:
      checkpoints.save(manager, step, parallel.fetch(state) if host_copies else state,
                       data_iterator=batches, meta=checkpoint_meta(step),
                       metrics=None if validation.value is None else {best_metric: validation.value})
      if logger is not None:
        logger.flush()  # a gs:// workdir's metrics then cover every checkpointed step
    if stopping_now and not last:
      return state, step, True
  return state, step, False


def _write(logger, step: int, metrics: Mapping[str, float]) -> None:
  if logger is not None:
    logger.write(step, metrics)
