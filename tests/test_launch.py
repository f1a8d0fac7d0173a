"""The launch scripts: shellcheck-clean, their usage text, and the commands they run.

Commands are read from --dry-run (which must not call gcloud, srun or ssh: stand-ins that record any
call sit first on PATH), and the parts that run on the remote side are executed for real against
stand-ins for gcloud, srun, scontrol, nvidia-smi and the Python interpreter.
"""
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("tpu_vm.sh", "gpu_local.sh", "slurm.sbatch")

# Records each call; fails, so that an unexpected call cannot pass unnoticed either.
_GUARD = '#!/bin/bash\nprintf "%s\\n" "$(basename "$0") $*" >> "$FAKE_CALLS"\nexit 97\n'

# gcloud for the TPU scripts: `describe` reports $FAKE_STATE (absent when empty), `ssh` runs
# --command in the home directory of each worker, $FAKE_WORKERS/<index>.
_GCLOUD = r"""#!/bin/bash
printf '%s\n' "gcloud $*" >> "$FAKE_CALLS"
[[ "$1 $2 $3" == "compute tpus tpu-vm" ]] || exit 97
case $4 in
  describe) [[ -n ${FAKE_STATE:-} ]] || exit 1; echo "$FAKE_STATE" ;;
  create | delete) ;;
  ssh)
    for arg in "$@"; do
      case $arg in --command=*) command=${arg#--command=} ;; --worker=*) worker=${arg#--worker=} ;; esac
    done
    if [[ $worker == all ]]; then workers=("$FAKE_WORKERS"/*); else workers=("$FAKE_WORKERS/$worker"); fi
    rc=0
    for home in "${workers[@]}"; do (cd "$home" && HOME=$home bash -c "$command") || rc=$?; done
    exit $rc ;;
  *) exit 97 ;;
esac
"""

# srun: runs the command once per task with the variables SLURM gives a task, and the node's GPUs.
_SRUN = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
options = {}
while args[0].startswith("-"):
  key, _, value = args.pop(0).partition("=")
  options[key] = value
with open(os.environ["FAKE_CALLS"], "a") as f:
  f.write("srun " + json.dumps(options) + "\\n")
nodes, per_node = int(options["--nodes"]), int(options["--ntasks-per-node"])
assert int(options["--ntasks"]) == nodes * per_node
rc = 0
for node in range(nodes):
  for local in range(per_node):
    env = dict(os.environ, SLURM_PROCID=str(node * per_node + local), SLURM_LOCALID=str(local),
               SLURM_NODEID=str(node), CUDA_VISIBLE_DEVICES=os.environ["FAKE_NODE_GPUS"])
    rc |= subprocess.run(args, env=env).returncode
sys.exit(rc)
"""

# The interpreter the scripts start: prints what it was given, one JSON line.
_PYTHON = """#!{python}
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                  "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "jax_platforms": os.environ.get("JAX_PLATFORMS")}), flush=True)
"""

_SCONTROL = """#!/bin/bash
[[ $1 == show && $2 == hostnames ]] || exit 97
case $3 in
  "gpu[007-010]") printf '%s\\n' gpu007 gpu008 gpu009 gpu010 ;;
  "gpu[001-002]") printf '%s\\n' gpu001 gpu002 ;;
  *) exit 1 ;;
esac
"""

# nvidia-smi of a node with $FAKE_NUM_GPUS GPUs and driver $FAKE_DRIVER.
_NVIDIA_SMI = """#!/bin/bash
(( ${FAKE_NUM_GPUS:-0} > 0 )) || exit 9
for (( i = 0; i < FAKE_NUM_GPUS; i++ )); do
  case "$*" in
    *driver_version*) echo "$FAKE_DRIVER" ;;
    *index,name*) echo "$i, NVIDIA H100 80GB HBM3, 81559 MiB" ;;
    *) exit 97 ;;
  esac
