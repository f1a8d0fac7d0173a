"""ResNet image encoder that computes what torchvision's `resnetNN()` computes, minus the fc layer.

Layout, paddings, initialisation and BatchNorm semantics follow torchvision (v1.5: the stride of a
bottleneck sits on its 3x3 conv), so weights port both ways exactly (see
`convirt_jax.interop.torchvision_resnet`). Submodule names mirror torchvision's keys: `layer1_0/conv1`
is `layer1.0.conv1`, `layer1_0/downsample_conv` is `layer1.0.downsample.0`.
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

# depth -> (bottleneck?, blocks per stage)
_STAGES = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
}
SUPPORTED_DEPTHS = tuple(_STAGES)
# "batch": torch's training mode (batch statistics, synced over `axis_name`, running averages updated);
# "frozen": the running statistics normalise and stay as they are, also with train=True.
BATCH_NORM_MODES = ("batch", "frozen")
_BOTTLENECK_EXPANSION = 4

# torch.nn.BatchNorm2d defaults: momentum 0.1 weights the new batch, Flax's momentum the old average.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"), a plain (untruncated)
# normal with variance 2 / (out_channels * kh * kw).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _stage_config(depth: int) -> tuple[bool, tuple[int, ...]]:
  if depth not in _STAGES:
    raise ConfigError(f"model.image.depth={depth!r} is not supported; "
                      f"choose one of {list(SUPPORTED_DEPTHS)}")
  return _STAGES[depth]


def base_channels(width: float) -> int:
  """Channels of the stem and of the first stage's 3x3 convs: 64 scaled by `width`."""
  channels = int(round(64 * width))
  if channels < 1:
    raise ConfigError(f"model.image.width={width!r} leaves no channels (64 * width rounds to {channels})")
  return channels


