"""The ConVIRT objective (Zhang et al., eq. 2-3), optionally over the global batch of a device mesh.

For a batch of N image/text embedding pairs (v_i, u_i), with cosine similarity <.,.> and temperature tau:

  l_i(v->u) = -log exp(<v_i, u_i>/tau) / sum_k exp(<v_i, u_k>/tau)
  l_i(u->v) = -log exp(<u_i, v_i>/tau) / sum_k exp(<u_i, v_k>/tau)
  L = (1/N) sum_i [lam * l_i(v->u) + (1 - lam) * l_i(u->v)]

With `axis_name`, the functions run inside `jax.shard_map`: every device scores its own rows against the
embeddings all-gathered from every device, so the negatives (and N) are those of the global batch and the
value equals the single-device loss on the concatenated batch. Gradients flow back through the gather.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

# torch.nn.functional.normalize's default: a zero vector stays zero instead of becoming NaN.
_NORM_EPS = 1e-12
# Logit given to masked-out columns: exp() underflows to exactly 0 in f32, and unlike -inf a row whose
# columns are all masked still has a finite (ignored) loss, so no NaN reaches a gradient.
_MASKED_LOGIT = -1e9


def l2_normalize(x, eps: float = _NORM_EPS):
  """x / max(||x||, eps) along the last axis, like torch.nn.functional.normalize.

  The project's one L2 normalisation: a jax array stays on its device (and differentiable), a numpy
  array stays numpy in its own precision (the API's outputs, float64 retrieval scores).
  """
  if isinstance(x, np.ndarray):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
  # Clamping the squared norm keeps the gradient finite at x = 0 (sqrt has an infinite slope there).
  squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def _gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _total(x: jax.Array, axis_name: str | None) -> jax.Array:
  total = jnp.sum(x)
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def convirt_loss_terms(image_emb: jax.Array,
                       text_emb: jax.Array,
                       *,
                       temperature: float = 0.1,
                       image_weight: float = 0.75,
                       axis_name: str | None = None,
                       mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """The ConVIRT loss, both directional losses and the top-1 matching accuracy both ways.

  Args:
    image_emb: [n, d] projected image embeddings (any float dtype; scored in float32).
    text_emb: [n, d] projected text embeddings of the same n pairs.
    temperature: tau.
    image_weight: lambda, the weight of the image->text direction.
    axis_name: mesh axis to gather over when called inside `jax.shard_map`; None = this batch only.
    mask: optional bool [n]; False rows (eval padding) are neither scored nor used as negatives, and N
      counts only the True rows of the global batch.

  Returns:
    float32 scalars: loss, loss_image_to_text, loss_text_to_image, accuracy_image_to_text,
    accuracy_text_to_image (fraction of rows whose own pair has the highest similarity).
  """
  if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
    raise ValueError(f"image_emb and text_emb must both be [n, d]; got {image_emb.shape} and "
                     f"{text_emb.shape}")
  if temperature <= 0:
    raise ValueError(f"loss.temperature must be > 0; got {temperature}")
  if not 0.0 <= image_weight <= 1.0:
    raise ValueError(f"loss.image_weight must be in [0, 1]; got {image_weight}")
  n = image_emb.shape[0]
  if mask is not None and mask.shape != (n,):
    raise ValueError(f"mask must be [{n}] to match the embeddings; got {mask.shape}")

  images = l2_normalize(image_emb.astype(jnp.float32))
  texts = l2_normalize(text_emb.astype(jnp.float32))
  all_images, all_texts = _gather(images, axis_name), _gather(texts, axis_name)
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n
  labels = offset + jnp.arange(n)

  # HIGHEST keeps these f32 matmuls exact on TPU/GPU, whose default precision rounds inputs to bf16.
  logits_i2t = jnp.matmul(images, all_texts.T, precision=jax.lax.Precision.HIGHEST) / temperature
  logits_t2i = jnp.matmul(texts, all_images.T, precision=jax.lax.Precision.HIGHEST) / temperature
  if mask is None:
    weights = jnp.ones((n,), jnp.float32)
  else:
    column_ok = _gather(mask.astype(bool), axis_name)[None, :]
    logits_i2t = jnp.where(column_ok, logits_i2t, _MASKED_LOGIT)
    logits_t2i = jnp.where(column_ok, logits_t2i, _MASKED_LOGIT)
    weights = mask.astype(jnp.float32)

  loss_i2t = optax.softmax_cross_entropy_with_integer_labels(logits_i2t, labels)
  loss_t2i = optax.softmax_cross_entropy_with_integer_labels(logits_t2i, labels)
  hit_i2t = (jnp.argmax(logits_i2t, axis=-1) == labels).astype(jnp.float32)
  hit_t2i = (jnp.argmax(logits_t2i, axis=-1) == labels).astype(jnp.float32)

  # N counts the real rows of the global batch; guarded so an all-padding batch gives 0, not NaN.
  count = jnp.maximum(_total(weights, axis_name), 1.0)
  mean = lambda per_row: _total(weights * per_row, axis_name) / count
  terms = {
      "loss_image_to_text": mean(loss_i2t),
      "loss_text_to_image": mean(loss_t2i),
      "accuracy_image_to_text": mean(hit_i2t),
      "accuracy_text_to_image": mean(hit_t2i),
  }
  terms["loss"] = (image_weight * terms["loss_image_to_text"] +
                   (1.0 - image_weight) * terms["loss_text_to_image"])
  return terms


def convirt_loss(image_emb: jax.Array,
                 text_emb: jax.Array,
                 *,
                 temperature: float = 0.1,
                 image_weight: float = 0.75,
                 axis_name: str | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
  """The scalar ConVIRT loss L; arguments as `convirt_loss_terms`."""
  return convirt_loss_terms(image_emb, text_emb, temperature=temperature, image_weight=image_weight,
                            axis_name=axis_name, mask=mask)["loss"]
