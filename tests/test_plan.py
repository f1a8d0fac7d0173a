"""python -m convirt_jax.plan: the jobs' steps compiled by the TPU and GPU compilers on this CPU.

Tiny models only; each program is compiled once per module (fixtures) and shared by the checks.
"""
import functools
import json
import os
import shutil
import subprocess
import sys

import pytest

from convirt_jax.planning import devices

devices.prepare_environment()  # before libtpu loads: no metadata server, the CPU as jax's backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from convirt_jax import transfer_config  # noqa: E402
from convirt_jax.data import augment, device_augment  # noqa: E402
from convirt_jax.errors import CompileFailed, ConfigError, UserError  # noqa: E402
from convirt_jax.models import convirt  # noqa: E402
from convirt_jax.planning import analysis, job, programs, targets  # noqa: E402
from convirt_jax.training import state as state_lib  # noqa: E402
import tiny_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 8  # per chip
STEP_TARGETS = ("v5e-4", "v4-16", "h100x2")


def _pretrain_config():
  # Wide enough that convolutions and matmuls are most of the arithmetic (the FLOPs checks).
  c = tiny_config.get_config()
  c.model.image.width, c.data.image_size, c.data.stored_size = 0.5, 64, 72
  c.model.text.config.hidden_size, c.model.text.config.intermediate_size = 64, 256
  c.model.projection_hidden, c.model.projection_dim = 64, 32
  return c


def _transfer_config():
  c = transfer_config.transfer_config()
  c.model.image.depth, c.model.image.width = 18, 0.25
  c.data.image_size, c.data.stored_size = 32, 40
  c.data.label_columns = ("a", "b", "c")
  return c


@functools.cache
def _planner(job_name: str, target_name: str):
  target = targets.get(target_name)
  config = _pretrain_config() if job_name == "pretrain" else _transfer_config()
  return job.Planner(config, job_name, target, None, log=lambda line: None)


@functools.cache
def _step_row(target_name: str):
  planner = _planner("pretrain", target_name)
  config = programs.with_batch(planner.config, "pretrain", ROWS, planner.target.chips)
  return planner.row(config, with_lowered=True)


def _taps(size_in: int, kernel: int, stride: int, pad: int) -> int:
  """Kernel taps on real (not padding) inputs, summed over one dimension's output positions: XLA
  counts a convolution's multiply-adds on padding as none."""
  size_out = (size_in + 2 * pad - kernel) // stride + 1
  return sum(0 <= o * stride - pad + k < size_in for o in range(size_out) for k in range(kernel))


def _hand_count_forward_flops(config, bert, rows: int) -> float:
  """2 x multiply-adds of every convolution and matmul of the model's forward pass on `rows` rows
  (torchvision's ResNet: a 7x7/2 stem and a 3x3/2 max-pool, then stages halving the size)."""
  model = convirt.build_model(config, bert)
  shapes = jax.tree_util.tree_flatten_with_path(state_lib.param_shapes(
      model, config.data.image_size, config.model.text.max_length))[0]
  size, tokens = config.data.image_size, rows * config.model.text.max_length
  flops = 0.0
  for path, leaf in shapes:
    names = [getattr(p, "key", "") for p in path]
    if names[-1] != "kernel":
      continue
    if leaf.ndim == 4:  # a convolution
      layer = next((n for n in names if n.startswith("layer")), "")
      if not layer:  # the stem
        size_in, stride, pad = size, 2, 3
      else:
        stage, block = int(layer[5]), int(layer.split("_")[1])
        side = size // 4 // 2 ** (stage - 1)
        strided = stage > 1 and block == 0 and names[-2] in ("conv1", "downsample_conv")
        size_in, stride = (2 * side, 2) if strided else (side, 1)
        pad = 0 if names[-2] == "downsample_conv" else 1
      taps = _taps(size_in, leaf.shape[0], stride, pad)
      flops += 2 * rows * taps * taps * leaf.shape[2] * leaf.shape[3]
    elif names[0] == "text":
      flops += 2 * tokens * leaf.size
    else:  # the projection heads
      flops += 2 * rows * leaf.size
  hidden, length = bert.hidden_size, config.model.text.max_length
  flops += bert.num_hidden_layers * 2 * (2 * tokens * length * hidden)  # q.k and attention x v
  return flops


