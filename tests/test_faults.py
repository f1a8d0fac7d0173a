"""Injected faults: kill -9 at random moments (during checkpoint saves too), damaged checkpoints, a full
disk, two jobs on one workdir, a dataset build killed half-way, hostile or broken weight files, no network.

Cost: the real jobs (subprocesses of `python -m convirt_jax.main`, one device each) share a persistent
XLA compilation cache in a module temp dir and build with XLA's cheapest optimisation level, so only the
first compiles for real; every run compared to another uses the same flags, so "exactly equal" holds.
"""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from convirt_jax.data import datasets
from convirt_jax.errors import CheckpointError, DiskFull, UserError, WorkdirBusy
from convirt_jax.training import checkpoints, workdir_lock
import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
SEED = 20240612
HARNESS_KILLS = 24   # kill -9s of the checkpoint harness (test 1a)
JOB_STEPS = 8        # steps of the real job killed twice, then resumed past a damaged step (test 1b)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """The tiny synthetic dataset, built once for the module (in-process, ~1 s)."""
  directory = str(tmp_path_factory.mktemp("tfds"))
  datasets.load_dataset(tiny_config.get_config(), directory)
  return directory


@pytest.fixture(scope="module")
def job_env(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  return dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
              XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true",
              JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def _config(tfds_dir):
  config = tiny_config.get_config()
  config.data.tfds_dir = tfds_dir
  return config


def _steps_on_disk(workdir):
  """(complete steps, in-flight temporary dirs) in <workdir>/checkpoints: orbax renames a step's
  temporary dir to its number only once every file of the step is written."""
  directory = checkpoints.checkpoint_dir(str(workdir))
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return (sorted(int(n) for n in names if n.isdigit()),
          sorted(n for n in names if ".orbax-checkpoint-tmp" in n))


def _truncate_arrays(step_dir):
  """Cuts every array file of a step's train state to half its length (a damaged disk, a bad copy)."""
  cut = []
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) == "d":
      for name in files:
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
        cut.append(path)
  assert cut, f"no array file under {step_dir}"


def _small_state(step):
  """A train-state-like tree whose every value says which step wrote it (a half-read step shows)."""
  return {"params": {"w": np.full((16, 16), step, np.float32), "b": np.arange(64, dtype=np.float32) + step},
          "batch_stats": {"m": np.full((8,), -step, np.float32)}, "step": np.int32(step)}


def _abstract(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=device),
                      tree)


def _assert_state_of(step, state):
  want = _small_state(step)
  assert jax.tree.structure(state) == jax.tree.structure(want)
  for got, expected in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got), expected, err_msg=f"step {step}")


# --- 1a. kill -9 against the checkpoint code path, 24 times -------------------------------------------

# One harness process imports jax/orbax/grain once (no jax backend started, so forking is safe) and
# forks a child per round: the child resumes with checkpoints.restore_newest (pretrain's resume path),
# checks what it restored, then saves step after step with checkpoints.save (async, as in training,
# with a grain iterator and a meta item) until the harness kills it with SIGKILL at a seeded random
# moment. Forking avoids ~3 s of imports per round.
_HARNESS = textwrap.dedent(r'''
  import json, os, random, signal, sys, time
  import numpy as np
  import jax, grain
  from convirt_jax.training import checkpoints
  sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
  from test_faults import _small_state, _abstract, _assert_state_of, _steps_on_disk

  workdir, kills, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

  def child(out):
    manager = checkpoints.make_manager(workdir, keep=3)
    iterator = iter(grain.MapDataset.range(10**6).to_iter_dataset())
    step, record = 0, {"resumed": 0, "ok": True, "skipped": []}
    if manager.all_steps():
      step, state, meta = checkpoints.restore_newest(
          manager, _abstract(_small_state(0)), data_iterator=iterator, announce=record["skipped"].append)
      record["resumed"] = step
      try:
        _assert_state_of(step, state)
        assert meta == {"step": step}, meta
      except AssertionError as e:
        record.update(ok=False, why=str(e)[:300])
    out.write(json.dumps(record) + "\n"); out.flush()
    while True:
      step += 1
      position = next(iterator)  # the data iterator resumes where the restored step left it
      if position != step - 1:
        out.write(json.dumps({"bad_iterator": [step, position]}) + "\n"); out.flush()
      checkpoints.save(manager, step, _small_state(step), data_iterator=iterator, meta={"step": step})

  rng = random.Random(seed)
  for round_ in range(kills + 1):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
      os.close(r)
      try:
        child(os.fdopen(w, "w"))
      finally:
        os._exit(1)
    os.close(w)
    # One kill in five lands while the child starts and restores; the others once it has resumed,
    # anywhere in the saves that follow.
    early = round_ < kills and rng.random() < 0.2
    with os.fdopen(r) as reader:
      if early:
        time.sleep(rng.uniform(0.0, 0.5))
      else:
        first = reader.readline()
        if round_ < kills:
          time.sleep(rng.uniform(0.0, 0.6))
      os.kill(pid, signal.SIGKILL)
      os.waitpid(pid, 0)
      lines = [json.loads(line) for line in reader.read().splitlines() if line.strip()]
    if early:
      first, lines = (json.dumps(lines[0]), lines[1:]) if lines and "resumed" in lines[0] else ("", lines)
    record = json.loads(first) if first else {}
    complete, in_flight = _steps_on_disk(workdir)
    record.update(round=round_, early=early, bad=lines, complete=complete, in_flight=in_flight)
    print(json.dumps(record), flush=True)
''')


