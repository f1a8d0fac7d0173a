"""One train step of a tiny ConVIRT: the shared setup of the step tests, and a worker process.

As a library it gives the tiny config, batch and initial state, and `run_step`, which the equality
tests run on a 1-device and an 8-device mesh (results are cached per process: compiling is the slow
part on a CPU). As a script it is one process of a multi-process job:

  python tests/multiprocess_worker.py --process_id=I --num_processes=N --port=P --init=S.npz --out=DIR

joins the job over 127.0.0.1 with gloo CPU collectives, starts from the initial state in S.npz, feeds
its slice of the same global batch, runs one train step and writes what it got: every process a small
metrics file, process 0 alone the full results. The caller sets XLA_FLAGS (the simulated device count)
in this process's environment.
"""
import argparse
import functools
import json
import os
import sys

# Run as a script from anywhere: the repository root holds the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from convirt_jax import multihost  # noqa: E402
from convirt_jax import parallel  # noqa: E402
from convirt_jax.training import optimizer as opt_lib  # noqa: E402
from convirt_jax.training import state as state_lib  # noqa: E402
from convirt_jax.training import steps as steps_lib  # noqa: E402
from convirt_jax.config import base_config  # noqa: E402
from convirt_jax.models.bert import BertConfig  # noqa: E402
from convirt_jax.models.convirt import build_model  # noqa: E402

