"""What the jobs' command lines share: flag parsing and errors in one line, readable logs, main().

Imports nothing heavy, so that --help and flag errors stay instant: a job's module (`convirt_jax.jobs`)
is imported here, by name, once the flags are good.
"""
import importlib
import os
import sys
import traceback
from typing import Any, Callable

from absl import app
from absl import flags

from convirt_jax import logs

JOBS = ("pretrain", "transfer", "export")  # the modules of convirt_jax/jobs/, each with a run()


def job(name: str):
  """The job's module (`convirt_jax.jobs.<name>`), imported on use."""
  if name not in JOBS:
    raise ValueError(f"no job named {name!r}; the jobs are {JOBS}")
  return importlib.import_module(f"convirt_jax.jobs.{name}")


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


def run_job(argv: list[str], name: str, config_flag, workdir: str | None, *, configs_dir: str,
            workdir_prefix: str = "") -> None:
  """A config-driven job's main(): checks the config file, joins the job's other processes, then
  `job(name).run(config, workdir)`; a user error (config, data, checkpoints) ends with its one-line
  message and no traceback.

  Every job's command line comes through here, so jax.distributed starts before anything can touch a
  JAX backend. A multi-process job runs under `multihost.supervise` (see there why).
  `workdir` defaults to runs/<workdir_prefix><config file's name>.
  """
  config_name = _start(argv, config_flag, configs_dir)
  workdir = workdir or os.path.join("runs", f"{workdir_prefix}{config_name}")
  from convirt_jax import multihost  # pylint: disable=g-import-not-at-top  (no jax)
  config = config_flag.value
  multi_process = multihost.is_multi_process(config.distributed)
  if multi_process and not multihost.is_supervised():
    sys.exit(multihost.supervise())

  def checked_run():
    from convirt_jax import storage  # pylint: disable=g-import-not-at-top
    # Said before the job's heavy imports (the job checks again, for callers of its run()).
    storage.check(workdir, "--workdir")
    storage.check(config.data.get("tfds_dir", ""), "--config.data.tfds_dir")
    from convirt_jax import parallel  # pylint: disable=g-import-not-at-top
    parallel.initialize(config.distributed, job_config=config.to_dict())
    job(name).run(config, workdir)
    multihost.stop_watchdog()
  one_line_errors(checked_run, multi_process)


def run_command(argv: list[str], run: Callable[[Any], Any], config_flag, *, configs_dir: str) -> None:
  """main() of a command without a workdir (the plan): as `run_job`, then `run(config)`."""
  _start(argv, config_flag, configs_dir)
  one_line_errors(lambda: run(config_flag.value))


def run_tool(argv: list[str], name: str, **kwargs) -> None:
  """main() of a job without a config (the export): `job(name).run(**kwargs)`, errors in one line."""
  _check_arguments(argv)
  one_line_errors(lambda: job(name).run(**kwargs))


def _check_arguments(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.configure(verbose=flags.FLAGS["verbosity"].present)  # orbax's lines would bury the one that matters


def _start(argv: list[str], config_flag, configs_dir: str) -> str:
  """Checks the arguments and the config file; returns the config file's name."""
  _check_arguments(argv)
  config_file = flags.FLAGS[config_flag.name].config_filename
  if not os.path.isfile(config_file):
    sys.exit(f"error: --config={config_file}: no such file (the configs are in {configs_dir})")
  return os.path.splitext(os.path.basename(config_file))[0]


def one_line_errors(fn: Callable[[], Any], multi_process: bool = False) -> None:
  """Runs `fn`; a UserError (config, data, checkpoints...) ends the program with its one-line message.

  In a multi-process job the other processes are told first (`multihost.fail`), and any other error
  first lets the watchdog name a lost process (a collective fails when one is lost)."""
  from convirt_jax import multihost  # pylint: disable=g-import-not-at-top
  from convirt_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    fn()
  except UserError as e:
    if multi_process:
      multihost.fail(str(e))  # tells the other processes, exits at once
    sys.exit(f"error: {e}")
  except Exception as e:  # pylint: disable=broad-except
    if not multi_process:
      raise
    multihost.wait_for_watchdog()
    traceback.print_exc()  # else a bug: its traceback, and the other processes stop too
    multihost.fail(f"{type(e).__name__}: {e}")
