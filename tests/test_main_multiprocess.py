"""The whole job on two real processes (2 simulated devices each), as on two hosts of a pod.

Covers what only several processes exercise: one process builds the data and learns the vocabulary
while the other waits, each reads its own shard, orbax saves one checkpoint from both, evaluation
gathers the features of both, and only process 0 writes the workdir's files.
"""
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "tiny_config.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_run_the_job_to_the_end(tmp_path):
  workdir = tmp_path / "run"
  port = _free_port()
  # 2 simulated devices each, built with XLA's cheapest optimisation level (as test_faults.py's jobs):
  # compiling is most of this test's time, and no number here is compared with another compilation's.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "convirt_jax.main", f"--config={TINY}", f"--workdir={workdir}",
       "--config.train.steps=4", "--config.eval.every_steps=2",
       f"--config.distributed.coordinator_address=127.0.0.1:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=600))
  finally:
    for proc in procs:
      proc.kill()
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-4000:]
  assert "Results, metrics and plots" in outputs[0][0]
  assert "ConVIRT evaluation" not in outputs[1][0], "only process 0 prints the results"
  results = json.loads((workdir / "results.json").read_text())
  assert results["run"]["processes"] == 2 and results["run"]["devices"] == 4
  probe = results["methods"]["ConVIRT"]["linear_probe"]["Synthetic CXR"]
  assert probe["n_pool"] == 64  # every training record embedded once, gathered from both processes
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
