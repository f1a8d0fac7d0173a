"""BERT text encoder in Flax, numerically Hugging Face's `BertModel` (minus its pooler); text pooling.

Parameter names mirror Hugging Face's module names (`embeddings/word_embeddings`,
`encoder/layer_3/attention/self/query`, ...) so that weight conversion is a rename plus a transpose, and
so that freezing rules can match "/"-joined parameter paths such as "encoder/layer_3/...".
"""
import dataclasses
import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of Hugging Face's `BertConfig` that define a `BertModel` encoder."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"BertConfig.hidden_act={self.hidden_act!r} is not supported; "
                       f"expected one of {sorted(_ACTIVATIONS)}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"BertConfig.hidden_size={self.hidden_size} is not a multiple of "
                       f"num_attention_heads={self.num_attention_heads}.")
    if not 0 <= self.pad_token_id < self.vocab_size:
      raise ValueError(f"BertConfig.pad_token_id={self.pad_token_id} is outside the vocabulary "
                       f"(vocab_size={self.vocab_size}).")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "BertConfig":
    """Builds a config from an HF config.json dict; keys that do not shape the encoder are ignored."""
    values = dict(values)
    model_type = values.get("model_type", "bert")
    if model_type != "bert":
      raise ValueError(f"config model_type={model_type!r}: only 'bert' checkpoints are supported.")
    position_type = values.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(f"config position_embedding_type={position_type!r}: only 'absolute' position "
                       "embeddings are implemented.")
    for flag in ("is_decoder", "add_cross_attention"):
      if values.get(flag):
        raise ValueError(f"config {flag}=True: only the bidirectional encoder is implemented.")
    if values.get("pad_token_id") is None:
      values.pop("pad_token_id", None)  # HF allows None; the encoder only needs it for initialisation.
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in fields})

  @classmethod
  def from_json_file(cls, path: str) -> "BertConfig":
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f))

  def to_dict(self) -> dict[str, Any]:
    """The content of an HF config.json that `transformers.BertModel.from_pretrained` accepts."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        **dataclasses.asdict(self),
        "position_embedding_type": "absolute",  # Read by transformers < 5.
        "torch_dtype": "float32",
    }


# Rematerialisation policy for `remat=True`: keep only each layer's input. The usual transformer
# alternative, dots_with_no_batch_dims_saveable, would still keep the outputs of all six projections
# (q, k, v, attention output, the 4H-wide intermediate, output), over half of what a layer stores;
# dots_saveable would add the [N, heads, T, T] attention scores. Recomputing a layer costs one more
# forward of it (~1/3 more FLOPs per step), the price of a bigger per-device contrastive batch.
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable


def _normal_init(stddev: float):
  return nn.initializers.normal(stddev=stddev)


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic: bool):
    c = self.config
    seq_len = input_ids.shape[-1]
    if seq_len > c.max_position_embeddings:
      raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings="
                       f"{c.max_position_embeddings}.")

    def pad_row_zero_init(key, shape, dtype=jnp.float32):
      # HF initialises the padding token's embedding to zeros.
      return _normal_init(c.initializer_range)(key, shape, dtype).at[c.pad_token_id].set(0)

    embed = lambda num, name, init: nn.Embed(num, c.hidden_size, embedding_init=init, name=name)
    words = embed(c.vocab_size, "word_embeddings", pad_row_zero_init)(input_ids)
    positions = embed(c.max_position_embeddings, "position_embeddings",
                      _normal_init(c.initializer_range))(jnp.arange(seq_len)[None])
    token_types = embed(c.type_vocab_size, "token_type_embeddings",
                        _normal_init(c.initializer_range))(token_type_ids)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(words + token_types + positions)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    c = self.config
    dense = lambda name: nn.Dense(c.hidden_size, dtype=self.dtype,
                                  kernel_init=_normal_init(c.initializer_range), name=name)
    split_heads = lambda y: y.reshape(y.shape[:-1] + (c.num_attention_heads, c.head_dim))
    q, k, v = (split_heads(dense(name)(x)) for name in ("query", "key", "value"))
    use_dropout = not deterministic and c.attention_probs_dropout_prob > 0
    out = nn.dot_product_attention(
        q, k, v, mask=mask, dtype=self.dtype, force_fp32_for_softmax=True,
        # HF drops each attention probability independently (no sharing across batch or heads).
        broadcast_dropout=False, dropout_rate=c.attention_probs_dropout_prob,
        dropout_rng=self.make_rng("dropout") if use_dropout else None, deterministic=not use_dropout)
    return out.reshape(out.shape[:-2] + (c.hidden_size,)).astype(self.dtype)


class BertResidualOutput(nn.Module):
  """Dense, dropout, residual add, post-LayerNorm (HF's BertSelfOutput and BertOutput)."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, residual, deterministic: bool):
    c = self.config
    x = nn.Dense(c.hidden_size, dtype=self.dtype, kernel_init=_normal_init(c.initializer_range),
                 name="dense")(x)
    x = nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
    # LayerNorm in f32: the residual stream stays f32 whatever the matmul dtype.
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=jnp.float32, name="LayerNorm")(x + residual)