done
"""


def _write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def sandbox(tmp_path):
  """A bin directory of stand-ins first on PATH, and a call log that must stay empty unless expected."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "srun", "sbatch", "ssh", "scp"):
    _write_exe(bin_dir / name, _GUARD)
  _write_exe(bin_dir / "scontrol", _SCONTROL)
  _write_exe(bin_dir / "nvidia-smi", _NVIDIA_SMI)  # no GPU unless FAKE_NUM_GPUS says so
  home = tmp_path / "home"
  home.mkdir()
  calls = tmp_path / "calls.log"
  base_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home),
         "TMPDIR": str(tmp_path), "FAKE_CALLS": str(calls), "LC_ALL": "C"}

  class Sandbox:
    path = tmp_path

    def install(self, name: str, text: str) -> pathlib.Path:
      return _write_exe(bin_dir / name, text.replace("{python}", sys.executable))

    def calls(self) -> list[str]:
      return calls.read_text().splitlines() if calls.exists() else []

    def run(self, script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
      # A clean environment: nothing of the caller's (SLURM_*, CONFIG, ...) leaks in.
      return subprocess.run(["bash", str(LAUNCH / script), *args], env={**base_env, **(env or {})},
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)

  return Sandbox()


def _shellcheck() -> str | None:
  beside_python = pathlib.Path(sys.executable).parent / "shellcheck"
  return shutil.which("shellcheck") or (str(beside_python) if beside_python.exists() else None)


@pytest.mark.parametrize("script", SCRIPTS + ("lib.sh",))
def test_shellcheck_is_clean(script):
  shellcheck = _shellcheck()
  if shellcheck is None:
    pytest.skip("no shellcheck binary on PATH or next to the Python interpreter")
  # -x follows `source launch/lib.sh`, resolved from the repository root.
  result = subprocess.run([shellcheck, "-x", "--shell=bash", str(LAUNCH / script)], capture_output=True,
                          text=True, timeout=60, cwd=LAUNCH.parent)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage(sandbox, script, flag):
  result = sandbox.run(script, flag)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("Usage:")
  assert "--dry-run" in result.stdout and "--config.KEY=VALUE" in result.stdout
  assert sandbox.calls() == []


@pytest.mark.parametrize("script,args,env", [
    ("tpu_vm.sh", ("create", "setup", "run", "logs", "stop", "delete", "--zone=z", "--name=n",
                   "--accelerator-type=v4-32", "--config=c.py", "--workdir=/gcs/b/r", "--config.x=it's"), {}),
    ("gpu_local.sh", ("--setup", "--config=c.py", "--workdir=w", "--config.x=it's"), {}),
    ("slurm.sbatch", ("--config=c.py", "--workdir=w", "--config.x=it's"),
     {"SLURM_JOB_NODELIST": "gpu[001-002]"}),
])
def test_dry_run_output_is_a_valid_shell_script(sandbox, script, args, env):
  result = sandbox.run(script, "--dry-run", *args, env=env)
  assert result.returncode == 0, result.stderr
  syntax = subprocess.run(["bash", "-n"], input=result.stdout, capture_output=True, text=True, timeout=60)
  assert syntax.returncode == 0, syntax.stderr + result.stdout
  assert sandbox.calls() == []


# ---------------------------------------------------------------------------------------------- TPU

_TPU = ("--zone=us-central2-b", "--name=my-tpu", "--project=my-project")


def _gcloud_lines(stdout: str) -> list[list[str]]:
  return [shlex.split(line) for line in stdout.splitlines() if line.startswith("gcloud ")]


def _remote_command(argv: list[str]) -> str:
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return command


def test_tpu_run_dry_run_starts_the_program_on_every_worker(sandbox):
  result = sandbox.run("tpu_vm.sh", "run", "--dry-run", *_TPU, "--config=configs/mimic.py",
                       "--workdir=gs://bucket/convirt/run1", "--config.train.batch_size=4096",
                       "--", "--config.data.csv=/data/my pairs.csv")
  assert result.returncode == 0, result.stderr
  (ssh,) = _gcloud_lines(result.stdout)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert {"--worker=all", "--zone=us-central2-b", "--project=my-project"} <= set(ssh)
  command = _remote_command(ssh)
  assert ("python -m convirt_jax.main --config=configs/mimic.py --workdir=gs://bucket/convirt/run1 "
          "--config.train.batch_size=4096") in command
  # The override with a space reaches the program as one argument.
  assert "--config.data.csv=/data/my pairs.csv" in shlex.split(command.replace(";", " "))
  assert "setsid nohup" in command and ">> logs/convirt.log 2>&1 < /dev/null &" in command
  assert sandbox.calls() == []


def test_tpu_environment_variables_equal_flags(sandbox):
  flags = sandbox.run("tpu_vm.sh", "create", "run", "--dry-run", *_TPU, "--accelerator-type=v5litepod-16",
                      "--spot", "--config=configs/mimic.py", "--workdir=/gcs/b/r", "--remote-dir=code")
  env = sandbox.run("tpu_vm.sh", "create", "run", env={
      "DRY_RUN": "1", "ZONE": "us-central2-b", "TPU_NAME": "my-tpu", "PROJECT": "my-project",
      "ACCELERATOR_TYPE": "v5litepod-16", "SPOT": "true", "CONFIG": "configs/mimic.py",
      "WORKDIR": "/gcs/b/r", "REMOTE_DIR": "code"})
  assert flags.returncode == env.returncode == 0, flags.stderr + env.stderr
  assert flags.stdout == env.stdout
  assert "cd code;" in flags.stdout


@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e"), ("v3-8", "tpu-ubuntu2204-base")])
def test_tpu_create_dry_run_picks_the_runtime_of_the_generation(sandbox, accelerator, runtime):
  result = sandbox.run("tpu_vm.sh", "create", "--dry-run", *_TPU, f"--accelerator-type={accelerator}")
  assert result.returncode == 0, result.stderr
  describe, create = result.stdout.strip().split(" >/dev/null 2>&1 || ")
  assert shlex.split(describe)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu"]
  create = shlex.split(create)
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
  assert {f"--accelerator-type={accelerator}", f"--version={runtime}", "--zone=us-central2-b"} <= set(create)
  assert "--spot" not in create and "--preemptible" not in create


def test_tpu_create_spot_preemptible_and_explicit_runtime(sandbox):
  spot = sandbox.run("tpu_vm.sh", "create", "--dry-run", *_TPU, "--accelerator-type=v4-32", "--spot",
                     "--runtime-version=tpu-vm-base-custom")
  assert spot.returncode == 0, spot.stderr
  assert "--spot" in spot.stdout.split() and "--version=tpu-vm-base-custom" in spot.stdout.split()
  preemptible = sandbox.run("tpu_vm.sh", "create", "--dry-run", *_TPU, "--accelerator-type=v4-32",
                            env={"PREEMPTIBLE": "1"})
  assert "--preemptible" in preemptible.stdout.split()


def test_tpu_setup_dry_run_copies_the_tree_and_installs_jax_tpu_on_all_workers(sandbox):
  result = sandbox.run("tpu_vm.sh", "setup", "--dry-run", *_TPU)
  assert result.returncode == 0, result.stderr
  assert "git ls-files -z --cached --others --exclude-standard" in result.stdout
  scp, ssh = _gcloud_lines(result.stdout)
  assert scp[4] == "scp" and "--worker=all" in scp and scp[6] == "my-tpu:convirt_jax-code.tar.gz"
  assert ssh[4] == "ssh" and "--worker=all" in ssh
  command = _remote_command(ssh)
  assert "tar -xzf convirt_jax-code.tar.gz -C convirt_jax" in command
  assert "-r requirements.txt 'jax[tpu]'" in command and "--python 3.11 .venv" in command
  assert sandbox.calls() == []


def test_tpu_setup_dry_run_from_a_repository(sandbox):
  result = sandbox.run("tpu_vm.sh", "setup", "--dry-run", *_TPU, "--repo=https://example.org/convirt.git",
                       "--ref", "v1.2")
  assert result.returncode == 0, result.stderr
  (ssh,) = _gcloud_lines(result.stdout)
  command = _remote_command(ssh)
  assert "git clone --quiet https://example.org/convirt.git convirt_jax" in command
  assert "fetch --quiet origin v1.2" in command and "checkout --quiet --detach FETCH_HEAD" in command
  assert "scp" not in result.stdout


@pytest.mark.parametrize("args,env,message", [
    (("run", "--zone=z", "--name=n", "--config=c.py"), {}, "WORKDIR is not set"),
    (("run", "--zone=z", "--name=n", "--config=c.py", "--workdir=relative/dir"), {},
     "WORKDIR must be an absolute path"),
    (("run", "--zone=z", "--name=n", "--workdir=/gcs/b/r"), {}, "CONFIG is not set"),
    (("run", "--name=n", "--config=c.py", "--workdir=/gcs/b/r"), {}, "ZONE is not set"),
    (("delete", "--zone=z"), {}, "TPU_NAME is not set"),
    (("--zone=z", "--name=n"), {}, "no command given"),
    (("reboot", "--zone=z", "--name=n"), {}, "unknown argument 'reboot'"),
    (("create", "--zone=z", "--name=n"), {}, "ACCELERATOR_TYPE is not set"),
    (("create", "--zone=z", "--name=n", "--accelerator-type=big"), {}, "ACCELERATOR_TYPE 'big'"),
    (("create", "--zone=z", "--name=n", "--accelerator-type=v9-8"), {}, "set RUNTIME_VERSION"),
    (("create", "--zone=z", "--name=n", "--accelerator-type=v4-8", "--spot"), {"PREEMPTIBLE": "1"},
     "SPOT and PREEMPTIBLE"),
    (("run", "--zone"), {}, "--zone needs a value"),
    (("logs", "--zone=z", "--name=n", "--remote-dir=/abs"), {}, "REMOTE_DIR must be"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_tpu_bad_parameters_fail_naming_them(sandbox, args, env, message, dry_run):
  result = sandbox.run("tpu_vm.sh", *args, *(("--dry-run",) if dry_run else ()), env=env)
  assert result.returncode != 0
  assert message in result.stderr
  assert sandbox.calls() == []


def test_tpu_create_reuses_an_existing_slice_and_refuses_a_preempted_one(sandbox):
  sandbox.install("gcloud", _GCLOUD)
  args = ("create", *_TPU, "--accelerator-type=v4-32")
  absent = sandbox.run("tpu_vm.sh", *args)
  assert absent.returncode == 0, absent.stderr
  assert [c.split()[4] for c in sandbox.calls()] == ["describe", "create"]
  ready = sandbox.run("tpu_vm.sh", *args, env={"FAKE_STATE": "READY"})
  assert ready.returncode == 0 and "reusing" in ready.stderr
  assert [c.split()[4] for c in sandbox.calls()] == ["describe", "create", "describe"]
  preempted = sandbox.run("tpu_vm.sh", *args, env={"FAKE_STATE": "PREEMPTED"})
  assert preempted.returncode != 0 and "preempted" in preempted.stderr


def _wait_for(predicate, seconds: float = 300.0) -> bool:
  # A deadline only against a hang; generous, because a busy machine is slow.
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_tpu_run_logs_stop_on_stand_in_workers(sandbox):
  """The remote commands themselves, run on two local 'workers': detached start, log, pid, stop."""
  sandbox.install("gcloud", _GCLOUD)
  workers = sandbox.path / "workers"
  # Prints its arguments, then stays up like a training run would.
  python = ('#!/bin/bash\nprintf "%s\\n" "$@" > "$HOME/argv.txt"\necho "step 1 loss 4.2"\n'
            'exec sleep 120\n')
  for index in (0, 1):
    venv_bin = workers / str(index) / "convirt_jax" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    _write_exe(venv_bin / "python", python)
  env = {"FAKE_WORKERS": str(workers)}
  run_args = ("run", *_TPU, "--config=configs/mimic.py", "--workdir=/gcs/b/run 1", "--config.train.steps=7")
  pids = []
  try:
    started = sandbox.run("tpu_vm.sh", *run_args, env=env)
    assert started.returncode == 0, started.stderr
    for index in (0, 1):
      home = workers / str(index)
      pid_file = home / "convirt_jax" / "logs" / "convirt.pid"
      assert _wait_for(lambda: (home / "argv.txt").exists() and pid_file.exists())
      pids.append(int(pid_file.read_text()))
      assert (home / "argv.txt").read_text().splitlines() == [
          "-m", "convirt_jax.main", "--config=configs/mimic.py", "--workdir=/gcs/b/run 1",
          "--config.train.steps=7"]
      assert _alive(pids[-1])
    # The run outlives the ssh command that started it and refuses a second start.
    again = sandbox.run("tpu_vm.sh", *run_args, env=env)
    assert again.returncode != 0 and "still active" in again.stdout + again.stderr
    logs = sandbox.run("tpu_vm.sh", "logs", *_TPU, env=env)
    assert logs.returncode == 0 and "step 1 loss 4.2" in logs.stdout
    stopped = sandbox.run("tpu_vm.sh", "stop", *_TPU, env=env)
    assert stopped.returncode == 0 and stopped.stdout.count("stopped") == 2
    assert all(_wait_for(lambda pid=pid: not _alive(pid)) for pid in pids)
  finally:
    for pid in pids:
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)


# -------------------------------------------------------------------------------------------- SLURM

_ALLOCATION = {"SLURM_JOB_NODELIST": "gpu[007-010]", "SLURM_NNODES": "4", "SLURM_JOB_ID": "4242",
               "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_ON_NODE": "64"}


def _srun_argv(stdout: str) -> list[str]:
  words = shlex.split(stdout)
  return words[words.index("srun"):]


@pytest.mark.parametrize("env,num_processes,per_node,coordinator", [
    ({}, 4, 1, "gpu007:24242"),
    ({"PROCS_PER_NODE": "8"}, 32, 8, "gpu007:24242"),
    ({"SLURM_NTASKS_PER_NODE": "4"}, 16, 4, "gpu007:24242"),
    ({"COORDINATOR_PORT": "29500"}, 4, 1, "gpu007:29500"),
])
def test_slurm_dry_run_takes_coordinator_and_processes_from_the_allocation(
    sandbox, env, num_processes, per_node, coordinator):
  result = sandbox.run("slurm.sbatch", "--dry-run", "--config=configs/mimic.py", "--workdir=/shared/run1",
                       "--config.train.batch_size=512",
                       env={**_ALLOCATION, "EXTRA": "--config.train.steps=10", "PYTHON": "python", **env})
  assert result.returncode == 0, result.stderr
  assert "python -m convirt_jax.main --config=configs/mimic.py --workdir=/shared/run1" in result.stdout
  srun = _srun_argv(result.stdout)
  assert {"--nodes=4", f"--ntasks={num_processes}", f"--ntasks-per-node={per_node}",
          f"--cpus-per-task={64 // per_node}", "--kill-on-bad-exit=1"} <= set(srun)
  assert f"--config.distributed.coordinator_address={coordinator}" in srun
  assert f"--config.distributed.num_processes={num_processes}" in srun
  assert srun[-2:] == ["--config.train.steps=10", "--config.train.batch_size=512"]
  assert "export JAX_PLATFORMS=cuda" in result.stdout
  assert sandbox.calls() == []


@pytest.mark.parametrize("with_venv", [True, False])
def test_slurm_runs_the_venv_of_the_repository_when_there_is_one(sandbox, with_venv):
  repo = sandbox.path / "repo"
  (repo / "convirt_jax").mkdir(parents=True)
  if with_venv:
    (repo / ".venv" / "bin").mkdir(parents=True)
    _write_exe(repo / ".venv" / "bin" / "python", "")
  result = sandbox.run("slurm.sbatch", "--dry-run", "--config=c.py", "--workdir=/w",
                       env={**_ALLOCATION, "REPO_DIR": str(repo)})
  assert result.returncode == 0, result.stderr
  python = f"{repo}/.venv/bin/python" if with_venv else "python3"
  assert f" {python} -m convirt_jax.main --config=c.py" in result.stdout
  assert f"cd {repo}" in result.stdout.splitlines()


def test_slurm_dry_run_works_outside_an_allocation(sandbox):
  result = sandbox.run("slurm.sbatch", "--dry-run", env={"CONFIG": "configs/mimic.py", "WORKDIR": "/w"})
  assert result.returncode == 0, result.stderr
  srun = _srun_argv(result.stdout)
  assert "--config.distributed.num_processes=1" in srun and "--nodes=1" in srun
  assert "not inside a SLURM allocation" in result.stderr


@pytest.mark.parametrize("per_node,node_gpus,expected", [
    (1, "0,1,2,3", ["0,1,2,3"] * 2),        # a process per node sees all of the node's GPUs
    (4, "0,1,2,3", ["0", "1", "2", "3"] * 2),  # a process per GPU
    (4, "4,5,6,7", ["4", "5", "6", "7"] * 2),  # GPUs SLURM numbered from 4
    (2, "3", ["3"] * 4),                       # one GPU already bound per task (--gpus-per-task=1)
])
def test_slurm_tasks_get_their_process_id_and_gpus(sandbox, per_node, node_gpus, expected):
  sandbox.install("srun", _SRUN)
  python = sandbox.install("python-stand-in", _PYTHON)
  config = sandbox.path / "config.py"
  config.write_text("")
  result = sandbox.run("slurm.sbatch", f"--config={config}", "--workdir=/shared/run1", "--config.x=1", env={
      "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "7",
      "SLURM_CPUS_ON_NODE": "32", "PROCS_PER_NODE": str(per_node), "PYTHON": str(python),
      "FAKE_NODE_GPUS": node_gpus})
  assert result.returncode == 0, result.stderr
  tasks = [json.loads(line) for line in result.stdout.splitlines()]
  num_processes = 2 * per_node
  assert len(tasks) == num_processes
  for process_id, (task, gpus) in enumerate(zip(tasks, expected)):
    assert task["argv"] == [
        "-m", "convirt_jax.main", f"--config={config}", "--workdir=/shared/run1",
        "--config.distributed.coordinator_address=gpu001:20007",
        f"--config.distributed.num_processes={num_processes}", "--config.x=1",
        f"--config.distributed.process_id={process_id}"]
    assert task["cuda_visible_devices"] == gpus
    assert task["jax_platforms"] == "cuda"
    assert task["cwd"] == str(REPO)
  (srun_call,) = sandbox.calls()
  assert json.loads(srun_call[len("srun "):])["--cpus-per-task"] == str(32 // per_node)


def test_slurm_task_fails_when_a_node_has_too_few_gpus(sandbox):
  sandbox.install("srun", _SRUN)
  config = sandbox.path / "config.py"
  config.write_text("")
  result = sandbox.run("slurm.sbatch", f"--config={config}", "--workdir=/w", env={
      "SLURM_JOB_NODELIST": "gpu[001-002]", "PROCS_PER_NODE": "4", "FAKE_NODE_GPUS": "0,1",
      "PYTHON": str(sandbox.install("python-stand-in", _PYTHON))})
  assert result.returncode != 0
  assert "4 processes per node but CUDA_VISIBLE_DEVICES=\"0,1\"" in result.stderr


@pytest.mark.parametrize("args,env,message", [
    (("--workdir=/w",), _ALLOCATION, "CONFIG is not set"),
    (("--config=c.py",), _ALLOCATION, "WORKDIR is not set"),
    (("--config=c.py", "--workdir=/w", "--procs-per-node=two"), _ALLOCATION, "PROCS_PER_NODE must be"),
    (("--config=c.py", "--workdir=/w"), {**_ALLOCATION, "PROCS_PER_NODE": "0"}, "PROCS_PER_NODE must be"),
    (("--config=c.py", "--workdir=/w", "--port=80"), _ALLOCATION, "COORDINATOR_PORT must be"),
    (("--config=c.py", "--workdir=/w"), {**_ALLOCATION, "SLURM_NNODES": "3"}, "SLURM_NNODES=3"),
    (("--config=c.py", "--workdir=/w"), {**_ALLOCATION, "SLURM_JOB_NODELIST": "bad[list"},
     "SLURM_JOB_NODELIST='bad[list'"),
    (("--config=c.py", "--workdir=/w", "--nodes=2"), _ALLOCATION, "unknown argument '--nodes'"),
])
def test_slurm_bad_parameters_fail_naming_them(sandbox, args, env, message):
  result = sandbox.run("slurm.sbatch", "--dry-run", *args, env=env)
  assert result.returncode != 0
  assert message in result.stderr
  assert sandbox.calls() == []


def test_slurm_outside_an_allocation_and_missing_config_file_fail(sandbox):
  outside = sandbox.run("slurm.sbatch", "--config=c.py", "--workdir=/w")
  assert outside.returncode != 0 and "SLURM_JOB_NODELIST is not set" in outside.stderr
  missing = sandbox.run("slurm.sbatch", "--config=configs/no_such_config.py", "--workdir=/w", env=_ALLOCATION)
  assert missing.returncode != 0 and "CONFIG file not found: configs/no_such_config.py" in missing.stderr
  assert sandbox.calls() == []


# ----------------------------------------------------------------------------------------- one node

_NODE = {"FAKE_NUM_GPUS": "8", "FAKE_DRIVER": "550.54.15"}


def test_gpu_local_dry_run_prints_the_main_command(sandbox):
  result = sandbox.run("gpu_local.sh", "--dry-run", "--config=configs/mimic.py", "--workdir=runs/mimic",
                       "--config.train.batch_size=256",
                       env={**_NODE, "PYTHON": "python", "VENV": str(sandbox.path / "no-venv")})
  assert result.returncode == 0, result.stderr
  assert ("python -m convirt_jax.main --config=configs/mimic.py --workdir=runs/mimic "
          "--config.train.batch_size=256") in result.stdout
  assert f"cd {REPO}" in result.stdout.splitlines()
  assert "8 GPU(s), driver 550.54.15" in result.stderr
  assert "pip install" not in result.stdout
  assert sandbox.calls() == []


@pytest.mark.parametrize("driver,flags,wheel", [
    ("550.54.15", (), "jax[cuda12]"), ("580.65.06", (), "jax[cuda13]"),
    ("580.65.06", ("--cuda=12",), "jax[cuda12]"), ("535.1", ("--cuda", "13"), "jax[cuda13]")])
def test_gpu_local_setup_installs_the_cuda_wheels_the_driver_supports(sandbox, driver, flags, wheel):
  venv = sandbox.path / "venv"
  result = sandbox.run("gpu_local.sh", "--dry-run", "--setup", f"--venv={venv}", *flags,
                       env={**_NODE, "FAKE_DRIVER": driver})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert f"python3 -m venv {venv}" in lines
  assert f"{venv}/bin/python -m pip install --quiet -r requirements.txt '{wheel}'" in lines
  assert "convirt_jax.main" not in result.stdout  # setup only: no config was given


def test_gpu_local_counts_the_visible_gpus(sandbox):
  result = sandbox.run("gpu_local.sh", "--dry-run", "--config=c.py", "--workdir=w",
                       env={**_NODE, "CUDA_VISIBLE_DEVICES": "2,5"})
  assert result.returncode == 0 and "2 GPU(s)" in result.stderr
  no_gpu = sandbox.run("gpu_local.sh", "--dry-run", "--config=c.py", "--workdir=w")
  assert no_gpu.returncode == 0 and "nvidia-smi lists no GPU" in no_gpu.stderr


def test_gpu_local_runs_the_program_in_the_repository_on_cuda(sandbox):
  python = sandbox.install("python-stand-in", _PYTHON)
  config = sandbox.path / "config.py"
  config.write_text("")
  result = sandbox.run("gpu_local.sh", f"--config={config}", "--workdir=runs/a", "--", "--config.x=a b",
                       env={**_NODE, "PYTHON": str(python), "VENV": str(sandbox.path / "no-venv")})
  assert result.returncode == 0, result.stderr
  task = json.loads(result.stdout)
  assert task["argv"] == [
      "-m", "convirt_jax.main", f"--config={config}", "--workdir=runs/a", "--config.x=a b"]
  assert task["cwd"] == str(REPO) and task["jax_platforms"] == "cuda"


@pytest.mark.parametrize("args,message", [
    (("--workdir=w",), "CONFIG is not set"),
    (("--config=c.py",), "WORKDIR is not set"),
    (("--config=c.py", "--workdir=w", "--cuda=11"), "CUDA_MAJOR must be auto, 12 or 13"),
    (("--config=c.py", "--workdir=w", "--gpus=2"), "unknown argument '--gpus'"),
    (("--config",), "--config needs a value"),
])
def test_gpu_local_bad_parameters_fail_naming_them(sandbox, args, message):
  result = sandbox.run("gpu_local.sh", "--dry-run", *args)
  assert result.returncode != 0
  assert message in result.stderr


def test_gpu_local_missing_config_file_fails(sandbox):
  result = sandbox.run("gpu_local.sh", "--config=configs/no_such_config.py", "--workdir=w",
                       env={"PYTHON": "python3", "VENV": str(sandbox.path / "no-venv")})
  assert result.returncode != 0
  assert "CONFIG file not found: configs/no_such_config.py" in result.stderr


# ------------------------------------------------------------------------------------------ --job

# Per script: the arguments and environment of a dry run, and the words of the program's command in it.
_JOB_DRY_RUNS = {
    "tpu_vm.sh": (("run", *_TPU, "--config=configs/transfer/chexpert.py", "--workdir=gs://b/transfer"), {},
                  lambda out: shlex.split(_remote_command(_gcloud_lines(out)[0]).split("setsid nohup ")[1])),
    "gpu_local.sh": (("--config=configs/transfer/chexpert.py", "--workdir=runs/transfer"),
                     {"PYTHON": "python", "VENV": "/no-venv"}, lambda out: shlex.split(out.splitlines()[-1])),
    "slurm.sbatch": (("--config=configs/transfer/chexpert.py", "--workdir=/shared/transfer"),
                     {**_ALLOCATION, "PYTHON": "python"}, _srun_argv),
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("job,env_job,module", [
    (None, None, "convirt_jax.main"),                   # the default: pretraining
    ("--job=pretrain", None, "convirt_jax.main"),
    ("--job=transfer", None, "convirt_jax.transfer"),
    (None, "transfer", "convirt_jax.transfer"),         # JOB=transfer, as the flag
    ("--job=convirt_jax.transfer", None, "convirt_jax.transfer"),  # a module name
    ("--job=convirt_jax.export", "transfer", "convirt_jax.export"),  # the flag wins over JOB
])
def test_job_picks_the_module_in_the_dry_run(sandbox, script, job, env_job, module):
  args, env, program_words = _JOB_DRY_RUNS[script]
  env = {**env, **({"JOB": env_job} if env_job else {})}
  result = sandbox.run(script, "--dry-run", *args, *((job,) if job else ()), "--config.x=1", env=env)
  assert result.returncode == 0, result.stderr
  words = program_words(result.stdout)
  start = words.index("-m")
  assert words[start:start + 4] == ["-m", module, "--config=configs/transfer/chexpert.py", args[-1]]
  assert "--config.x=1" in words
  assert sandbox.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_job_takes_a_separate_value(sandbox, script):
  args, env, program_words = _JOB_DRY_RUNS[script]
  result = sandbox.run(script, "--dry-run", "--job", "transfer", *args, env=env)
  assert result.returncode == 0, result.stderr
  assert "convirt_jax.transfer" in program_words(result.stdout)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("job,env_job,shown", [
    ("--job=train", None, "'train'"), ("--job=convirt_jax.", None, "'convirt_jax.'"),
    ("--job=", None, "''"), (None, "transfer now", "'transfer now'"), (None, "main", "'main'")])
@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_job_fails_with_one_line_naming_the_values(sandbox, script, job, env_job, shown, dry_run):
  args, env, _ = _JOB_DRY_RUNS[script]
  env = {**env, **({"JOB": env_job} if env_job else {})}
  result = sandbox.run(script, *(("--dry-run",) if dry_run else ()), *args, *((job,) if job else ()), env=env)
  assert result.returncode == 2
  assert result.stderr == (
      f"{script}: error: JOB must be pretrain, transfer or a module name such as convirt_jax.transfer "
      f"(--job=... or JOB=...), got {shown}\n")
  assert result.stdout == "" and sandbox.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_names_the_jobs(sandbox, script):
  usage = sandbox.run(script, "--help").stdout
  assert "--job=JOB" in usage and "[JOB]" in usage
  assert "pretrain (default: python -m convirt_jax.main)" in usage and "convirt_jax.transfer" in usage
  assert "--job=transfer" in usage and "configs/transfer/chexpert.py" in usage  # the transfer example


def test_gpu_local_runs_the_transfer_module(sandbox):
  python = sandbox.install("python-stand-in", _PYTHON)
  config = sandbox.path / "config.py"
  config.write_text("")
  result = sandbox.run("gpu_local.sh", "--job=transfer", f"--config={config}", "--workdir=runs/t",
                       env={**_NODE, "PYTHON": str(python), "VENV": str(sandbox.path / "no-venv")})
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)["argv"][:2] == ["-m", "convirt_jax.transfer"]


def test_slurm_tasks_run_the_transfer_module_with_their_process_ids(sandbox):
  sandbox.install("srun", _SRUN)
  python = sandbox.install("python-stand-in", _PYTHON)
  config = sandbox.path / "config.py"
  config.write_text("")
  result = sandbox.run("slurm.sbatch", f"--config={config}", "--workdir=/shared/t", env={
      "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "7", "JOB": "transfer",
      "PYTHON": str(python), "FAKE_NODE_GPUS": "0"})
  assert result.returncode == 0, result.stderr
  tasks = [json.loads(line)["argv"] for line in result.stdout.splitlines()]
  assert [t[:2] for t in tasks] == [["-m", "convirt_jax.transfer"]] * 2
  assert [t[-1] for t in tasks] == [f"--config.distributed.process_id={i}" for i in (0, 1)]


def test_slurm_finds_the_helpers_in_repo_dir_when_run_as_a_spooled_copy(sandbox):
  """sbatch runs a copy of the script from slurmd's spool: lib.sh comes from REPO_DIR (SLURM_SUBMIT_DIR)."""
  spool = sandbox.path / "spool" / "job7"
  spool.mkdir(parents=True)
  shutil.copy(LAUNCH / "slurm.sbatch", spool / "slurm_script")
  env = {"PATH": os.environ["PATH"], "LC_ALL": "C", "CONFIG": "c.py", "WORKDIR": "/w", "JOB": "transfer",
         "DRY_RUN": "1", "PYTHON": "python"}
  found = subprocess.run(["bash", str(spool / "slurm_script")], env={**env,
                         "SLURM_SUBMIT_DIR": str(REPO)}, capture_output=True, text=True, timeout=60)
  assert found.returncode == 0, found.stderr
  assert "python -m convirt_jax.transfer --config=c.py" in found.stdout
  missing = subprocess.run(["bash", str(spool / "slurm_script")], env={**env,
                           "SLURM_SUBMIT_DIR": str(sandbox.path)}, capture_output=True, text=True, timeout=60)
  assert missing.returncode == 2
  assert missing.stderr == (f"slurm.sbatch: error: no launch/lib.sh in REPO_DIR '{sandbox.path}': submit "
                            "from the repository root or set REPO_DIR\n")
