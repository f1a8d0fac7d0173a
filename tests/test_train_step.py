"""The model, the optimizer and the sharded train/eval steps, on 8 simulated devices against 1."""
import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import multiprocess_worker as tiny
from convirt_jax import losses, parallel
from convirt_jax.training import optimizer as opt_lib
from convirt_jax.training import state as state_lib
from convirt_jax.training import steps as steps_lib
from convirt_jax.config import base_config
from convirt_jax.models.convirt import ConVIRTModel, ProjectionHead, build_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def config():
  return tiny.tiny_config()


@pytest.fixture(scope="module")
def mesh8():
  return parallel.make_mesh()


@pytest.fixture(scope="module")
def results8(config, mesh8):
  return tiny.step_results(*tiny.run_steps(config, mesh8, tiny.global_batch()))


# ----------------------------------------------------------------------------------------------------
# The model.


def test_model_outputs_and_parameter_groups(config):
  model, _ = tiny.model_and_optimizer(config)
  variables = tiny.state_from_variables(tiny.initial_variables(config), optax.identity())
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  assert set(variables["params"]) == {"image", "text", "image_head", "text_head"}
  batch = tiny.global_batch(batch_size=4)
  args = (batch["image"], batch["input_ids"], batch["attention_mask"])

  out = jax.jit(lambda v, *a: model.apply(v, *a, return_features=True))(variables, *args)
  assert out["image_emb"].shape == out["text_emb"].shape == (4, config.model.projection_dim)
  assert out["image_features"].shape == (4, 8 * 8)  # ResNet18 at width 1/8: 512 / 8 features.
  assert out["text_features"].shape == (4, tiny.TINY_BERT.hidden_size)
  assert all(x.dtype == jnp.float32 for x in out.values())

  # The per-modality methods give the same features and projections.
  image_features, image_emb = jax.jit(
      lambda v, x: model.apply(v, x, method=ConVIRTModel.encode_images))(variables, args[0])
  text_features, text_emb = jax.jit(
      lambda v, i, m: model.apply(v, i, m, method=ConVIRTModel.encode_texts))(variables, *args[1:])
  for got, want in ((image_features, "image_features"), (image_emb, "image_emb"),
                    (text_features, "text_features"), (text_emb, "text_emb")):
    np.testing.assert_allclose(np.asarray(got), np.asarray(out[want]), rtol=0, atol=1e-6)

  # Max pooling sees only valid tokens: changing a padded token changes nothing.
  padded = np.argwhere(batch["attention_mask"] == 0)[0]
  ids = batch["input_ids"].copy()
  ids[tuple(padded)] = 5
  _, text_emb_2 = model.apply(variables, ids, batch["attention_mask"], method=ConVIRTModel.encode_texts)
  np.testing.assert_allclose(np.asarray(text_emb_2), np.asarray(text_emb), rtol=0, atol=1e-6)

  with pytest.raises(ValueError, match="uint8"):
    model.apply(variables, args[0].astype(np.float32), method=ConVIRTModel.encode_images)


def test_projection_head_uses_torch_linear_init():
  head = ProjectionHead(hidden_dim=256, output_dim=128)
  params = head.init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))["params"]
  for name, fan_in in (("dense1", 64), ("dense2", 256)):
    bound = 1 / math.sqrt(fan_in)
    for leaf in ("kernel", "bias"):
      value = np.asarray(params[name][leaf])
      assert np.max(np.abs(value)) <= bound
      # U(-b, b) has standard deviation b / sqrt(3).
      assert np.std(value) == pytest.approx(bound / math.sqrt(3), rel=0.15)


# ----------------------------------------------------------------------------------------------------
# Data parallelism: the step on 8 devices is the step on 1.


