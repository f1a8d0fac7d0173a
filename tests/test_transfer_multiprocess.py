"""The transfer job on two real processes (2 simulated devices each), as on two hosts of a pod.

The linear, fine-tuning and zero-shot protocols of a ConVIRT workdir and Random Init. on a tiny
synthetic set, and the CheXpert 8x200 retrieval on a fake tree: the numbers equal those of the same
job on one process with the same 4 devices, and only process 0 writes. Fine-tuning survives the loss
of the coordinator's host (kill -9 of process 0: process 1 stops in one line naming it) and a SIGTERM
(a preemption notice to process 1 alone: both processes stop at one agreed step), and the reruns end
with the unbroken two-process run's parameters.
"""
import json
import os
import signal
import textwrap
import time

import pytest

import multiprocess_jobs
import test_chexpert_retrieval
import test_transfer
import tiny_config
from convirt_jax.data import datasets
from test_main_multiprocess import assert_same_variables

ENCODERS = ("convirt", "random")  # the fine-tuning runs' directory names
FINETUNE_STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(root, classification config file, retrieval config file), the tiny data set built once."""
  root = tmp_path_factory.mktemp("transfer_2p")
  test_transfer.write_convirt_workdir(str(root / "pretrained"), {2: 3.0, 4: 2.0})
  chexpert_dir, sets, _ = test_chexpert_retrieval.write_retrieval_tree(str(root / "tree"))
  classification = root / "classification.py"
  classification.write_text(textwrap.dedent(f"""\
      import sys
      sys.path.insert(0, {multiprocess_jobs.TESTS!r})
      import tiny_config

      def get_config():
        c = tiny_config.transfer({str(root)!r}, ({str(root / "pretrained")!r}, "random"))
        c.fractions = (0.5,)
        c.finetune.min_steps = {FINETUNE_STEPS}
        c.finetune.log_every_steps = 1
        return c
      """))
  retrieval = root / "retrieval.py"
  retrieval.write_text(textwrap.dedent(f"""\
      import sys
      sys.path.insert(0, {multiprocess_jobs.TESTS!r})
      import test_chexpert_retrieval

      def get_config():
        return test_chexpert_retrieval.config_8x200({chexpert_dir!r}, {sets!r},
                                                    ({str(root / "pretrained")!r}, "random"), None)
      """))
  datasets.load_dataset(tiny_config.transfer(str(root), ()), str(root / "tfds"))
  return root, classification, retrieval


def _job(config_file, workdir, logs, processes=2):
  return multiprocess_jobs.Job("convirt_jax.transfer", [f"--config={config_file}", f"--workdir={workdir}"],
                               logs, processes=processes, devices=4 // processes)


def _run_on_2_and_1(setup, name, config_file):
  """(workdir, job) of `config_file`'s job on 2 processes and on 1 (4 devices either way)."""
  root = setup[0]
  out = {}
  for processes in (2, 1):
    workdir = root / f"{name}_{processes}p"
    job = _job(config_file, workdir, root / f"logs_{name}_{processes}p", processes)
    job.assert_ok()
    out[processes] = workdir, job
  return out


def _numbers(tree, prefix=""):
  """{path: value} of every number in a results tree."""
  if isinstance(tree, dict):
    return {k: v for key, value in tree.items() for k, v in _numbers(value, f"{prefix}/{key}").items()}
  if isinstance(tree, list):
    return {k: v for i, value in enumerate(tree) for k, v in _numbers(value, f"{prefix}/{i}").items()}
  return {prefix: float(tree)} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


def _first_step(workdir, encoder):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  prefix = f"finetune/{encoder}/0.5/seed0/train/"
  return next({k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)} for r in rows
              if prefix + "loss" in r)