def resnet_features_dim(depth: int, width: float = 1.0) -> int:
  """Size of the pooled feature vector: 2048 for ResNet50/101, 512 for ResNet18/34 (at width 1)."""
  bottleneck, _ = _stage_config(depth)
  return base_channels(width) * 8 * (_BOTTLENECK_EXPANSION if bottleneck else 1)


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d (and SyncBatchNorm when `axis_name` is set), channels last.

  Differs from `flax.linen.BatchNorm` where torch does: the running variance is updated with the
  *unbiased* batch variance (n / (n - 1)), and the batch variance is computed in two passes, as torch
  does, rather than as E[x^2] - E[x]^2. Statistics and normalisation are always float32.
  Variables use Flax's names: params `scale`, `bias`; batch_stats `mean`, `var`.
  """
  use_running_average: bool
  axis_name: str | None = None
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

    x = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      reduce_axes = tuple(range(x.ndim - 1))
      count = x.size // features
      mean = jnp.mean(x, axis=reduce_axes)
      if self.axis_name is not None:
        mean = jax.lax.pmean(mean, self.axis_name)
      var = jnp.mean(jnp.square(x - mean), axis=reduce_axes)
      if self.axis_name is not None:
        var = jax.lax.pmean(var, self.axis_name)
        count *= jax.lax.axis_size(self.axis_name)
      if count < 2:
        # torch raises the same way: one value per channel has no variance.
        raise ValueError(f"BatchNorm {'/'.join(self.scope.path)} in training mode needs more than one "
                         f"value per channel, got input shape {x.shape}")
      # `init` must not move the running statistics away from torch's 0 / 1.
      if not self.is_initializing():
        unbiased_var = var * (count / (count - 1))
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased_var
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


# Rematerialisation policy: save nothing inside a block, keep only its input (what the block boundary
# passes on). jax.checkpoint_policies.dots_saveable would keep every conv output here (convs count as
# dots), a third to a half of what a block stores, the BatchNorm and ReLU outputs being the rest;
# recomputing a block costs one extra forward of it (~1/3 more FLOPs per step), which is the price of
# fitting the per-device batch that a contrastive loss wants.
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable


def _conv(features: int, kernel: int, strides: int, name: str, dtype: Any) -> nn.Conv:
  # torchvision pads every conv by kernel // 2 on both sides; Flax's 'SAME' would pad (0, 1) on
  # stride-2 convs of even inputs and shift every later activation.
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=conv_kernel_init, name=name)


class BasicBlock(nn.Module):
  """torchvision.models.resnet.BasicBlock: two 3x3 convs (ResNet18/34)."""
  features: int
  strides: int = 1
  axis_name: str | None = None
  dtype: Any = jnp.float32
  frozen_batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda name: BatchNorm(not train or self.frozen_batch_norm, self.axis_name,
                                  dtype=self.dtype, name=name)
    y = _conv(self.features, 3, self.strides, "conv1", self.dtype)(x)
    y = nn.relu(norm("bn1")(y))
    y = _conv(self.features, 3, 1, "conv2", self.dtype)(y)
    y = norm("bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.strides, "downsample_conv", self.dtype)(x)
      x = norm("downsample_bn")(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """torchvision.models.resnet.Bottleneck (v1.5): 1x1, strided 3x3, 1x1 to 4x the features."""
  features: int
  strides: int = 1
  axis_name: str | None = None
  dtype: Any = jnp.float32
  frozen_batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda name: BatchNorm(not train or self.frozen_batch_norm, self.axis_name,
                                  dtype=self.dtype, name=name)
    out_features = self.features * _BOTTLENECK_EXPANSION
    y = _conv(self.features, 1, 1, "conv1", self.dtype)(x)
    y = nn.relu(norm("bn1")(y))
    y = _conv(self.features, 3, self.strides, "conv2", self.dtype)(y)
    y = nn.relu(norm("bn2")(y))
    y = _conv(out_features, 1, 1, "conv3", self.dtype)(y)
    y = norm("bn3")(y)
    if self.strides != 1 or x.shape[-1] != out_features:
      x = _conv(out_features, 1, self.strides, "downsample_conv", self.dtype)(x)
      x = norm("downsample_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """torchvision ResNet without its fc layer: NHWC normalised images -> globally pooled features.

  Attributes:
    depth: 18, 34 (basic blocks), 50 or 101 (bottlenecks).
    width: multiplier on the 64 base channels; 1.0 is torchvision's model.
    small_stem: a 3x3 stride-1 stem conv and no max-pool, for tiny images. Not a torchvision model.
    axis_name: mesh axis over which training-mode BatchNorm statistics are averaged (SyncBatchNorm),
      when the model runs per device under shard_map.
    dtype: computation dtype of convs and activations; parameters and BatchNorm stay float32.
    remat: recompute each residual block's activations in the backward pass instead of storing them
      (`REMAT_POLICY`); same parameters, names and numbers, less memory, ~1/3 more compute.
    batch_norm: "batch" (torch semantics: batch statistics when training) or "frozen" (the running
      statistics are used and left unchanged even when training; for tiny or micro-batches and
      fine-tuning).
  """
  depth: int = 50
  width: float = 1.0
  small_stem: bool = False
  axis_name: str | None = None
  dtype: Any = jnp.float32
  remat: bool = False
  batch_norm: str = "batch"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ResNet expects NHWC images with 3 channels, got shape {x.shape}")
    if self.batch_norm not in BATCH_NORM_MODES:
      raise ConfigError(f"model.image.batch_norm={self.batch_norm!r}: choose one of {list(BATCH_NORM_MODES)}")
    bottleneck, stage_sizes = _stage_config(self.depth)
    block_cls = Bottleneck if bottleneck else BasicBlock
    if self.remat:
      # Per residual block rather than per stage: a stage-level checkpoint would have to rebuild and
      # hold a whole stage (up to 23 blocks) at once in the backward pass, and a wrapper module per
      # stage would change the parameter paths. Lifting the block class keeps `name=` and so every
      # path (`layer1_0/conv1/kernel`). Argument 2 (`train`, counting self as 0) is a Python bool.
      block_cls = nn.remat(block_cls, static_argnums=(2,), policy=REMAT_POLICY)
    frozen = self.batch_norm == "frozen"
    base = base_channels(self.width)

    x = x.astype(self.dtype)
    if self.small_stem:
      x = _conv(base, 3, 1, "conv1", self.dtype)(x)
    else:
      x = _conv(base, 7, 2, "conv1", self.dtype)(x)
    x = nn.relu(BatchNorm(not train or frozen, self.axis_name, dtype=self.dtype, name="bn1")(x))
    if not self.small_stem:
      # reduce_window pads with the init value -inf, as torch's max-pool does.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    for stage, num_blocks in enumerate(stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = block_cls(base * 2**stage, strides, self.axis_name, self.dtype, frozen,
                      name=f"layer{stage + 1}_{block}")(x, train)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# --- The image encoder registry's interface (`convirt_jax.models.registry`) ----------------------------

ARCH_KEYS = {"depth": int, "width": float, "small_stem": bool}


def build(arch: Mapping[str, Any], *, axis_name: str | None, dtype: Any, remat: bool,
          batch_norm: str) -> tuple[ResNet, int]:
  module = ResNet(depth=arch["depth"], width=arch["width"], small_stem=arch["small_stem"],
                  axis_name=axis_name, dtype=dtype or jnp.float32, remat=remat, batch_norm=batch_norm)
  return module, resnet_features_dim(arch["depth"], arch["width"])


def title(arch: Mapping[str, Any]) -> str:
  return f"ResNet{arch['depth']}"


def describe(arch: Mapping[str, Any]) -> str:
  return f"ResNet{arch['depth']} (width {arch['width']:g}{', small stem' if arch['small_stem'] else ''})"


def layer_index(arch: Mapping[str, Any], path: tuple[str, ...]) -> tuple[int, int]:
  """(layer of the parameter at `path`, number of layers) for layer-wise learning-rate decay, by stage:
  the stem (conv1, bn1) is 0, layerS_B is S (1 to 4); the head above is 5."""
  del arch
  return (int(path[0][len("layer"):].split("_")[0]) if path[0].startswith("layer") else 0), 5


def random_variables(arch: Mapping[str, Any], image_size: int, seed: int) -> dict[str, Any]:
  """torchvision's ResNet initialisation drawn with numpy from `seed`: convolutions kaiming-normal
  (fan_out, ReLU gain: N(0, 2 / (k * k * out))), BatchNorm scale 1 / bias 0, running mean 0 / var 1.

  The distribution `ResNet.init` draws from, without compiling the network's forward pass (seconds to
  minutes on a CPU) for weights that are only a baseline.
  """
  model = ResNet(depth=arch["depth"], width=arch["width"], small_stem=arch["small_stem"])
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  rng = np.random.default_rng(seed)
  out = {}
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(shapes[collection])
    values = {}
    for path in sorted(flat):
      shape, leaf = flat[path].shape, path[-1]
      if leaf == "kernel":
        fan_out = math.prod(shape[:-2]) * shape[-1]
        values[path] = rng.normal(0.0, math.sqrt(2.0 / fan_out), shape).astype(np.float32)
      elif leaf in ("scale", "var"):
        values[path] = np.ones(shape, np.float32)
      elif leaf in ("bias", "mean"):
        values[path] = np.zeros(shape, np.float32)
      else:
        raise ValueError(f"unexpected ResNet variable {collection}/{'/'.join(path)}")
    out[collection] = flax.traverse_util.unflatten_dict(values)
  return out
