"""train.microbatch_size: the GradCache step on 8 devices against the plain step and a ghost-BN reference.

4 rows per device (global batch 32). With frozen BatchNorm the micro-batched step is the plain step;
with batch statistics it is the step of `steps.micro_batched_gradient`'s docstring, which
`_ghost_batch_norm_reference` computes here directly, by autodiff through every micro-batch at once.
"""
import functools

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import multiprocess_worker as tiny
from convirt_jax import config as config_lib
from convirt_jax import losses, parallel
from convirt_jax.errors import ConfigError
from convirt_jax.training import state as state_lib
from convirt_jax.training import steps as steps_lib
from convirt_jax.training.optimizer import frozen_mask, get_learning_rate

DEVICES = 8
PER_DEVICE = 4
BATCH = DEVICES * PER_DEVICE
ATOL = 1e-5


def _config(batch_norm: str, microbatch_size: int = 0):
  return tiny.tiny_config(**{"model.image.batch_norm": batch_norm, "train.batch_size": BATCH,
                             "train.microbatch_size": microbatch_size})


@functools.cache
def _batch():
  return tiny.global_batch(seed=3, batch_size=BATCH)


@pytest.fixture(scope="module")
def mesh8():
  mesh = parallel.make_mesh()
  assert mesh.size == DEVICES
  return mesh


def _step_results(config, mesh, variables):
  return tiny.step_results(*tiny.run_steps(config, mesh, _batch(), variables=variables))


@functools.cache
def _variables():
  """Flattened initial variables of the tiny model, drawn with numpy from the traced shapes.

  Compiling the model's initialiser takes longer than all of the steps below; any generic point does
  for an equivalence test: kernels and embeddings N(0, 1/fan_in), norm scales 1, biases N(0, 0.01),
  running statistics 0 / 1. Batch size, micro-batch size and BatchNorm mode do not change the tree.
  """
  model, _ = tiny.model_and_optimizer(_config("batch"))
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          *state_lib.dummy_inputs(tiny.IMAGE_SIZE, tiny.TEXT_LENGTH))
  rng = np.random.default_rng(0)

  def draw(key, shape):
    name = key.rsplit("/", 1)[-1]
    if name in ("scale", "var"):
      return np.ones(shape, np.float32)
    if name == "mean":
      return np.zeros(shape, np.float32)
    if len(shape) < 2:  # biases: nonzero, or every ReLU of a head might start dead for some unit
      return (0.1 * rng.normal(size=shape)).astype(np.float32)
    return (rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)

  variables = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes[collection]):
      key = f"{collection}/{jax.tree_util.keystr(path, simple=True, separator='/')}"
      variables[key] = draw(key, leaf.shape)
  variables["rng"] = np.asarray(jax.random.PRNGKey(1))
  return variables


def _check_equal(got, want, lr):
  diffs = tiny.compare_step_results(got, want, lr=lr)
  for kind in ("metrics", "gradient", "batch_stats", "params"):
    assert diffs[kind] <= ATOL, (kind, diffs)
  assert diffs["entries_beyond_atol"] <= 1e-4 * sum(v.size for k, v in want.items()
                                                    if k.startswith("params/"))
  return diffs


@pytest.mark.parametrize("microbatch_size", [1, 2])
def test_frozen_batch_norm_micro_batched_step_is_the_plain_step(mesh8, microbatch_size):
  plain_config = _config("frozen")
  plain = _step_results(plain_config, mesh8, _variables())
  micro = _step_results(_config("frozen", microbatch_size), mesh8, _variables())
  diffs = _check_equal(micro, plain, plain_config.optimizer.lr)
  print(f"frozen BN, microbatch {microbatch_size}/device vs plain:", diffs)
  # Not vacuous: a sane gradient, and the frozen running statistics stayed where they were.
  assert 0.1 < plain["metrics/grad_norm"] < 1e3
  for key, value in _variables().items():
    if key.startswith("batch_stats/"):
      np.testing.assert_array_equal(micro[key], value)