GLOBAL_BATCH = 16
IMAGE_SIZE = 32
TEXT_LENGTH = 12
STEPS_TOTAL = 10
# Dropout off: the equality tests compare runs whose dropout masks differ by construction (per device).
TINY_BERT = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=TEXT_LENGTH,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The base config shrunk to a ResNet18 at width 1/8 on 32 px and a 2-layer BERT of width 32.

  The text embeddings and layer 0 are frozen. `overrides` maps dotted keys to values.
  """
  config = base_config()
  config.model.image.depth = 18
  config.model.image.width = 0.125
  config.model.image.small_stem = True
  config.model.text.init_from = ""
  config.model.text.frozen_layers = 1
  config.model.text.max_length = TEXT_LENGTH
  config.model.projection_dim = 16
  config.model.projection_hidden = 24
  config.data.image_size = IMAGE_SIZE
  config.train.batch_size = GLOBAL_BATCH
  config.update_from_flattened_dict(overrides)
  return config


def global_batch(seed: int = 0, batch_size: int = GLOBAL_BATCH) -> dict[str, np.ndarray]:
  """Random uint8 images and token ids with a different number of valid tokens per row."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, TEXT_LENGTH + 1, size=batch_size)
  mask = (np.arange(TEXT_LENGTH)[None, :] < lengths[:, None]).astype(np.int32)
  return {
      "image": rng.integers(0, 256, size=(batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
      "input_ids": (rng.integers(1, TINY_BERT.vocab_size, size=mask.shape) * mask).astype(np.int32),
      "attention_mask": mask,
  }


@functools.cache
def _model_and_optimizer(config_json: str):
  config = ml_collections.ConfigDict(json.loads(config_json))
  model = build_model(config, TINY_BERT, axis_name=parallel.DATA_AXIS)
  shapes = state_lib.param_shapes(model, IMAGE_SIZE, TEXT_LENGTH)
  return model, opt_lib.make_optimizer(config, shapes, STEPS_TOTAL)


def model_and_optimizer(config: ml_collections.ConfigDict):
  return _model_and_optimizer(config.to_json())


@functools.cache
def _initial_variables(config_json: str) -> dict[str, np.ndarray]:
  config = ml_collections.ConfigDict(json.loads(config_json))
  model, optimizer = _model_and_optimizer(config_json)
  state = state_lib.init_train_state(model, optimizer, jax.random.PRNGKey(config.train.seed), IMAGE_SIZE,
                                 TEXT_LENGTH)
  return {**flat(state["params"], "params/"), **flat(state["batch_stats"], "batch_stats/"),
          "rng": np.asarray(state["rng"])}


def initial_variables(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Flattened initial params, batch_stats and rng (computed once per process and config)."""
  return _initial_variables(config.to_json())


def state_from_variables(variables: dict[str, np.ndarray], optimizer) -> state_lib.State:
  """A fresh train state from flattened variables (copied, so that donation never touches them)."""
  def nested(prefix):
    return flax.traverse_util.unflatten_dict(
        {tuple(k[len(prefix):].split("/")): np.array(v) for k, v in variables.items()
         if k.startswith(prefix)})
  params = nested("params/")
  return {"step": np.zeros((), np.int32), "params": params, "batch_stats": nested("batch_stats/"),
          "opt_state": jax.tree.map(np.asarray, optimizer.init(params)),
          "rng": np.array(variables["rng"])}


def flat(tree, prefix: str) -> dict[str, np.ndarray]:
  """{prefix + "a/b/c": array} for a pytree, for np.savez and comparisons."""
  return {prefix + jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def step_results(state, metrics) -> dict[str, np.ndarray]:
  """Everything one step produced, flattened: metrics, params, batch_stats and the gradient.

  The gradient is read from Adam's first moment after the first update, mu = (1 - b1) * (g + wd * p0):
  it must be compared directly, because Adam's first update, g / (|g| + eps), is blind to the
  gradient's scale (a doubled all-reduce would not show in the parameters).
  """
  state, metrics = parallel.fetch((state, metrics))
  out = {f"metrics/{k}": np.asarray(v) for k, v in metrics.items()}
  out.update(flat(state["params"], "params/"))
  out.update(flat(state["batch_stats"], "batch_stats/"))
  out.update(flat(optax.tree_utils.tree_get(state["opt_state"], "mu"), "adam_mu/"))
  return out


@functools.cache
def _train_step(config_json: str, mesh):
  config = ml_collections.ConfigDict(json.loads(config_json))
  model, optimizer = _model_and_optimizer(config_json)
  return steps_lib.make_train_step(model, optimizer, config, mesh)


def train_step_for(config: ml_collections.ConfigDict, mesh):
  """The jitted train step (one per config and mesh per process, so it compiles once)."""
  return _train_step(config.to_json(), mesh)


def run_steps(config, mesh, local_batch, num_steps: int = 1, variables=None):
  """(state, metrics) after `num_steps` train steps from the initial state on `mesh`."""
  _, optimizer = model_and_optimizer(config)
  variables = initial_variables(config) if variables is None else variables
  state = parallel.replicate(state_from_variables(variables, optimizer), mesh)
  step = train_step_for(config, mesh)
  metrics = None
  for _ in range(num_steps):
    state, metrics = step(state, parallel.shard_batch(local_batch, mesh))
  return state, metrics


@functools.cache
def _reference_step(config_json: str) -> dict[str, np.ndarray]:
  config = ml_collections.ConfigDict(json.loads(config_json))
  mesh = parallel.make_mesh(jax.devices()[:1])
  return step_results(*run_steps(config, mesh, global_batch()))


def reference_step(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """One step on a 1-device mesh over the whole global batch: what every parallel run must equal."""
  return _reference_step(config.to_json())


# Adam's first update is lr * g / (|g| + eps): where |g| is near eps its slope is lr / eps = 1e4, so
# gradients equal to float32 rounding (~1e-9) can move such a weight by up to 2 * lr. Parameters are
# compared at `atol` wherever the gradient is above this floor, and within 2 * lr below it.
GRAD_FLOOR = 1e-7
ADAM_B1 = 0.9


def compare_step_results(got: dict[str, np.ndarray], want: dict[str, np.ndarray], lr: float,
                         atol: float = 1e-5) -> dict[str, float]:
  """Largest absolute differences between two runs of the same step, per kind of quantity.

  Returns the largest differences of "metrics", "gradient" (Adam's first moment / (1 - b1), i.e.
  g + wd * p0), "batch_stats", "params" (where the gradient is above GRAD_FLOOR) and
  "params_below_grad_floor", and the counts "entries_below_grad_floor" and "entries_beyond_atol" (those
  of them that differ by more than `atol`).
  """
  assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())
  # An encoder without BatchNorm (a ViT) has no "batch_stats/" entries: their difference is 0.
  worst = lambda prefix: max((float(np.max(np.abs(got[k] - want[k]))) for k in want
                              if k.startswith(prefix)), default=0.0)
  diffs = {"metrics": worst("metrics/"), "gradient": worst("adam_mu/") / (1 - ADAM_B1),
           "batch_stats": worst("batch_stats/"), "params": 0.0, "params_below_grad_floor": 0.0,
           "entries_below_grad_floor": 0, "entries_beyond_atol": 0}
  for key in (k for k in want if k.startswith("params/")):
    diff = np.abs(got[key] - want[key])
    mu_key = "adam_mu/" + key[len("params/"):]
    if mu_key in want:  # Trainable.
      grad = np.minimum(np.abs(got[mu_key]), np.abs(want[mu_key])) / (1 - ADAM_B1)
      flat_gradient = grad < GRAD_FLOOR
      diffs["entries_below_grad_floor"] += int(np.sum(flat_gradient))
      diffs["entries_beyond_atol"] += int(np.sum(diff[flat_gradient] > atol))
      if np.any(flat_gradient):
        diffs["params_below_grad_floor"] = max(diffs["params_below_grad_floor"],
                                               float(np.max(diff[flat_gradient])))
      diff = diff[~flat_gradient]
    if diff.size:
      diffs["params"] = max(diffs["params"], float(np.max(diff)))
  assert diffs["params_below_grad_floor"] <= 2 * lr * (1 + 1e-3), diffs
  return diffs


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--init", required=True, help="npz of initial_variables()")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  config = tiny_config(**{"distributed.coordinator_address": f"127.0.0.1:{args.port}",
                          "distributed.num_processes": args.num_processes,
                          "distributed.process_id": args.process_id})
  assert parallel.initialize(config.distributed)
  assert parallel.initialize(config.distributed)  # Idempotent.
  mesh = parallel.make_mesh()
  # The rows of process 0 lead the global batch only if its devices lead the mesh.
  owners = [d.process_index for d in mesh.devices.flat]
  assert owners == sorted(owners), owners

  local_rows = parallel.local_batch_size(config.train.batch_size)
  start = jax.process_index() * local_rows
  local = {k: v[start:start + local_rows] for k, v in global_batch().items()}
  with np.load(args.init) as init:
    variables = dict(init)
  results = step_results(*run_steps(config, mesh, local, variables=variables))

  os.makedirs(args.out, exist_ok=True)
  summary = {"metrics": {k: float(v) for k, v in results.items() if k.startswith("metrics/")},
             "devices": jax.device_count(), "local_devices": jax.local_device_count(),
             "processes": jax.process_count(), "local_rows": local_rows}
  with open(os.path.join(args.out, f"metrics_{jax.process_index()}.json"), "w") as f:
    json.dump(summary, f)
  if parallel.is_main_process():
    np.savez(os.path.join(args.out, "step.npz"), **results)
  multihost.stop_watchdog()  # as the jobs end (cli.run_job)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