@pytest.mark.parametrize("target_name", STEP_TARGETS)
def test_pretraining_step_compiles_for_the_target(target_name):
  row = _step_row(target_name)
  target = targets.get(target_name)
  assert row["chips"] == target.chips and row["hosts"] == target.hosts
  assert row["precision"] == "bfloat16"  # "auto" resolved for the target, not for this CPU
  # ... and where the augmentations run: in the step on a GPU, on the host for a TPU (their gathers)
  assert row["augment_on"] == ("device" if target.platform == "cuda" else "host")
  memory = row["memory_bytes"]
  assert 0 < memory["total"] < target.chip.memory_bytes and row["fits"]
  assert memory["state"] > 0 and memory["batch"] > 0 and memory["temp"] > 0
  # The loss all-gathers the [rows, projection_dim] float32 embeddings of every chip.
  embeddings = ROWS * target.chips * _pretrain_config().model.projection_dim * 4
  gathered = row["collectives"].get("all-gather", {"count": 0, "bytes": 0})
  assert gathered["count"] >= 1 and gathered["bytes"] >= embeddings
  # The gradient is summed in float32 (steps.summed_gradient): no bfloat16 all-reduce.
  assert set(row["collectives"]["all-reduce"]["dtypes"]) == {"f32"}
  if target.platform == "tpu":  # the TPU compiler's count of the optimised step vs the lowered program's
    assert abs(row["flops_per_chip"] / row["lowered_flops_per_chip"] - 1) < 0.05
  else:  # a GPU executable counts none: the plan says whose count it reports
    assert "lowered" in row["cost_source"] and row["bytes_accessed_per_chip"] > 0
  bound = row["roofline_bound"]
  assert bound["bound_s"] == max(row["flops_per_chip"] / target.chip.peak_bf16_flops,
                                 row["bytes_accessed_per_chip"] / target.chip.hbm_bytes_per_s)


def test_forward_flops_match_a_hand_count():
  planner = _planner("pretrain", "v5e-4")
  config, mesh = planner.config, planner.mesh
  model = convirt.build_model(config, planner.bert)
  size, length = config.data.image_size, config.model.text.max_length
  variables = jax.eval_shape(lambda: state_lib.init_variables(
      model, jax.random.PRNGKey(0), *state_lib.dummy_inputs(size, length)))
  batch = ROWS * mesh.size
  data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  forward = jax.jit(lambda v, *inputs: model.apply(v, *inputs), in_shardings=(replicated, data, data, data))
  compiled = forward.lower(variables, jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
                           jax.ShapeDtypeStruct((batch, length), jnp.int32),
                           jax.ShapeDtypeStruct((batch, length), jnp.int32)).compile()
  counted = _hand_count_forward_flops(config, planner.bert, ROWS)
  assert abs(compiled.cost_analysis()["flops"] / counted - 1) < 0.15


def test_finetuning_step_compiles_for_a_tpu():
  row = _planner("transfer", "v5e-4").at(ROWS)
  assert row["job"] == "transfer" and row["precision"] == "bfloat16"
  assert 0 < row["memory_bytes"]["total"] < targets.get("v5e-4").chip.memory_bytes and row["fits"]
  assert row["flops_per_chip"] > 0 and set(row["collectives"]["all-reduce"]["dtypes"]) == {"f32"}


def test_the_tpu_compiles_the_affine_step_without_per_pixel_gathers():
  # XLA's TPU gathers read far more than they return: the device augmentations choose the tiled warp
  # when the step is compiled for a TPU (lax.platform_dependent), which reads a fraction of the bytes.
  mesh = devices.mesh_for(targets.get("v5e-1"))
  spec = augment.TrainAugment.from_config(_pretrain_config().augment, 224)
  shapes = (jax.ShapeDtypeStruct((8, 224, 224), jnp.float32), jax.ShapeDtypeStruct((8,), jnp.float32),
            jax.ShapeDtypeStruct((8, 2), jnp.int32), jax.ShapeDtypeStruct((8,), jnp.float32))
  shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P())) for s in shapes]
  cost = lambda method: jax.jit(jax.vmap(lambda *a: device_augment.affine(
      *a, device_augment.warp_patch(spec), method=method))).lower(*shapes).compile().cost_analysis()
  chosen, gathers = cost(""), cost("gather")
  assert chosen["bytes accessed"] * 5 < gathers["bytes accessed"], (chosen, gathers)


@pytest.mark.parametrize("job_name,target_name", [("pretrain", "v5e-4"), ("transfer", "h100x2")])
def test_a_vit_plans_through_the_encoder_registry(job_name, target_name):
  config = _pretrain_config() if job_name == "pretrain" else _transfer_config()
  config.model.image.name = "vit_tiny"
  if job_name == "transfer":  # the ViT fine-tuning options compile into the step
    config.finetune.update(optimizer="adamw", layer_decay=0.75, warmup_steps=10, schedule="cosine")
  target = targets.get(target_name)
  row = job.Planner(config, job_name, target, None, log=lambda line: None).at(ROWS)
  assert row["fits"] and row["flops_per_chip"] > 0 and row["memory_bytes"]["state"] > 0
  assert set(row["collectives"]["all-reduce"]["dtypes"]) == {"f32"}
  # No BatchNorm: nothing but the gradient (and the loss's metrics) is reduced, in few collectives.
  assert row["collectives"]["all-reduce"]["count"] <= 8, row["collectives"]


