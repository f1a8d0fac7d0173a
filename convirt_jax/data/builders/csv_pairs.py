"""Any CSV of image-report pairs as a TFDS dataset.

Columns:
  image   path of the image, relative to the CSV's folder (or absolute); anything Pillow reads
  text    the report; its findings/impression when it has headings, else all of it, split in sentences
  split   optional: train | validation | test (also val, valid, validate, dev, training, testing)
  group   optional (e.g. a patient id): without `split`, the split is drawn by hashing the group, so a
          group never straddles two splits (~80/10/10); without either, by hashing the image path
  labels  the columns named in config.data.label_columns: either binary columns (1, 0, -1 uncertain,
          blank = NaN) -> task "multilabel", or exactly one categorical column -> one-hot, "multiclass".
Row numbers in messages are the CSV's line numbers (the header is line 1).
"""
import dataclasses
import hashlib
import os
from typing import Callable, Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from convirt_jax.data.builders import common
from convirt_jax.errors import DataError

_SPLIT_ALIASES = {
    **dict.fromkeys(["train", "training"], "train"),
    **dict.fromkeys(["validation", "validate", "val", "valid", "dev"], "validation"),
    **dict.fromkeys(["test", "testing"], "test"),
}
# Cumulative percentages of the hashed split: train < 80 <= validation < 90 <= test.
_HASH_SPLIT = (("train", 80), ("validation", 90), ("test", 100))
_BINARY_VALUES = {-1.0, 0.0, 1.0}


@dataclasses.dataclass(frozen=True)
class CsvParams:
  """Everything that changes the built dataset (its BuilderConfig name is a hash of these)."""
  csv_path: str
  csv_sha256: str   # a changed CSV is a new dataset; changed image files with unchanged paths are not seen
  label_columns: tuple[str, ...] = ()
  stored_size: int = 256
  min_sentence_tokens: int = 3

  @property
  def config_name(self) -> str:
    return f"s{self.stored_size}_{common.params_hash(self)}"


def params_from_config(config: ml_collections.ConfigDict) -> CsvParams:
  if not config.data.csv:
    raise DataError("config.data.csv is empty: give the CSV of pairs (columns image,text[,split][,group])")
  path = os.path.abspath(os.path.expanduser(config.data.csv))
  if not os.path.isfile(path):
    raise DataError(f"config.data.csv={config.data.csv!r}: no such file")
  return CsvParams(csv_path=path, csv_sha256=common.file_sha256(path),
                   label_columns=tuple(str(c) for c in config.data.label_columns),
                   stored_size=int(config.data.stored_size),
                   min_sentence_tokens=int(config.data.min_sentence_tokens))


@dataclasses.dataclass(frozen=True)
class _Row:
  line: int
  fields: dict[str, str]

  def get(self, column: str) -> str:
    return (self.fields.get(column) or "").strip()


def _read_rows(path: str, label_columns: Sequence[str]) -> tuple[list[_Row], list[str]]:
  f, reader = common.open_csv(path)
  with f:
    common.require_columns(reader, ("image", "text", *label_columns), path)
    rows, line = [], 2
    for fields in reader:
      rows.append(_Row(line, fields))
      line = reader.line_num + 1  # a quoted report may span several lines
    return rows, list(reader.fieldnames)


def _as_number(value: str) -> float | None:
  try:
    return float(value)
  except ValueError:
    return None


