"""Embeds a data split or free texts with a frozen ConVIRT model, on every device of every process.

Each process reads its shard of the split (`pipeline.eval_batches`), the batch is sharded over the mesh,
and the rows of all processes are gathered back in dataset order, so every process ends with the same
numpy arrays.
"""
from __future__ import annotations

import dataclasses
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


def processes(mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """(this process's index, the process count) among the processes `mesh` spans: (0, 1) for a mesh of
  this process's own devices, whatever the job's process count."""
  if len(mesh.local_devices) == mesh.devices.size:
    return 0, 1
  return jax.process_index(), jax.process_count()


@dataclasses.dataclass(frozen=True)
class Reading:
  """How a split is read to be embedded: the evaluation transform's side, the global batch (rounded up
  to fill every device) and grain's read threads."""
  image_size: int
  batch_size: int
  read_threads: int

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> "Reading":
    """data.image_size, eval.batch_size and data.num_threads of a job's config."""
    return cls(int(config.data.image_size), int(config.eval.batch_size), int(config.data.num_threads))

  def batches(self, source: Sequence[Any], tokenizer, mesh: jax.sharding.Mesh, **kwargs):
    """This process's share of every record of `source` (`pipeline.eval_batches`)."""
    index, count = processes(mesh)
    return pipeline.eval_batches(source, tokenizer, image_size=self.image_size,
                                 batch_size=per_process_batch(self.batch_size, mesh),
                                 read_threads=self.read_threads, shard_index=index, shard_count=count,
                                 **kwargs)


def predict(fn: Callable, variables: Any, source: Sequence[Any], reading: Reading,
            mesh: jax.sharding.Mesh) -> tuple[np.ndarray, np.ndarray]:
  """(fn's rows, labels) of every record of `source`, in order, on every process.

  `fn(variables, images)` is a jitted function of images sharded over "data" (e.g.
  `classifier_steps.make_predict_fn`); images get the evaluation transform at reading.image_size.
  """
  compute = lambda batch: {"rows": fn(variables, parallel.shard_batch({"image": batch["image"]}, mesh)["image"])}
  rows = in_order(reading.batches(source, None, mesh), compute, len(source), mesh)
  return rows["rows"], rows["labels"]


def pooled_features(classifier, encoder_variables: Mapping[str, Any], sources: Mapping[str, Sequence[Any]],
                    reading: Reading, mesh: jax.sharding.Mesh) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{name: (pooled features f_v, labels)} of each source, embedded by the image encoder of
  `classifier` (a `models.classifier.ImageClassifier`) with `encoder_variables`: how the transfer job's
  protocols embed every kind of encoder."""
  variables = parallel.replicate(classifier_lib.classifier_variables(classifier, encoder_variables, seed=0),
                                 mesh)
  features_fn = classifier_steps.make_predict_fn(classifier, mesh, features=True)
  return {name: predict(features_fn, variables, source, reading, mesh) for name, source in sources.items()}


def in_order(batches, compute: Callable[[dict], dict], n: int,
             mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
  """The rows of `compute(batch)` and the batches' labels over every batch of every process `mesh`
  spans, gathered, the padding dropped (batch["mask"]) and in dataset order (batch["index"]): the one
  way every embedding of a split, of texts or of in-memory arrays is collected."""
  gather = np.asarray if processes(mesh)[1] == 1 else parallel.gather_rows
  collected = {}
  for batch in batches:
    outputs = dict(compute(batch), **{k: batch[k] for k in ("labels", "index", "mask") if k in batch})
    for key, value in outputs.items():
      collected.setdefault(key, []).append(gather(value))
  mask = np.concatenate(collected.pop("mask")).astype(bool)
  order = np.concatenate(collected.pop("index"))[mask]
  assert len(order) == n and np.array_equal(np.sort(order), np.arange(n)), "every record exactly once"
  return {key: np.concatenate(values)[mask][np.argsort(order, kind="stable")]
          for key, values in collected.items()}


def array_batches(arrays: Mapping[str, np.ndarray], batch_size: int):
  """In-memory rows -> batches of `batch_size` with "mask" and "index", the last padded with copies of
  its last row (one compiled shape for every call)."""
  n = len(next(iter(arrays.values())))
  for start in range(0, n, batch_size):
    real = min(batch_size, n - start)
    batch = {k: np.concatenate([v[start:start + real], np.repeat(v[start + real - 1:start + real],
                                                                  batch_size - real, axis=0)])
             for k, v in arrays.items()}
    mask = np.arange(batch_size) < real
    yield {**batch, "mask": mask,
           "index": np.where(mask, np.arange(start, start + batch_size), -1).astype(np.int32)}


class Embedder:
  """Jitted image/text encoders of one model, with the variables replicated on `mesh`. Rows are read
  and gathered over the processes the mesh spans (this one alone for a mesh of its local devices)."""

  def __init__(self, model: ConVIRTModel, variables: dict[str, Any], mesh: jax.sharding.Mesh,
               reading: Reading):
    self.mesh, self.reading = mesh, reading
    self.variables = parallel.replicate({"params": variables["params"],
                                         "batch_stats": variables["batch_stats"]}, mesh)
    self._images, self._texts = jitted_encoders(model)

  def split(self, source: Sequence[Any], tokenizer, *, with_text: bool = True) -> dict[str, np.ndarray]:
    """{"image_features", "image_emb"[, "text_features", "text_emb"], "labels"} for every record, in order."""
    batches = self.reading.batches(source, tokenizer, self.mesh)
    return self._run(batches, len(source), with_images=True, with_text=with_text)

  def texts(self, texts: Sequence[str], tokenizer) -> dict[str, np.ndarray]:
    """{"text_features", "text_emb"} of free texts (every process passes the same list)."""
    index, count = processes(self.mesh)
    batch_size = per_process_batch(self.reading.batch_size, self.mesh) * count
    # Every process holds all texts; each feeds its own slice of every batch.
    local = index * (batch_size // count)
    width = batch_size // count
    batches = ({k: v[local:local + width] for k, v in b.items()}
               for b in pipeline.text_batches(texts, tokenizer, batch_size))
    return self._run(batches, len(texts), with_images=False, with_text=True)

  def arrays(self, inputs: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """This process's in-memory rows: {"image": uint8 [N, S, S, 3]} (evaluation-transformed) ->
    {"image_features", "image_emb"}, or {"input_ids", "attention_mask"} -> {"text_features",
    "text_emb"}. No rows give no rows, of the encoder's widths."""
    with_images = "image" in inputs
    n = len(next(iter(inputs.values())))
    if n == 0:
      one = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype) for k, v in inputs.items()}
      shapes = jax.eval_shape(lambda x: self._encode(x, with_images, not with_images), one)
      return {k: np.zeros((0, v.shape[-1]), v.dtype) for k, v in shapes.items()}
    batches = array_batches(inputs, per_process_batch(batch_size, self.mesh))
    return self._run(batches, n, with_images=with_images, with_text=not with_images)

  def _compute(self, batch, with_images: bool, with_text: bool) -> dict[str, Any]:
    inputs = parallel.shard_batch({k: batch[k] for k in INPUT_KEYS if k in batch}, self.mesh)
    return self._encode(inputs, with_images, with_text)

  def _encode(self, inputs, with_images: bool, with_text: bool) -> dict[str, Any]:
    outputs = {}
    if with_images:
      outputs["image_features"], outputs["image_emb"] = self._images(self.variables, inputs["image"])
    if with_text:
      outputs["text_features"], outputs["text_emb"] = self._texts(
          self.variables, inputs["input_ids"], inputs["attention_mask"])
    return outputs

  def _run(self, batches, n, *, with_images: bool, with_text: bool) -> dict[str, np.ndarray]:
    return in_order(batches, lambda batch: self._compute(batch, with_images, with_text), n, self.mesh)


@functools.lru_cache(maxsize=4)
def jitted_encoders(model: ConVIRTModel):
  """Jitted (encode_images, encode_texts) of a model -> (pooled features, projections), shared by every
  user of an equal model (Embedders, the API), so evaluating several weights compiles once."""
  images = jax.jit(lambda v, x: model.apply(v, x, method=ConVIRTModel.encode_images))
  texts = jax.jit(lambda v, ids, mask: model.apply(v, ids, mask, method=ConVIRTModel.encode_texts))
  return images, texts
