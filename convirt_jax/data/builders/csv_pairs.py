"""Any CSV of image-report pairs as a TFDS dataset.

Columns:
  image   path of the image, relative to the CSV's folder (or absolute); anything Pillow reads
  text    the report; its findings/impression when it has headings, else all of it, split in sentences
  split   optional: train | validation | test (also val, valid, validate, dev, training, testing)
  group   optional (e.g. a patient id): a group never straddles two splits
  labels  the columns named in config.data.label_columns, read as config.data.task says (`_label_schema`):
          "binary"/"multilabel": each column binary (1, 0, -1 uncertain; blank or NaN = not mentioned);
          "multiclass": exactly one categorical column, one-hot; "auto": inferred, and refused when the
          inference rests on a rare value (a stray "maybe" in a binary column must not make it 3 classes).
Without a `split` column, the splits (~80/10/10) are planned by `plan_splits`: whole groups (rows sharing
a group or an image), stratified by label so that every split gets positives and negatives of every label
where the data allow it; deterministic from the CSV's content (not its row order).

Bad rows are skipped and counted by reason (or, with data.strict, stop the build naming the file and line):
a line with more or fewer fields than the header (malformed_row), bytes that are not UTF-8 (bad_encoding),
the same image and report as an earlier line (duplicate_record), an empty image (missing_image), a label
outside its set (bad_label), an empty categorical label (missing_label), and what every builder checks
(images, reports). Line numbers are the CSV's (the header is line 1; a quoted report may span lines).
"""
import collections
import dataclasses
import hashlib
import os
from typing import Callable, Iterator, Mapping, Sequence

from absl import logging
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
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
# Which split gets a scarce class first: the linear probe needs both classes in train and in test;
# validation only chooses the regularisation.
_COVERAGE_ORDER = ("train", "test", "validation")
_BINARY_VALUES = {-1.0, 0.0, 1.0}
# Label values read as "not mentioned" (NaN), compared lower-cased.
_MISSING_VALUES = frozenset({"", "nan", "-nan", "na", "n/a", "null", "#n/a"})
TASKS = ("auto", "binary", "multilabel", "multiclass")
# "auto" refuses an inferred class with fewer rows than this, or than this fraction of the labelled rows.
RARE_ROWS, RARE_FRACTION = 3, 0.01


@dataclasses.dataclass(frozen=True)
class CsvParams:
  """Everything that changes the built dataset (its BuilderConfig name is a hash of these)."""
  csv_path: str
  csv_sha256: str   # a changed CSV is a new dataset; changed image files with unchanged paths are not seen
  label_columns: tuple[str, ...] = ()
  stored_size: int = 256
  min_sentence_tokens: int = 3
  task: str = "auto"  # config.data.task

  @property
  def config_name(self) -> str:
    return f"s{self.stored_size}_{common.params_hash(self)}"


