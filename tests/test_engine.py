"""The engine's keep-best and stopping rule (`engine.Stopping`), checked against the pretraining job's rule
counted from steps (`pretrain._stop_early`) and against the state a resumed run rebuilds from its
checkpoints' metrics (`pretrain._stopping`), also between evaluations."""
import numpy as np
import pytest

from convirt_jax import config as config_lib
from convirt_jax.jobs import pretrain
from convirt_jax.training import engine

EVERY = 100


class _Checkpoints:
  """What `pretrain._stopping` reads of a checkpoint manager: the kept steps and their metrics."""

  def __init__(self, metrics):
    self._metrics = dict(metrics)

  def all_steps(self):
    return sorted(self._metrics)

  def metrics(self, step):
    return self._metrics[step]


def _config(patience):
  config = config_lib.base_config()
  config.eval.every_steps, config.train.stop_patience = EVERY, patience
  return config


def test_stopping_keeps_the_lowest_value_and_stops_after_patience_validations_without_it():
  stopping = engine.Stopping(patience=2)
  for step, value in ((100, 3.0), (200, 2.5), (300, 2.5), (400, None)):  # equal is no improvement
    stopping.update(step, value, last=False)
  assert (stopping.best, stopping.best_step, stopping.bad_evals, stopping.stopped) == (2.5, 200, 1, False)
  stopping.update(500, 2.6, last=False)
  assert stopping.stopped and stopping.best_step == 200
  last = engine.Stopping(patience=1)
  last.update(100, 1.0, last=False)
  last.update(200, 2.0, last=True)  # the last step ends the run anyway: not "stopped early"
  assert not last.stopped and last.bad_evals == 1


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("patience", [0, 1, 3])
def test_the_engine_decides_as_the_step_counted_rule_and_a_resumed_run_decides_the_same(seed, patience):
  losses = np.random.default_rng(seed).uniform(1.0, 2.0, 12)
  config = _config(patience)
  running, saved = engine.Stopping(patience), {}
  for i, loss in enumerate(losses):
    step = (i + 1) * EVERY
    running.update(step, float(loss), last=False)
    saved[step] = {"val/loss": float(loss)}
    assert running.stopped == pretrain._stop_early(config, step, running.best_step)  # pylint: disable=protected-access
    # A run resumed at this step, or between this evaluation and the next, rebuilds the same state.
    for resumed_at in (step, step + EVERY // 2):
      rebuilt = pretrain._stopping(_Checkpoints(saved), config, resumed_at)  # pylint: disable=protected-access
      assert (rebuilt.best, rebuilt.best_step, rebuilt.bad_evals, rebuilt.stopped) == (
          running.best, running.best_step, running.bad_evals, running.stopped)
    if running.stopped:
      break