def _label_schema(rows: list[_Row], columns: Sequence[str],
                  path: str) -> tuple[list[str], str, Callable[[_Row], np.ndarray | None]]:
  """(label names, task, row -> labels or None when the row's label is missing)."""
  non_binary = {}
  for column in columns:
    for row in rows:
      value = row.get(column)
      if value and _as_number(value) not in _BINARY_VALUES:
        non_binary[column] = (row, value)
        break

  if not non_binary:
    def binary(row: _Row) -> np.ndarray:
      return np.asarray([float(row.get(c)) if row.get(c) else np.nan for c in columns], np.float32)
    return list(columns), common.MULTILABEL, binary

  if len(columns) > 1:
    column, (row, value) = next(iter(non_binary.items()))
    raise DataError(f"{path} line {row.line}: label column {column!r} has value {value!r}; with several "
                    "label columns each must be binary (1, 0, -1 uncertain, blank); a categorical label must "
                    "be the only entry of config.data.label_columns")
  (column,) = columns
  values = {row.get(column) for row in rows} - {""}
  numeric = all(_as_number(v) is not None for v in values)
  classes = sorted(values, key=lambda v: (_as_number(v), v) if numeric else v)
  index = {name: i for i, name in enumerate(classes)}

  def one_hot(row: _Row) -> np.ndarray | None:
    value = row.get(column)
    if not value:
      return None
    labels = np.zeros((len(classes),), np.float32)
    labels[index[value]] = 1.0
    return labels

  return classes, common.MULTICLASS, one_hot


def _hashed_split(key: str) -> str:
  bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
  return next(name for name, upper in _HASH_SPLIT if bucket < upper)


def _assign_splits(rows: list[_Row], header: list[str], path: str) -> dict[str, list[_Row]]:
  splits = {name: [] for name in common.SPLITS}
  for row in rows:
    if "split" in header:
      split = _SPLIT_ALIASES.get(row.get("split").lower())
      if split is None:
        raise DataError(f"{path} line {row.line}: split={row.get('split')!r} must be train, validation "
                        "or test")
    elif "group" in header:
      if not row.get("group"):
        raise DataError(f"{path} line {row.line}: empty 'group' (it decides the split of the row)")
      split = _hashed_split(row.get("group"))
    else:
      split = _hashed_split(row.get("image"))
    splits[split].append(row)
  return {name: split_rows for name, split_rows in splits.items() if split_rows}


class CsvPairs(common.LocalBuilder):
  """Image-report pairs listed in a CSV file."""

  name = "convirt_csv_pairs"
  VERSION = common.VERSION

  def __init__(self, *, params: CsvParams, **kwargs):
    # Columns and labels are checked here, before any image is read.
    self._rows, self._header = _read_rows(params.csv_path, params.label_columns)
    if not self._rows:
      raise DataError(f"{params.csv_path}: no rows")
    self._label_names, self._task, self._labels = _label_schema(self._rows, params.label_columns,
                                                                params.csv_path)
    super().__init__(params=params, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return common.dataset_info(self, label_names=self._label_names, task=self._task,
                               description=f"Image-report pairs from {self._params.csv_path}.",
                               source=self._params.csv_path, skipped={})

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download: the CSV and its images are local
    splits = _assign_splits(self._rows, self._header, self._params.csv_path)
    return {name: self._generate_examples(name, rows) for name, rows in splits.items()}

  def _generate_examples(self, split: str, rows: list[_Row]) -> Iterator[tuple[int, dict]]:
    bad = common.BadRecords(self.name, split, self._strict)
    folder = os.path.dirname(self._params.csv_path)

    def candidates() -> Iterator[common.Candidate]:
      for row in rows:
        record, report = f"line {row.line} ({row.get('image')})", row.fields.get("text") or ""
        text, reason = common.report_text(report, self._params.min_sentence_tokens)
        labels, detail = self._labels(row), ""
        if reason is None and labels is None:
          reason, detail = common.MISSING_LABEL, f"empty {self._params.label_columns[0]!r}"
        features = None if reason else {"id": row.get("image"), "report": report, "text": text,
                                        "labels": labels}
        yield common.Candidate(record, os.path.join(folder, row.get("image")), features, reason, detail)

    yield from common.examples_with_images(candidates(), bad, size=self._params.stored_size,
                                           num_threads=self._threads)
    self.info.metadata["skipped"][split] = dict(bad.counts)