def test_kill_9_during_saves_always_resumes_from_the_newest_complete_step(tmp_path, job_env):
  """24 seeded SIGKILLs of a harness that saves through checkpoints.save every ~0.1 s (so most land
  while a save is in flight: its temporary dir is on disk after the kill), each followed by a resume
  through checkpoints.restore_newest that must pick the newest complete step and read back exactly the
  values that step wrote (iterator position and meta included). The real job is killed in test 1b."""
  workdir = str(tmp_path / "harness")
  result = subprocess.run([sys.executable, "-c", _HARNESS, workdir, str(HARNESS_KILLS), str(SEED)],
                          cwd=REPO, env=job_env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rounds = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert len(rounds) == HARNESS_KILLS + 1, result.stdout[-2000:] + result.stderr[-2000:]
  verified = 0
  for before, after in zip(rounds, rounds[1:]):
    if "resumed" in after:  # absent when a kill came before the child had restored
      assert after["resumed"] == max(before["complete"], default=0), (before, after)
      assert after["ok"] and not after["skipped"], after
      verified += after["resumed"] > 0
  assert "resumed" in rounds[-1]
  assert not any(r["bad"] for r in rounds), [r for r in rounds if r["bad"]]
  in_flight = sum(bool(r["in_flight"]) for r in rounds[:-1] if not r["early"])
  early = sum(r["early"] for r in rounds)
  print(f"\nharness: {HARNESS_KILLS} kills ({in_flight} with a save in flight, {early} during start-up "
        f"or restore), {verified} resumes verified, reached step {rounds[-1]['resumed']}")
  assert in_flight >= HARNESS_KILLS // 4, "too few kills landed during a save"
  assert rounds[-1]["resumed"] >= HARNESS_KILLS // 2, "the runs made too little progress"
  # Every step left on disk reads back whole.
  reader = checkpoints.make_manager(workdir, read_only=True)
  for step in reader.all_steps():
    state, meta = checkpoints.restore(reader, step, _abstract(_small_state(0)))
    _assert_state_of(step, state)
    assert meta == {"step": step}
  reader.close()


# --- 1b + 2. the real job: kill -9 twice, damage the newest step, resume, compare -----------------------

def _job_config_file(tmp_path):
  """The tiny config without the downstream evaluations (this test is about training and resume)."""
  path = tmp_path / "faults_config.py"
  path.write_text(textwrap.dedent(f"""\
      import sys
      sys.path.insert(0, {TESTS!r})
      import ml_collections
      import tiny_config

      def get_config():
        c = tiny_config.get_config()
        c.evals = ml_collections.ConfigDict()
        c.eval.random_init_baseline = False
        return c
      """))
  return str(path)


def _job(config_file, workdir, tfds_dir):
  return [sys.executable, "-m", "convirt_jax.main", f"--config={config_file}", f"--workdir={workdir}",
          f"--config.data.tfds_dir={tfds_dir}", f"--config.train.steps={JOB_STEPS}",
          "--config.checkpoint.every_steps=1", "--config.eval.every_steps=1000"]


def _start(command, env, log):
  with open(log, "w") as out:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _kill_after_a_new_step(proc, workdir, after, delay, log):
  """SIGKILL `proc` `delay` s after a complete step newer than `after` appears; the steps on disk."""
  while proc.poll() is None and max(_steps_on_disk(workdir)[0], default=0) <= after:
    time.sleep(0.02)
  assert proc.poll() is None, f"the run ended before it could be killed:\n{open(log).read()[-3000:]}"
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return _steps_on_disk(workdir)


def _assert_resumed_from_newest(log, complete, workdir):
  """The run resumed from the newest complete step (or, had the kill landed such that the newest one
  does not read back, said so and took the one before)."""
  text = open(log).read()
  newest = complete[-1]
  unreadable = f"checkpoint step {newest} in {checkpoints.checkpoint_dir(str(workdir))} is unreadable"
  if unreadable in text:
    assert f"Resuming from step {complete[-2]} of" in text, text[-3000:]
    return complete[-2]
  assert f"Resuming from step {newest} of" in text, text[-3000:]
  return newest


def test_real_job_killed_twice_and_resumed_past_a_damaged_step_ends_with_the_unbroken_parameters(
    tmp_path, tfds_dir, job_env):
  """Two kill -9s of `python -m convirt_jax.main` at seeded random moments after a new checkpoint
  (checkpoint.every_steps=1, so a save is usually in flight), each followed by the same command
  resuming from the newest complete step; before the last resume the newest step's arrays are truncated
  by hand: the run names the step it skips and resumes from the one before, never from scratch. The
  final parameters equal those of an unbroken run's exactly (run alongside once the first run has
  compiled everything into the shared cache)."""
  rng = random.Random(SEED)
  config_file = _job_config_file(tmp_path)
  unbroken_dir, broken_dir = tmp_path / "unbroken", tmp_path / "broken"
  kills, unbroken = [], None
  for i in range(2):
    log = tmp_path / f"killed_{i}.log"
    proc = _start(_job(config_file, broken_dir, tfds_dir), job_env, log)
    newest = kills[-1][0][-1] if kills else 0
    complete, in_flight = _kill_after_a_new_step(proc, broken_dir, newest, rng.uniform(0.0, 0.8), log)
    if kills:
      _assert_resumed_from_newest(log, kills[-1][0], broken_dir)
    else:
      unbroken = _start(_job(config_file, unbroken_dir, tfds_dir), job_env, tmp_path / "unbroken.log")
    kills.append((complete, in_flight))
  assert len(kills[-1][0]) >= 2, kills

  newest, previous = kills[-1][0][-1], kills[-1][0][-2]
  _truncate_arrays(os.path.join(checkpoints.checkpoint_dir(str(broken_dir)), str(newest)))
  log = tmp_path / "resumed.log"
  result = subprocess.run(_job(config_file, broken_dir, tfds_dir), cwd=REPO, env=job_env,
                          stdout=open(log, "w"), stderr=subprocess.STDOUT, timeout=600)
  text = open(log).read()
  assert result.returncode == 0, text[-3000:]
  skipped = (f"checkpoint step {newest} in {checkpoints.checkpoint_dir(str(broken_dir))} is unreadable (")
  assert skipped in text and "): skipping it" in text, text[-3000:]
  assert f"Resuming from step {previous} of {JOB_STEPS}" in text, text[-3000:]
  assert os.path.isdir(broken_dir / checkpoints.UNREADABLE_DIR / str(newest))

  assert unbroken.wait(timeout=600) == 0, open(tmp_path / "unbroken.log").read()[-3000:]
  a = checkpoints.restore_variables(str(unbroken_dir), JOB_STEPS)
  b = checkpoints.restore_variables(str(broken_dir), JOB_STEPS)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  print(f"\njob: 2 kills ({sum(bool(f) for _, f in kills)} during a save in flight; steps on disk "
        f"after each: {[c for c, _ in kills]}), step {newest} damaged and skipped, resumed from "
        f"{previous}, final parameters equal the unbroken run's")


# --- 2. damaged checkpoints, in-process ----------------------------------------------------------------

def _save_steps(workdir, steps, meta=lambda step: {"step": step}):
  manager = checkpoints.make_manager(str(workdir), keep=len(steps))
  for step in steps:
    checkpoints.save(manager, step, _small_state(step), meta=meta(step))
  manager.close()


def test_a_truncated_newest_step_is_named_skipped_and_set_aside(tmp_path):
  _save_steps(tmp_path, [1, 2, 3])
  _truncate_arrays(os.path.join(checkpoints.checkpoint_dir(str(tmp_path)), "3"))
  said = []
  manager = checkpoints.make_manager(str(tmp_path))
  step, state, meta = checkpoints.restore_newest(manager, _abstract(_small_state(0)), announce=said.append)
  assert step == 2 and meta == {"step": 2}
  _assert_state_of(2, state)
  assert said[0].startswith(f"checkpoint step 3 in {checkpoints.checkpoint_dir(str(tmp_path))} is "
                            "unreadable (") and said[0].endswith("): skipping it"), said
  assert "unreadable_checkpoints" in said[1]
  assert manager.all_steps() == [1, 2], "the damaged step is out of the way of the resumed run's save"
  checkpoints.save(manager, 3, _small_state(3), meta={"step": 3})
  manager.close()
  assert os.path.isdir(tmp_path / checkpoints.UNREADABLE_DIR / "3")
  reader = checkpoints.make_manager(str(tmp_path), read_only=True)
  _assert_state_of(3, checkpoints.restore(reader, 3, _abstract(_small_state(0)))[0])


def test_when_no_step_reads_back_the_error_names_them_all(tmp_path):
  _save_steps(tmp_path, [1, 2])
  for step in (1, 2):
    _truncate_arrays(os.path.join(checkpoints.checkpoint_dir(str(tmp_path)), str(step)))
  manager = checkpoints.make_manager(str(tmp_path))
  with pytest.raises(CheckpointError, match=r"none of the checkpoints .*\(step 2: .*; step 1: .*another "
                                            r"--workdir") as error:
    checkpoints.restore_newest(manager, _abstract(_small_state(0)), announce=lambda _: None)
  assert "\n" not in str(error.value)
  assert manager.all_steps() == [1, 2], "nothing is moved or deleted when nothing can be resumed"
  manager.close()


def test_a_run_never_starts_from_scratch_over_unreadable_checkpoints(tmp_path, tfds_dir):
  """Every step's meta truncated: pretrain.run stops before the data build and names the steps."""
  from convirt_jax.jobs import pretrain  # pylint: disable=g-import-not-at-top
  config = _config(tfds_dir)
  _save_steps(tmp_path, [2, 4], meta=lambda step: {"config": config.to_dict(), "step": step})
  for step in (2, 4):
    path = os.path.join(checkpoints.checkpoint_dir(str(tmp_path)), str(step), "meta", "metadata")
    with open(path, "r+b") as f:
      f.truncate(5)
  with pytest.raises(CheckpointError, match=r"none of the checkpoints .*step 4: .*step 2: "):
    pretrain.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "config.json") and not os.path.exists(tmp_path / ".lock")


