"""Train state, optimizer and the data-parallel train/eval steps of ConVIRT (pure functions).

The state is a plain pytree:
  {"step", "params": {"image", "text", "image_head", "text_head"}, "batch_stats", "opt_state", "rng"}.

A step runs the forward pass and the loss per device under `jax.shard_map` over the mesh axis "data":
BatchNorm statistics are averaged over the axis (SyncBatchNorm) and the loss scores every row against
the embeddings of the whole global batch. Under shard_map's `check_vma`, the gradient of a replicated
parameter leaves the map already summed over the axis, so there is no explicit gradient psum here.
"""
import functools
import re
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from convirt_jax import losses, parallel
from convirt_jax.models.convirt import ConVIRTModel

PARAM_GROUPS = ("image", "text", "image_head", "text_head")
BATCH_KEYS = ("image", "input_ids", "attention_mask")

State = dict[str, Any]
Metrics = dict[str, jax.Array]

# PyTorch Adam's defaults.
_ADAM_B1, _ADAM_B2, _ADAM_EPS = 0.9, 0.999, 1e-8
# PyTorch ReduceLROnPlateau's default relative threshold for "an improvement".
_PLATEAU_RTOL = 1e-4

# "text/embeddings/..." and "text/encoder/layer_<i>/..." are the freezable parts of the text encoder.
_TEXT_FREEZABLE = re.compile(r"^text/(?:embeddings/|encoder/layer_(\d+)/)")


# ----------------------------------------------------------------------------------------------------
# Freezing.


def _path_str(path: tuple[str, ...]) -> str:
  return "/".join(path)


def frozen_mask(params: Any, frozen_layers: int) -> Any:
  """A bool pytree like `params`: True for the text embeddings and text layers 0..frozen_layers-1.

  `frozen_layers` = -1 freezes nothing, 0 only the embeddings (model.text.frozen_layers).
  """
  if frozen_layers < -1:
    raise ValueError(f"model.text.frozen_layers={frozen_layers}: must be -1 (none) or >= 0")
  paths = [_path_str(p) for p in flax.traverse_util.flatten_dict(params)]
  layers = {int(m.group(1)) for p in paths if (m := _TEXT_FREEZABLE.match(p)) and m.group(1)}
  if frozen_layers > len(layers):
    raise ValueError(f"model.text.frozen_layers={frozen_layers} exceeds the {len(layers)} layers of "
                     "the text encoder")

  def is_frozen(path: tuple[str, ...], _) -> bool:
    match = _TEXT_FREEZABLE.match(_path_str(path))
    if frozen_layers < 0 or match is None:
      return False
    return match.group(1) is None or int(match.group(1)) < frozen_layers

  return flax.traverse_util.path_aware_map(is_frozen, params)


def parameter_counts(params: Any, frozen: Any) -> dict[str, int]:
  """Number of frozen and trainable scalars."""
  sizes = jax.tree.leaves(jax.tree.map(lambda p, f: (int(np.size(p)), f), params, frozen),
                          is_leaf=lambda x: isinstance(x, tuple))
  frozen_count = sum(size for size, f in sizes if f)
  return {"frozen": frozen_count, "trainable": sum(size for size, _ in sizes) - frozen_count}


def describe_parameters(params: Any, frozen_layers: int) -> str:
  """One line for the log, e.g. 'parameters: 133.3M (trainable 90.7M, frozen 42.6M), per group ...'."""
  frozen = frozen_mask(params, frozen_layers)
  fmt = lambda n: f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"
  total = parameter_counts(params, frozen)
  groups = ", ".join(f"{g} {fmt(sum(parameter_counts(params[g], frozen[g]).values()))}"
                     for g in params)
  return (f"parameters: {fmt(total['frozen'] + total['trainable'])} (trainable "
          f"{fmt(total['trainable'])}, frozen {fmt(total['frozen'])}); {groups}")