def test_a_compiler_failure_is_one_line_with_what_to_try():
  class Lowered:  # what the GPU compiler said of a ViT-B/16 step, compiling without a GPU
    def compile(self):
      raise jax.errors.JaxRuntimeError("INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.846 = "
                                       "bf16[6304,768]{1,0} dot(...)\n\tSymbolic tile with\n")

  with pytest.raises(CompileFailed, match=r"^the cuda compiler failed on this step: INTERNAL: Couldn't find "
                                          r"output tile sizes .*dot\(\.\.\.\); run the plan with "
                                          r"XLA_FLAGS=--xla_gpu_enable_triton_gemm=false") as raised:
    analysis._compile(Lowered(), "cuda")
  assert "\n" not in str(raised.value) and isinstance(raised.value, UserError)


def test_max_batch_fits_and_its_double_does_not():
  # On a GPU: the tiny step's memory on a TPU barely grows with the rows (its temporaries are the
  # compiler's workspace), so no small chip would tell the rows apart.
  planner = _planner("transfer", "h100x1")
  # A chip that holds the tiny step at ROWS rows but not at 2 x ROWS: the search, predicting from its
  # compile at ROWS, compiles the prediction's double and stops (two compiles in all).
  small, large = (planner.at(rows)["memory_bytes"]["total"] for rows in (ROWS, 2 * ROWS))
  capacity = (small + large) // 2
  found = planner.largest_batch("plain", start=ROWS, capacity=capacity)
  rows = found["rows_per_chip"]
  assert rows == ROWS and found["total_bytes"] <= capacity < found["double_total_bytes"]
  assert planner.at(rows)["memory_bytes"]["total"] <= capacity  # both compiled
  assert planner.at(2 * rows)["memory_bytes"]["total"] > capacity


