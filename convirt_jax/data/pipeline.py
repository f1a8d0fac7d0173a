"""grain input pipelines: endless shuffled training batches and ordered, padded evaluation batches.

Records are the dataset contract's dicts: "id", "report", "text" (bytes or str; "text" holds the usable
sentences one per line), "image" uint8 [H, W, 1], "labels" float32 [L]. Host batches are
  {"image": uint8 [b, S, S, 3], "input_ids": int32 [b, T], "attention_mask": int32 [b, T],
   "labels": float32 [b, L]}
or, for training with config.data.augment_on resolved to "device", "image" uint8 [b, P, P] (the stored
images padded, `augment.padded_size`) and "extent" int32 [b, 2]: the train step augments them.
and evaluation batches add "mask" bool [b] (False on padding rows) and "index" int32 [b] (the record's
index in the source, -1 on padding rows). With `tokenizer=None` the batches are image-only, {"image",
"labels"} (+ "mask", "index"): the records' text is not read at all (downstream classification sets have none).

Per example a grain transform picks the text and augments the image; strings stay strings through grain's
Batch so the tokenizer encodes a whole batch in one call (one Rust call per batch instead of b).

The training iterator's position is grain state: save it with orbax next to the model,
  mngr.save(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(iterator)))
  mngr.restore(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(iterator)))
where `iterator = iter(train_loader(...))` built with the same arguments; each process writes its own
file, so every process must save and restore.
"""
import math
from typing import Any, Iterator, Mapping, Sequence

from absl import flags
import grain
import ml_collections
import numpy as np

from convirt_jax.data.augment import TrainAugment, eval_transform, pad_to, padded_size, resolve_augment_on
from convirt_jax.data.datasets import as_text
from convirt_jax.errors import DataError

Batch = dict[str, np.ndarray]
Record = Mapping[str, Any]


def record_id(record: Record) -> str:
  """The record's "id" as str, for error messages."""
  return as_text(record.get("id", "<no id>"))


def _field(record: Record, key: str) -> Any:
  try:
    return record[key]
  except KeyError:
    raise DataError(f"record {record_id(record)!r} has no {key!r} (keys: {sorted(record)})") from None


def record_sentences(record: Record) -> list[str]:
  """The non-blank lines of the record's "text" (one sentence each); none is bad input."""
  lines = [line.strip() for line in as_text(_field(record, "text")).split("\n")]
  lines = [line for line in lines if line]
  if not lines:
    raise DataError(f"record {record_id(record)!r}: \"text\" has no sentence")
  return lines


def whole_text(record: Record) -> str:
  """All usable sentences joined by a space (evaluation, and training with data.whole_report)."""
  return " ".join(record_sentences(record))


def _labels(record: Record, num_labels: int | None = None) -> np.ndarray:
  labels = np.asarray(_field(record, "labels"), np.float32)
  if labels.ndim != 1 or num_labels not in (None, labels.shape[0]):
    expected = "[L]" if num_labels is None else f"[{num_labels}] like the first record's"
    raise DataError(f"record {record_id(record)!r}: \"labels\" has shape {list(labels.shape)}, "
                    f"expected {expected}")
  return labels


class _TrainExample(grain.transforms.RandomMap):
  """Record -> {"image" uint8 [S, S, 3], "text" str (one random sentence), "labels" float32 [L]}; with
  `pad` (device augmentation) "image" is the stored image padded or cut to uint8 [pad, pad] and
  "extent" int32 [2] its valid (height, width)."""

  def __init__(self, augment: TrainAugment, whole_report: bool, num_labels: int, with_text: bool = True,
               pad: int = 0):
    self._augment = augment
    self._whole_report = whole_report
    self._num_labels = num_labels
    self._with_text = with_text
    self._pad = pad

  def random_map(self, record: Record, rng: np.random.Generator) -> dict[str, Any]:
    example = {}
    if self._with_text:
      sentences = record_sentences(record)
      example["text"] = (" ".join(sentences) if self._whole_report
                         else sentences[rng.integers(len(sentences))])
    try:
      if self._pad:
        image, extent = pad_to(_field(record, "image"), self._pad, self._pad)
        example["extent"] = extent
      else:
        image = self._augment(_field(record, "image"), rng)
    except ValueError as e:
      raise DataError(f"record {record_id(record)!r}: {e}") from e
    return {"image": image, **example, "labels": _labels(record, self._num_labels)}


class _StudyExample(grain.transforms.RandomMap):
  """Study index -> a training example of one of its images, drawn at random (the paper's pair: one report,
  one of its study's images per step)."""

  def __init__(self, source: Sequence[Record], study_sizes: np.ndarray, example: _TrainExample):
    self._source = source
    self._starts = np.concatenate([[0], np.cumsum(study_sizes)[:-1]])
    self._sizes = study_sizes
    self._example = example

  def random_map(self, study: int, rng: np.random.Generator) -> dict[str, Any]:
    index = int(self._starts[study] + rng.integers(self._sizes[study]))
    return self._example.random_map(self._source[index], rng)