# ----------------------------------------------------------------------------------------------------
# Optimizer and learning rate.


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_total: int) -> optax.ScalarOrSchedule:
  """optimizer.schedule: "constant" and "plateau" give a number (kept in opt_state, so the loop can
  lower it), "cosine" a linear warm-up to optimizer.lr then a cosine decay to 0 at `steps_total`."""
  opt = config.optimizer
  if opt.schedule in ("constant", "plateau"):
    return float(opt.lr)
  if opt.schedule == "cosine":
    if not 0 <= opt.warmup_steps < steps_total:
      raise ValueError(f"optimizer.warmup_steps={opt.warmup_steps} must be in [0, {steps_total}), "
                       "the total number of steps")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=opt.warmup_steps, decay_steps=steps_total,
        end_value=0.0)
  raise ValueError(f"optimizer.schedule={opt.schedule!r}: choose 'constant', 'cosine' or 'plateau'")


def make_optimizer(config: ml_collections.ConfigDict, params: Any,
                   steps_total: int) -> optax.GradientTransformation:
  """torch.optim.Adam(lr, weight_decay) on the trainable parameters; frozen ones get nothing.

  `params` (or `param_shapes(...)`) only gives the tree whose paths decide what is frozen.

  PyTorch's weight decay is L2 regularisation: weight_decay * param is added to the gradient before
  the Adam moments (not AdamW's decoupled decay). Optional clipping by global norm comes first, as
  torch.nn.utils.clip_grad_norm_ does before optimizer.step(). Frozen parameters are routed to
  `set_to_zero`, which keeps no state, so they carry no Adam moments.
  """
  opt = config.optimizer
  if opt.weight_decay < 0 or opt.grad_clip_norm < 0:
    raise ValueError(f"optimizer.weight_decay={opt.weight_decay} and optimizer.grad_clip_norm="
                     f"{opt.grad_clip_norm} must be >= 0")
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.weight_decay > 0:
    parts.append(optax.add_decayed_weights(opt.weight_decay))
  parts.append(optax.scale_by_adam(b1=_ADAM_B1, b2=_ADAM_B2, eps=_ADAM_EPS))
  # inject_hyperparams keeps the learning rate in the state: read back for logging, set by the loop.
  parts.append(optax.inject_hyperparams(optax.scale_by_learning_rate)(
      learning_rate=learning_rate_schedule(config, steps_total)))
  labels = jax.tree.map(lambda frozen: "frozen" if frozen else "trainable",
                        frozen_mask(params, config.model.text.frozen_layers))
  return optax.multi_transform({"trainable": optax.chain(*parts), "frozen": optax.set_to_zero()},
                               labels)


def _is_value(_, value: Any) -> bool:
  # With a schedule, inject_hyperparams also keeps a "learning_rate" schedule state: skip it.
  return not isinstance(value, tuple)


def get_learning_rate(opt_state: Any) -> jax.Array:
  """The learning rate of the last update (or the first one, before any update)."""
  return optax.tree_utils.tree_get(opt_state, "learning_rate", filtering=_is_value)


def set_learning_rate(opt_state: Any, learning_rate: float) -> Any:
  """opt_state with a new learning rate (for "constant"/"plateau"; a schedule overwrites it).

  The new value keeps the old one's sharding, so a replicated state stays replicated on every host.
  """
  old = get_learning_rate(opt_state)
  if old is None:
    raise ValueError("opt_state has no learning_rate: it was not built by make_optimizer")
  value = np.asarray(learning_rate, dtype=old.dtype)
  if isinstance(old, jax.Array):
    value = jax.make_array_from_process_local_data(old.sharding, value)
  return optax.tree_utils.tree_set(opt_state, _is_value, learning_rate=value)