def test_train_step_8_devices_equals_1_device(config, results8):
  reference = tiny.reference_step(config)
  diffs = tiny.compare_step_results(results8, reference, lr=config.optimizer.lr)
  print("8 devices vs 1:", diffs)
  for kind in ("metrics", "gradient", "batch_stats", "params"):
    assert diffs[kind] <= ATOL, (kind, diffs)
  # The stated exemption (README): a parameter whose gradient is below 1e-7 may differ by up to
  # 2 * lr (Adam's first step is lr * g / (|g| + eps)), and at most 1 in 10^4 of them beyond 1e-5.
  assert diffs["params_below_grad_floor"] <= 2 * config.optimizer.lr, diffs
  assert diffs["entries_beyond_atol"] <= 1e-4 * sum(
      v.size for k, v in reference.items() if k.startswith("params/"))

  # The comparison is not vacuous: the step moved the BatchNorm statistics off their initial 0 / 1,
  # produced gradients of a sane size, and matches the loss computed by hand on the outputs.
  initial = tiny.initial_variables(config)
  moved = [k for k in initial if k.startswith("batch_stats/") and
           not np.allclose(initial[k], reference[k])]
  assert len(moved) == len([k for k in initial if k.startswith("batch_stats/")])
  assert 0.1 < reference["metrics/grad_norm"] < 1e3
  assert reference["metrics/lr"] == pytest.approx(config.optimizer.lr)
  lam = config.loss.image_weight
  np.testing.assert_allclose(
      reference["metrics/loss"], lam * reference["metrics/loss_image_to_text"] +
      (1 - lam) * reference["metrics/loss_text_to_image"], rtol=1e-6)


def test_gradient_is_summed_once_over_devices(config, results8):
  """A second psum of the gradients would multiply them by 8; grad_norm and Adam's mu would show it."""
  reference = tiny.reference_step(config)
  ratio = results8["metrics/grad_norm"] / reference["metrics/grad_norm"]
  assert ratio == pytest.approx(1.0, abs=1e-5)
  key = "adam_mu/image_head/dense2/kernel"
  np.testing.assert_allclose(results8[key], reference[key], rtol=0, atol=1e-7)


def test_frozen_parameters_stay_bit_identical(config, mesh8):
  batches = [tiny.global_batch(seed) for seed in (1, 2, 3)]
  step = tiny.train_step_for(config, mesh8)
  _, optimizer = tiny.model_and_optimizer(config)
  initial = tiny.initial_variables(config)
  state = parallel.replicate(tiny.state_from_variables(initial, optimizer), mesh8)
  for batch in batches:
    state, metrics = step(state, parallel.shard_batch(batch, mesh8))
  state = parallel.fetch(state)
  assert int(state["step"]) == 3 and np.isfinite(float(metrics["loss"]))

  frozen = tiny.flat(opt_lib.frozen_mask(state["params"], config.model.text.frozen_layers), "params/")
  params = tiny.flat(state["params"], "params/")
  frozen_keys = {k for k, f in frozen.items() if f}
  assert frozen_keys and all(k.startswith(("params/text/embeddings/", "params/text/encoder/layer_0/"))
                             for k in frozen_keys)
  for key, value in params.items():
    if key in frozen_keys:
      np.testing.assert_array_equal(value, initial[key], err_msg=key)
    else:
      assert np.any(value != initial[key]), f"{key} did not move"

  # Adam keeps moments for the trainable parameters only.
  for moment in ("mu", "nu"):
    stored = set(tiny.flat(optax.tree_utils.tree_get(state["opt_state"], moment), "params/"))
    assert stored == set(params) - frozen_keys


def test_repeated_steps_lower_the_loss(config, mesh8):
  _, optimizer = tiny.model_and_optimizer(config)
  state = parallel.replicate(tiny.state_from_variables(tiny.initial_variables(config), optimizer),
                             mesh8)
  batch = parallel.shard_batch(tiny.global_batch(), mesh8)
  step = tiny.train_step_for(config, mesh8)
  history = []
  for _ in range(8):
    state, metrics = step(state, batch)
    history.append(float(metrics["loss"]))
  assert int(state["step"]) == 8
  assert all(b < a for a, b in zip(history, history[1:])), history
  assert history[-1] < 0.85 * history[0], history


