"""Exact weight interop with torchvision's VisionTransformer (`convirt_jax.models.vit`), both ways.

torch keys <-> flax paths: `conv_proj.weight` [h, 3, p, p] <-> `conv_proj/kernel` [p, p, 3, h];
`encoder.layers.encoder_layer_i.self_attention.in_proj_weight` (nn.MultiheadAttention's fused q, k, v
projection, [3h, h]) <-> `encoder/encoder_layer_i/self_attention/in_proj/kernel` [h, 3h]; Linear
weights transposed, LayerNorm weight <-> scale; `mlp.0` / `mlp.3` <-> `mlp_0` / `mlp_3`. torchvision's
classifier (`heads.*`) is not part of the encoder: it is skipped on load and not written on save, so
an exported file loads into `vit_b_16()` with `heads = Identity()` strictly.

A checkpoint made for another input size (torchvision's are for 224 px) has its position embeddings
interpolated as torchvision's `interpolate_embeddings` does: bicubic over the square grid with
align_corners=True, the class token's embedding kept.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from convirt_jax.errors import CheckpointError, ConfigError
from convirt_jax.interop import state_dicts
from convirt_jax.models import vit

Variables = dict[str, Any]  # {"params": ..., "batch_stats": {}}
TORCHVISION_WEIGHTS = ("vit_b_16", "vit_b_32", "vit_l_16")  # the presets torchvision has weights for


def _torch_key(path: tuple[str, ...]) -> str:
  *modules, leaf = path
  if modules and modules[-1] == "in_proj":  # nn.MultiheadAttention keeps it as two parameters
    return ".".join([*(_torch_module(m) for m in modules[:-1]), f"in_proj_{'weight' if leaf == 'kernel' else 'bias'}"])
  name = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  return ".".join([*(_torch_module(m) for m in modules), name])


def _torch_module(name: str) -> str:
  if name.startswith("encoder_layer_"):
    return f"layers.{name}"
  return {"mlp_0": "mlp.0", "mlp_3": "mlp.3"}.get(name, name)


def _to_torch_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array.T
  return array


def _to_flax_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array.T
  return array


def torchvision_state_dict(variables: Variables) -> dict[str, np.ndarray]:
  """The torchvision state dict (without `heads.*`) of a ViT's variables."""
  flat = flax.traverse_util.flatten_dict(variables["params"])
  return {_torch_key(path): np.ascontiguousarray(_to_torch_layout(path, np.asarray(value, np.float32)))
          for path, value in flat.items()}


def save_torchvision_vit(variables: Variables, path: str | os.PathLike) -> None:
  """Writes `variables` as a state dict that torchvision's ViT with `heads = Identity()` loads with
  strict=True; `.safetensors` or `.pt`/`.pth` by the file's suffix."""
  state_dicts.save_state_dict(torchvision_state_dict(variables), path)


def interpolate_position_embedding(pos: np.ndarray, grid: int) -> np.ndarray:
  """[1, 1 + g*g, h] -> [1, 1 + grid*grid, h]: torchvision's `interpolate_embeddings` (the class
  token's embedding kept; the grid's resized with torch's bicubic, a = -0.75, align_corners=True)."""
  old = math.isqrt(pos.shape[1] - 1)
  if old * old != pos.shape[1] - 1:
    raise CheckpointError(f"position embeddings of {pos.shape[1] - 1} patches are not a square grid")
  if old == grid:
    return pos
  image = pos[0, 1:].reshape(old, old, -1).astype(np.float64)
  weights = _bicubic_matrix(old, grid)  # [grid, old], applied on both axes (separable)
  resized = np.einsum("ai,bj,ijc->abc", weights, weights, image).reshape(1, grid * grid, -1)
  return np.concatenate([pos[:, :1], resized.astype(pos.dtype)], axis=1)