def _plateau_transform(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  opt = config.optimizer
  if not 0.0 < opt.plateau_factor < 1.0:
    raise ValueError(f"optimizer.plateau_factor={opt.plateau_factor} must be in (0, 1)")
  if opt.plateau_patience < 1:
    raise ValueError(f"optimizer.plateau_patience={opt.plateau_patience} must be >= 1")
  return optax.contrib.reduce_on_plateau(factor=opt.plateau_factor, patience=opt.plateau_patience,
                                         rtol=_PLATEAU_RTOL, atol=0.0)


def plateau_init(config: ml_collections.ConfigDict) -> Any:
  """The state of `reduce_on_plateau` before the first evaluation (scale 1, best loss +inf)."""
  return _plateau_transform(config).init(jnp.zeros((), jnp.float32))


def reduce_on_plateau(plateau_state: Any, val_loss: float,
                      config: ml_collections.ConfigDict) -> tuple[Any, float]:
  """Feeds one validation loss; returns the new state and the learning-rate scale to apply.

  The scale is multiplied by optimizer.plateau_factor once the loss has not improved (relative
  threshold 1e-4) for optimizer.plateau_patience evaluations in a row; this is
  torch.optim.lr_scheduler.ReduceLROnPlateau with its patience = plateau_patience - 1.
  """
  _, plateau_state = _plateau_transform(config).update((), plateau_state,
                                                       value=jnp.asarray(val_loss, jnp.float32))
  return plateau_state, float(plateau_state.scale)


# ----------------------------------------------------------------------------------------------------
# Train state.


def _check_override(group: str, collection: str, given: Any, expected: Any) -> Any:
  where = f"{collection}/{group}"
  given_flat = {_path_str(k): v for k, v in flax.traverse_util.flatten_dict(given).items()}
  expected_flat = {_path_str(k): v for k, v in flax.traverse_util.flatten_dict(expected).items()}
  missing, extra = expected_flat.keys() - given_flat.keys(), given_flat.keys() - expected_flat.keys()
  if missing or extra:
    raise ValueError(f"params_override {where}: missing {sorted(missing)[:5]} (of {len(missing)}), "
                     f"unexpected {sorted(extra)[:5]} (of {len(extra)})")
  for path, value in given_flat.items():
    if np.shape(value) != expected_flat[path].shape:
      raise ValueError(f"params_override {where}/{path}: shape {np.shape(value)}, the model has "
                       f"{expected_flat[path].shape}")
  return jax.tree.map(lambda v, e: jnp.asarray(v, e.dtype), given, expected)


def _dummy_inputs(image_size: int, text_length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  tokens = jnp.ones((1, text_length), jnp.int32)
  return jnp.zeros((1, image_size, image_size, 3), jnp.uint8), tokens, tokens


@functools.lru_cache(maxsize=8)
def _jitted_init(model: ConVIRTModel) -> Callable[..., Any]:
  # Modules compare by their fields: re-initialising an equal model (another seed, a random-init
  # baseline) reuses the compiled initialiser, which is slow to compile on CPU.
  return jax.jit(functools.partial(model.init, train=False))


def param_shapes(model: ConVIRTModel, image_size: int, text_length: int) -> Any:
  """The params tree as ShapeDtypeStructs, without computing anything (enough for make_optimizer)."""
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, {"params": jax.random.PRNGKey(0)},
                        *_dummy_inputs(image_size, text_length))["params"]


def init_train_state(model: ConVIRTModel, optimizer: optax.GradientTransformation, rng: jax.Array,
                     image_size: int, text_length: int,
                     params_override: dict[str, Any] | None = None) -> State:
  """A fresh train state (on the default device; `parallel.replicate` it onto the mesh).

  Args:
    model: the ConVIRT model.
    optimizer: from `make_optimizer` for the same parameters.
    rng: a PRNG key; split into the initialisation key and the state's dropout key.
    image_size, text_length: input shapes to trace the initialisation with.
    params_override: {"params": {group: tree}, "batch_stats": {group: tree}} with whole groups
      (e.g. "image", "text") loaded from torchvision / Hugging Face weights; each group must match the
      model's tree exactly in structure and shapes.
  """
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  init_rng, state_rng = jax.random.split(rng)
  variables = flax.core.unfreeze(
      _jitted_init(model)({"params": init_rng}, *_dummy_inputs(image_size, text_length)))
  variables.setdefault("batch_stats", {})
  for collection, groups in (params_override or {}).items():
    if collection not in ("params", "batch_stats"):
      raise ValueError(f"params_override has collection {collection!r}; expected params, batch_stats")
    for group, tree in groups.items():
      if group not in variables[collection]:
        raise ValueError(f"params_override {collection}/{group}: the model has no such group "
                         f"(it has {sorted(variables[collection])})")
      variables[collection][group] = _check_override(group, collection, tree,
                                                     variables[collection][group])
  params = variables["params"]
  if set(params) != set(PARAM_GROUPS):
    raise ValueError(f"the model's parameter groups are {sorted(params)}; expected {PARAM_GROUPS}")
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "batch_stats": variables["batch_stats"],
      "opt_state": optimizer.init(params),
      "rng": state_rng,
  }