def test_dropout_streams_follow_the_step(config, mesh8):
  """With dropout on, a step is reproducible from the state, and the masks change with the step."""
  text = dataclasses.replace(tiny.TINY_BERT, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
  model = build_model(config, text, axis_name=parallel.DATA_AXIS)
  _, optimizer = tiny.model_and_optimizer(config)  # Same parameter tree.
  step = steps_lib.make_train_step(model, optimizer, config, mesh8)
  batch = tiny.global_batch()

  def loss_at(step_number):
    state = tiny.state_from_variables(tiny.initial_variables(config), optimizer)
    state["step"] = np.int32(step_number)
    _, metrics = step(parallel.replicate(state, mesh8), parallel.shard_batch(batch, mesh8))
    return float(metrics["loss"])

  first = loss_at(0)
  assert loss_at(0) == first
  assert loss_at(1) != first
  assert abs(first - float(tiny.reference_step(config)["metrics/loss"])) > 1e-4  # Dropout is on.


def test_bfloat16_step_runs_close_to_float32(config, mesh8, results8):
  bf16 = tiny.tiny_config(**{"train.precision": "bfloat16"})
  state, metrics = tiny.run_steps(bf16, mesh8, tiny.global_batch(),
                                  variables=tiny.initial_variables(config))
  state, metrics = parallel.fetch((state, metrics))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state["params"]))
  assert metrics["loss"].dtype == np.float32
  # bf16 keeps 8 mantissa bits: activations differ by ~1e-2 relative, the loss by far less.
  print("bf16 vs f32 loss:", float(metrics["loss"]), float(results8["metrics/loss"]))
  assert float(metrics["loss"]) == pytest.approx(float(results8["metrics/loss"]), rel=2e-2)
  assert float(metrics["grad_norm"]) == pytest.approx(float(results8["metrics/grad_norm"]), rel=0.1)


def test_eval_step_ignores_padding_and_matches_the_encoders(config, mesh8):
  model, optimizer = tiny.model_and_optimizer(config)
  state = parallel.replicate(tiny.state_from_variables(tiny.initial_variables(config), optimizer),
                             mesh8)
  eval_step = steps_lib.make_eval_step(model, config, mesh8)
  real = tiny.global_batch(seed=7)
  plain = parallel.fetch(eval_step(state, parallel.shard_batch(real, mesh8)))

  # 8 padding rows spread over the devices, holding another batch's data.
  junk = tiny.global_batch(seed=8, batch_size=8)
  where = np.array([0, 4, 5, 9, 12, 13, 20, 23])
  keep = np.setdiff1d(np.arange(24), where)
  padded = {k: np.empty((24,) + v.shape[1:], v.dtype) for k, v in real.items()}
  for key in padded:
    padded[key][keep], padded[key][where] = real[key], junk[key]
  padded["mask"] = np.isin(np.arange(24), keep)
  masked = parallel.fetch(eval_step(state, parallel.shard_batch(padded, mesh8)))
  for key in plain:
    np.testing.assert_allclose(masked[key], plain[key], rtol=0, atol=1e-6, err_msg=key)

  # The same number from the encoders on one device and the loss on the whole batch.
  variables = tiny.state_from_variables(tiny.initial_variables(config), optax.identity())
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  out = jax.jit(lambda v, *a: model.apply(v, *a))(variables, real["image"], real["input_ids"],
                                                 real["attention_mask"])
  want = losses.convirt_loss_terms(out["image_emb"], out["text_emb"])
  for key in plain:
    np.testing.assert_allclose(plain[key], float(want[key]), rtol=0, atol=ATOL, err_msg=key)


def test_train_step_requires_synchronised_batchnorm(config, mesh8):
  model = build_model(config, tiny.TINY_BERT, axis_name=None)
  with pytest.raises(ValueError, match="axis_name"):
    steps_lib.make_train_step(model, optax.identity(), config, mesh8)


# ----------------------------------------------------------------------------------------------------
# Freezing rules.


def _shapes(config):
  model, _ = tiny.model_and_optimizer(config)
  return state_lib.param_shapes(model, tiny.IMAGE_SIZE, tiny.TEXT_LENGTH)


def test_frozen_mask_rule(config):
  shapes = _shapes(config)

  def frozen_prefixes(frozen_layers):
    mask = tiny.flat(opt_lib.frozen_mask(shapes, frozen_layers), "")
    return {"/".join(k.split("/")[:3]) for k, f in mask.items() if f}

  assert frozen_prefixes(-1) == set()
  assert frozen_prefixes(0) == {"text/embeddings/word_embeddings", "text/embeddings/position_embeddings",
                                "text/embeddings/token_type_embeddings", "text/embeddings/LayerNorm"}
  assert frozen_prefixes(1) == frozen_prefixes(0) | {"text/encoder/layer_0"}
  assert frozen_prefixes(2) == frozen_prefixes(1) | {"text/encoder/layer_1"}
  with pytest.raises(ValueError, match="model.text.frozen_layers=3"):
    opt_lib.frozen_mask(shapes, 3)

  counts = opt_lib.parameter_counts(shapes, opt_lib.frozen_mask(shapes, 2))
  text_total = sum(x.size for x in jax.tree.leaves(shapes["text"]))
  assert counts["frozen"] == text_total
  assert counts["frozen"] + counts["trainable"] == sum(x.size for x in jax.tree.leaves(shapes))
  assert "frozen" in opt_lib.describe_parameters(shapes, 1)


