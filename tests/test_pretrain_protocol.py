"""The pretraining protocol's rules that are pure arithmetic or config checks: the stopping rule, the unit."""
import pytest

from convirt_jax import config as config_lib
from convirt_jax.jobs import pretrain
from convirt_jax.errors import ConfigError


def _config(**train):
  config = config_lib.base_config()
  config.eval.every_steps = 100
  for key, value in train.items():
    config.train[key] = value
  return config


@pytest.mark.parametrize("step, best_step, stop", [
    (100, None, False),  # no validation metric yet
    (300, 100, False),   # 2 evaluations since the best
    (400, 100, True),    # 3
    (450, 100, True),    # a resumed run between evaluations: still 3
    (400, 400, False),   # a new best
])
def test_stop_early_after_patience_evaluations_without_a_new_best(step, best_step, stop):
  assert pretrain._stop_early(_config(stop_patience=3), step, best_step) is stop  # pylint: disable=protected-access
  assert pretrain._stop_early(_config(stop_patience=0), step, best_step) is False  # pylint: disable=protected-access


def test_the_study_unit_and_the_stopping_rule_are_checked_before_anything_runs():
  config = _config()
  config.data.unit = "study"
  with pytest.raises(ConfigError, match=r"data.unit='study' needs a data set of studies \(mimic_cxr\)"):
    config_lib.validate(config)
  config.data.name, config.data.dir = "mimic_cxr", "/data/mimic"
  config_lib.validate(config)
  config.data.unit = "report"
  with pytest.raises(ConfigError, match="config.data.unit"):
    config_lib.validate(config)
  with pytest.raises(ConfigError, match="config.train.stop_patience=-1"):
    config_lib.validate(_config(stop_patience=-1))


def test_a_run_stops_early_evaluates_its_best_step_and_stays_stopped(tmp_path, tiny_tfds_dir, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import tiny_config  # pylint: disable=g-import-not-at-top
  from convirt_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  losses = {1: 3.0, 2: 2.0, 3: 2.5, 4: 2.5, 5: 1.0, 6: 1.0}  # the best is step 2: stop at 4, before 5
  def fake_validation(eval_step, state, *args, **kwargs):
    return {"val/loss": losses[int(jax.device_get(state["step"]))]}
  monkeypatch.setattr(pretrain, "validation_loss", fake_validation)
  config = tiny_config.tiny(tiny_tfds_dir, train__stop_patience=2, eval__every_steps=1,
                            checkpoint__every_steps=1, checkpoint__keep=1, eval__random_init_baseline=False)
  config.evals = ml_collections.ConfigDict()  # the stopping rule only: no downstream evaluation
  workdir = str(tmp_path / "run")
  results = pretrain.run(config, workdir)
  assert results["run"]["evaluated_step"] == 2
  assert checkpoints.make_manager(workdir, read_only=True).latest_step() == 4
  # The same command again: the run is over (a rerun resumes at step 4 and does not train on).
  assert pretrain.run(config, workdir)["run"]["evaluated_step"] == 2
  assert checkpoints.make_manager(workdir, read_only=True).latest_step() == 4