def test_a_step_that_does_not_fit_the_model_is_not_skipped_as_damaged(tmp_path):
  _save_steps(tmp_path, [1, 2])
  other = _small_state(0)
  other["params"]["w"] = np.zeros((4, 4), np.float32)
  manager = checkpoints.make_manager(str(tmp_path))
  said = []
  with pytest.raises(CheckpointError, match="step 2 .* does not fit this model/config"):
    checkpoints.restore_newest(manager, _abstract(other), announce=said.append)
  assert not said and manager.all_steps() == [1, 2]
  manager.close()


# --- 3. a full disk during a save ------------------------------------------------------------------------

def test_a_full_disk_during_a_save_is_one_clear_error_and_the_earlier_steps_stay(tmp_path, monkeypatch):
  """Every write into a step being saved fails with ENOSPC from step 3 on (builtins.open, which orbax's
  metadata and JSON writers and grain's iterator state use; no tmpfs here to really fill)."""
  import builtins  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  manager = checkpoints.make_manager(workdir, keep=5)
  for step in (1, 2):
    checkpoints.save(manager, step, _small_state(step), meta={"step": step})
  manager.wait_until_finished()
  real_open = builtins.open

  def full_disk_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and ".orbax-checkpoint-tmp" in os.fspath(file):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", full_disk_open)
  with pytest.raises(DiskFull) as error:
    for step in range(3, 10):  # the async save's error comes out of the next save (or the close)
      checkpoints.save(manager, step, _small_state(step), meta={"step": step})
    manager.wait_until_finished()
  try:
    manager.close()  # as pretrain.run does; the disk is still full for the save in flight
  except DiskFull:
    pass  # orbax may report the failed save once more; the job has stopped already
  monkeypatch.undo()
  message = str(error.value)
  assert isinstance(error.value, UserError) and "\n" not in message
  assert workdir in message and "ENOSPC" in message and "step 3" in message, message
  assert "steps 1, 2" in message and "intact" in message, message
  assert _steps_on_disk(workdir)[0] == [1, 2]
  for step in (1, 2):
    variables = checkpoints.restore_variables(workdir, step)
    np.testing.assert_array_equal(variables["params"]["w"], _small_state(step)["params"]["w"])


