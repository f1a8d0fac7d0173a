"""An image classifier (the ResNet image encoder + a new linear head) and its data-parallel train/eval steps.

The fine-tuning protocol of the transfer job: every encoder weight and the head are trained. As in
`steps.py`, the forward pass and the loss run per device under `jax.shard_map` over the mesh axis "data":
BatchNorm statistics are averaged over the axis (SyncBatchNorm) and the loss is the psum of per-device
sums divided by the global count, so the gradient (summed over the axis in one float32 psum,
`steps.summed_gradient`) is the gradient of the global-batch loss.

Losses (labels as the data contract writes them: 1 positive, 0 negative, -1 uncertain, NaN not
mentioned):
  "binary" / "multilabel"  sigmoid binary cross-entropy per (row, label), target = (label == 1); NaN
                           entries are masked out (not mentioned = no supervision); the mean is over the
                           unmasked entries of the global batch.
  "multiclass"             softmax cross-entropy against the one-hot row's class; mean over rows.
The train state is `state.new_state` around {"params": {"image", "classifier"}, "batch_stats": {"image"}}.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from convirt_jax import parallel
from convirt_jax.data import device_augment
from convirt_jax.data.augment import TrainAugment
from convirt_jax.models.classifier import ImageClassifier
from convirt_jax.training import engine, steps

TASKS = ("binary", "multilabel", "multiclass")
Metrics = dict[str, jax.Array]


def classification_loss_sums(logits: jax.Array, labels: jax.Array, task: str,
                             row_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(sum of the loss terms, number of terms) of a batch; the loss is their ratio (see the module doc).

  logits, labels: float [n, L]; row_mask: optional bool [n] (False rows count for nothing).
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r}: must be one of {TASKS}")
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  rows = jnp.ones(labels.shape[:1], bool) if row_mask is None else row_mask.astype(bool)
  if task == "multiclass":
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.argmax(labels, axis=-1))
    weights = rows.astype(jnp.float32)
    return jnp.sum(weights * per_row), jnp.sum(weights)
  known = ~jnp.isnan(labels) & rows[:, None]
  targets = (labels == 1.0).astype(jnp.float32)
  per_entry = optax.sigmoid_binary_cross_entropy(logits, targets)
  weights = known.astype(jnp.float32)
  return jnp.sum(jnp.where(known, per_entry, 0.0)), jnp.sum(weights)


def _global_mean(total: jax.Array, count: jax.Array, axis: str | None) -> jax.Array:
  if axis is not None:
    total, count = jax.lax.psum(total, axis), jax.lax.psum(count, axis)
  return total / jnp.maximum(count, 1.0)


def _gradient(model: ImageClassifier, task: str, augment: TrainAugment | None = None):
  """The per-device gradient of the engine's update step: (params, batch_stats, rng, step, batch) ->
  (grads, batch_stats, {"loss"}); `batch` {"image", "labels"} (+ "extent": augmented first with
  `augment`, `device_augment.in_step`)."""
  axis = parallel.DATA_AXIS
  # An encoder without batch statistics (no `axis_name` field) has nothing to synchronise.
  if getattr(model.encoder, "axis_name", axis) != axis:
    raise ValueError(f"the classifier step needs the image encoder built with axis_name={axis!r} so that "
                     f"BatchNorm statistics are synchronised; it has {model.encoder.axis_name!r}")

  def per_device(params, batch_stats, rng, step, batch):
    batch = device_augment.in_step(batch, rng, step, augment, axis)
    images, labels = batch["image"], batch["labels"]

    def loss_fn(params):
      logits, updated = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                    mutable=["batch_stats"])
      total, count = classification_loss_sums(logits, labels, task)
      loss = _global_mean(total, count, axis)
      return loss, (loss, updated["batch_stats"])

    # Summed over the axis in float32, in one psum (see steps.summed_gradient); nothing is frozen.
    nothing_frozen = jax.tree.map(lambda _: False, params)
    grads, (loss, new_stats) = steps.summed_gradient(loss_fn, params, nothing_frozen, axis)
    return grads, new_stats, {"loss": loss}

  return per_device


def make_finetune_step(model: ImageClassifier, optimizer: optax.GradientTransformation, task: str,
                       mesh: Mesh, augment: TrainAugment | None = None
                       ) -> Callable[[dict, dict], tuple[dict, Metrics]]:
  """jit(train_step(state, batch) -> (state, metrics)): the classification loss's gradient on the
  engine's update step (`engine.make_update_step`); the state (replicated) is donated.

  `batch`: {"image", "labels"}, and "extent" when `augment` is set (device augmentation: the step
  augments the padded images with the state's key and step). Metrics: loss (global-batch mean),
  grad_norm, lr.
  """
  return engine.make_update_step(_gradient(model, task, augment), optimizer, mesh)


@functools.lru_cache(maxsize=8)
def make_predict_fn(model: ImageClassifier, mesh: Mesh, *, features: bool = False) -> Callable:
  """jit((variables, images) -> logits [B, L], or the pooled features with `features=True`), inference
  mode (running BatchNorm statistics), images sharded over "data" and the rows returned sharded alike.

  One per (model, mesh, features) per process, so that every caller shares its compilations."""
  axis = parallel.DATA_AXIS

  def per_device(variables, images):
    if features:
      return model.apply(variables, images, method=ImageClassifier.features)
    return model.apply(variables, images)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis)), out_specs=P(axis))
  replicated, data = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(sharded, in_shardings=(replicated, data), out_shardings=data)