class _Tokenize(grain.transforms.Map):
  """Batch with "text" [b] strings -> batch with "input_ids" and "attention_mask" int32 [b, T]."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer

  def map(self, batch: dict[str, Any]) -> Batch:
    batch = dict(batch)
    tokens = self._tokenizer([str(t) for t in batch.pop("text")])
    batch["input_ids"] = np.asarray(tokens["input_ids"], np.int32)
    batch["attention_mask"] = np.asarray(tokens["attention_mask"], np.int32)
    return batch


class _DropText(grain.transforms.Map):
  """An image-only evaluation batch: the (empty) "text" column removed."""

  def map(self, batch: dict[str, Any]) -> Batch:
    return {k: v for k, v in batch.items() if k != "text"}


def _read_options(threads: int) -> grain.ReadOptions:
  # Elements are whole batches here: a short buffer keeps every thread busy without hoarding memory.
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


def _check_shard(shard_index: int, shard_count: int) -> None:
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")


def _stream_seed(seed: int) -> int:
  if seed < 0:
    raise ValueError(f"seed={seed} must be >= 0")
  # (seed, 0): the seed of a single process's stream before the stream was made global.
  return int(np.random.SeedSequence((seed, 0)).generate_state(1)[0])


def train_loader(source: Sequence[Record], tokenizer, config: ml_collections.ConfigDict, *,
                 local_batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                 study_sizes: np.ndarray | None = None) -> grain.IterDataset:
  """Endless augmented training batches: this process's rows of each global batch; `iter()` it for a
  checkpointable iterator.

  One global stream, whatever the number of processes: the units of an epoch (the records, or with
  `study_sizes` the studies, each drawn once per epoch with one of its images picked at random each
  time) are shuffled, cut into global batches of `shard_count * local_batch_size` (the epoch's last
  partial batch is dropped: other units each epoch), and process `shard_index` reads rows
  [shard_index * local_batch_size, (shard_index + 1) * local_batch_size) of each. Every random choice
  (order, image, sentence, augmentation) follows from (seed, the unit's place in the global stream), so
  a job gives the same batches on any number of processes with the same global batch, and a restored
  iterator continues exactly.

  Args:
    source: random-access records (`tfds.data_source`, or any sequence of record dicts).
    tokenizer: called on a list of strings, returns int32 "input_ids"/"attention_mask" [N, T]; picklable
      when config.data.worker_count > 0. None: image-only batches {"image", "labels"} (fine-tuning).
    config: reads data.image_size, data.stored_size, data.augment_on, data.whole_report,
      data.num_threads, data.worker_count and augment.
    local_batch_size: rows per batch on this process.
    seed: non-negative int.
    shard_index, shard_count: this process and the number of processes.
    study_sizes: records per study in record order (`datasets.study_sizes`), or None: records are units.
  """
  _check_shard(shard_index, shard_count)
  if local_batch_size <= 0:
    raise ValueError(f"local_batch_size={local_batch_size} must be > 0")
  units, unit_name = (len(source), "records") if study_sizes is None else (len(study_sizes), "studies")
  global_batch = local_batch_size * shard_count
  if units < global_batch:
    # A batch would hold one record (or study) twice: a false negative for the contrastive loss.
    raise DataError(f"{units} {unit_name} are fewer than one global batch of {global_batch}")
  augment = TrainAugment.from_config(config.augment, config.data.image_size)
  on_device = resolve_augment_on(config.data.augment_on) == "device"
  example = _TrainExample(augment, bool(config.data.whole_report), _labels(source[0]).shape[0],
                          with_text=tokenizer is not None,
                          pad=padded_size(config.data.stored_size) if on_device else 0)
  if study_sizes is None:
    ds = grain.MapDataset.source(source)
  else:
    ds = grain.MapDataset.range(units)
    example = _StudyExample(source, np.asarray(study_sizes), example)
  ds = ds.seed(_stream_seed(seed)).shuffle()
  ds = ds.random_map(example)
  # Batching before repeating keeps each batch inside one epoch, so no record can meet itself as a
  # negative; indices past the first epoch re-seed the shuffle and the augmentation (grain's slices and
  # batches carry the epoch through). A global batch is `shard_count` consecutive local ones.
  ds = ds.batch(local_batch_size, drop_remainder=True)
  ds = ds[:units // global_batch * shard_count][shard_index::shard_count]
  if tokenizer is not None:
    ds = ds.map(_Tokenize(tokenizer))
  ds = ds.repeat(None)
  ds = ds.to_iter_dataset(_read_options(int(config.data.num_threads)))
  workers = int(config.data.worker_count)
  if workers > 0:
    # grain's worker processes read absl flags; a program not run under absl.app has not parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


def eval_num_batches(num_records: int, batch_size: int, shard_count: int = 1) -> int:
  """Batches `eval_batches` yields on every shard."""
  return math.ceil(math.ceil(num_records / shard_count) / batch_size)


def _eval_shard_rows(num_records: int, batch_size: int, shard_index: int, shard_count: int) -> np.ndarray:
  """Record indices of this shard's rows in order, -1 for padding; contiguous shards in dataset order."""
  per_shard = math.ceil(num_records / shard_count)
  start = min(shard_index * per_shard, num_records)
  stop = min(start + per_shard, num_records)
  rows = np.full(eval_num_batches(num_records, batch_size, shard_count) * batch_size, -1, np.int32)
  rows[:stop - start] = np.arange(start, stop)
  return rows


class _EvalExample(grain.transforms.Map):
  """Row (record index or -1) -> {"image", "text", "labels", "mask", "index"}; padding rows are zeros."""

  def __init__(self, source: Sequence[Record], size: int, num_labels: int,
               text_override: Sequence[str] | None, with_text: bool = True):
    self._source = source
    self._size = size
    self._num_labels = num_labels
    self._text_override = text_override
    self._with_text = with_text

  def map(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index < 0:
      return {"image": np.zeros((self._size, self._size, 3), np.uint8), "text": "",
              "labels": np.zeros((self._num_labels,), np.float32), "mask": False, "index": np.int32(-1)}
    record = self._source[index]
    try:
      image = eval_transform(_field(record, "image"), self._size)
    except ValueError as e:
      raise DataError(f"record {record_id(record)!r}: {e}") from e
    if not self._with_text:
      text = ""
    else:
      text = whole_text(record) if self._text_override is None else self._text_override[index]
    return {"image": image, "text": text, "labels": _labels(record, self._num_labels), "mask": True,
            "index": np.int32(index)}


def eval_batches(source: Sequence[Record], tokenizer, *, image_size: int, batch_size: int,
                 read_threads: int, shard_index: int = 0, shard_count: int = 1,
                 text_override: Sequence[str] | None = None) -> Iterator[Batch]:
  """Every record once, in dataset order, with the evaluation transform and the whole text.

  The source is split into `shard_count` contiguous shards of ceil(N / shard_count) records; every shard
  yields `eval_num_batches(N, batch_size, shard_count)` full batches (padding rows at the end), so every
  process runs the same jitted steps on the same shapes.

  Args:
    tokenizer: as `train_loader`'s; None gives image-only batches (no text is read).
    image_size: the evaluation transform's output side (config.data.image_size).
    batch_size: this process's rows per batch.
    read_threads: grain's read threads (config.data.num_threads).
    text_override: one text per record of the source, used instead of its "text" (e.g. another prompt).
  Returns:
    An iterator of host batches with "mask" bool [b] and "index" int32 [b] added.
  """
  _check_shard(shard_index, shard_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be > 0")
  if len(source) == 0:
    raise DataError("the evaluation source has no records")
  if text_override is not None and len(text_override) != len(source):
    raise ValueError(f"text_override has {len(text_override)} texts for {len(source)} records")
  num_labels = _labels(source[0]).shape[0]
  rows = _eval_shard_rows(len(source), batch_size, shard_index, shard_count)
  ds = grain.MapDataset.source(rows).map(
      _EvalExample(source, int(image_size), num_labels, text_override,
                   with_text=tokenizer is not None))
  ds = ds.batch(batch_size)
  ds = ds.map(_Tokenize(tokenizer)) if tokenizer is not None else ds.map(_DropText())
  return iter(ds.to_iter_dataset(_read_options(int(read_threads))))


def text_batches(texts: Sequence[str], tokenizer, batch_size: int) -> Iterator[Batch]:
  """Free texts (e.g. retrieval queries) -> {"input_ids", "attention_mask", "mask", "index"} batches, the
  last one padded with empty texts."""
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be > 0")
  texts = [str(t) for t in texts]

  def batches() -> Iterator[Batch]:
    for start in range(0, len(texts), batch_size):
      real = min(batch_size, len(texts) - start)
      tokens = tokenizer(texts[start:start + real] + [""] * (batch_size - real))
      mask = np.arange(batch_size) < real
      index = np.where(mask, np.arange(start, start + batch_size), -1).astype(np.int32)
      yield {"input_ids": np.asarray(tokens["input_ids"], np.int32),
             "attention_mask": np.asarray(tokens["attention_mask"], np.int32), "mask": mask, "index": index}

  return batches()