def declared_label_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The label names known from the config alone: the label columns, unless one column may be
  categorical (task "multiclass", or "auto" with one column), whose classes are its values."""
  columns = tuple(str(c) for c in config.data.label_columns)
  task = str(config.data.get("task", "auto"))
  if task == "multiclass" or (task == "auto" and len(columns) == 1):
    return ()
  return columns


def params_from_config(config: ml_collections.ConfigDict) -> CsvParams:
  if not config.data.csv:
    raise DataError("config.data.csv is empty: give the CSV of pairs (columns image,text[,split][,group])")
  path = os.path.abspath(os.path.expanduser(config.data.csv))
  if not os.path.isfile(path):
    raise DataError(f"config.data.csv={config.data.csv!r}: no such file")
  task = str(config.data.get("task", "auto"))
  if task not in TASKS:
    raise DataError(f"config.data.task={task!r}: must be one of {', '.join(TASKS)}")
  return CsvParams(csv_path=path, csv_sha256=common.file_sha256(path),
                   label_columns=tuple(str(c) for c in config.data.label_columns),
                   stored_size=int(config.data.stored_size),
                   min_sentence_tokens=int(config.data.min_sentence_tokens), task=task)


@dataclasses.dataclass(frozen=True)
class _Row:
  line: int
  fields: dict
  reason: str | None = None       # why the row cannot be used, known before any image is read
  detail: str = ""
  labels: np.ndarray | None = None
  text: str | None = None         # the "text" feature: the report's sentences

  def get(self, column: str) -> str:
    value = self.fields.get(column)
    return value.strip() if isinstance(value, str) else ""


def _read_rows(path: str, label_columns: Sequence[str]) -> tuple[list[_Row], list[str]]:
  """Every row of the CSV; malformed rows and rows with bytes that are not UTF-8 carry their reason."""
  f, reader = common.open_csv(path, undecodable_rows="keep")
  with f:
    common.require_columns(reader, ("image", "text", *label_columns), path)
    header = list(reader.fieldnames)
    used = [c for c in ("image", "text", "split", "group", *label_columns) if c in header]
    rows = []
    for fields in reader:
      reason, detail = None, ""
      if None in fields or any(v is None for v in fields.values()):
        count = sum(v is not None for k, v in fields.items() if k is not None) + len(fields.get(None) or ())
        reason = common.MALFORMED_ROW
        detail = f"{count} fields where the header has {len(header)}" + (
            " (an unquoted comma in the report?)" if count > len(header) else "")
      else:
        bad = [c for c in used if common.undecodable(fields.get(c))]
        if bad:
          reason = common.BAD_ENCODING
          detail = f"bytes that are not UTF-8 in {', '.join(bad)} (save the CSV as UTF-8)"
      rows.append(_Row(reader.first_line, fields, reason, detail))
    return rows, header


def _as_number(value: str) -> float | None:
  try:
    return float(value)
  except ValueError:
    return None


def _is_missing(value: str) -> bool:
  return value.lower() in _MISSING_VALUES


def _is_binary(value: str) -> bool:
  return _as_number(value) in _BINARY_VALUES


def _is_rare(count: int, labelled: int) -> bool:
  return count < RARE_ROWS or count < RARE_FRACTION * labelled


def _describe(values: Mapping[str, int], lines: Mapping[str, list[int]]) -> str:
  """"'0' (500 rows), 'maybe' (1 row: line 17)": values with their counts, lines of the rare ones."""
  parts = []
  for value, n in sorted(values.items(), key=lambda item: (-item[1], item[0])):
    where = lines.get(value, [])
    at = ""
    if n < 10 and where:
      at = ": line" + ("s " if len(where) > 1 else " ") + ", ".join(map(str, where[:5])) + (
          ", ..." if len(where) > 5 else "")
    parts.append(f"{value!r} ({n} row{'s' if n != 1 else ''}{at})")
  return ", ".join(parts)


_LabelFn = Callable[[_Row], tuple[np.ndarray | None, str | None, str]]


def _inferred_task(usable: Sequence[_Row], columns: Sequence[str], path: str) -> str:
  """config.data.task="auto" read from the label values (see `_label_schema`): "binary" or
  "multiclass", or a DataError instead of a guess."""
  task = "binary"
  for column in columns:
    counts = collections.Counter(row.get(column) for row in usable if not _is_missing(row.get(column)))
    lines = collections.defaultdict(list)
    for row in usable:
      lines[row.get(column)].append(row.line)
    labelled = sum(counts.values())
    strays = {v: n for v, n in counts.items() if not _is_binary(v)}
    if not strays:
      continue
    rare = {v: n for v, n in counts.items() if _is_rare(n, labelled)}
    only_rare_strays = all(v in rare for v in strays)
    if len(columns) > 1:
      if only_rare_strays:
        raise DataError(
            f"{path}: label column {column!r} is binary but for {_describe(strays, lines)}, under 1% of "
            f"its {labelled} labelled rows or under {RARE_ROWS} rows. Set config.data.task='multilabel' to "
            "skip such rows as bad_label records, or fix the CSV")
      value = next(v for v in strays if v not in rare)
      raise DataError(f"{path} line {lines[value][0]}: label column {column!r} has value {value!r}; with "
                      "several label columns each must be binary (1, 0, -1 uncertain, blank); a "
                      "categorical label must be the only entry of config.data.label_columns")
    if rare:
      limits = f"under 1% of the {labelled} labelled rows or under {RARE_ROWS} rows"
      if only_rare_strays:
        why = f", only because of {_describe(strays, lines)}, each {limits}: a stray value?"
        advice = ("Set config.data.task='binary' to read it as a binary label (1, 0, -1 uncertain; "
                  "blank/NaN = not mentioned) and skip the other values as bad_label records, or "
                  "config.data.task='multiclass' to confirm the categorical label")
      else:
        why = f"; {_describe(rare, lines)} {'is' if len(rare) == 1 else 'are'} {limits}: a stray value?"
        advice = "Set config.data.task='multiclass' to confirm these classes"
      raise DataError(
          f"{path}: label column {column!r} was inferred to be categorical (task 'multiclass', one class "
          f"per value) from its values {_describe(counts, lines)}{why} {advice}; or fix the CSV")
    task = "multiclass"
  return task


def _label_schema(rows: Sequence[_Row], columns: Sequence[str], task: str,
                  path: str) -> tuple[list[str], str, _LabelFn]:
  """(label names, task "multilabel" | "multiclass", row -> (labels, reason, detail)).

  `task` is config.data.task:
    "binary" | "multilabel": every label column is binary: 1, 0, -1 (uncertain); blank or NaN (nan, NA,
      N/A, null) = not mentioned (NaN); any other value is a bad_label record.
    "multiclass": the one label column is categorical, one class per distinct value (sorted, numerically
      when all are numbers), one-hot; blank or NaN is a missing_label record.
    "auto": binary when every value of every column is; else, with one column, categorical. It stops
      (DataError, naming the values, their counts and lines) instead of guessing when a value that is
      outside the binary set, or a class of the inferred categorical label, has under RARE_ROWS rows or under
      RARE_FRACTION of the labelled rows: set config.data.task to say which reading is meant.
  Only rows without a known reason (malformed, bad encoding, duplicate) are looked at.
  """
  usable = [row for row in rows if row.reason is None]
  if task == "auto":
    task = _inferred_task(usable, columns, path)
  if task in ("binary", "multilabel"):
    def binary(row: _Row) -> tuple[np.ndarray | None, str | None, str]:
      values = []
      for column in columns:
        value = row.get(column)
        if _is_missing(value):
          values.append(np.nan)
        elif _is_binary(value):
          values.append(float(value))
        else:
          return None, common.BAD_LABEL, f"{column}={value!r} is not 1, 0, -1 (uncertain), blank or NaN"
      return np.asarray(values, np.float32), None, ""
    return list(columns), common.MULTILABEL, binary

  if len(columns) != 1:
    raise DataError(f"{path}: config.data.task='multiclass' needs exactly one label column "
                    f"(config.data.label_columns={tuple(columns)})")
  (column,) = columns
  values = {row.get(column) for row in usable} - {v for v in (row.get(column) for row in usable)
                                                  if _is_missing(v)}
  numeric = all(_as_number(v) is not None for v in values)
  classes = sorted(values, key=lambda v: (_as_number(v), v) if numeric else v)
  index = {name: i for i, name in enumerate(classes)}

  def one_hot(row: _Row) -> tuple[np.ndarray | None, str | None, str]:
    value = row.get(column)
    if _is_missing(value):
      return None, common.MISSING_LABEL, f"empty {column!r}"
    if value not in index:  # only a row with a known reason can have a value outside the classes
      return None, common.BAD_LABEL, f"{column}={value!r} is not one of the classes"
    labels = np.zeros((len(classes),), np.float32)
    labels[index[value]] = 1.0
    return labels, None, ""

  return classes, common.MULTICLASS, one_hot


def _mark_rows(rows: list[_Row], columns: Sequence[str], task: str, path: str,
               min_tokens: int) -> tuple[list[_Row], list[str], str]:
  """The rows with their text and labels (or the reason they cannot be used), the label names, the task.

  Reasons, first found first: malformed_row / bad_encoding (read), missing_image (empty), empty_report /
  no_findings_or_impression, duplicate_record (same image and report as a usable earlier row), then labels.
  """
  first_line = {}
  marked = []
  for row in rows:
    if row.reason is None and not row.get("image"):
      row = dataclasses.replace(row, reason=common.MISSING_IMAGE, detail="empty 'image'")
    if row.reason is None:
      text, reason = common.report_text(row.fields.get("text") or "", min_tokens)
      row = dataclasses.replace(row, text=text, reason=reason)
    if row.reason is None:
      key = (os.path.normpath(row.get("image")), " ".join(row.get("text").split()))
      if key in first_line:
        row = dataclasses.replace(row, reason=common.DUPLICATE,
                                  detail=f"the same image and report as line {first_line[key]}")
      else:
        first_line[key] = row.line
    marked.append(row)
  names, task, read_labels = _label_schema(marked, columns, task, path)
  result = []
  for row in marked:
    if row.reason is None:
      labels, reason, detail = read_labels(row)
      row = dataclasses.replace(row, labels=labels, reason=reason, detail=detail)
    result.append(row)
  return result, names, task


def _hash_key(key: str) -> bytes:
  return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _cover(has: np.ndarray, rows: np.ndarray, order: list[int], assigned: np.ndarray,
           split_counts: np.ndarray, assign: Callable[[int, int], None]) -> None:
  """Step 1 of `plan_splits` (coverage): every (label, class) pair to every split that lacks it, the
  rarest pair first, then a group for each split still empty."""
  groups_having = has.sum(axis=0)
  for pair in np.argsort(groups_having, kind="stable"):
    if groups_having[pair] == 0:
      continue
    for split in order:
      if split_counts[split, pair] > 0:
        continue
      candidates = np.flatnonzero(has[:, pair] & (assigned < 0))
      if not candidates.size:
        break
      gain = has[candidates][:, split_counts[split] == 0].sum(axis=1)
      best = np.lexsort((candidates, rows[candidates], -gain))[0]
      assign(candidates[best], split)
  for split in order:
    free = np.flatnonzero(assigned < 0)
    if free.size and not (assigned == split).any():
      assign(free[np.lexsort((free, rows[free]))[0]], split)


def plan_splits(groups: Mapping[str, tuple[int, np.ndarray, np.ndarray]],
                fractions: Mapping[str, float] = SPLIT_FRACTIONS) -> dict[str, str]:
  """Assigns whole groups to splits, stratified by label: {group key: split}.

  Args:
    groups: key -> (rows, positives [L], negatives [L]): the group's usable rows and, per label, how many of
      them are positive (== 1) and how many are not (0, -1 uncertain, NaN: all negative for the linear
      probe, which binarises labels as == 1).
    fractions: split -> its share of the rows (train, validation, test).

  Algorithm (deterministic: it depends on the groups' keys and counts only, not on any order of input):
    0. Groups are ordered by the SHA-256 of their key; every tie below goes to the earlier group.
    1. Coverage. Each (label, class) pair, class = positive or negative, the rarest first (held by the fewest
       groups), is given to each split that lacks it, in the order train, test, validation (the probe scores
       a label only with both classes in train and in test; validation only chooses C), for as long as
       unassigned groups holding it remain. The group given is the one that also brings that split the most
       other (label, class) pairs it lacks, then the one with the fewest rows. Then each split still empty
       gets the smallest unassigned group (same split order), so every split has rows when there are at least
       as many groups as splits.
    2. Proportions (iterative stratification, Sechidis et al. 2011, with groups as the unit). The other
       groups, those holding the rarest pairs first, go one by one to the split furthest below its share
       of the group's rarest pair, ties going to the split furthest below its share of rows, then to the
       first split of `fractions`. A group without labelled rows goes to the split furthest below its
       share of rows.
  So a label keeps both classes in every split whenever it has positives in at least as many groups as there
  are splits and negatives too; with fewer, train then test get them first.
  """
  keys = sorted(groups, key=_hash_key)
  splits = list(fractions)
  num_groups, num_splits = len(keys), len(splits)
  if not keys:
    return {}
  rows = np.asarray([groups[k][0] for k in keys], np.float64)
  # [G, 2L]: positives of every label, then negatives
  counts = np.stack([np.concatenate([np.asarray(groups[k][1], np.float64),
                                     np.asarray(groups[k][2], np.float64)]) for k in keys])
  has = counts > 0
  assigned = np.full(num_groups, -1)
  split_counts = np.zeros((num_splits, counts.shape[1]))
  split_rows = np.zeros(num_splits)

  def assign(group: int, split: int) -> None:
    assigned[group] = split
    split_counts[split] += counts[group]
    split_rows[split] += rows[group]

  order = [splits.index(s) for s in _COVERAGE_ORDER if s in splits] + [
      i for i, s in enumerate(splits) if s not in _COVERAGE_ORDER]
  _cover(has, rows, order, assigned, split_counts, assign)
  share = np.asarray([fractions[s] for s in splits], np.float64)
  total = counts.sum(axis=0)
  want, want_rows = share[:, None] * total[None, :], share * rows.sum()
  rarity = np.concatenate([np.where(has, total[None, :], np.inf), np.full((num_groups, 1), np.inf)], axis=1)
  rarest = rarity.argmin(axis=1)  # a group's rarest (label, class) pair (the extra column when it has none)
  free = [g for g in np.lexsort((np.arange(num_groups), rarity.min(axis=1))) if assigned[g] < 0]
  for group in free:
    row_deficit = want_rows - split_rows
    if has[group].any():
      deficit = want[:, rarest[group]] - split_counts[:, rarest[group]]
      split = max(range(num_splits), key=lambda s: (deficit[s], row_deficit[s], -s))
    else:
      split = max(range(num_splits), key=lambda s: (row_deficit[s], -s))
    assign(group, split)
  return {key: splits[assigned[i]] for i, key in enumerate(keys)}


class _Groups:
  """Union-find of row units: rows sharing a group or an image end up in one unit."""

  def __init__(self):
    self._parent = {}

  def find(self, node: str) -> str:
    self._parent.setdefault(node, node)
    while self._parent[node] != node:
      self._parent[node] = self._parent[self._parent[node]]
      node = self._parent[node]
    return node

  def union(self, a: str, b: str) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self._parent[max(ra, rb)] = min(ra, rb)  # the smaller name represents: independent of row order


def _assign_splits(rows: list[_Row], header: list[str], num_labels: int, path: str) -> dict[str, list[_Row]]:
  splits = {name: [] for name in common.SPLITS}
  if "split" in header:
    for row in rows:
      split = _SPLIT_ALIASES.get(row.get("split").lower())
      if split is None:
        if row.reason in (common.MALFORMED_ROW, common.BAD_ENCODING):
          split = "train"  # skipped anyway: counted in train
        else:
          raise DataError(f"{path} line {row.line}: split={row.get('split')!r} must be train, validation "
                          "or test")
      splits[split].append(row)
    return {name: split_rows for name, split_rows in splits.items() if split_rows}

  units = _Groups()
  for row in rows:
    image = "image:" + os.path.normpath(row.get("image") or f"<line {row.line}>")
    if "group" in header and row.reason not in (common.MALFORMED_ROW, common.BAD_ENCODING):
      if not row.get("group"):
        raise DataError(f"{path} line {row.line}: empty 'group' (it decides the split of the row)")
      units.union("group:" + row.get("group"), image)
    else:
      units.find(image)
  unit_of = [units.find("image:" + os.path.normpath(row.get("image") or f"<line {row.line}>"))
             for row in rows]
  stats = {}
  for row, unit in zip(rows, unit_of):
    n, pos, neg = stats.get(unit, (0, np.zeros(num_labels), np.zeros(num_labels)))
    if row.reason is None:
      positive = row.labels == 1
      n, pos, neg = n + 1, pos + positive, neg + ~positive
    stats[unit] = (n, pos, neg)
  plan = plan_splits(stats)
  for row, unit in zip(rows, unit_of):
    splits[plan[unit]].append(row)
  logging.info("%s: splits planned by %s, stratified by label: %s", path,
               "group" if "group" in header else "image",
               ", ".join(f"{name} {len(split_rows)} rows" for name, split_rows in splits.items()))
  return {name: split_rows for name, split_rows in splits.items() if split_rows}


class CsvPairs(common.LocalBuilder):
  """Image-report pairs listed in a CSV file."""

  name = "convirt_csv_pairs"
  VERSION = common.VERSION

  def __init__(self, *, params: CsvParams, **kwargs):
    # Columns and labels are checked here, before any image is read.
    rows, self._header = _read_rows(params.csv_path, params.label_columns)
    if not rows:
      raise DataError(f"{params.csv_path}: no rows (only a header, or an empty file)")
    self._rows, self._label_names, self._task = _mark_rows(rows, params.label_columns, params.task,
                                                           params.csv_path, params.min_sentence_tokens)
    super().__init__(params=params, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return common.dataset_info(self, label_names=self._label_names, task=self._task,
                               description=f"Image-report pairs from {self._params.csv_path}.",
                               source=self._params.csv_path, skipped={}, label_counts={})

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download: the CSV and its images are local
    splits = _assign_splits(self._rows, self._header, len(self._label_names), self._params.csv_path)
    return {name: self._generate_examples(name, rows) for name, rows in splits.items()}

  def _generate_examples(self, split: str, rows: list[_Row]) -> Iterator[tuple[int, dict]]:
    bad = common.BadRecords(self.name, split, self._strict)
    counts = common.LabelCounts(self._label_names)
    folder = os.path.dirname(self._params.csv_path)

    def candidates() -> Iterator[common.Candidate]:
      for row in rows:
        record = f"{self._params.csv_path} line {row.line} ({row.get('image')})"
        image_path = os.path.join(folder, row.get("image"))
        features = None if row.reason else {"id": row.get("image"), "report": row.fields.get("text") or "",
                                            "text": row.text, "labels": row.labels}
        yield common.Candidate(record, image_path, features, row.reason, row.detail)

    yield from counts.counted(common.examples_with_images(candidates(), bad, size=self._params.stored_size,
                                                          num_threads=self._threads))
    self.info.metadata["skipped"][split] = dict(bad.counts)
    self.info.metadata["label_counts"][split] = counts.as_dict()
