"""Embeds a data split or free texts with a frozen ConVIRT model, on every device of every process.

Each process reads its shard of the split (`pipeline.eval_batches`), the batch is sharded over the mesh,
and the rows of all processes are gathered back in dataset order, so every process ends with the same
numpy arrays.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from convirt_jax import parallel
from convirt_jax.data import pipeline
from convirt_jax.models import classifier as classifier_lib
from convirt_jax.models.convirt import INPUT_KEYS, ConVIRTModel
from convirt_jax.training import classifier_steps


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


def predict(fn: Callable, variables: Any, source: Sequence[Any], config: ml_collections.ConfigDict,
            mesh: jax.sharding.Mesh) -> tuple[np.ndarray, np.ndarray]:
  """(fn's rows, labels) of every record of `source`, in order, on every process.

  `fn(variables, images)` is a jitted function of images sharded over "data" (e.g.
  `classifier_steps.make_predict_fn`); images get the evaluation transform at config.data.image_size.
  """
  batches = pipeline.eval_batches(source, None, config, batch_size=per_process_batch(config.eval.batch_size, mesh),
                                  shard_index=jax.process_index(), shard_count=jax.process_count())
  compute = lambda batch: {"rows": fn(variables, parallel.shard_batch({"image": batch["image"]}, mesh)["image"])}
  rows = in_order(batches, compute, len(source))
  return rows["rows"], rows["labels"]


def pooled_features(classifier, encoder_variables: Mapping[str, Any], sources: Mapping[str, Sequence[Any]],
                    config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{name: (pooled features f_v, labels)} of each source, embedded by the image encoder of
  `classifier` (a `models.classifier.ImageClassifier`) with `encoder_variables`: how the transfer job's
  protocols embed every kind of encoder."""
  variables = parallel.replicate(classifier_lib.classifier_variables(classifier, encoder_variables, seed=0),
                                 mesh)
  features_fn = classifier_steps.make_predict_fn(classifier, mesh, features=True)
  return {name: predict(features_fn, variables, source, config, mesh) for name, source in sources.items()}


def in_order(batches, compute: Callable[[dict], dict], n: int) -> dict[str, np.ndarray]:
  """The rows of `compute(batch)` and the batches' labels over every batch of every process, gathered,
  the padding dropped (batch["mask"]) and in dataset order (batch["index"]): the one way every
  embedding of a split or of texts is collected."""
  collected = {}
  for batch in batches:
    outputs = dict(compute(batch), **{k: batch[k] for k in ("labels", "index", "mask") if k in batch})
    for key, value in outputs.items():
      collected.setdefault(key, []).append(parallel.gather_rows(value))
  mask = np.concatenate(collected.pop("mask")).astype(bool)
  order = np.concatenate(collected.pop("index"))[mask]
  assert len(order) == n and np.array_equal(np.sort(order), np.arange(n)), "every record exactly once"
  return {key: np.concatenate(values)[mask][np.argsort(order, kind="stable")]
          for key, values in collected.items()}


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
    return self._run(batches, len(source), with_images=True, with_text=with_text)

  def texts(self, texts: Sequence[str], tokenizer, config) -> dict[str, np.ndarray]:
    """{"text_features", "text_emb"} of free texts (every process passes the same list)."""
    batch_size = per_process_batch(config.eval.batch_size, self.mesh) * jax.process_count()
    # Every process holds all texts; each feeds its own slice of every batch.
    local = jax.process_index() * (batch_size // jax.process_count())
    width = batch_size // jax.process_count()
    batches = ({k: v[local:local + width] for k, v in b.items()}
               for b in pipeline.text_batches(texts, tokenizer, batch_size))
    return self._run(batches, len(texts), with_images=False, with_text=True)

  def _run(self, batches, n, *, with_images: bool, with_text: bool) -> dict[str, np.ndarray]:
    def compute(batch):
      inputs = parallel.shard_batch({k: batch[k] for k in INPUT_KEYS if k in batch}, self.mesh)
      outputs = {}
      if with_images:
        outputs["image_features"], outputs["image_emb"] = self._images(self.variables, inputs["image"])
      if with_text:
        outputs["text_features"], outputs["text_emb"] = self._texts(
            self.variables, inputs["input_ids"], inputs["attention_mask"])
      return outputs

    return in_order(batches, compute, n)


@functools.lru_cache(maxsize=4)
def jitted_encoders(model: ConVIRTModel):
  """Jitted (encode_images, encode_texts) of a model -> (pooled features, projections), shared by every
  user of an equal model (Embedders, the API), so evaluating several weights compiles once."""
  images = jax.jit(lambda v, x: model.apply(v, x, method=ConVIRTModel.encode_images))
  texts = jax.jit(lambda v, ids, mask: model.apply(v, ids, mask, method=ConVIRTModel.encode_texts))
  return images, texts
