"""Embeds a data split or free texts with a frozen ConVIRT model, on every device of every process.

Each process reads its shard of the split (`pipeline.eval_batches`), the batch is sharded over the mesh,
and the rows of all processes are gathered back in dataset order, so every process ends with the same
numpy arrays.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import numpy as np

from convirt_jax import parallel
from convirt_jax.data import pipeline
from convirt_jax.models.convirt import INPUT_KEYS, ConVIRTModel


class Subset:
  """A random-access view of some records of a source (e.g. a capped probe training set)."""

  def __init__(self, source: Sequence[Any], indices: np.ndarray):
    self._source, self._indices = source, np.asarray(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> Any:
    return self._source[int(self._indices[i])]


def capped(source: Sequence[Any], max_examples: int, seed: int = 0) -> Sequence[Any]:
  """At most `max_examples` records, a seeded random choice kept in dataset order (0 = all)."""
  if not max_examples or len(source) <= max_examples:
    return source
  rng = np.random.default_rng(seed)
  return Subset(source, np.sort(rng.choice(len(source), max_examples, replace=False)))


def per_process_batch(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """`batch_size` rounded up to fill every device equally, as this process's share of it."""
  per_device = math.ceil(batch_size / mesh.devices.size)
  return per_device * len(mesh.local_devices)


class Embedder:
  """Jitted image/text encoders of one model, with the variables replicated on `mesh`."""

  def __init__(self, model: ConVIRTModel, variables: dict[str, Any], mesh: jax.sharding.Mesh):
    self.mesh = mesh
    self.variables = parallel.replicate({"params": variables["params"],
                                         "batch_stats": variables["batch_stats"]}, mesh)
    self._images, self._texts = jitted_encoders(model)

  def split(self, source: Sequence[Any], tokenizer, config, *, with_text: bool = True) -> dict[str, np.ndarray]:
    """{"image_features", "image_emb"[, "text_features", "text_emb"], "labels"} for every record, in order."""
    batch_size = per_process_batch(config.eval.batch_size, self.mesh)
    batches = pipeline.eval_batches(source, tokenizer, config, batch_size=batch_size,
                                    shard_index=jax.process_index(), shard_count=jax.process_count())
    keys = ["image_features", "image_emb"] + (["text_features", "text_emb"] if with_text else [])
    return self._run(batches, keys, len(source), with_images=True, with_text=with_text)

  def texts(self, texts: Sequence[str], tokenizer, config) -> dict[str, np.ndarray]:
    """{"text_features", "text_emb"} of free texts (every process passes the same list)."""
    batch_size = per_process_batch(config.eval.batch_size, self.mesh) * jax.process_count()
    # Every process holds all texts; each feeds its own slice of every batch.
    local = jax.process_index() * (batch_size // jax.process_count())
    width = batch_size // jax.process_count()
    batches = ({k: v[local:local + width] for k, v in b.items()}
               for b in pipeline.text_batches(texts, tokenizer, batch_size))
    return self._run(batches, ["text_features", "text_emb"], len(texts), with_images=False,
                     with_text=True)

  def _run(self, batches, keys, n, *, with_images: bool, with_text: bool) -> dict[str, np.ndarray]:
    collected = {k: [] for k in keys + ["labels", "index", "mask"]}
    for batch in batches:
      extra = {k: batch[k] for k in ("labels", "index", "mask") if k in batch}
      inputs = {k: batch[k] for k in INPUT_KEYS if k in batch}
      inputs = parallel.shard_batch(inputs, self.mesh)
      outputs = dict(extra)
      if with_images:
        outputs["image_features"], outputs["image_emb"] = self._images(self.variables, inputs["image"])
      if with_text:
        outputs["text_features"], outputs["text_emb"] = self._texts(
            self.variables, inputs["input_ids"], inputs["attention_mask"])
      for key, value in outputs.items():
        collected[key].append(parallel.gather_rows(value))
    mask = np.concatenate(collected.pop("mask")).astype(bool)
    order = np.concatenate(collected.pop("index"))[mask]
    result = {}
    for key, values in collected.items():
      if values:
        rows = np.concatenate(values)[mask]
        result[key] = rows[np.argsort(order, kind="stable")]
    assert len(order) == n and np.array_equal(np.sort(order), np.arange(n)), "every record exactly once"
    return result


@functools.lru_cache(maxsize=4)
def jitted_encoders(model: ConVIRTModel):
  """Jitted (encode_images, encode_texts) of a model -> (pooled features, projections), shared by every
  user of an equal model (Embedders, the API), so evaluating several weights compiles once."""
  images = jax.jit(lambda v, x: model.apply(v, x, method=ConVIRTModel.encode_images))
  texts = jax.jit(lambda v, ids, mask: model.apply(v, ids, mask, method=ConVIRTModel.encode_texts))
  return images, texts
