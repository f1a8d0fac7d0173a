"""How a job's log reads in a file: the project's own lines, plainly; other libraries' chatter silenced at
its source.

- The project's warnings (absl logging) print as `warning: message`, without absl's developer prefix
  (`W1201 12:00:00.123456 4242 datasets.py:129] `); on processes other than 0 of a multi-process job every
  such line starts with `process N: ` (`set_process`), so a pod's merged log says who spoke.
- Below ERROR, records logged from orbax's and TensorFlow Datasets' modules are dropped (by the module
  that logs them, never by their text): orbax warns at every read-only restore about items not asked
  for, TFDS at every load about the builder's "custom data configuration" (with its whole parameter
  dump); the project says itself what it built or reused (`data/datasets.py`).
- Not reached: the CUDA plugin, where installed beside a CPU jax, logs "Could not find cuda drivers" at
  every start from its own statically linked C++ absl (neither TF_CPP_MIN_LOG_LEVEL nor
  JAX_LOGGING_LEVEL silences it); give the plan's compilers an environment of their own.
`--verbosity=0` or higher (absl's flag) keeps every record and absl's own format, for debugging.
"""
import logging as std_logging
import os

from absl import logging

_QUIET_SOURCES = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "tensorflow_datasets"))


def quiet_third_party(record: std_logging.LogRecord) -> bool:
  """A logging filter: False for a record below ERROR logged by orbax's or TFDS's own modules."""
  return record.levelno >= std_logging.ERROR or not any(s in record.pathname for s in _QUIET_SOURCES)


class _Plain(std_logging.Formatter):
  prefix = ""

  def format(self, record: std_logging.LogRecord) -> str:
    text = f"{self.prefix}{record.levelname.lower()}: {record.getMessage()}"
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return text


_PLAIN = _Plain()


def configure(verbose: bool) -> None:
  """The jobs' logging, set once at start-up by the command lines."""
  if verbose:
    return
  logging.set_verbosity(logging.WARNING)  # the progress lines and the results say what matters
  handler = logging.get_absl_handler()
  handler.addFilter(quiet_third_party)
  handler.setFormatter(_PLAIN)


def set_process(index: int, count: int) -> None:
  """Prefixes this process's warnings and errors with its index, on processes other than 0."""
  _PLAIN.prefix = f"process {index}: " if count > 1 and index > 0 else ""
