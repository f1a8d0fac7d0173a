"""ConVIRT's dual encoder: an image encoder (ResNet50 in the paper; any of `models.registry`) on images,
BERT on report text, each with a nonlinear projection head.

Parameters are grouped as {"image", "text", "image_head", "text_head"}; the train state, the freezing
rules and weight interop rely on these names. Images come in as uint8 NHWC and are normalised here, so
host pipelines stay uint8 (4x less to move) and the model owns its preprocessing constants.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from convirt_jax.config import IMAGENET_MEAN, IMAGENET_STD
from convirt_jax.models.bert import BertConfig, BertEncoder, pool_text
from convirt_jax.models import registry
from convirt_jax.models.resnet import BATCH_NORM_MODES

# The batch contract: what the model takes from a host batch (labels and masks stay on the host).
INPUT_KEYS = ("image", "input_ids", "attention_mask")

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# "auto" resolves per backend: bfloat16 where the matrix units run it natively, float32 on CPU (slow
# and no memory pressure there, and the tests compare float32 numbers).
_AUTO_PRECISION = {"gpu": "bfloat16", "cuda": "bfloat16", "rocm": "bfloat16", "tpu": "bfloat16"}


def torch_linear_bias_init(fan_in: int):
  """torch.nn.Linear's bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# torch.nn.Linear's weight init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class ProjectionHead(nn.Module):
  """The paper's nonlinear projection: Linear -> ReLU -> Linear, initialised as torch.nn.Linear."""
  hidden_dim: int
  output_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda features, fan_in, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=torch_linear_kernel_init,
        bias_init=torch_linear_bias_init(fan_in), name=name)
    x = nn.relu(dense(self.hidden_dim, x.shape[-1], "dense1")(x))
    # The embeddings leave in float32: the loss and the evaluations compare them at full precision.
    return dense(self.output_dim, self.hidden_dim, "dense2")(x).astype(jnp.float32)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 NHWC RGB -> float32 (x / 255 - ImageNet mean) / ImageNet std, as torchvision models expect."""
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be uint8 [N, H, W, 3]; got {images.dtype} {images.shape}")
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


class ConVIRTModel(nn.Module):
  """Image and text encoders with projection heads to a shared `projection_dim` space.

  Attributes:
    image_encoder: the registered image encoder (`registry.build_image_encoder`; its `axis_name` syncs
      BatchNorm over the data axis when training).
    text_encoder: the BertEncoder.
    projection_dim: size of the shared embedding space (512 in the paper).
    projection_hidden: hidden width of both projection heads.
    pooling: how token states become one text vector: "max" (paper), "mean" or "cls".
    dtype: computation dtype of the heads (the encoders carry their own).
  """
  image_encoder: nn.Module
  text_encoder: BertEncoder
  projection_dim: int = 512
  projection_hidden: int = 512
  pooling: str = "max"
  dtype: Any = jnp.float32

  def setup(self):
    # Re-parented under fixed names so that parameter paths do not depend on the field names.
    self.image = self.image_encoder.clone(parent=self, name="image")
    self.text = self.text_encoder.clone(parent=self, name="text")
    self.image_head = ProjectionHead(self.projection_hidden, self.projection_dim, self.dtype)
    self.text_head = ProjectionHead(self.projection_hidden, self.projection_dim, self.dtype)

  def encode_images(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """uint8 [N, H, W, 3] -> (pooled image features [N, C], projection [N, projection_dim])."""
    features = self.image(normalize_images(images), train=train)
    return features, self.image_head(features)

  def encode_texts(self, input_ids: jax.Array, attention_mask: jax.Array,
                   train: bool = False) -> tuple[jax.Array, jax.Array]:
    """int [N, T] token ids and mask -> (pooled BERT features [N, H], projection [N, projection_dim])."""
    hidden = self.text(input_ids, attention_mask, deterministic=not train)
    features = pool_text(hidden, attention_mask, self.pooling)
    return features, self.text_head(features)

  def __call__(self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
               train: bool = False, return_features: bool = False) -> dict[str, jax.Array]:
    """Projected (not normalised) embeddings of N image/text pairs; the loss normalises them."""
    image_features, image_emb = self.encode_images(images, train=train)
    text_features, text_emb = self.encode_texts(input_ids, attention_mask, train=train)
    out = {"image_emb": image_emb, "text_emb": text_emb}
    if return_features:
      out.update(image_features=image_features, text_features=text_features)
    return out


def resolve_precision(precision: str, platform: str | None = None) -> str:
  """"float32" or "bfloat16" for `train.precision`; "auto" is bfloat16 on GPU/TPU, float32 elsewhere.

  `platform` defaults to `jax.default_backend()` ("cpu", "gpu", "tpu").
  """
  if precision == "auto":
    return _AUTO_PRECISION.get(platform or jax.default_backend(), "float32")
  if precision not in PRECISIONS:
    raise ValueError(f"train.precision={precision!r} is not supported; "
                     f"choose one of {['auto', *sorted(PRECISIONS)]}")
  return precision


def compute_dtype(precision: str, platform: str | None = None) -> Any:
  """The activation dtype for `train.precision` (see `resolve_precision`); parameters stay float32."""
  return PRECISIONS[resolve_precision(precision, platform)]


def image_variables(variables: dict[str, Any]) -> dict[str, Any]:
  """The image encoder's {"params", "batch_stats"} of a ConVIRT variables tree (empty statistics for an
  encoder without BatchNorm, whose tree then has no "image" statistics at all)."""
  return {"params": variables["params"]["image"],
          "batch_stats": variables.get("batch_stats", {}).get("image", {})}


def build_model(config: ml_collections.ConfigDict, text_config: BertConfig,
                axis_name: str | None = None) -> ConVIRTModel:
  """The model described by `config.model`, `config.train.precision` and `config.train.remat`.

  Reads model.image (the registered encoder's fields and batch_norm), model.text.pooling,
  model.projection_{dim, hidden}, train.precision (the activation dtype of both encoders and the heads,
  "auto" resolved on the default backend; parameters, BatchNorm statistics, LayerNorms, softmaxes and
  the returned embeddings stay float32) and train.remat (per residual block and per BERT layer).
  `axis_name` is the mesh axis that training-mode BatchNorm averages its statistics over; leave it None
  for a model that only runs outside shard_map (feature extraction, export).
  """
  dtype = compute_dtype(config.train.precision)
  if config.model.text.pooling not in ("max", "mean", "cls"):
    raise ValueError(f"model.text.pooling={config.model.text.pooling!r}: choose 'max', 'mean' or 'cls'")
  image = config.model.image
  if image.batch_norm not in BATCH_NORM_MODES:
    raise ValueError(f"model.image.batch_norm={image.batch_norm!r}: choose one of {list(BATCH_NORM_MODES)}")
  remat = bool(config.train.remat)
  image_encoder, _ = registry.build_image_encoder(
      registry.arch_from_config(image), axis_name=axis_name, dtype=dtype, remat=remat,
      batch_norm=image.batch_norm)
  return ConVIRTModel(
      image_encoder=image_encoder,
      text_encoder=BertEncoder(text_config, dtype=dtype, remat=remat),
      projection_dim=config.model.projection_dim,
      projection_hidden=config.model.projection_hidden,
      pooling=config.model.text.pooling,
      dtype=dtype)
