"""Pretrains ConVIRT, evaluates it and writes everything into the workdir (the job is `pretrain.run`).

  python -m convirt_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
  python -m convirt_jax.main --config=configs/mimic.py --workdir=runs/mimic --config.data.dir=/data/mimic

Any config value can be overridden with --config.KEY=VALUE. Running the same command again in the same
workdir resumes from the last checkpoint.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file; override values with --config.KEY=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and results (default: runs/<config name>).")
flags.mark_flags_as_required(["config"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line message instead of a traceback for a bad --config.KEY."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nSee --helpfull for the flags.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # config_flags raises these for an unknown key or a value of the wrong type.
    while e.args and isinstance(e.args[0], Exception):  # unwrap AttributeError(KeyError(message))
      e = e.args[0]
    detail = e.args[0] if e.args else e
    sys.exit(f"error: invalid --config override: {detail}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so that --help and flag errors are instant.
  from convirt_jax import pretrain  # pylint: disable=g-import-not-at-top
  from convirt_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # the progress bar and the results say what matters
  config_file = flags.FLAGS["config"].config_filename
  if not os.path.isfile(config_file):
    sys.exit(f"error: --config={config_file}: no such file (the configs are in configs/)")
  config_name = os.path.splitext(os.path.basename(config_file))[0]
  workdir = _WORKDIR.value or os.path.join("runs", config_name)
  try:
    import jax  # pylint: disable=g-import-not-at-top
    jax.devices()  # start the backend now: a missing GPU is one line, not a traceback from deep inside
  except (RuntimeError, AssertionError) as e:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    sys.exit(f"error: JAX could not start its {platforms or 'default'} backend ({type(e).__name__}: "
             f"{str(e).splitlines()[0] if str(e) else ''}). Is a GPU/TPU visible to this process? "
             "To run on the CPU, unset JAX_PLATFORMS (or set JAX_PLATFORMS=cpu).")
  try:
    pretrain.run(_CONFIG.value, workdir)
  except UserError as e:
    # A problem with the user's config, data or checkpoints: the message says what to do; no traceback.
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