def _bicubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
  """torch's upsample_bicubic2d (align_corners=True) along one axis, as a [size_out, size_in] matrix:
  source positions out * (in - 1) / (out - 1), Keys' cubic with a = -0.75, indices clamped at the border."""
  scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
  matrix = np.zeros((size_out, size_in))
  for o in range(size_out):
    x = o * scale
    i = math.floor(x)
    t = x - i
    for offset, d in zip((-1, 0, 1, 2), (1 + t, t, 1 - t, 2 - t)):
      d = abs(d)
      if d <= 1:
        w = ((a + 2) * d - (a + 3)) * d * d + 1
      elif d < 2:
        w = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
      else:
        w = 0.0
      matrix[o, min(max(i + offset, 0), size_in - 1)] += w
  return matrix


def _expected(hp: Mapping[str, int], image_size: int) -> dict[tuple[str, ...], Any]:
  model = vit.ViT(**hp)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
  return flax.traverse_util.flatten_dict(shapes["params"])


def load_torchvision_vit(source: str | os.PathLike | Mapping[str, Any], hp: Mapping[str, int],
                         image_size: int) -> Variables:
  """{"params", "batch_stats": {}} of the ViT with hyperparameters `hp` (`vit.preset`) at `image_size`
  from a torchvision state dict (or its file); every key and shape is checked, position embeddings
  interpolated to the size."""
  name = "ViT ({num_layers} layers, width {hidden_dim}, patch {patch_size})".format(**hp)
  state = state_dicts.read_state_dict(source, f"torchvision {name}")
  state = {k: v for k, v in state.items() if not k.startswith("heads.")}
  expected = _expected(hp, image_size)
  by_key = {_torch_key(path): path for path in expected}
  missing = sorted(set(by_key) - set(state))
  unexpected = sorted(set(state) - set(by_key))
  if missing or unexpected:
    problems = ([f"missing {state_dicts.list_keys(missing)}"] if missing else []) + (
        [f"unexpected {state_dicts.list_keys(unexpected)}"] if unexpected else [])
    raise CheckpointError(f"not a torchvision {name} state dict: {'; '.join(problems)}")
  flat = {}
  for key, path in by_key.items():
    value = _to_flax_layout(path, state[key]).astype(np.float32)
    if key == "encoder.pos_embedding":
      value = interpolate_position_embedding(value, image_size // hp["patch_size"])
    if value.shape != expected[path].shape:
      raise CheckpointError(f"{key}: shape {tuple(state[key].shape)} does not fit a {name} at "
                            f"{image_size} px")
    flat[path] = value
  return {"params": flax.traverse_util.unflatten_dict(flat), "batch_stats": {}}


# --- The image encoder registry's interface (`convirt_jax.models.registry`) ----------------------------


def load_torchvision(init_from: str, arch: Mapping[str, Any], image_size: int) -> Variables:
  """`model.image.init_from`: "torchvision" (torchvision's IMAGENET1K_V1 weights; needs internet) or a
  .pth/.pt/.safetensors file."""
  name = arch["name"]
  if init_from == "torchvision":
    if name not in TORCHVISION_WEIGHTS:
      raise ConfigError(f"model.image.init_from='torchvision': torchvision has no weights for {name}; "
                        f"it has {list(TORCHVISION_WEIGHTS)}")
  source = state_dicts.imagenet_source(init_from, name, "/path/to/vit.pth")
  return load_torchvision_vit(source, vit.preset(name), image_size)


def save_torchvision(variables: Variables, path: str | os.PathLike) -> None:
  save_torchvision_vit(variables, path)


def torch_builder(arch: Mapping[str, Any], image_size: int) -> tuple[str, str]:
  """("vit", the torch lines that build the ViT at `image_size` with torchvision, heads an Identity)."""
  name, p = arch["name"], vit.preset(arch["name"])
  if name in TORCHVISION_WEIGHTS:
    build = f"vit = torchvision.models.{name}(image_size={image_size})"
  else:
    build = (f"vit = torchvision.models.VisionTransformer(image_size={image_size}, patch_size="
             f"{p['patch_size']}, num_layers={p['num_layers']},\n    num_heads={p['num_heads']}, "
             f"hidden_dim={p['hidden_dim']}, mlp_dim={p['mlp_dim']})")
  return "vit", build + "\nvit.heads = torch.nn.Identity()"
