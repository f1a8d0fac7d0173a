"""Pretrains ConVIRT, evaluates it and writes everything into the workdir (the job is
`convirt_jax.jobs.pretrain.run`).

  python -m convirt_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
  python -m convirt_jax.main --config=configs/mimic.py --workdir=runs/mimic --config.data.dir=/data/mimic

Any config value can be overridden with --config.KEY=VALUE. Running the same command again in the same
workdir resumes from the last checkpoint.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from convirt_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file; override values with --config.KEY=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and results (default: runs/<config name>).")
flags.mark_flags_as_required(["config"])


def main(argv):
  cli.run_job(argv, "pretrain", _CONFIG, _WORKDIR.value, configs_dir="configs/")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
