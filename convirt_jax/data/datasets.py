"""The data sources the trainer and the evaluators read: built once as TFDS ArrayRecord, then opened.

Data contract (every builder): one record per image with its study's report,
  "id" text, "image" uint8 [H, W, 1] (8-bit gray, shorter side = config.data.stored_size),
  "report" text (as written), "text" text (findings + impression, one sentence per line),
  "labels" float32 [L] (1 / 0 / -1 uncertain / NaN not mentioned; L may be 0).
Text features read back as bytes. Label names and the task ("multilabel" | "multiclass") are in the
dataset's metadata, with per split the skipped records by reason ("skipped") and, for the builders that
count them, the positives/negatives per label ("label_counts": see `unscorable_labels`). Splits: train,
validation, test (those that have records) and, for the synthetic corpus, retrieval_candidates and
retrieval_queries.

Where: <data_dir>/<builder name>/<config name: hash of the parameters>/<version>/. Changing a parameter
that changes the data (sizes, seed, CSV content, ...) makes a new directory, never a silently stale one.

Several processes: only the builder process (process 0) builds; the others poll for the finished
dataset, which TFDS moves into place in one rename, so a directory with dataset_info.json is complete.
A build killed half-way leaves only an incomplete.* directory beside it, which the next build (one job
at a time per dataset, under a lock) removes before it starts anew.
Every process must see `data_dir` (a shared file system or gs://) and, while the dataset is not built
yet, the raw data (config.data.dir / config.data.csv); once built, the raw data is no longer read.
A gs:// data_dir is built in a local temporary directory (ArrayRecord writes local files only) and
uploaded with dataset_info.json last, without the build lock (GCS has no flock; two jobs building the
same dataset upload the same files); ArrayRecord reads it from GCS directly.
"""
import contextlib
import dataclasses
import fcntl
import importlib
import os
import re
import shutil
import tempfile
import time
from typing import Any, Mapping

from absl import logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from convirt_jax import storage
from convirt_jax.data import decode
from convirt_jax.data import registry
from convirt_jax.data.builders import common
from convirt_jax.errors import DataError

__all__ = ["DataError", "Dataset", "load_dataset", "decode_record", "as_text", "make_builder",
           "prepared_dir", "label_counts", "unscorable_labels", "text_source"]



@dataclasses.dataclass
class Dataset:
  """The opened splits of one dataset and what the evaluators need to know about it."""
  sources: dict[str, Any]          # split -> random-access source of raw records (grain-compatible)
  label_names: list[str]
  task: str                        # "multilabel" | "multiclass"
  retrieval_text_queries: dict[str, list[str]] | None
  info: tfds.core.DatasetInfo
  name: str                        # its registered name (config.data.name)


def _builder_parts(config: ml_collections.ConfigDict):
  name = config.data.name
  entry = registry.find(name)
  if entry is None:
    raise DataError(f"config.data.name={name!r}: must be one of {', '.join(registry.names())}")
  # A name under convirt_jax.data.builders, or the full path of a module outside the package.
  module = importlib.import_module(entry.module if "." in entry.module
                                   else f"convirt_jax.data.builders.{entry.module}")
  return module, getattr(module, entry.builder)