def _ghost_batch_norm_reference(config, mesh):
  """The step `micro_batched_gradient`'s docstring states, by autodiff through the whole step.

  The plain step with one change: each device's rows go through the model in micro-batches of m
  (rows [c*m, (c+1)*m) of every shard together form global micro-batch c, whose BatchNorm statistics
  are synced over the devices as usual), in order, the running averages carried from one micro-batch
  to the next; the loss scores the whole global batch and jax.grad differentiates through all of it.

  It runs on the same 8 devices as the step: with batch statistics a 1-device run reduces the
  statistics in another order, and float rounding then flips the odd ReLU input near 0, which moves
  some gradients by ~1e-4 (checked by hand: so does permuting the rows of a micro-batch on 1 device).
  """
  model, optimizer = tiny.model_and_optimizer(config)
  microbatch_size = config.train.microbatch_size
  loss_config = {"temperature": config.loss.temperature, "image_weight": config.loss.image_weight}

  def per_device(params, batch_stats, inputs):
    frozen = frozen_mask(params, config.model.text.frozen_layers)
    chunks = jax.tree.map(lambda x: x.reshape((-1, microbatch_size) + x.shape[1:]), inputs)

    def loss_fn(params):
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)

      def embed(stats, chunk):
        out, updated = model.apply({"params": params, "batch_stats": stats}, chunk["image"],
                                   chunk["input_ids"], chunk["attention_mask"], train=True,
                                   mutable=["batch_stats"])
        return updated["batch_stats"], (out["image_emb"], out["text_emb"])

      stats, (images, texts) = jax.lax.scan(embed, batch_stats, chunks)
      terms = losses.convirt_loss_terms(images.reshape(-1, images.shape[-1]),
                                        texts.reshape(-1, texts.shape[-1]),
                                        axis_name=parallel.DATA_AXIS, **loss_config)
      return terms["loss"], (terms, stats)

    grads, (terms, stats) = jax.grad(loss_fn, has_aux=True)(params)
    return grads, stats, terms

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(parallel.DATA_AXIS)),
                          out_specs=(P(), P(), P()))

  @jax.jit
  def step(state, batch):
    grads, batch_stats, terms = sharded(state["params"], state["batch_stats"], batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new_state = dict(state, step=state["step"] + 1, batch_stats=batch_stats, opt_state=opt_state,
                     params=optax.apply_updates(state["params"], updates))
    return new_state, dict(terms, grad_norm=optax.global_norm(grads),
                           lr=get_learning_rate(opt_state))

  state = parallel.replicate(tiny.state_from_variables(_variables(), optimizer), mesh)
  batch = parallel.shard_batch(steps_lib.model_inputs(_batch()), mesh)
  return tiny.step_results(*step(state, batch))


def test_batch_norm_micro_batched_step_is_the_ghost_batch_norm_step(mesh8):
  config = _config("batch", 2)
  micro = _step_results(config, mesh8, _variables())
  reference = _ghost_batch_norm_reference(config, mesh8)
  diffs = _check_equal(micro, reference, config.optimizer.lr)
  print("batch BN, microbatch 2/device vs the ghost-BN autodiff reference:", diffs)
  # Not vacuous: every running statistic moved, and the gradient is of a sane size.
  initial = _variables()
  for key in (k for k in initial if k.startswith("batch_stats/")):
    assert not np.allclose(micro[key], initial[key]), key
  assert 0.1 < micro["metrics/grad_norm"] < 1e3


def test_microbatch_size_must_divide_the_per_device_batch(mesh8):
  config = _config("frozen", 3)
  model, optimizer = tiny.model_and_optimizer(_config("frozen"))
  with pytest.raises(ConfigError, match=r"train\.microbatch_size=3.*per-device batch 4.*train\.batch_size"):
    steps_lib.make_train_step(model, optimizer, config, mesh8)
  with pytest.raises(ConfigError, match="train.microbatch_size"):
    config_lib.validate(tiny.tiny_config(**{"train.microbatch_size": -1}))
  with pytest.raises(ConfigError, match="train.microbatch_size=5.*train.batch_size=32"):
    config_lib.validate(_config("frozen", 5))
