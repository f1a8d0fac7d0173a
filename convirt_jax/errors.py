"""Errors that are the user's to fix (config, data, checkpoints, a diverged run).

The main job prints their message without a traceback; each message names the key, record or file.
"""


class UserError(Exception):
  """Base class: something in the user's config, data or workdir, not a bug in convirt_jax."""


class ConfigError(UserError, ValueError):
  """A configuration that cannot run."""


class DataError(UserError, ValueError):
  """Missing or malformed data: a file, a column, a record."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that is missing or does not fit the configured model."""


class TrainingDiverged(UserError, FloatingPointError):
  """The loss became NaN or inf; the last good checkpoint is kept."""



class WeightsNotFound(CheckpointError, FileNotFoundError):
  """Pretrained weights or a tokenizer that are not where the config says, or cannot be fetched."""


class WorkdirBusy(UserError, RuntimeError):
  """Another job holds the workdir's lock (`training/workdir_lock.py`); the message names it."""


class DiskFull(UserError, OSError):
  """No space left (ENOSPC) while writing a checkpoint; the checkpoints completed before are intact."""


class NothingToEvaluate(UserError, ValueError):
  """An evaluation the data cannot support (e.g. a label with one class in the test split): the
  evaluation is skipped and the reason reported; the run is never lost for it."""


class AcceleratorUnavailable(UserError, RuntimeError):
  """The platform asked for (JAX_PLATFORMS) has no usable device on this machine."""


class CompileFailed(UserError, RuntimeError):
  """An accelerator's compiler refused a program the plan compiles for it (named with what to try)."""
