"""ConVIRT's data-parallel train and eval steps: pure functions of (state, batch), jitted over the mesh.

A step runs the forward pass and the loss per device under `jax.shard_map` over the mesh axis "data":
BatchNorm statistics are averaged over the axis (SyncBatchNorm) and the loss scores every row against
the embeddings of the whole global batch. Each device differentiates its own copy of the trainable
parameters and the float32 gradients are summed over the axis in one psum (`summed_gradient`).

With train.microbatch_size > 0 the gradient is computed in micro-batches the GradCache way (Gao et al.
2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"): see
`micro_batched_gradient`. Activation memory then follows the micro-batch, not the batch, while the
negatives stay the whole global batch.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, PartitionSpec as P

from convirt_jax import losses, parallel
from convirt_jax.data import device_augment
from convirt_jax.errors import ConfigError
from convirt_jax.models.convirt import INPUT_KEYS, ConVIRTModel
from convirt_jax.training import engine
from convirt_jax.training.optimizer import frozen_mask
from convirt_jax.training.state import State

Metrics = dict[str, jax.Array]


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
  """The keys of a host or device batch that the step takes (labels stay on the host): the model's
  inputs, and "extent" when the step augments the images (data.augment_on resolved to "device")."""
  missing = [k for k in INPUT_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch is missing {missing}; it has {sorted(batch)}")
  return {k: batch[k] for k in INPUT_KEYS + ("extent",) if k in batch}


def _loss_config(config: ml_collections.ConfigDict) -> dict[str, float]:
  return {"temperature": config.loss.temperature, "image_weight": config.loss.image_weight}


def check_microbatch_size(per_device_batch: int, microbatch_size: int, devices: int) -> None:
  """ConfigError unless train.microbatch_size is 0 (off) or divides the per-device batch."""
  if microbatch_size < 0 or (microbatch_size and per_device_batch % microbatch_size):
    raise ConfigError(
        f"train.microbatch_size={microbatch_size} must be 0 (off) or divide the per-device batch "
        f"{per_device_batch} (train.batch_size / {devices} devices)")


def summed_gradient(loss_fn: Callable[[Any], tuple[jax.Array, Any]], params: Any, frozen: Any,
                    axis: str) -> tuple[Any, Any]:
  """(gradient of `loss_fn` at `params` summed over `axis`, loss_fn's aux), inside shard_map.

  `loss_fn(params) -> (loss, aux)`, the loss a psum over the axis. Only the leaves `frozen` marks False
  are differentiated (frozen ones get zeros and no collective). The trainable leaves are marked
  varying, so each device differentiates its own copy and the cross-device sum is this one psum of
  float32 gradients: without it, shard_map sums the gradient where a replicated parameter meets
  per-device values, i.e. after the model casts it to the compute dtype, which under bfloat16 sums
  every kernel's gradient in bfloat16, in one all-reduce per layer that XLA does not combine.
  """
  trainable, merge, fill = _trainable(params, frozen)
  local = jax.lax.pcast(trainable, axis, to="varying")
  grads, aux = jax.grad(lambda t: loss_fn(merge(t)), has_aux=True)(local)
  return fill(jax.lax.psum(grads, axis)), aux


def _trainable(params: Any, frozen: Any) -> tuple[list[jax.Array], Callable, Callable]:
  """(the leaves of `params` that `frozen` marks False, merge(those leaves) -> params with the frozen
  leaves as they are, fill(their gradients) -> a gradient tree with zeros for the frozen leaves)."""
  leaves, treedef = jax.tree.flatten(params)
  is_frozen = jax.tree.leaves(frozen)
  trainable = [leaf for leaf, f in zip(leaves, is_frozen) if not f]

  def merge(trainable_leaves):
    rest = iter(trainable_leaves)
    return treedef.unflatten([leaf if f else next(rest) for leaf, f in zip(leaves, is_frozen)])

  def fill(trainable_grads):
    rest = iter(trainable_grads)
    return treedef.unflatten([jnp.zeros_like(leaf) if f else next(rest) for leaf, f in zip(leaves, is_frozen)])

  return trainable, merge, fill


def micro_batched_gradient(model: ConVIRTModel, params: Any, batch_stats: Any, rng: jax.Array,
                           inputs: dict[str, jax.Array], frozen: Any, microbatch_size: int,
                           loss_config: dict[str, float], axis: str) -> tuple[Any, Any, Metrics]:
  """(grads, batch_stats, loss terms) of one device's rows, computed micro-batch by micro-batch.

  Runs inside the train step's shard_map; the returned grads are already summed over `axis`. GradCache
  (Gao et al. 2021) in three parts:
    1. every micro-batch of `microbatch_size` rows is embedded without keeping activations (a scan,
       nothing differentiated);
    2. the loss of the whole global batch (all-gathered, as in the plain step) and its gradient with
       respect to this device's embeddings (only [rows, projection_dim] each);
    3. every micro-batch is embedded again under jax.vjp, pulled back with its slice of that gradient,
       and the parameter gradients accumulate (per device; one psum at the end).
  Micro-batch c gets the dropout key fold_in(rng, c) in parts 1 and 3, so part 3 recomputes exactly the
  activations of part 1. Frozen parameters are closed over, not differentiated (zero gradient, as the
  plain step's stop_gradient gives).

  What it equals. With model.image.batch_norm="frozen" (and no dropout, or up to the dropout masks): the
  plain step's loss, metrics and gradient, up to float rounding. With "batch" (ghost batch norm): the
  images of micro-batch c are normalised with the statistics of the global micro-batch c, i.e. rows
  [c*m, (c+1)*m) of every device's shard (m = microbatch_size; synced over the axis as usual); the
  loss, metrics and gradient are those of the whole global batch embedded that way (gradient through
  the batch statistics included); the running averages are updated once per micro-batch, in order
  c = 0 .. b/m - 1, by part 1 only: they equal what b/m training-mode forward passes of the plain step
  over the global micro-batches 0, 1, ... in turn, with this step's parameters, would leave (so the
  momentum is applied b/m times per step).
  """
  rows = inputs["input_ids"].shape[0]
  if rows % microbatch_size:
    check_microbatch_size(rows, microbatch_size, jax.lax.axis_size(axis))
  chunks = rows // microbatch_size
  chunked = jax.tree.map(lambda x: x.reshape((chunks, microbatch_size) + x.shape[1:]), inputs)
  indices = jnp.arange(chunks)

  # Only the trainable leaves are differentiated: no zero gradients for frozen BERT layers are carried.
  trainable, merge, fill = _trainable(params, frozen)

  def embed(trainable_leaves, stats, chunk, index):
    out, updated = model.apply(
        {"params": merge(trainable_leaves), "batch_stats": stats}, chunk["image"], chunk["input_ids"],
        chunk["attention_mask"], train=True, rngs={"dropout": jax.random.fold_in(rng, index)},
        mutable=["batch_stats"])
    return (out["image_emb"], out["text_emb"]), updated["batch_stats"]

  # 1. Embeddings of every micro-batch; the BatchNorm running averages advance once per micro-batch.
  def forward(stats, xs):
    embeddings, stats = embed(trainable, stats, *xs)
    return stats, embeddings

  new_batch_stats, (image_emb, text_emb) = jax.lax.scan(forward, batch_stats, (chunked, indices))
  image_emb, text_emb = (x.reshape((rows,) + x.shape[2:]) for x in (image_emb, text_emb))

  # 2. The loss over the global batch and its gradient with respect to this device's embeddings.
  def loss_fn(image_emb, text_emb):
    terms = losses.convirt_loss_terms(image_emb, text_emb, axis_name=axis, **loss_config)
    return terms["loss"], terms

  (d_image, d_text), terms = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(image_emb, text_emb)
  d_image, d_text = (x.reshape((chunks, microbatch_size) + x.shape[1:]) for x in (d_image, d_text))

  # 3. Recompute each micro-batch under vjp and accumulate this device's parameter gradient. Marked
  # varying, the parameters' cotangents are not summed over the axis per micro-batch, only once below.
  local_trainable = jax.lax.pcast(trainable, axis, to="varying")

  def backward(accumulated, xs):
    chunk, index, cotangents = xs
    _, pullback, _ = jax.vjp(lambda t: embed(t, batch_stats, chunk, index), local_trainable,
                             has_aux=True)
    (grads,) = pullback(cotangents)
    return jax.tree.map(jnp.add, accumulated, grads), None

  zeros = jax.tree.map(jnp.zeros_like, local_trainable)
  accumulated, _ = jax.lax.scan(backward, zeros, (chunked, indices, (d_image, d_text)))
  return fill(jax.lax.psum(accumulated, axis)), new_batch_stats, terms


def make_train_step(model: ConVIRTModel, optimizer: optax.GradientTransformation,
                    config: ml_collections.ConfigDict,
                    mesh: Mesh) -> Callable[[State, dict[str, jax.Array]], tuple[State, Metrics]]:
  """jit(train_step(state, batch) -> (state, metrics)): the contrastive loss's gradient on the engine's
  update step (`engine.make_update_step`); the state is donated.

  `state` is replicated on `mesh` and `batch` ({"image": uint8 [B,H,W,3], "input_ids",
  "attention_mask": int32 [B,T]}; with device augmentation "image" uint8 [B,P,P] and "extent" [B,2],
  augmented first, `device_augment.in_step`) sharded over "data" with B the global batch. Metrics: loss, both
  directional losses and top-1 accuracies (over the global batch), grad_norm (before clipping) and lr.
  train.microbatch_size > 0 computes the same gradient in micro-batches (`micro_batched_gradient`).
  """
  axis = parallel.DATA_AXIS
  # An encoder without batch statistics (no `axis_name` field) has nothing to synchronise.
  if getattr(model.image_encoder, "axis_name", axis) != axis:
    raise ValueError(f"the train step needs the model built with axis_name={axis!r} so that "
                     f"BatchNorm statistics are synchronised; it has {model.image_encoder.axis_name!r}")
  frozen_layers = config.model.text.frozen_layers
  loss_config = _loss_config(config)
  microbatch_size = int(config.train.get("microbatch_size", 0))
  check_microbatch_size(config.train.batch_size // mesh.size, microbatch_size, mesh.size)
  augment = device_augment.spec_for(config.data.augment_on, config.augment, config.data.image_size)

  def per_device(params, batch_stats, rng, step, inputs):
    inputs = device_augment.in_step(inputs, rng, step, augment, axis)  # host-augmented: as it is
    frozen = frozen_mask(params, frozen_layers)
    # One dropout stream per step and device, reproducible from the state alone.
    rng = jax.random.fold_in(jax.random.fold_in(rng, step), jax.lax.axis_index(axis))
    if microbatch_size:
      return micro_batched_gradient(model, params, batch_stats, rng, inputs, frozen, microbatch_size,
                                    loss_config, axis)

    def loss_fn(params):
      out, updated = model.apply(
          {"params": params, "batch_stats": batch_stats}, inputs["image"], inputs["input_ids"],
          inputs["attention_mask"], train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
      terms = losses.convirt_loss_terms(out["image_emb"], out["text_emb"], axis_name=axis,
                                        **loss_config)
      return terms["loss"], (terms, updated["batch_stats"])

    # Frozen weights are not differentiated, so XLA skips their backward pass.
    grads, (terms, batch_stats) = summed_gradient(loss_fn, params, frozen, axis)
    return grads, batch_stats, terms

  return engine.make_update_step(per_device, optimizer, mesh, select=model_inputs)


def make_eval_step(model: ConVIRTModel, config: ml_collections.ConfigDict,
                   mesh: Mesh) -> Callable[[State, dict[str, jax.Array]], Metrics]:
  """jit(eval_step(state, batch) -> metrics): the train step's loss terms in inference mode.

  An optional bool batch["mask"] marks real rows; padded rows are neither scored nor negatives.
  """
  axis = parallel.DATA_AXIS
  loss_config = _loss_config(config)

  def per_device(params, batch_stats, inputs, mask):
    out = model.apply({"params": params, "batch_stats": batch_stats}, inputs["image"],
                      inputs["input_ids"], inputs["attention_mask"], train=False)
    return losses.convirt_loss_terms(out["image_emb"], out["text_emb"], axis_name=axis, mask=mask,
                                     **loss_config)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axis), P(axis)),
                          out_specs=P())

  def eval_step(state: State, batch: dict[str, jax.Array]) -> Metrics:
    inputs = model_inputs(batch)
    mask = batch.get("mask")
    if mask is None:
      mask = jnp.ones(inputs["input_ids"].shape[:1], bool)
    return sharded(state["params"], state["batch_stats"], inputs, mask.astype(bool))

  replicated, data = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(eval_step, in_shardings=(replicated, data), out_shardings=replicated)