# ----------------------------------------------------------------------------------------------------
# Steps.


def _model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch is missing {missing}; it has {sorted(batch)}")
  return {k: batch[k] for k in BATCH_KEYS}


def _loss_config(config: ml_collections.ConfigDict) -> dict[str, float]:
  return {"temperature": config.loss.temperature, "image_weight": config.loss.image_weight}


def make_train_step(model: ConVIRTModel, optimizer: optax.GradientTransformation,
                    config: ml_collections.ConfigDict,
                    mesh: Mesh) -> Callable[[State, dict[str, jax.Array]], tuple[State, Metrics]]:
  """jit(train_step(state, batch) -> (state, metrics)); the state is donated.

  `state` is replicated on `mesh` and `batch` ({"image": uint8 [B,H,W,3], "input_ids",
  "attention_mask": int32 [B,T]}) sharded over "data" with B the global batch. Metrics: loss, both
  directional losses and top-1 accuracies (over the global batch), grad_norm (before clipping) and lr.
  """
  axis = parallel.DATA_AXIS
  if model.image_encoder.axis_name != axis:
    raise ValueError(f"the train step needs the model built with axis_name={axis!r} so that "
                     f"BatchNorm statistics are synchronised; it has {model.image_encoder.axis_name!r}")
  frozen_layers = config.model.text.frozen_layers
  loss_config = _loss_config(config)

  def per_device(params, batch_stats, rng, step, inputs):
    frozen = frozen_mask(params, frozen_layers)
    # One dropout stream per step and device, reproducible from the state alone.
    rng = jax.random.fold_in(jax.random.fold_in(rng, step), jax.lax.axis_index(axis))

    def loss_fn(params):
      # No gradient flows into frozen weights, so XLA skips their backward pass.
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
      out, updated = model.apply(
          {"params": params, "batch_stats": batch_stats}, inputs["image"], inputs["input_ids"],
          inputs["attention_mask"], train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
      terms = losses.convirt_loss_terms(out["image_emb"], out["text_emb"], axis_name=axis,
                                        **loss_config)
      return terms["loss"], (terms, updated["batch_stats"])

    # Already summed over the axis (check_vma): the loss is a psum of per-device sums.
    grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
    return grads, batch_stats, terms

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(), P(axis)),
                          out_specs=(P(), P(), P()))

  def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, Metrics]:
    grads, batch_stats, terms = sharded(state["params"], state["batch_stats"], state["rng"],
                                        state["step"], _model_inputs(batch))
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(state["params"], updates),
        "batch_stats": batch_stats,
        "opt_state": opt_state,
        "rng": state["rng"],
    }
    metrics = dict(terms, grad_norm=optax.global_norm(grads), lr=get_learning_rate(opt_state))
    return new_state, metrics

  replicated, data = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(train_step, in_shardings=(replicated, data), out_shardings=replicated,
                 donate_argnums=0)


def make_eval_step(model: ConVIRTModel, config: ml_collections.ConfigDict,
                   mesh: Mesh) -> Callable[[State, dict[str, jax.Array]], Metrics]:
  """jit(eval_step(state, batch) -> metrics): the train step's loss terms in inference mode.

  An optional bool batch["mask"] marks real rows; padded rows are neither scored nor negatives.
  """
  axis = parallel.DATA_AXIS
  loss_config = _loss_config(config)

  def per_device(params, batch_stats, inputs, mask):
    out = model.apply({"params": params, "batch_stats": batch_stats}, inputs["image"],
                      inputs["input_ids"], inputs["attention_mask"], train=False)
    return losses.convirt_loss_terms(out["image_emb"], out["text_emb"], axis_name=axis, mask=mask,
                                     **loss_config)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axis), P(axis)),
                          out_specs=P())

  def eval_step(state: State, batch: dict[str, jax.Array]) -> Metrics:
    inputs = _model_inputs(batch)
    mask = batch.get("mask")
    if mask is None:
      mask = jnp.ones(inputs["input_ids"].shape[:1], bool)
    return sharded(state["params"], state["batch_stats"], inputs, mask.astype(bool))

  replicated, data = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(eval_step, in_shardings=(replicated, data), out_shardings=replicated)
