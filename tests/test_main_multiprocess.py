"""The pretraining job on two real processes (2 simulated devices each), as on two hosts of a pod.

Covers what only several processes exercise: one process builds the data and learns the vocabulary
while the other waits, each reads its own shard, orbax saves one checkpoint from both, evaluation
gathers the features of both, only process 0 writes the workdir's files; and a host lost mid-run
(kill -9): the other process stops in one line naming it, and the rerun ends as the unbroken run.
"""
import json
import os
import time

import jax
import numpy as np

import multiprocess_jobs
from convirt_jax.training import checkpoints

TINY = os.path.join(multiprocess_jobs.TESTS, "tiny_config.py")
STEPS = 4


def _job(workdir, logs):
  return multiprocess_jobs.Job("convirt_jax.main", [
      f"--config={TINY}", f"--workdir={workdir}", f"--config.train.steps={STEPS}",
      "--config.eval.every_steps=2"], logs)


def assert_same_variables(a_dir, b_dir, step):
  a, b = (checkpoints.restore_variables(str(d), step) for d in (a_dir, b_dir))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_two_processes_run_the_job_and_a_lost_host_stops_the_other_and_the_rerun_resumes(tmp_path):
  """One test (one test process: the runs share its compilation cache, and the unbroken run is the
  reference of the broken one). kill -9 of process 1 (its supervisor and the job with it) once step 2
  is saved: process 0 stops within the heartbeat timeout and a margin, saying in its last line that
  process 1 was lost; the same command on both processes resumes from step 2 and ends with the
  unbroken run's parameters."""
  unbroken = tmp_path / "unbroken"
  started = time.monotonic()
  job = _job(unbroken, tmp_path / "logs")
  job.assert_ok()
  elapsed = time.monotonic() - started
  assert "Results, metrics and plots" in job.output(0)
  # A log file gets plain progress lines (one per validation, at steps 2 and 4, plus one per 60 s
  # interval), no carriage-return bar updates; process 1 prints no progress.
  assert "\r" not in job.output(0)
  progress = [line for line in job.output(0).splitlines() if line.startswith("train ")]
  assert 2 <= len(progress) <= 2 + elapsed // 60, progress
  assert progress[-1].startswith(f"train {STEPS}/{STEPS} (100%)  loss "), progress
  assert not [line for line in job.output(1).splitlines() if line.startswith("train ")]
  for i in range(2):  # no line of TFDS's, orbax's or absl's own; the project's plainly
    noise = [line for line in job.output(i).splitlines() if multiprocess_jobs.NOT_OURS.search(line)]
    assert not noise, noise
  assert len(job.output(0).encode()) < 20_000, len(job.output(0).encode())  # the whole log, tables included
  assert "ConVIRT evaluation" not in job.output(1), "only process 0 prints the results"
  results = json.loads((unbroken / "results.json").read_text())
  assert results["run"]["processes"] == 2 and results["run"]["devices"] == 4
  probe = results["methods"]["ConVIRT"]["linear_probe"]["Synthetic CXR"]
  assert probe["n_pool"] == 64  # every training record embedded once, gathered from both processes
  rows = [json.loads(line) for line in (unbroken / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
  assert sorted(p.name for p in (unbroken / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]

  workdir = tmp_path / "run"
  job = _job(workdir, tmp_path / "killed")
  job.when(lambda: (workdir / "checkpoints" / "2").is_dir())
  killed_at = job.signal(1)
  codes = job.wait(timeout=120)
  stopped_after = time.monotonic() - killed_at
  survivor = job.output(0)
  assert codes[0] == 1, survivor[-3000:]
  assert stopped_after < multiprocess_jobs.HEARTBEAT_S + 20, stopped_after
  assert multiprocess_jobs.last_line(survivor).startswith("error: process 0: lost process 1 of 2"), (
      survivor[-3000:])
  assert "Traceback" not in survivor, survivor[-3000:]

  rerun = _job(workdir, tmp_path / "rerun")
  rerun.assert_ok()
  assert "Resuming from step" in rerun.output(0)
  assert_same_variables(unbroken, workdir, STEPS)
