"""The train state of every training job, as a plain pytree, and how a fresh one is made.

  {"step", "params", "batch_stats", "opt_state", "rng", "plateau"}

"params" holds ConVIRT's groups {"image", "text", "image_head", "text_head"} when pretraining (a
fine-tuning state has its own groups). "plateau" is the reduce-on-plateau schedule's state; it is in the
state so that orbax saves and restores it with everything else.
"""
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from convirt_jax.models.convirt import ConVIRTModel
from convirt_jax.training import optimizer as optimizer_lib

PARAM_GROUPS = ("image", "text", "image_head", "text_head")

State = dict[str, Any]


def _check_override(group: str, collection: str, given: Any, expected: Any) -> Any:
  where = f"{collection}/{group}"
  given_flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(given).items()}
  expected_flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(expected).items()}
  missing, extra = expected_flat.keys() - given_flat.keys(), given_flat.keys() - expected_flat.keys()
  if missing or extra:
    raise ValueError(f"params_override {where}: missing {sorted(missing)[:5]} (of {len(missing)}), "
                     f"unexpected {sorted(extra)[:5]} (of {len(extra)})")
  for path, value in given_flat.items():
    if np.shape(value) != expected_flat[path].shape:
      raise ValueError(f"params_override {where}/{path}: shape {np.shape(value)}, the model has "
                       f"{expected_flat[path].shape}")
  return jax.tree.map(lambda v, e: jnp.asarray(v, e.dtype), given, expected)


def dummy_inputs(image_size: int, text_length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  tokens = jnp.ones((1, text_length), jnp.int32)
  return jnp.zeros((1, image_size, image_size, 3), jnp.uint8), tokens, tokens


@functools.lru_cache(maxsize=8)
def _jitted_init(model: flax.linen.Module) -> Callable[..., Any]:
  # Modules compare by their fields: re-initialising an equal model (another seed, a random-init
  # baseline) reuses the compiled initialiser, which is slow to compile on CPU.
  return jax.jit(functools.partial(model.init, train=False))


def param_shapes(model: ConVIRTModel, image_size: int, text_length: int) -> Any:
  """The params tree as ShapeDtypeStructs, without computing anything (enough for make_optimizer)."""
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, {"params": jax.random.PRNGKey(0)},
                        *dummy_inputs(image_size, text_length))["params"]


def init_variables(model: flax.linen.Module, rng: jax.Array, *inputs: jax.Array,
                   params_override: dict[str, Any] | None = None) -> dict[str, Any]:
  """{"params", "batch_stats"} of `model` initialised on `inputs`, with whole groups replaced.

  params_override: {"params": {group: tree}, "batch_stats": {group: tree}} with whole groups (e.g.
  "image", "text") loaded from torchvision / Hugging Face weights or a pretrained run; each group must
  match the model's tree exactly in structure and shapes.
  """
  variables = flax.core.unfreeze(_jitted_init(model)({"params": rng}, *inputs))
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
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def new_state(variables: dict[str, Any], optimizer: optax.GradientTransformation,
              rng: jax.Array) -> State:
  """Step 0 of a train state around `variables`; `rng` becomes the state's dropout key."""
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": variables["params"],
      "batch_stats": variables.get("batch_stats", {}),  # none without BatchNorm (a ViT)
      "opt_state": jax.jit(optimizer.init)(variables["params"]),  # one compile, not one per leaf
      "rng": rng,
      "plateau": optimizer_lib.plateau_init(),
  }


def _key_data(rng: jax.Array) -> jax.Array:
  return jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng


def init_rng(seed: int) -> jax.Array:
  """The key `init_train_state` initialises parameters with for `jax.random.key(seed)`: a baseline
  built from a seed gets the same weights as a run started from that seed."""
  return jax.random.split(_key_data(jax.random.key(seed)))[0]


def init_train_state(model: ConVIRTModel, optimizer: optax.GradientTransformation, rng: jax.Array,
                     image_size: int, text_length: int,
                     params_override: dict[str, Any] | None = None) -> State:
  """A fresh ConVIRT train state (on the default device; `parallel.replicate` it onto the mesh).

  Args:
    model: the ConVIRT model.
    optimizer: from `make_optimizer` for the same parameters.
    rng: a PRNG key; split into the initialisation key and the state's dropout key.
    image_size, text_length: input shapes to trace the initialisation with.
    params_override: whole groups to load instead of initialising them (see `init_variables`).
  """
  params_rng, state_rng = jax.random.split(_key_data(rng))
  variables = init_variables(model, params_rng, *dummy_inputs(image_size, text_length),
                             params_override=params_override)
  if set(variables["params"]) != set(PARAM_GROUPS):
    raise ValueError(f"the model's parameter groups are {sorted(variables['params'])}; expected "
                     f"{PARAM_GROUPS}")
  return new_state(variables, optimizer, state_rng)
