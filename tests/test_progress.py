"""Progress as a cluster user reads it: plain timed lines in a log file, a bar on a terminal."""
import fcntl
import io
import os
import pty
import struct
import termios

from convirt_jax.training import metric_logging


class FakeClock:

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_a_log_file_gets_one_plain_line_per_interval_and_per_validation(monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(metric_logging.time, "monotonic", clock)
  out = io.StringIO()
  progress = metric_logging.Progress(1000, 100, True, every_seconds=60, batch_size=32, stream=out)
  progress.set_postfix(loss="3.3217", lr="1.00e-03")
  for _ in range(300):  # 300 steps at 0.5 s each: 150 s, so two intervals of 60 s
    clock.now += 0.5
    progress.update(1)
  progress.line()  # a validation
  for _ in range(10):
    clock.now += 0.5
    progress.update(1)
  progress.close()
  text = out.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  assert len(lines) == 2 + 1 + 1, lines  # two intervals, the validation, the close
  assert lines[0] == ("train 220/1000 (22%)  loss 3.3217  lr 1.00e-03  2 steps/s  64 images/s  "
                      "ETA 6m30s"), lines[0]
  assert lines[2].startswith("train 400/1000 (40%)"), lines
  assert lines[3].startswith("train 410/1000 (41%)") and lines[3].endswith("ETA 4m55s"), lines


def test_no_line_from_other_processes_and_none_at_close_without_new_steps(monkeypatch):
  out = io.StringIO()
  quiet = metric_logging.Progress(10, 0, False, stream=out)
  quiet.update(5)
  quiet.line()
  quiet.close()
  progress = metric_logging.Progress(10, 10, True, stream=out)
  progress.close()
  assert out.getvalue() == ""


def test_a_terminal_gets_the_bar():
  main, secondary = pty.openpty()
  fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
  with os.fdopen(secondary, "w") as tty:
    progress = metric_logging.Progress(4, 0, True, stream=tty)
    for _ in range(4):
      progress.update(1)
    progress.line()  # a terminal's bar is current: no extra line
    progress.close()
  chunks = []
  while True:  # everything written, until the closed terminal reads as ended (EIO)
    try:
      chunk = os.read(main, 65536)
    except OSError:
      break
    if not chunk:
      break
    chunks.append(chunk)
  os.close(main)
  text = b"".join(chunks).decode()
  assert "\r" in text and "4/4" in text and "step/s" in text, text
  assert "steps/s" not in text  # not the plain line


def test_durations_read_as_a_person_writes_them():
  assert metric_logging._duration(42) == "42s"
  assert metric_logging._duration(390) == "6m30s"
  assert metric_logging._duration(3 * 86400 + 3700) == "73h01m"


def test_the_projects_warnings_read_plainly_and_other_processes_say_who_they_are():
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from convirt_jax import logs  # pylint: disable=g-import-not-at-top
  handler = logging.get_absl_handler()
  formatter, filters, verbosity = handler.python_handler.formatter, list(handler.filters), logging.get_verbosity()
  try:
    logs.configure(verbose=False)
    record = lambda path, level=std_logging.WARNING: std_logging.LogRecord(
        "absl", level, path, 12, "cannot lock %s", ("/data",), None)
    ours = record("/x/convirt_jax/data/datasets.py")
    assert handler.format(ours) == "warning: cannot lock /data"
    logs.set_process(1, 2)
    assert handler.format(ours) == "process 1: warning: cannot lock /data"
    logs.set_process(0, 2)
    assert handler.format(ours) == "warning: cannot lock /data"
    # Other libraries' records below ERROR are dropped by the module that logs them; errors stay.
    assert handler.filter(ours)
    assert not handler.filter(record("/x/tensorflow_datasets/core/dataset_builder.py"))
    assert not handler.filter(record("/x/orbax/checkpoint/checkpoint_manager.py", std_logging.INFO))
    assert handler.filter(record("/x/orbax/checkpoint/checkpoint_manager.py", std_logging.ERROR))
  finally:
    logs.set_process(0, 1)
    handler.setFormatter(formatter)
    for f in list(handler.filters):
      handler.removeFilter(f)
    for f in filters:
      handler.addFilter(f)
    logging.set_verbosity(verbosity)
