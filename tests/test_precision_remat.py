"""Accelerator-scale model options: train.precision, train.remat and model.image.batch_norm.

A quarter-width ResNet18 at 32 px and a 2-layer BERT of width 32, batch 8, on one (CPU) device.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from convirt_jax import config as config_lib
from convirt_jax import losses
from convirt_jax.errors import ConfigError
from convirt_jax.models import convirt
from convirt_jax.models.bert import BertConfig

BATCH, IMAGE_SIZE, TEXT_LENGTH = 8, 32, 12
TEXT = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=32)
NO_DROPOUT = dataclasses.replace(TEXT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _config(**overrides):
  c = config_lib.base_config()
  c.model.image.depth = 18
  c.model.image.width = 0.25
  c.model.projection_dim = 16
  c.model.projection_hidden = 32
  c.train.precision = "float32"
  c.update_from_flattened_dict(overrides)
  return c


def _batch(seed=0, batch=BATCH):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
  ids = rng.integers(1, TEXT.vocab_size, (batch, TEXT_LENGTH)).astype(np.int32)
  mask = np.ones_like(ids)
  for row, valid in enumerate(np.linspace(TEXT_LENGTH, 3, batch).astype(int)):
    ids[row, valid:], mask[row, valid:] = 0, 0
  return images, ids, mask


def _init(model, batch):
  return jax.jit(lambda key: model.init(key, *batch))(jax.random.key(0))


def _abstract_init(model, batch):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *batch))


def _loss_and_grads_fn(model):
  """jit((variables, batch, dropout_seed) -> (loss, grads wrt all params, updated batch_stats, out)).

  Training mode, as the train step runs it: batch statistics mutable, dropout from "dropout".
  """

  def run(variables, batch, dropout_seed):
    def loss_fn(params):
      out, updated = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, *batch,
                                 train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(dropout_seed)})
      return losses.convirt_loss(out["image_emb"], out["text_emb"]), (updated["batch_stats"], out)

    (loss, (stats, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    return loss, grads, stats, out

  return jax.jit(run)


def _flat(tree):
  return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


def _paths(tree):
  return sorted(traverse_util.flatten_dict(jax.tree.map(lambda x: (x.shape, x.dtype), tree)).items())


def test_remat_keeps_parameter_paths_and_gradients():
  """Dropout on (p = 0.1): the recomputed forward redraws the same masks.

  Gradients with and without rematerialisation agree up to float32 rounding: XLA fuses the
  recomputed forward differently, and the largest gradients here are O(4), so a bound of 1e-6 holds
  relative to the largest gradient entry, not absolutely (measured: max |difference| 2.7e-6 =
  7.5e-7 of max |gradient|, on the stem conv kernel). Asserted: max |difference| < 2e-6 * max
  |gradient|, ||difference|| < 1e-6 * ||gradient||; loss and updated BatchNorm statistics within 1e-6.
  """
  batch = _batch()
  plain = convirt.build_model(_config(), TEXT)
  remat = convirt.build_model(_config(**{"train.remat": True}), TEXT)
  assert remat.image_encoder.remat and remat.text_encoder.remat and not plain.image_encoder.remat
  variables = _init(plain, batch)
  assert _paths(_abstract_init(remat, batch)) == _paths(variables)  # Same names, shapes and dtypes.

  plain_fn = _loss_and_grads_fn(plain)
  loss, grads, stats, _ = plain_fn(variables, batch, 1)
  remat_loss, remat_grads, remat_stats, _ = _loss_and_grads_fn(remat)(variables, batch, 1)
  print("remat: loss", float(loss), float(remat_loss))
  assert abs(float(loss) - float(remat_loss)) < 1e-6
  assert jax.tree.structure(grads) == jax.tree.structure(remat_grads)
  flat, remat_flat = _flat(grads), _flat(remat_grads)
  worst = float(jnp.max(jnp.abs(flat - remat_flat)))
  largest = float(jnp.max(jnp.abs(flat)))
  relative_norm = float(jnp.linalg.norm(flat - remat_flat) / jnp.linalg.norm(flat))
  print(f"remat: max |grad difference| {worst:.2e} (largest |grad| {largest:.2f}, ratio "
        f"{worst / largest:.2e}), relative norm of the difference {relative_norm:.2e}")
  assert worst < 2e-6 * largest
  assert relative_norm < 1e-6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), stats, remat_stats)
  # Dropout is on in this comparison: another seed moves the gradients far more than remat does.
  _, other_grads, _, _ = plain_fn(variables, batch, 2)
  assert float(jnp.max(jnp.abs(_flat(other_grads) - flat))) > 1e-3


def _cosine(a, b):
  a, b = _flat(a), _flat(b)
  return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def test_bfloat16_activations_stay_close_to_float32():
  """Same params and batch, dropout off, training mode; bfloat16 keeps 8 mantissa bits.

  The small stem (32x32 maps in stage 1, 4x4 in stage 4): with the ImageNet stem a 32 px image ends
  at 1x1 and the BatchNorms of stage 4 see 8 values per channel, which makes the image gradient of
  this random-init network so sensitive that rounding the parameters alone to bfloat16 (float32
  compute) turns its cosine to 0.95 (bf16 activations: 0.89). Here that parameter rounding gives
  image gradients at cosine 0.973; bf16 activations measured 0.930 (image), 0.983 (image head),
  0.9999 (text, text head), 0.986 overall; loss 2.0e-4 relative.
  Tolerances: loss within 2e-2 relative; gradient cosine > 0.97 overall, > 0.99 for the text groups,
  > 0.9 for the image groups. Parameters, gradients, BatchNorm statistics, embeddings and the loss
  are float32; conv and dense outputs are bfloat16.
  """
  batch = _batch()
  f32 = convirt.build_model(_config(**{"model.image.small_stem": True}), NO_DROPOUT)
  bf16 = convirt.build_model(_config(**{"model.image.small_stem": True,
                                        "train.precision": "bfloat16"}), NO_DROPOUT)
  assert (f32.dtype, bf16.dtype, bf16.image_encoder.dtype, bf16.text_encoder.dtype) == (
      jnp.float32, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16)
  variables = _init(f32, batch)
  assert _paths(_abstract_init(bf16, batch)) == _paths(variables)  # bf16 parameters would show here.

  loss32, grads32, _, _ = _loss_and_grads_fn(f32)(variables, batch, 0)
  loss16, grads16, stats16, out16 = _loss_and_grads_fn(bf16)(variables, batch, 0)
  cosine = _cosine(grads16, grads32)
  groups = {k: _cosine(grads16[k], grads32[k]) for k in grads32}
  print(f"bf16 vs f32: loss {float(loss16):.6f} vs {float(loss32):.6f} "
        f"(rel {abs(float(loss16) / float(loss32) - 1):.2e}), grad cosine {cosine:.5f}, per group "
        + ", ".join(f"{k} {v:.5f}" for k, v in groups.items()))
  assert loss16.dtype == jnp.float32
  assert float(loss16) == pytest.approx(float(loss32), rel=2e-2)
  assert float(loss16) != float(loss32)  # The bfloat16 path did run.
  assert cosine > 0.97
  assert min(groups["text"], groups["text_head"]) > 0.99
  assert min(groups["image"], groups["image_head"]) > 0.9
  for tree in (grads16, stats16, out16):
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tree))

  # The activations themselves are bfloat16.
  _, state = jax.eval_shape(lambda: bf16.apply(variables, *batch, capture_intermediates=True))
  inter = traverse_util.flatten_dict(state["intermediates"], sep="/")
  dtype_of = lambda prefix: inter[prefix + "/__call__"][0].dtype
  assert dtype_of("image/layer2_0/conv1") == jnp.bfloat16
  assert dtype_of("image/layer2_0/bn1") == jnp.bfloat16
  assert dtype_of("text/encoder/layer_1/intermediate/dense") == jnp.bfloat16
  assert dtype_of("image_head/dense1") == jnp.bfloat16
  assert dtype_of("image_head") == jnp.float32  # The embeddings leave the heads in float32.


def test_auto_precision_resolves_per_platform():
  assert jax.default_backend() == "cpu"
  assert convirt.compute_dtype("auto") == jnp.float32
  assert convirt.compute_dtype("auto", "cpu") == jnp.float32
  assert convirt.compute_dtype("auto", "gpu") == jnp.bfloat16
  assert convirt.compute_dtype("auto", "tpu") == jnp.bfloat16
  assert convirt.compute_dtype("float32", "tpu") == jnp.float32
  assert convirt.compute_dtype("bfloat16", "cpu") == jnp.bfloat16
  with pytest.raises(ValueError, match="float16"):
    convirt.compute_dtype("float16")

  base = config_lib.base_config()
  assert (base.train.precision, base.train.remat, base.model.image.batch_norm) == ("auto", False, "batch")
  assert convirt.build_model(_config(**{"train.precision": "auto"}), TEXT).dtype == jnp.float32
  config_lib.validate(base)
  for key, bad in (("train.precision", "float16"), ("model.image.batch_norm", "running")):
    c = config_lib.base_config()
    node, leaf = c, key.split(".")
    for part in leaf[:-1]:
      node = node[part]
    node[leaf[-1]] = bad
    with pytest.raises(ConfigError, match=key):
      config_lib.validate(c)


def test_frozen_batch_norm_uses_and_keeps_the_running_statistics():
  """With batch_norm="frozen", train=True normalises with the running statistics and leaves them."""
  images, _, _ = _batch()
  model = convirt.build_model(_config(**{"model.image.batch_norm": "frozen"}), TEXT)
  # Only the image side: encode_images is all this test runs.
  variables = jax.jit(lambda key: model.init(key, images, method="encode_images"))(jax.random.key(0))
  # Running statistics away from the initial 0 / 1, so that using them is visible.
  flat = traverse_util.flatten_dict(variables["batch_stats"])
  keys = dict(zip(flat, jax.random.split(jax.random.key(5), len(flat))))
  stats = traverse_util.unflatten_dict({
      path: (0.1 * jax.random.normal(keys[path], x.shape) if path[-1] == "mean" else
             jax.random.uniform(keys[path], x.shape, minval=0.5, maxval=2.0))
      for path, x in flat.items()})
  variables = {"params": variables["params"], "batch_stats": stats}

  encode = jax.jit(lambda v, x, train: model.apply(v, x, train=train, method="encode_images",
                                                   mutable=["batch_stats"]), static_argnums=2)
  (features_train, emb_train), updated = encode(variables, images, True)
  (features_eval, emb_eval), _ = encode(variables, images, False)
  print("frozen BN: max |train - eval| features",
        float(jnp.max(jnp.abs(features_train - features_eval))))
  np.testing.assert_allclose(features_train, features_eval, rtol=0, atol=1e-6)
  np.testing.assert_allclose(emb_train, emb_eval, rtol=0, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, updated["batch_stats"], stats)
  # One image per micro-batch trains: batch statistics would have no variance.
  (one, _), _ = encode(variables, images[:1], True)
  np.testing.assert_allclose(one, features_eval[:1], rtol=0, atol=1e-5)

  # The default ("batch") mode does use batch statistics and updates the running ones.
  batch_model = convirt.build_model(_config(), TEXT)
  (features_batch, _), batch_updated = jax.jit(
      lambda v, x: batch_model.apply(v, x, train=True, method="encode_images",
                                     mutable=["batch_stats"]))(variables, images)
  assert float(jnp.max(jnp.abs(features_batch - features_eval))) > 1e-3
  assert any(float(jnp.max(jnp.abs(a - b))) > 1e-3 for a, b in
             zip(jax.tree.leaves(batch_updated["batch_stats"]), jax.tree.leaves(stats)))