def _assert_two_give_the_numbers_of_one(runs, name):
  """Linear, zero-shot and retrieval results within the single-process tests' tolerance; fine-tuning
  compared at its first step (loss within that tolerance, gradient norm within 0.1%): the all-reduce
  sums in another order across processes, and Adam's first updates (g / (|g| + eps)) amplify those
  float32 roundings into different weights within a few steps, as for 8 devices against 1."""
  (two, job), (one, _) = runs[2], runs[1]
  got, want = (json.loads((d / "results.json").read_text()) for d in (two, one))
  assert got["run"]["processes"] == 2 and want["run"]["processes"] == 1
  assert got["run"]["devices"] == want["run"]["devices"] == 4
  got, want = _numbers(got["methods"]), _numbers(want["methods"])
  assert got.keys() == want.keys() and got
  protocols = {key.split("/")[2] for key in got}
  assert protocols == ({"linear", "finetune", "zeroshot"} if name == "classification" else {"retrieval"})
  compared = [k for k in got if k.split("/")[2] != "finetune"]
  worst = max(abs(got[k] - want[k]) for k in compared)
  assert worst <= test_transfer.ATOL, {k: (got[k], want[k]) for k in compared if abs(got[k] - want[k]) > 1e-6}
  if name == "classification":
    for encoder in ENCODERS:
      a, b = _first_step(two, encoder), _first_step(one, encoder)
      assert abs(a["loss"] - b["loss"]) <= test_transfer.ATOL, (encoder, a, b)
      assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * b["grad_norm"], (encoder, a, b)
  # Process 0 writes (and prints) the results; process 1 only computes.
  assert "Results" in job.output(0) and "Results" not in job.output(1)
  assert "| Method |" not in job.output(1)


def test_the_8x200_retrieval_on_two_processes_gives_the_numbers_of_one(setup):
  _assert_two_give_the_numbers_of_one(_run_on_2_and_1(setup, "retrieval", setup[2]), "retrieval")


def _finetune_step_saved(workdir, encoder, step):
  return lambda: (workdir / "finetune" / encoder / "0.5" / "0" / "checkpoints" / str(step)).is_dir()


def test_linear_finetuning_zeroshot_on_two_processes_equal_one_and_survive_a_lost_host_and_a_sigterm(
    setup, tmp_path):
  """One test (one test process): the unbroken two-process run is compared with one process, then is
  the reference of the interrupted one."""
  _, classification, _ = setup
  runs = _run_on_2_and_1(setup, "classification", classification)
  _assert_two_give_the_numbers_of_one(runs, "classification")
  unbroken = runs[2][0]
  workdir = tmp_path / "run"

  # 1. The coordinator's host is lost while the ConVIRT encoder fine-tunes.
  job = _job(classification, workdir, tmp_path / "killed")
  job.when(_finetune_step_saved(workdir, "convirt", 2))
  killed_at = job.signal(0)
  codes = job.wait(timeout=120)
  stopped_after = time.monotonic() - killed_at
  survivor = job.output(1)
  assert codes[1] == 1 and stopped_after < multiprocess_jobs.HEARTBEAT_S + 20, (stopped_after, survivor[-3000:])
  # Said by its watchdog ("process 1") or by its supervisor ("process 1 of 2"), whichever sees it first.
  last = multiprocess_jobs.last_line(survivor)
  assert last.startswith("error: process 1") and "lost process 0 (the coordinator, 127.0.0.1:" in last, (
      survivor[-3000:])

  # 2. Rerun; a preemption notice (SIGTERM) reaches process 1 during the second encoder's run.
  job = _job(classification, workdir, tmp_path / "sigterm")
  job.when(_finetune_step_saved(workdir, "random", 2))
  job.signal(1, signal.SIGTERM)
  job.assert_ok(timeout=300)
  for i in range(2):
    assert "Preempted" in job.output(0), job.output(i)[-3000:]
  assert not (workdir / "finetune" / "random" / "0.5" / "0" / "result.json").exists()

  # 3. Rerun to the end: the parameters and results of the unbroken run.
  job = _job(classification, workdir, tmp_path / "resumed")
  job.assert_ok()
  for encoder in ENCODERS:
    run = os.path.join("finetune", encoder, "0.5", "0")
    assert_same_variables(unbroken / run, workdir / run, FINETUNE_STEPS)
  got, want = (_numbers(json.loads((d / "results.json").read_text())["methods"]) for d in (workdir, unbroken))
  assert got == want
