"""Transfers image encoders to a labelled data set: linear, fine-tuning and zero-shot protocols (the job is
`run`), and writes results.json / results.md (the paper's Table 1 shape) and transfer_curves.png.

  python -m convirt_jax.transfer --config=configs/transfer/synthetic.py --workdir=runs/transfer_synthetic

Any config value can be overridden with --config.KEY=VALUE (see convirt_jax/transfer_config.py). Running
the same command again in the same workdir skips what is finished and resumes an interrupted fine-tuning
run from its last checkpoint. The job itself is `convirt_jax.jobs.transfer.run` (imported on use, so
that --help and flag errors are instant); the encoders are loaded by `jobs.transfer_encoders`.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from convirt_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/transfer/*.py file; override values with --config.KEY=VALUE.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the results, fine-tuning checkpoints and "
                               "metrics (default: runs/transfer_<config name>).")
flags.mark_flags_as_required(["config"])


def main(argv):
  cli.run_job(argv, "transfer", _CONFIG, _WORKDIR.value, configs_dir="configs/transfer/",
              workdir_prefix="transfer_")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