class BertAttention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    attended = BertSelfAttention(self.config, self.dtype, name="self")(x, mask, deterministic)
    return BertResidualOutput(self.config, self.dtype, name="output")(attended, x, deterministic)


class BertIntermediate(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = nn.Dense(c.intermediate_size, dtype=self.dtype,
                 kernel_init=_normal_init(c.initializer_range), name="dense")(x)
    return _ACTIVATIONS[c.hidden_act](x)


class BertLayer(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    x = BertAttention(self.config, self.dtype, name="attention")(x, mask, deterministic)
    hidden = BertIntermediate(self.config, self.dtype, name="intermediate")(x)
    return BertResidualOutput(self.config, self.dtype, name="output")(hidden, x, deterministic)


class BertLayerStack(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    layer_cls = BertLayer
    if self.remat:
      # Lifting the class keeps `name=` and so the parameter paths (`layer_3/attention/...`). Argument 3
      # (`deterministic`, counting self as 0) is a Python bool. Dropout masks are redrawn from the same
      # rng in the recomputation, so they are the masks of the forward pass.
      layer_cls = nn.remat(BertLayer, static_argnums=(3,), policy=REMAT_POLICY)
    for i in range(self.config.num_hidden_layers):
      x = layer_cls(self.config, self.dtype, name=f"layer_{i}")(x, mask, deterministic)
    return x


class BertEncoder(nn.Module):
  """HF `BertModel` up to `last_hidden_state` (no pooler).

  `dtype` is the matmul dtype; parameters, LayerNorm, softmax and the returned states are float32.
  With `deterministic=False`, dropout draws from the "dropout" rng collection. `remat=True` recomputes
  each layer's activations in the backward pass (`REMAT_POLICY`): same parameters and numbers, less memory.
  """
  config: BertConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    if input_ids.shape != attention_mask.shape:
      raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} "
                       "must have the same shape.")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(self.config, name="embeddings")(input_ids, token_type_ids, deterministic)
    # [N, 1 (heads), 1 (queries), T (keys)]: padded keys get no attention.
    mask = (attention_mask > 0)[:, None, None, :]
    return BertLayerStack(self.config, self.dtype, self.remat, name="encoder")(x, mask, deterministic)


def pool_text(hidden: jax.Array, attention_mask: jax.Array, kind: str) -> jax.Array:
  """[N, T, H] token states -> [N, H] over the valid (mask > 0) tokens.

  "max": element-wise max (ConVIRT), "mean": average, "cls": the first token's state.
  A row without any valid token pools to zeros for "max" and "mean".
  """
  valid = (attention_mask > 0)[..., None]
  if kind == "max":
    pooled = jnp.max(jnp.where(valid, hidden, -jnp.inf), axis=1)
    return jnp.where(jnp.any(valid, axis=1), pooled, 0).astype(hidden.dtype)
  if kind == "mean":
    count = jnp.sum(valid, axis=1, dtype=hidden.dtype)
    return jnp.sum(jnp.where(valid, hidden, 0), axis=1) / jnp.maximum(count, 1)
  if kind == "cls":
    return hidden[:, 0]
  raise ValueError(f"unknown text pooling {kind!r}; expected 'max', 'mean' or 'cls'.")