# --- 4. two jobs on one workdir --------------------------------------------------------------------------

_HOLD_LOCK = ("import sys, time\n"
              "from convirt_jax.training.workdir_lock import WorkdirLock\n"
              "WorkdirLock(sys.argv[1]).acquire()\n"
              "print('locked', flush=True)\n"
              "time.sleep(600)\n")


class _PastTheLock(Exception):
  pass


def test_a_second_job_on_a_locked_workdir_refuses_and_a_killed_holder_leaves_no_stale_lock(
    tmp_path, tfds_dir, monkeypatch):
  import socket  # pylint: disable=g-import-not-at-top
  from convirt_jax.jobs import pretrain  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "shared"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(workdir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirBusy) as error:
      pretrain.run(_config(tfds_dir), str(workdir))
    message = str(error.value)
    assert f"pid {holder.pid}" in message and f"host {socket.gethostname()}" in message, message
    assert "started 20" in message and str(workdir) in message and "\n" not in message, message
    assert os.listdir(workdir) == [workdir_lock.LOCK_FILE], "the refused job wrote nothing"
    # Another fd of this very process is refused too (flock locks open files, not processes).
    with pytest.raises(WorkdirBusy):
      workdir_lock.WorkdirLock(str(workdir)).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The kernel dropped the dead holder's lock: a new run gets past it (stopped right after, at the
  # data loading, to keep this test cheap), and releases it when it ends.
  def past_the_lock(*args, **kwargs):
    raise _PastTheLock()
  monkeypatch.setattr(pretrain.datasets, "load_dataset", past_the_lock)
  with pytest.raises(_PastTheLock):
    pretrain.run(_config(tfds_dir), str(workdir))
  with workdir_lock.WorkdirLock(str(workdir)):
    info = json.load(open(workdir / workdir_lock.LOCK_FILE))
    assert info["pid"] == os.getpid()


