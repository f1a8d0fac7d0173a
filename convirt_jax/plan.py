"""Compiles a job's train step for TPUs and GPUs without one, and prints what their compilers say.

  python -m convirt_jax.plan --config=configs/mimic.py --target=v5e-16 --target=h100x8
  python -m convirt_jax.plan --config=configs/transfer/chexpert.py --job=transfer --target=v5e-4
  python -m convirt_jax.plan --config=configs/mimic.py --target=h100x8 --rows_per_chip=32,256 \
      --max_batch --json=plan.json

Per target and chip: memory (state, batch shard, temporaries, outputs) against the chip's, FLOPs and
bytes, the roofline lower bound of the step time, the collectives, the input cores needed, and with
--max_batch the largest per-chip batch that fits (plain / remat / micro-batched). Any config value can
be overridden with --config.KEY=VALUE, as in the jobs. Needs requirements-plan.txt (libtpu, the CUDA
plugin); runs on the CPU, reads no data and opens no network connection. The job is `planning.job.run`.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from convirt_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py (or configs/transfer/*.py with --job=transfer) file; override values "
    "with --config.KEY=VALUE.", lock_config=True)
_TARGETS = flags.DEFINE_multi_string("target", [], "A target, e.g. v5e-16, v4-32, h100x8 (repeat the flag "
                                     "for several); a bad name lists them all.")
_JOB = flags.DEFINE_enum("job", "pretrain", ["pretrain", "transfer"], "Whose train step to plan.")
_ROWS = flags.DEFINE_list("rows_per_chip", [], "Plan these per-chip batches (train.batch_size = rows x "
                          "chips of each target) instead of the config's batch.")
_MAX_BATCH = flags.DEFINE_bool("max_batch", False, "Also find the largest power-of-two batch per chip "
                               "that fits, by compiling, for plain / remat / micro-batched steps.")
_JSON = flags.DEFINE_string("json", "", "Also write the report as JSON to this file.")
_INPUT_SECONDS = flags.DEFINE_float("input_seconds", 3.0, "Seconds to time the input pipeline (0: skip).")
flags.mark_flags_as_required(["config"])


def run(config) -> dict:
  # Before jax is imported: the CPU as this process's backend, no metadata server (planning.devices).
  from convirt_jax.planning import devices  # pylint: disable=g-import-not-at-top
  devices.prepare_environment()
  devices.start_jax()
  from convirt_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from convirt_jax.planning import job  # pylint: disable=g-import-not-at-top
  try:
    rows = [int(r) for r in _ROWS.value]
  except ValueError:
    raise ConfigError(f"--rows_per_chip={','.join(_ROWS.value)}: give positive integers") from None
  if any(r < 1 for r in rows):
    raise ConfigError(f"--rows_per_chip={','.join(_ROWS.value)}: give positive integers")
  report = job.run(config, _JOB.value, _TARGETS.value, rows_per_chip=rows, max_batch=_MAX_BATCH.value,
                   measure_input=_INPUT_SECONDS.value > 0, input_seconds=_INPUT_SECONDS.value,
                   log=lambda line: print(line, flush=True))
  print(job.format_table(report))
  if _JSON.value:
    job.write_json(report, _JSON.value)
  return report


def main(argv):
  configs_dir = "configs/transfer/" if _JOB.value == "transfer" else "configs/"
  cli.run_command(argv, run, _CONFIG, configs_dir=configs_dir)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