class _WidePlanner(job.Planner):
  """The plan's search and table on a step whose temporaries grow by 1 MiB a row, compiled by the real
  TPU compiler in seconds: the tiny model's step would take minutes at the sizes that fill a chip."""

  def program(self, config):
    batch = programs.global_batch(config, self.job)
    data, replicated = NamedSharding(self.mesh, P("data")), NamedSharding(self.mesh, P())

    def step(state, batch):
      hidden = batch["x"] @ state["w"]  # [rows, 2**18] float32
      return {"w": state["w"] + (hidden[:, :256].T @ jnp.tanh(hidden)) * 1e-3}

    state = {"w": jax.ShapeDtypeStruct((256, 2**18), jnp.float32, sharding=replicated)}
    inputs = {"x": jax.ShapeDtypeStruct((batch, 256), jnp.float32, sharding=data)}
    return programs.Program(jax.jit(step, donate_argnums=0), state, inputs, batch, batch // self.mesh.size)


def test_a_step_the_tpu_compiler_refuses_does_not_fit():
  # libtpu refuses a program that does not fit a chip instead of compiling it: the plan reports the
  # row as not fitting (with what the compiler said it needs), and --max_batch searches past it.
  target = targets.get("v5e-4")
  planner = _WidePlanner(_transfer_config(), "transfer", target, None, log=lambda line: None)
  found = planner.largest_batch("plain", start=256)
  rows = found["rows_per_chip"]
  fitting, double = planner.at(rows), planner.at(2 * rows)
  assert fitting["fits"] and "refused" not in fitting and found["total_bytes"] <= target.chip.memory_bytes
  assert not double["fits"] and found["double_refused"]
  refused = double["refused"]
  assert refused["reason"].startswith("RESOURCE_EXHAUSTED") and "\n" not in refused["reason"]
  # Its memory is a lower bound: the arguments and the temporaries the compiler counted (2 x rows MiB).
  memory = double["memory_bytes"]
  assert memory["temp"] > refused["available_bytes"] > 0.9 * target.chip.memory_bytes
  assert memory["temp"] >= 2 * rows * 2**20 and memory["total"] == memory["temp"] + memory["arguments"]
  assert "flops_per_chip" not in double and "roofline_bound" not in double
  table = job.format_table({"job": "transfer", "image_encoder": "-", "note": "-", "rows": [fitting, double],
                            "max_batch": [{"target": target.name, **found}]})
  assert "NO: refused by the compiler (it can use 15.75)" in table
  assert f"| {rows} | {fitting['memory_bytes']['total'] / 2**30:.2f} | ≥ " in table


def test_bad_target_lists_the_known_ones():
  with pytest.raises(ConfigError) as e:
    targets.get("v5e-3")
  message = str(e.value)
  assert "\n" not in message and all(name in message for name in ("v5e-16", "v4-32", "h100x8", "h200x1"))


@pytest.mark.parametrize("platform, package", [("tpu", "libtpu"), ("cuda", "jax-cuda12-plugin")])
def test_missing_compiler_names_the_requirements_file(monkeypatch, platform, package):
  real = devices.importlib.util.find_spec
  hidden = {"tpu": "libtpu", "cuda": "jax_plugins.xla_cuda12"}[platform]
  monkeypatch.setattr(devices.importlib.util, "find_spec",
                      lambda name, *a: None if name == hidden else real(name, *a))
  with pytest.raises(UserError) as e:
    devices.require_compiler(platform)
  assert "\n" not in str(e.value) and "requirements-plan.txt" in str(e.value) and package in str(e.value)


def test_batch_that_does_not_split_gets_the_jobs_error():
  config = _pretrain_config()
  config.train.batch_size = 6  # over 4 chips
  with pytest.raises(ConfigError, match=r"train.batch_size=6 must be a positive multiple of the number of "
                                        r"devices \(4 over 1 processes\)"):
    job.run(config, "pretrain", ["v5e-4"], measure_input=False, log=lambda line: None)
  with pytest.raises(ConfigError, match=r"\(16 over 4 processes\)"):  # a 4-host slice
    job.run(config, "pretrain", ["v5e-16"], measure_input=False, log=lambda line: None)


def test_hlo_collectives_are_counted_once_per_op():
  text = "\n".join([
      "  %a = f32[8,4]{1,0} all-reduce(f32[8,4]{1,0} %x), replica_groups={}",
      "  %s = (bf16[16]{0}, f32[2,2]{1,0}) all-reduce-start(%y, %z), channel_id=1",
      "  %d = (bf16[16]{0}, f32[2,2]{1,0}) all-reduce-done(%s)",
      "  %g = (f32[2,4]{1,0}, f32[8,4]{1,0:T(8,128)}) all-gather-start(%w), dimensions={0}",
      "  %h = f32[8,4]{1,0} all-gather-done(%g)",
  ])
  found = analysis.collectives(text)
  assert found["all-reduce"] == {"count": 2, "bytes": 8 * 4 * 4 + 16 * 2 + 4 * 4,
                                 "dtypes": {"f32": 2, "bf16": 1}}
  assert found["all-gather"] == {"count": 1, "bytes": 8 * 4 * 4, "dtypes": {"f32": 1}}


@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare")
def test_plan_runs_without_a_network(tmp_path):
  """The whole command inside a network namespace with no interface up (as root), or, where that
  cannot be made, with the socket calls of the process refused (it would fail on any attempt)."""
  out = tmp_path / "plan.json"
  command = [sys.executable, "-m", "convirt_jax.plan", "--config=configs/transfer/synthetic.py",
             "--job=transfer", "--target=v5e-1", "--target=h100x1", "--input_seconds=0.5",
             "--config.model.image.depth=18", "--config.model.image.width=0.25",
             "--config.data.image_size=32", "--config.data.stored_size=40",
             "--config.finetune.batch_size=8", f"--json={out}"]
  env = dict(os.environ, PYTHONPATH=REPO)
  isolated = subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
  if isolated:
    command = ["unshare", "-n", *command]
  else:  # no namespace here: any socket the process opens (but AF_UNIX) raises
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import socket\n_real = socket.socket.__init__\n"
        "def _refuse(self, family=socket.AF_INET, *a, **k):\n"
        "  if family != socket.AF_UNIX:\n    raise OSError('network use in the plan')\n"
        "  _real(self, family, *a, **k)\nsocket.socket.__init__ = _refuse\n")
    env["PYTHONPATH"] = f"{guard}{os.pathsep}{REPO}"
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert [r["target"] for r in report["rows"]] == ["v5e-1", "h100x1"]
  assert all(r["fits"] and r["flops_per_chip"] > 0 for r in report["rows"])
  assert all(rate["images_per_s_per_core"] > 0 for rate in report["input"].values())
  # Each target's own pipeline: the TPU's augments on the host, the GPU's in the step.
  assert [r["augment_on"] for r in report["rows"]] == ["host", "device"] and set(report["input"]) == {
      "host", "device"}
  # libtpu's and the CUDA plugin's start-up chatter does not reach the user.
  for noise in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "cuda drivers", "metadata"):
    assert noise not in result.stderr, result.stderr[-2000:]


def test_cli_error_is_one_line():
  result = subprocess.run([sys.executable, "-m", "convirt_jax.plan", "--config=tests/tiny_config.py",
                           "--target=a100x3"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode != 0 and "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "known targets:" in errors[0] and "h100x8" in errors[0], result.stderr