# --- 5. a dataset build killed half-way --------------------------------------------------------------------

_BUILD = ("import sys\n"
          "sys.path.insert(0, 'tests')\n"
          "import tiny_config\n"
          "from convirt_jax.data import datasets\n"
          "config = tiny_config.get_config()\n"
          "config.data.synthetic.num_train = 160\n"
          "datasets.load_dataset(config, sys.argv[1])\n")


def test_a_build_killed_half_way_is_never_used_and_the_next_run_builds_it_whole(tmp_path, job_env):
  data_dir = str(tmp_path / "tfds")
  proc = subprocess.Popen([sys.executable, "-c", _BUILD, data_dir], cwd=REPO, env=job_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  config = tiny_config.get_config()
  config.data.synthetic.num_train = 160
  path = datasets.prepared_dir(config, data_dir)
  parent = os.path.dirname(path)
  partial = []
  while proc.poll() is None and not partial:
    try:
      partial = [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith("incomplete.")
                 and any("array_record" in f for f in os.listdir(os.path.join(parent, n)))]
    except FileNotFoundError:
      pass  # not created yet (or renamed meanwhile: then the assertion below says so)
    time.sleep(0.005)
  assert proc.poll() is None, f"the build ended before it could be killed:\n{proc.stdout.read()}"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not datasets._is_built(path) and not datasets._is_built(partial[0])  # pylint: disable=protected-access

  dataset = datasets.load_dataset(config, data_dir)  # the next run: removes the leftovers, builds anew
  assert {split: len(source) for split, source in dataset.sources.items()} == {
      "train": 160, "validation": 32, "test": 48, "retrieval_candidates": 32, "retrieval_queries": 16}
  assert not [n for n in os.listdir(parent) if n.startswith("incomplete.")]
  assert datasets._is_built(path)  # pylint: disable=protected-access


# --- 6. weight files ------------------------------------------------------------------------------------------

class _WritesAFile:
  """A pickle that, unpickled without weights_only, would write a file (any code could run instead)."""
  marker = ""

  def __reduce__(self):
    return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_weight_files_that_are_hostile_truncated_or_of_another_architecture_are_refused(tmp_path):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from convirt_jax.interop.hf_bert import load_hf_bert  # pylint: disable=g-import-not-at-top
  from convirt_jax.interop.torchvision_resnet import load_torchvision_resnet  # pylint: disable=g-import-not-at-top

  marker = tmp_path / "code_ran"
  _WritesAFile.marker = str(marker)
  hostile = tmp_path / "resnet.pt"
  torch.save({"conv1.weight": _WritesAFile()}, hostile)
  with pytest.raises(CheckpointError, match=r"refused to load .*resnet\.pt.*Unsupported global.*exec.*"
                                            r"weights_only=True"):
    load_torchvision_resnet(hostile, depth=18)
  bert_dir = tmp_path / "bert"
  bert_dir.mkdir()
  (bert_dir / "config.json").write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "intermediate_size": 64,
                                                    "vocab_size": 100}))
  torch.save({"embeddings.word_embeddings.weight": _WritesAFile()}, bert_dir / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match=r"refused to load .*pytorch_model\.bin"):
    load_hf_bert(str(bert_dir))
  assert not marker.exists(), "a weight file ran code"

  whole = tmp_path / "whole.safetensors"
  safetensors.numpy.save_file({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}, str(whole))
  truncated = tmp_path / "resnet.safetensors"
  truncated.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
  with pytest.raises(CheckpointError, match=r"resnet\.safetensors.* not a readable safetensors file"):
    load_torchvision_resnet(truncated, depth=50)
  (bert_dir / "pytorch_model.bin").unlink()
  (bert_dir / "model.safetensors").write_bytes(truncated.read_bytes())
  with pytest.raises(CheckpointError, match=r"model\.safetensors.* not a readable safetensors file"):
    load_hf_bert(str(bert_dir))

  resnet34 = tmp_path / "resnet34.pt"
  torch.save(torchvision.models.resnet34().state_dict(), resnet34)
  with pytest.raises(CheckpointError, match=r"resnet34\.pt' does not fit ResNet50 .*missing keys .*"
                                            r"'layer1\.0\.conv3\.weight'.*those of ResNet34"):
    load_torchvision_resnet(resnet34, depth=50)


