"""Preemption: SIGTERM (a Cloud TPU / SLURM notice) sets a flag that the training loops check each step,
so they save and exit cleanly; with several processes orbax agrees on the step to stop at."""
import signal
import threading

import jax


class SigtermFlag:
  """Set by SIGTERM (preemption) while a job trains; with several processes orbax agrees on the step to
  stop at. `restore()` gives SIGTERM back its previous handler.

  With several processes, SIGTERM is left to the handler of jax.distributed's preemption sync manager,
  which tells the other processes; a Python handler here would replace it, and a notice to one host
  would then stop no one.
  """

  def __init__(self):
    self._set = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handler(self, signum, frame):
    del signum, frame
    self._set = True

  def is_set(self, manager, step: int) -> bool:
    """Whether to save and stop after `step`, which must grow from call to call across the whole job
    (every process makes the same calls: the processes agree on the first step past the notice)."""
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return self._set
