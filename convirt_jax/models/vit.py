"""Vision Transformer image encoder that computes what torchvision's `vit_b_16()` (and its siblings)
computes with `heads = Identity()`: the class token after the final LayerNorm.

Patch convolution, class token, learned position embeddings, pre-norm encoder blocks (LayerNorm eps
1e-6, torch's nn.MultiheadAttention with one fused input projection, exact-erf GELU MLP), final
LayerNorm. Submodule names mirror torchvision's keys (`encoder/encoder_layer_3/self_attention/in_proj`
is `encoder.layers.encoder_layer_3.self_attention.in_proj_weight`), so weights port both ways exactly
(`convirt_jax.interop.torchvision_vit`). No BatchNorm: nothing is synchronised over the data axis, and a
micro-batched step computes exactly the plain step's gradient.

Dropout is left out: torchvision's ViTs are built with dropout 0 (and attention dropout 0).
"""
import math
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convirt_jax.errors import ConfigError
from convirt_jax.models.convirt import torch_linear_kernel_init

# torchvision's vit_* builders: (patch_size, num_layers, num_heads, hidden_dim, mlp_dim). vit_tiny is
# this project's small configuration for tests and the embedded default (DeiT-Ti's width, 4 layers).
PRESETS = {
    "vit_b_16": (16, 12, 12, 768, 3072),
    "vit_b_32": (32, 12, 12, 768, 3072),
    "vit_l_16": (16, 24, 16, 1024, 4096),
    "vit_tiny": (8, 4, 3, 192, 768),
}
TITLES = {"vit_b_16": "ViT-B/16", "vit_b_32": "ViT-B/32", "vit_l_16": "ViT-L/16", "vit_tiny": "ViT-Tiny/8"}
LN_EPSILON = 1e-6


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPSILON, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class SelfAttention(nn.Module):
  """torch.nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True) on (x, x, x)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, s, hidden = x.shape
    head_dim = hidden // self.num_heads
    # torch's init: Xavier-uniform over the fused [3h, h] weight (the same fans as this [h, 3h] kernel),
    # out projection as torch.nn.Linear; both biases 0.
    qkv = nn.Dense(3 * hidden, dtype=self.dtype, param_dtype=jnp.float32, name="in_proj",
                   kernel_init=nn.initializers.xavier_uniform())(x)
    q, k, v = (t.reshape(n, s, self.num_heads, head_dim) for t in jnp.split(qkv, 3, axis=-1))
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(head_dim)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, s, hidden)
    return nn.Dense(hidden, dtype=self.dtype, param_dtype=jnp.float32, name="out_proj",
                    kernel_init=torch_linear_kernel_init)(out)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = _layer_norm("ln_1")(x).astype(self.dtype)
    x = x + SelfAttention(self.num_heads, self.dtype, name="self_attention")(y)
    y = _layer_norm("ln_2")(x).astype(self.dtype)
    mlp = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=nn.initializers.xavier_uniform(),
               bias_init=nn.initializers.normal(1e-6))  # torchvision's MLPBlock init
    y = nn.Dense(self.mlp_dim, name="mlp_0", **mlp)(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(x.shape[-1], name="mlp_3", **mlp)(y)
    return x + y


class Encoder(nn.Module):
  num_layers: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]), jnp.float32)
    x = (x + pos).astype(jnp.float32)
    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    for i in range(self.num_layers):
      x = block(self.num_heads, self.mlp_dim, self.dtype, name=f"encoder_layer_{i}")(x)
    return _layer_norm("ln")(x)


class ViT(nn.Module):
  """Normalised float NHWC images -> the class token's features [N, hidden_dim] (float32).

  The position embeddings' shape follows the input size at init: (size / patch)^2 + 1 positions.
  """
  patch_size: int
  num_layers: int
  num_heads: int
  hidden_dim: int
  mlp_dim: int
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each encoder block in the backward pass

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout, no BatchNorm: training and evaluation compute the same function
    n, height, width, channels = x.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"a ViT with patch {p} needs image sides divisible by {p}, got {height}x{width}")
    fan_in = channels * p * p
    x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="conv_proj",
                # torch: trunc_normal_(std=sqrt(1 / fan_in)) cut at +-2, which at these stds never cuts
                kernel_init=nn.initializers.normal(math.sqrt(1 / fan_in)))(x.astype(self.dtype))
    x = x.reshape(n, -1, self.hidden_dim)  # patches row by row, as torch's reshape + permute
    token = self.param("class_token", nn.initializers.zeros, (1, 1, self.hidden_dim), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(token, (n, 1, self.hidden_dim)).astype(x.dtype), x], axis=1)
    x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.dtype, self.remat, name="encoder")(x)
    return x[:, 0].astype(jnp.float32)


def preset(name: str) -> dict[str, int]:
  if name not in PRESETS:
    raise ConfigError(f"no ViT named {name!r}; the ViTs are {list(PRESETS)}")
  return dict(zip(("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim"), PRESETS[name]))


# --- The image encoder registry's interface (`convirt_jax.models.registry`) ----------------------------

ARCH_KEYS: dict[str, type] = {}  # the registered name is the whole architecture


def build(arch: Mapping[str, Any], *, axis_name: str | None, dtype: Any, remat: bool,
          batch_norm: str) -> tuple[ViT, int]:
  del axis_name, batch_norm  # no BatchNorm
  hp = preset(arch["name"])
  return ViT(**hp, dtype=dtype or jnp.float32, remat=remat), hp["hidden_dim"]


def title(arch: Mapping[str, Any]) -> str:
  preset(arch["name"])  # a clear error for an unknown name
  return TITLES[arch["name"]]


def describe(arch: Mapping[str, Any]) -> str:
  p = preset(arch["name"])
  return (f"{title(arch)} ({p['num_layers']} layers, width {p['hidden_dim']}, {p['num_heads']} heads, "
          f"patch {p['patch_size']})")


def check_image_size(arch: Mapping[str, Any], image_size: int) -> None:
  patch = preset(arch["name"])["patch_size"]
  if image_size % patch:
    raise ConfigError(f"config.data.image_size={image_size}: a {title(arch)} takes sides that are multiples "
                      f"of its patch, {patch} (e.g. {image_size - image_size % patch} or "
                      f"{image_size - image_size % patch + patch})")


def layer_index(arch: Mapping[str, Any], path: tuple[str, ...]) -> tuple[int, int]:
  """(layer of the parameter at `path`, number of layers) for layer-wise learning-rate decay: the patch
  and position embeddings and the class token are layer 0, encoder block i is layer i + 1, the final
  LayerNorm is the top layer (with the head above the encoder)."""
  count = preset(arch["name"])["num_layers"] + 1
  if path[0] in ("conv_proj", "class_token") or path[-1] == "pos_embedding":
    return 0, count
  if len(path) > 1 and path[1].startswith("encoder_layer_"):
    return int(path[1][len("encoder_layer_"):]) + 1, count
  return count, count


def random_variables(arch: Mapping[str, Any], image_size: int, seed: int) -> dict[str, Any]:
  """torchvision's ViT initialisation drawn with numpy from `seed` (nothing compiled): patch convolution
  truncated normal (std sqrt(1 / fan_in), cut at +-2), bias 0; class token 0; position embeddings
  normal(0, 0.02); attention input projection Xavier-uniform over torch's fused [3h, h] weight and out
  projection torch.nn.Linear's U(+-1/sqrt(h)), both biases 0; MLP Xavier-uniform, biases normal(0,
  1e-6); LayerNorms 1 / 0."""
  model, _ = build(arch, axis_name=None, dtype=None, remat=False, batch_norm="batch")
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))["params"]
  rng = np.random.default_rng(seed)
  values = {}
  for path, leaf in sorted(flax.traverse_util.flatten_dict(shapes).items()):
    shape, module, name = leaf.shape, path[-2] if len(path) > 1 else "", path[-1]
    if name == "class_token" or (name == "bias" and module in ("in_proj", "out_proj", "conv_proj")):
      value = np.zeros(shape)
    elif name == "pos_embedding":
      value = rng.normal(0.0, 0.02, shape)
    elif module.startswith("ln"):
      value = np.ones(shape) if name == "scale" else np.zeros(shape)
    elif module == "conv_proj":
      std = math.sqrt(1 / math.prod(shape[:-1]))
      value = np.clip(rng.normal(0.0, std, shape), -2.0, 2.0)  # torch's cut is at +-2 absolute
    elif module == "in_proj":  # torch's in_proj_weight is [3h, h]: fan_in h, fan_out 3h
      bound = math.sqrt(6.0 / (shape[0] + shape[1]))
      value = rng.uniform(-bound, bound, shape)
    elif module == "out_proj":
      bound = 1 / math.sqrt(shape[0])
      value = rng.uniform(-bound, bound, shape)
    elif module in ("mlp_0", "mlp_3"):
      if name == "kernel":
        bound = math.sqrt(6.0 / (shape[0] + shape[1]))
        value = rng.uniform(-bound, bound, shape)
      else:
        value = rng.normal(0.0, 1e-6, shape)
    else:
      raise ValueError(f"unexpected ViT parameter {'/'.join(path)}")
    values[path] = value.astype(np.float32)
  return {"params": flax.traverse_util.unflatten_dict(values), "batch_stats": {}}
