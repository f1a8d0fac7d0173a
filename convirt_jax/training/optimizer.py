"""The optimizer of every training job: Adam with PyTorch's L2 weight decay on the trainable parameters,
learning-rate schedules (constant, warm-up + cosine, reduce-on-plateau) and the frozen-parameter mask.

Frozen parameters (BERT embeddings and the first `model.text.frozen_layers` layers) are chosen by a rule
on parameter paths, so the same mask serves the ConVIRT state and a fine-tuning state.
"""
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from convirt_jax.errors import ConfigError

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
  if "text" in params and frozen_layers > len(layers):
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
      raise ConfigError(f"optimizer.warmup_steps={opt.warmup_steps} must be in [0, {steps_total}), "
                       "the total number of steps")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=opt.warmup_steps, decay_steps=steps_total,
        end_value=0.0)
  raise ConfigError(f"optimizer.schedule={opt.schedule!r}: choose 'constant', 'cosine' or 'plateau'")


def make_optimizer(config: ml_collections.ConfigDict, params: Any,
                   steps_total: int) -> optax.GradientTransformation:
  """The optimizer of a config's `optimizer.*` (pretraining's): `adam` with its schedule, clipping and
  the text layers `model.text.frozen_layers` frozen; the settings checked before anything compiles."""
  opt = config.optimizer
  if opt.weight_decay < 0 or opt.grad_clip_norm < 0:
    raise ConfigError(f"optimizer.weight_decay={opt.weight_decay} and optimizer.grad_clip_norm="
                     f"{opt.grad_clip_norm} must be >= 0")
  if opt.schedule == "plateau":
    _plateau_transform(config)  # checks its settings now, before anything compiles
  return adam(params, learning_rate_schedule(config, steps_total), weight_decay=float(opt.weight_decay),
              grad_clip_norm=float(opt.grad_clip_norm), frozen_layers=frozen_layers_of(config))


def adam(params: Any, learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 0.0,
         grad_clip_norm: float = 0.0, frozen_layers: int = -1, decoupled_weight_decay: bool = False,
         lr_scales: Any = None) -> optax.GradientTransformation:
  """torch.optim.Adam(lr, weight_decay) on the trainable parameters; frozen ones get nothing.

  `params` (or `param_shapes(...)`) only gives the tree whose paths decide what is frozen
  (`frozen_mask(params, frozen_layers)`).

  PyTorch's weight decay is L2 regularisation: weight_decay * param is added to the gradient before
  the Adam moments (not AdamW's decoupled decay). Optional clipping by global norm comes first, as
  torch.nn.utils.clip_grad_norm_ does before optimizer.step(). Frozen parameters are routed to
  `set_to_zero`, which keeps no state, so they carry no Adam moments.

  `decoupled_weight_decay`: torch.optim.AdamW instead (p -= lr * (adam_update + weight_decay * p)).
  `lr_scales`: a tree of floats like `params` multiplying each parameter's learning rate (layer-wise
  learning-rate decay, `layer_decay_scales`); with AdamW it scales the decay too, as torch's per-group
  learning rates do.
  """
  parts = []
  if grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  decay = [optax.add_decayed_weights(weight_decay)] if weight_decay > 0 else []
  moments = [optax.scale_by_adam(b1=_ADAM_B1, b2=_ADAM_B2, eps=_ADAM_EPS)]
  parts += moments + decay if decoupled_weight_decay else decay + moments
  # inject_hyperparams keeps the learning rate in the state: read back for logging, set by the loop.
  parts.append(optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=learning_rate))
  labels = jax.tree.map(lambda frozen: "frozen" if frozen else "trainable",
                        frozen_mask(params, frozen_layers))
  optimizer = optax.multi_transform({"trainable": optax.chain(*parts), "frozen": optax.set_to_zero()},
                                    labels)
  if lr_scales is None:
    return optimizer
  scale = optax.stateless(lambda updates, _: jax.tree.map(lambda u, c: u * c, updates, lr_scales))
  return optax.chain(optimizer, scale)


def layer_decay_scales(params: Any, layer_of: Any, decay: float) -> Any:
  """Layer-wise learning-rate decay (BEiT's, as MAE and timm fine-tune ViTs): a parameter of layer i of
  n gets decay ** (n - i) of the learning rate; the top (n: the head) gets all of it.

  `layer_of(path) -> (i, n)` maps a parameter's path (a tuple of names) to its layer.
  """
  if not 0.0 < decay <= 1.0:
    raise ConfigError(f"finetune.layer_decay={decay}: must be in (0, 1] (1: no decay)")

  def scale(path, _):
    index, count = layer_of(tuple(str(getattr(k, "key", k)) for k in path))
    return float(decay) ** (count - index)

  return jax.tree_util.tree_map_with_path(scale, params)


def frozen_layers_of(config: ml_collections.ConfigDict) -> int:
  """model.text.frozen_layers of a job with a text encoder; -1 (nothing frozen) otherwise."""
  text = config.get("model", {}).get("text")
  return -1 if text is None else int(text.frozen_layers)


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
    raise ConfigError(f"optimizer.plateau_factor={opt.plateau_factor} must be in (0, 1)")
  if opt.plateau_patience < 1:
    raise ConfigError(f"optimizer.plateau_patience={opt.plateau_patience} must be >= 1")
  return optax.contrib.reduce_on_plateau(factor=opt.plateau_factor, patience=opt.plateau_patience,
                                         rtol=_PLATEAU_RTOL, atol=0.0)


def plateau_init() -> dict[str, jax.Array]:
  """The reduce-on-plateau state before the first evaluation (scale 1, best loss +inf), as a plain
  dict: it lives in the train state, so orbax saves and restores it with everything else."""
  return optax.contrib.reduce_on_plateau().init(jnp.zeros((), jnp.float32))._asdict()


def reduce_on_plateau(plateau: dict[str, Any], val_loss: float,
                      config: ml_collections.ConfigDict) -> tuple[dict[str, Any], float]:
  """Feeds one validation loss; returns the new plateau state and the learning-rate scale to apply.

  The scale is multiplied by optimizer.plateau_factor once the loss has not improved (relative
  threshold 1e-4) for optimizer.plateau_patience evaluations in a row; this is
  torch.optim.lr_scheduler.ReduceLROnPlateau with its patience = plateau_patience - 1.
  """
  state = optax.contrib.ReduceLROnPlateauState(**{k: jnp.asarray(np.asarray(v))
                                                   for k, v in plateau.items()})
  _, state = _plateau_transform(config).update((), state, value=jnp.asarray(val_loss, jnp.float32))
  return state._asdict(), float(state.scale)