def test_the_package_never_trusts_remote_code_and_loads_torch_files_with_weights_only():
  package = os.path.join(REPO, "convirt_jax")
  sources = {}
  for root, _, files in os.walk(package):
    for name in files:
      if name.endswith(".py"):
        sources[os.path.join(root, name)] = open(os.path.join(root, name), encoding="utf-8").read()
  assert not [path for path, text in sources.items() if "trust_remote_code" in text]
  loads = [(path, text[i:text.index(")", i)]) for path, text in sources.items()
           for i in [j for j in range(len(text)) if text.startswith("torch.load(", j)]]
  assert loads and all("weights_only=True" in call for _, call in loads), loads


# --- 7. no network ------------------------------------------------------------------------------------------

def test_offline_weights_fail_in_one_line_before_the_dataset_is_built(tmp_path, job_env):
  env = dict(job_env, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
  tiny = os.path.join(TESTS, "tiny_config.py")
  cases = {
      "torchvision": (["--config.model.image.init_from=torchvision", "--config.model.image.width=1.0"],
                      ["resnet18", "download.pytorch.org", "--config.model.image.init_from=/path/to/"]),
      "hub": (["--config.model.text.init_from=some-org/some-clinical-bert"],
              ["'some-org/some-clinical-bert'", "--config.model.text.init_from=DIR"]),
  }
  procs = {}
  for name, (flags, _) in cases.items():
    command = [sys.executable, "-m", "convirt_jax.main", f"--config={tiny}",
               f"--workdir={tmp_path / name / 'run'}", f"--config.data.tfds_dir={tmp_path / name / 'tfds'}",
               *flags]
    procs[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
  for name, (_, expected) in cases.items():
    stdout, stderr = procs[name].communicate(timeout=300)
    assert procs[name].returncode != 0, stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert all(text in errors[0] for text in expected), errors[0]
    assert not os.path.exists(tmp_path / name / "tfds"), "the dataset was built before the weights"
    assert not os.path.exists(tmp_path / name / "run")