# ----------------------------------------------------------------------------------------------------
# Optimizer.


def _optimizer_config(**overrides):
  config = base_config()
  config.model.text.frozen_layers = -1
  for key, value in overrides.items():
    config.optimizer[key] = value
  return config


def _torch_reference(params, grads_per_step, lr, weight_decay, clip):
  tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  opt = torch.optim.Adam(tensors.values(), lr=lr, weight_decay=weight_decay)
  for grads in grads_per_step:
    for key, tensor in tensors.items():
      tensor.grad = torch.tensor(grads[key])
    if clip:
      torch.nn.utils.clip_grad_norm_(tensors.values(), clip)
    opt.step()
  return {k: t.detach().numpy() for k, t in tensors.items()}


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_adam_with_l2_matches_torch(clip):
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
            "bias": rng.normal(size=(3,)).astype(np.float32)}
  # Small gradients next to a large weight decay: L2-in-the-gradient and AdamW then differ clearly.
  grads = [{k: (0.05 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
           for _ in range(4)]
  lr, wd = 1e-2, 0.1
  config = _optimizer_config(lr=lr, weight_decay=wd, grad_clip_norm=clip)
  tree = {"image_head": params}
  optimizer = opt_lib.make_optimizer(config, tree, steps_total=10)
  state = optimizer.init(tree)
  ours = tree
  for g in grads:
    updates, state = optimizer.update({"image_head": g}, state, ours)
    ours = optax.apply_updates(ours, updates)
  want = _torch_reference(params, grads, lr, wd, clip)
  for key in params:
    np.testing.assert_allclose(np.asarray(ours["image_head"][key]), want[key], rtol=0, atol=1e-6)

  decoupled = optax.adamw(lr, weight_decay=wd)
  adamw_params, adamw_state = params, decoupled.init(params)
  for g in grads:
    updates, adamw_state = decoupled.update(g, adamw_state, adamw_params)
    adamw_params = optax.apply_updates(adamw_params, updates)
  assert max(np.max(np.abs(adamw_params[k] - want[k])) for k in params) > 1e-3


def _run_updates(optimizer, steps):
  params = {"image_head": {"w": jnp.ones((3,))}}
  state = optimizer.init(params)
  lrs = []
  for _ in range(steps):
    updates, state = optimizer.update({"image_head": {"w": jnp.full((3,), 0.5)}}, state, params)
    params = optax.apply_updates(params, updates)
    lrs.append(float(opt_lib.get_learning_rate(state)))
  return lrs, state, params


def test_cosine_schedule_with_warmup():
  lr, warmup, total = 1e-3, 3, 11
  config = _optimizer_config(lr=lr, schedule="cosine", warmup_steps=warmup)
  lrs, _, _ = _run_updates(opt_lib.make_optimizer(config, {"image_head": {"w": 0}}, total), total + 1)
  want = [lr * k / warmup if k < warmup else
          lr * 0.5 * (1 + math.cos(math.pi * min(k - warmup, total - warmup) / (total - warmup)))
          for k in range(total + 1)]
  np.testing.assert_allclose(lrs, want, rtol=0, atol=1e-6 * lr)  # float32 schedule arithmetic.
  assert lrs[warmup] == pytest.approx(lr) and lrs[-1] == 0.0
  with pytest.raises(ValueError, match="optimizer.warmup_steps"):
    opt_lib.make_optimizer(config, {"image_head": {"w": 0}}, steps_total=warmup)


def test_plateau_matches_torch_and_sets_the_learning_rate():
  patience, factor = 2, 0.5
  config = _optimizer_config(schedule="plateau", plateau_patience=patience, plateau_factor=factor)
  val_losses = [1.0, 0.9, 0.95, 0.96, 0.97, 0.89995, 0.8, 0.85, 0.79995, 0.85, 0.7, 0.7, 0.7, 0.7, 0.7]
  weight = torch.zeros(1, requires_grad=True)
  torch_opt = torch.optim.SGD([weight], lr=1.0)
  scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
      torch_opt, mode="min", factor=factor, patience=patience - 1, threshold=1e-4,
      threshold_mode="rel", cooldown=0)
  plateau, scales, torch_scales = opt_lib.plateau_init(), [], []
  for value in val_losses:
    plateau, scale = opt_lib.reduce_on_plateau(plateau, value, config)
    scheduler.step(value)
    scales.append(scale)
    torch_scales.append(torch_opt.param_groups[0]["lr"])
  np.testing.assert_allclose(scales, torch_scales, rtol=1e-7)
  assert min(scales) <= factor**2  # Several reductions happened.

  # The loop applies the scale through the optimizer state; the next update uses it.
  optimizer = opt_lib.make_optimizer(config, {"image_head": {"w": 0}}, steps_total=100)
  lrs, state, params = _run_updates(optimizer, 1)
  assert lrs == [pytest.approx(config.optimizer.lr)]
  state = opt_lib.set_learning_rate(state, config.optimizer.lr * scales[-1])
  updates, state = optimizer.update({"image_head": {"w": jnp.full((3,), 0.5)}}, state, params)
  assert float(opt_lib.get_learning_rate(state)) == pytest.approx(config.optimizer.lr * scales[-1])
  # Adam's step with a constant gradient has size lr.
  np.testing.assert_allclose(np.asarray(updates["image_head"]["w"]),
                             -config.optimizer.lr * scales[-1] * np.ones(3), rtol=1e-4)


def test_bad_optimizer_config_raises():
  with pytest.raises(ValueError, match="optimizer.schedule"):
    opt_lib.make_optimizer(_optimizer_config(schedule="linear"), {"image_head": {"w": 0}}, 10)
  with pytest.raises(ValueError, match="optimizer.plateau_factor"):
    opt_lib.make_optimizer(_optimizer_config(schedule="plateau", plateau_factor=1.5),
                           {"image_head": {"w": 0}}, 10)


# ----------------------------------------------------------------------------------------------------
# Initial state.


def test_init_train_state_with_override(config):
  model, optimizer = tiny.model_and_optimizer(config)
  rng = jax.random.PRNGKey(0)
  fresh = state_lib.init_train_state(model, optimizer, rng, tiny.IMAGE_SIZE, tiny.TEXT_LENGTH)
  assert set(fresh) == {"step", "params", "batch_stats", "opt_state", "rng", "plateau"}
  assert set(fresh["batch_stats"]) == {"image"}

  head = jax.tree.map(lambda x: np.full(x.shape, 0.25, np.float32), fresh["params"]["image_head"])
  stats = jax.tree.map(lambda x: np.full(x.shape, 2.0, np.float32), fresh["batch_stats"]["image"])
  state = state_lib.init_train_state(model, optimizer, rng, tiny.IMAGE_SIZE, tiny.TEXT_LENGTH,
                                 params_override={"params": {"image_head": head},
                                                  "batch_stats": {"image": stats}})
  for got, want in ((state["params"]["image_head"], head), (state["batch_stats"]["image"], stats)):
    jax.tree.map(np.testing.assert_array_equal, got, want)
  jax.tree.map(np.testing.assert_array_equal, state["params"]["text"], fresh["params"]["text"])

  wrong = flax.traverse_util.flatten_dict(head, sep="/")
  wrong["dense1/kernel"] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match="params/image_head/dense1/kernel: shape"):
    state_lib.init_train_state(model, optimizer, rng, tiny.IMAGE_SIZE, tiny.TEXT_LENGTH, params_override={
        "params": {"image_head": flax.traverse_util.unflatten_dict(wrong, sep="/")}})
  missing = {"dense1": head["dense1"]}
  with pytest.raises(ValueError, match="missing.*dense2"):
    state_lib.init_train_state(model, optimizer, rng, tiny.IMAGE_SIZE, tiny.TEXT_LENGTH,
                           params_override={"params": {"image_head": missing}})
  with pytest.raises(ValueError, match="no such group"):
    state_lib.init_train_state(model, optimizer, rng, tiny.IMAGE_SIZE, tiny.TEXT_LENGTH,
                           params_override={"params": {"vision": head}})