def declared_label_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The labels a data set's builder declares without reading its files: its LABEL_NAMES, or what its
  module's `declared_label_names(config)` reads from the config (a CSV's label columns); () when they
  come from the data."""
  module, builder_cls = _builder_parts(config)
  if hasattr(module, "declared_label_names"):
    return tuple(module.declared_label_names(config))
  return tuple(getattr(builder_cls, "LABEL_NAMES", ()))


def prepared_dir(config: ml_collections.ConfigDict, data_dir: str) -> str:
  """The directory the dataset for `config` is (or will be) built into."""
  module, builder_cls = _builder_parts(config)
  params = module.params_from_config(config)
  return os.path.join(data_dir, builder_cls.name, params.config_name, str(builder_cls.VERSION))


def make_builder(config: ml_collections.ConfigDict, data_dir: str) -> tfds.core.GeneratorBasedBuilder:
  """The builder for `config` (validates the raw data's files and columns; reads no image)."""
  module, builder_cls = _builder_parts(config)
  return builder_cls(params=module.params_from_config(config), strict=bool(config.data.strict),
                     build_threads=int(config.data.build_threads), data_dir=data_dir)


def check_raw_data(config: ml_collections.ConfigDict, data_dir: str) -> None:
  """Unless the dataset is built already, checks that its raw files and columns are there (reads no
  image): a missing download is named before anything slow happens."""
  if not _is_built(prepared_dir(config, data_dir)):
    make_builder(config, data_dir)


def _is_built(path: str) -> bool:
  return storage.path(os.path.join(path, "dataset_info.json")).is_file()


@contextlib.contextmanager
def _build_lock(path: str):
  """One build of `path` at a time: an flock on <config dir>/.build.lock, waited for if another job
  holds it; yields whether it is held (False on a file system without flock). The OS drops it when
  the builder ends, kill -9 included."""
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  fd = os.open(os.path.join(parent, ".build.lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      held = True
    except BlockingIOError:
      print(f"Waiting for another job that is building {path}", flush=True)
      fcntl.flock(fd, fcntl.LOCK_EX)
      held = True
    except OSError as e:
      logging.warning("cannot lock %s for the build (%s): building without the lock", parent, e)
      held = False
    yield held
  finally:
    os.close(fd)


def _remove_interrupted_builds(path: str) -> None:
  """Deletes what killed builds of `path` left: TFDS writes into <config dir>/incomplete.XXXXXX_<version>/
  and renames it to <version>/ only once complete, so a build killed half-way leaves that directory,
  which nothing reads (a dataset is used only from <version>/ with its dataset_info.json) but which
  holds up to a whole dataset's bytes. Called under the build lock, so none of them is being written."""
  parent, version = os.path.split(path)
  for name in sorted(os.listdir(parent)):
    if re.fullmatch(rf"incomplete\.\w+_{re.escape(version)}", name):
      print(f"Removing {os.path.join(parent, name)}, left by an interrupted build", flush=True)
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _build(builder: tfds.core.GeneratorBasedBuilder, what: str) -> None:
  print(f"Building {what}", flush=True)
  tfds.disable_progress_bar()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))


def _build_and_upload(config: ml_collections.ConfigDict, path: str) -> None:
  """Builds the dataset into a local temporary directory, then uploads it to `path` (see the docstring)."""
  with tempfile.TemporaryDirectory(prefix="convirt_tfds_") as local:
    # make_builder checks the raw data's files and columns first.
    _build(make_builder(config, local), f"the {config.data.name} dataset into {path} (through {local})")
    storage.copy_tree(prepared_dir(config, local), path, last="dataset_info.json")


def _wait_until_built(path: str, timeout_s: float, poll_interval_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  logging.info("Waiting for the builder process to build %s", path)
  while not _is_built(path):
    if time.monotonic() > deadline:
      raise DataError(f"the dataset {path} was not built within {timeout_s:.0f} s: see the builder "
                      "process's log (process 0)")
    time.sleep(poll_interval_s)


def load_dataset(config: ml_collections.ConfigDict, data_dir: str, *, is_builder_process: bool = True,
                 retrieval_text_queries: Mapping[str, list[str]] | None = None,
                 wait_timeout_s: float = 24 * 3600.0, poll_interval_s: float = 1.0) -> Dataset:
  """Builds the dataset into `data_dir` unless built already, then opens every split.

  Args:
    config: the job config (config.data.* selects and parameterises the dataset).
    data_dir: root of built TFDS datasets (config.data.tfds_dir or <workdir>/tfds).
    is_builder_process: True on the one process that builds (process 0); the others wait for it.
    retrieval_text_queries: category -> text queries for text->image retrieval; by default the builder
      module's RETRIEVAL_TEXT_QUERIES, if it has them (the synthetic corpus does).
    wait_timeout_s, poll_interval_s: how long and how often a non-builder process looks for the build.

  Raises:
    DataError: missing files or columns, bad records with config.data.strict, an empty split, or a build
      that did not appear in time.
  """
  path = prepared_dir(config, data_dir)
  reused = _is_built(path)
  if not reused:
    if is_builder_process and storage.is_remote(data_dir):
      _build_and_upload(config, path)
    elif is_builder_process:
      builder = make_builder(config, data_dir)  # checks the raw data's files and columns first
      with _build_lock(path) as exclusive:
        if not _is_built(path):  # another job may have built it while this one waited for the lock
          if exclusive:
            _remove_interrupted_builds(path)
          _build(builder, f"the {config.data.name} dataset into {path}")
    else:
      _wait_until_built(path, wait_timeout_s, poll_interval_s)
  # Read through the stored features and metadata: no raw data (or builder parameters) needed.
  reader = tfds.builder_from_directory(path)
  sources = {split: open_source(reader, split) for split in reader.info.splits}
  metadata = reader.info.metadata or {}
  if is_builder_process:  # said once, for TFDS's own lines are silenced (logs.py)
    sizes = ", ".join(f"{split} {len(source):,}" for split, source in sources.items())
    print(f"{'Using the' if reused else 'Built the'} {config.data.name} dataset in {path}: {sizes}",
          flush=True)
  if config.data.strict:
    _refuse_skipped_records(path, metadata)
  if retrieval_text_queries is None:  # a builder module may bring its own (the synthetic corpus does)
    retrieval_text_queries = getattr(_builder_parts(config)[0], "RETRIEVAL_TEXT_QUERIES", None)
  return Dataset(
      sources=sources,
      label_names=list(metadata.get("label_names", [])),
      task=str(metadata.get("task", common.MULTILABEL)),
      retrieval_text_queries=(None if retrieval_text_queries is None
                              else {k: list(v) for k, v in retrieval_text_queries.items()}),
      info=reader.info,
      name=config.data.name,
  )


def _refuse_skipped_records(path: str, metadata: Mapping[str, Any]) -> None:
  """With data.strict, a dataset built earlier without it that skipped records is not used.

  Strict is not one of the builder parameters that name the directory (it does not change the records a
  clean build writes), so a strict job finds the non-strict build of the same data: checked here, on load.
  """
  skipped = {split: {reason: int(n) for reason, n in counts.items() if int(n)}
             for split, counts in dict(metadata.get("skipped") or {}).items()}
  skipped = {split: counts for split, counts in skipped.items() if counts}
  if skipped:
    summary = "; ".join(f"{split}: " + ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
                        for split, counts in sorted(skipped.items()))
    raise DataError(f"config.data.strict=True, but the dataset in {path} was built without data.strict "
                    f"and skipped records ({summary}). To rebuild it strictly (stopping at the first bad "
                    f"record), delete that directory (rm -r {path}) or set config.data.tfds_dir to another "
                    "directory; or set config.data.strict=False to use it as it is")


def open_source(reader: tfds.core.DatasetBuilder, split: str):
  """The split's records as a random-access source, the image decoded by `decode.image` on each read."""
  return reader.as_data_source(split=split, decoders={"image": decode.ImageDecoder()})


def text_source(dataset: Dataset, split: str):
  """The split's records with "image" left as its encoded bytes: for reading the text of a whole split
  (the corpus vocabulary, the text lengths), without decoding every image."""
  reader = tfds.builder_from_directory(dataset.info.data_dir)
  return reader.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


def label_counts(dataset: Dataset, split: str) -> dict[str, dict[str, int]]:
  """{label: {"positive", "negative", "uncertain", "not_mentioned": records}} of one split.

  From the metadata the builder stored ("label_counts"), or counted from the records for a dataset built
  without it (that reads the whole split).
  """
  stored = dict((dataset.info.metadata or {}).get("label_counts") or {})
  if split in stored:
    return {name: {kind: int(n) for kind, n in counts.items()}
            for name, counts in dict(stored[split]).items()}
  counter = common.LabelCounts(dataset.label_names)
  source = dataset.sources[split]
  for i in range(len(source)):
    counter.add(source[i]["labels"])
  return counter.as_dict()


def study_sizes(dataset: Dataset, split: str) -> np.ndarray | None:
  """Records per study of one split, in record order (a study's records are adjacent), or None when the
  dataset has no studies (only MIMIC-CXR has: one report, several images)."""
  sizes = dict((dataset.info.metadata or {}).get("study_sizes") or {}).get(split)
  if sizes is None:
    return None
  sizes = np.asarray(sizes, np.int64)
  if sizes.sum() != len(dataset.sources[split]) or (sizes <= 0).any():
    raise DataError(f"the {split} split's study_sizes ({len(sizes)} studies, {sizes.sum()} records) do not "
                    f"match its {len(dataset.sources[split])} records: rebuild the dataset")
  return sizes


def unscorable_labels(dataset: Dataset, splits: tuple[str, ...] = ("train", "test")) -> dict[str, str]:
  """{label: reason} of the labels the linear probe will not score, known before training.

  The probe (`evaluate.linear_probe`) binarises labels as positive = 1 and negative = anything else (0,
  -1 uncertain, NaN not mentioned); a label needs both in the training set and in the test set (for a
  multiclass dataset, each class one-vs-rest). Labels of `splits` (train and test by default; pass
  ("test",) for the test set only) with a single class, or a split that is missing, are returned with the
  reason and the counts. {} when every label can be scored (or the dataset has no labels).
  """
  reasons = {}
  for split in splits:
    if split not in dataset.sources:
      for name in dataset.label_names:
        reasons.setdefault(name, f"no {split} split")
      continue
    for name, counts in label_counts(dataset, split).items():
      positive = counts.get("positive", 0)
      negative = sum(counts.values()) - positive
      if name not in reasons and (positive == 0 or negative == 0):
        reasons[name] = (f"single class in the {split} split: {positive} positive, {negative} negative ("
                         f"{counts.get('negative', 0)} labelled 0, {counts.get('uncertain', 0)} uncertain, "
                         f"{counts.get('not_mentioned', 0)} not mentioned)")
  return reasons


def as_text(value: Any) -> str:
  """A text feature as str: records read back from a data source hold bytes (UTF-8)."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
  """A raw record of a data source -> {"id", "report", "text": str, "image": uint8 [H, W], "labels"}."""
  missing = [k for k in ("id", "image", "report", "text", "labels") if k not in record]
  if missing:
    record_id = as_text(record["id"]) if "id" in record else "<no id>"
    raise DataError(f"record {record_id!r} lacks {', '.join(missing)}")
  image = np.asarray(record["image"])
  if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 1):
    raise DataError(f"record {as_text(record['id'])!r}: image must be uint8 [H, W] or [H, W, 1], got "
                    f"{image.dtype} {list(image.shape)}")
  return {
      "id": as_text(record["id"]),
      "image": image.reshape(image.shape[:2]),
      "report": as_text(record["report"]),
      "text": as_text(record["text"]),
      "labels": np.asarray(record["labels"], np.float32),
  }
