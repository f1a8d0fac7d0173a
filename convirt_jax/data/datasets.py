"""The data sources the trainer and the evaluators read: built once as TFDS ArrayRecord, then opened.

Data contract (every builder): one record per image with its study's report,
  "id" text, "image" uint8 [H, W, 1] (8-bit gray, shorter side = config.data.stored_size),
  "report" text (as written), "text" text (findings + impression, one sentence per line),
  "labels" float32 [L] (1 / 0 / -1 uncertain / NaN not mentioned; L may be 0).
Text features read back as bytes. Label names and the task ("multilabel" | "multiclass") are in the
dataset's metadata. Splits: train, validation, test (those that have records) and, for the synthetic
corpus, retrieval_candidates and retrieval_queries.

Where: <data_dir>/<builder name>/<config name: hash of the parameters>/<version>/. Changing a parameter
that changes the data (sizes, seed, CSV content, ...) makes a new directory, never a silently stale one.

Several processes: only the builder process (process 0) builds; the others poll for the finished
dataset, which TFDS moves into place in one rename, so a directory with dataset_info.json is complete.
Every process must see `data_dir` (a shared file system) and, while the dataset is not built yet, the
raw data (config.data.dir / config.data.csv); once built, the raw data is no longer read.
"""
import dataclasses
import importlib
import os
import time
from typing import Any, Mapping

from absl import logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from convirt_jax.data.builders import common
from convirt_jax.errors import DataError

__all__ = ["DataError", "Dataset", "load_dataset", "decode_record", "make_builder", "prepared_dir"]

# config.data.name -> (module, builder class) under convirt_jax.data.builders; imported on use.
_BUILDERS = {
    "synthetic": ("synthetic", "SyntheticCxr"),
    "mimic_cxr": ("mimic_cxr", "MimicCxr"),
    "csv": ("csv_pairs", "CsvPairs"),
}


@dataclasses.dataclass
class Dataset:
  """The opened splits of one dataset and what the evaluators need to know about it."""
  sources: dict[str, Any]          # split -> random-access source of raw records (grain-compatible)
  label_names: list[str]
  task: str                        # "multilabel" | "multiclass"
  retrieval_text_queries: dict[str, list[str]] | None
  info: tfds.core.DatasetInfo


def _builder_parts(config: ml_collections.ConfigDict):
  name = config.data.name
  if name not in _BUILDERS:
    raise DataError(f"config.data.name={name!r}: must be one of {', '.join(sorted(_BUILDERS))}")
  module_name, class_name = _BUILDERS[name]
  module = importlib.import_module(f"convirt_jax.data.builders.{module_name}")
  return module, getattr(module, class_name)


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


def _is_built(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "dataset_info.json"))


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
                 wait_timeout_s: float = 24 * 3600.0, poll_interval_s: float = 10.0) -> Dataset:
  """Builds the dataset into `data_dir` unless built already, then opens every split.

  Args:
    config: the job config (config.data.* selects and parameterises the dataset).
    data_dir: root of built TFDS datasets (config.data.tfds_dir or <workdir>/tfds).
    is_builder_process: True on the one process that builds (process 0); the others wait for it.
    retrieval_text_queries: category -> text queries for text->image retrieval; the synthetic corpus
      brings its own.
    wait_timeout_s, poll_interval_s: how long and how often a non-builder process looks for the build.

  Raises:
    DataError: missing files or columns, bad records with config.data.strict, an empty split, or a build
      that did not appear in time.
  """
  path = prepared_dir(config, data_dir)
  if not _is_built(path):
    if is_builder_process:
      builder = make_builder(config, data_dir)  # checks the raw data's files and columns first
      print(f"Building the {config.data.name} dataset into {path}", flush=True)
      tfds.disable_progress_bar()
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
    else:
      _wait_until_built(path, wait_timeout_s, poll_interval_s)
  # Read through the stored features and metadata: no raw data (or builder parameters) needed.
  reader = tfds.builder_from_directory(path)
  sources = {split: reader.as_data_source(split=split) for split in reader.info.splits}
  metadata = reader.info.metadata or {}
  if retrieval_text_queries is None and config.data.name == "synthetic":
    from convirt_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    retrieval_text_queries = synthetic.RETRIEVAL_TEXT_QUERIES
  return Dataset(
      sources=sources,
      label_names=list(metadata.get("label_names", [])),
      task=str(metadata.get("task", common.MULTILABEL)),
      retrieval_text_queries=(None if retrieval_text_queries is None
                              else {k: list(v) for k, v in retrieval_text_queries.items()}),
      info=reader.info,
  )


def _text(record: Mapping[str, Any], key: str) -> str:
  value = record[key]
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
  """A raw record of a data source -> {"id", "report", "text": str, "image": uint8 [H, W], "labels"}."""
  missing = [k for k in ("id", "image", "report", "text", "labels") if k not in record]
  if missing:
    record_id = _text(record, "id") if "id" in record else "<no id>"
    raise DataError(f"record {record_id!r} lacks {', '.join(missing)}")
  image = np.asarray(record["image"])
  if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 1):
    raise DataError(f"record {_text(record, 'id')!r}: image must be uint8 [H, W] or [H, W, 1], got "
                    f"{image.dtype} {list(image.shape)}")
  return {
      "id": _text(record, "id"),
      "image": image.reshape(image.shape[:2]),
      "report": _text(record, "report"),
      "text": _text(record, "text"),
      "labels": np.asarray(record["labels"], np.float32),
  }
