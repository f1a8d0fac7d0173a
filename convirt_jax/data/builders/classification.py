"""What the builders of the paper's four downstream classification sets share (RSNA, CheXpert, COVIDx, MURA).

ConVIRT evaluates its image encoder on four classification tasks (ConVIRT §4.2 "Evaluation Tasks & Data",
dataset sizes in its dataset-statistics table in the Appendix; arXiv 2010.00747v2; the section numbers
could not be checked against the text here: the section titles are the pointers):
  RSNA Pneumonia Detection  binary, AUC          25,184 / 1,500 / 3,000 (train / validation / test)
  CheXpert                  5 labels, AUC each   218,414 / 5,000 / 234
  COVIDx                    3 classes, accuracy  13,598 / 300 / 300
  MURA                      binary, AUC          33,078 / 3,730 / 3,197

Records follow the data contract of `convirt_jax.data.datasets`; these sets have no reports, so "report"
and "text" are "" in every record. The builders never call `common.report_text`, so the shared bad-record
logic cannot skip a record as EMPTY_REPORT: no switch is needed there.

Splits: the validation (and, for RSNA, the test) split is held out of the official training list by
patient: patients are ordered by a hash of (split_seed, patient id) and each held-out split takes whole
patients until it holds its number of images (so it may exceed it by the images of one patient); train
keeps the rest. The result depends on the seed and the patients, not on the order of the files' lines, and
no patient is in two splits. A download with fewer images than the paper's keeps the paper's proportions
(a warning says so); a bigger one gives the held-out splits the paper's sizes and train the rest.

What a builder module holds: its `DOWNLOAD` (where the data set comes from, what it holds), its `*Params`
(a subclass of `Params`; more fields only for a set with more parameters), `params_from_config` (through
`shared_params`), and a `ClassificationBuilder` that finds the download's files (`_open_download`) and reads
its lists (`_splits`).
"""
import abc
import collections
import dataclasses
import hashlib
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from convirt_jax.data.builders import common
from convirt_jax.data.builders import dicom
from convirt_jax.errors import DataError

# Reasons a record is skipped, besides common's MISSING_IMAGE, CORRUPT_IMAGE and MISSING_LABEL.
BAD_LABEL = "bad_label"          # a label outside its set (e.g. Target=2, class "unknown")
MALFORMED_ROW = "malformed_row"  # a line with missing fields, or without a patient id in its path


@dataclasses.dataclass(frozen=True)
class Item:
  """One image before it is read: its labels, or the reason it cannot be used."""
  record: str             # names the record in messages: "<file> line N (<id>)"
  image_id: str           # the record's "id": the image's path as the download's lists write it
  image_path: str         # where the image is on disk
  patient: str | None     # the unit of the split; None only for a malformed line
  labels: np.ndarray | None = None
  reason: str | None = None
  detail: str = ""


@dataclasses.dataclass(frozen=True)
class Download:
  """A data set's download: its name in messages, where it is obtained, the files it is expected to hold."""
  dataset: str
  url: str
  access: str                  # what obtaining it takes ("needs a Kaggle account ...")
  expected: tuple[str, ...]    # the files and folders looked for, one a line in messages

  def error(self, problem: str, root: str) -> DataError:
    """The error of a missing or incomplete download: what is wrong, the expected files, where to get them."""
    return DataError(f"{problem}. Expected the {self.dataset} download in {root}:\n  "
                     + "\n  ".join(self.expected) + f"\nIt is obtained from {self.url} ({self.access}).")


@dataclasses.dataclass(frozen=True)
class Params:
  """Everything that changes the built dataset (its BuilderConfig name is a hash of these).

  Each set has its own subclass (its name shows in the BuilderConfig's description); one with more
  parameters adds fields. The hash is of the fields' names and values only, not of the class.
  """
  root: str
  stored_size: int = 256
  split_seed: int = 0

  @property
  def config_name(self) -> str:
    return f"s{self.stored_size}_{common.params_hash(self)}"


def shared_params(config: ml_collections.ConfigDict, download: Download) -> dict[str, Any]:
  """The fields of `Params` from `config`; a DataError naming `download` when config.data.dir is empty."""
  if not config.data.dir:
    raise download.error("config.data.dir is empty: give the directory of the download", "it")
  return dict(root=os.path.abspath(os.path.expanduser(config.data.dir)),
              stored_size=int(config.data.stored_size), split_seed=int(config.data.split_seed))


def line_fields(row: Mapping[str, str | None], columns: Sequence[str]) -> list[str] | None:
  """The stripped values of `columns`, or None when the row is too short to have them all."""
  values = [row.get(column) for column in columns]
  return None if any(v is None for v in values) else [v.strip() for v in values]


def _patient_rank(seed: int, patient: str) -> bytes:
  return hashlib.sha256(f"{seed}\0{patient}".encode("utf-8")).digest()


def hold_out(pool: Sequence[Item], held_out: Mapping[str, int], paper_train: int, seed: int,
             dataset: str) -> dict[str, list[Item]]:
  """Splits `pool` by patient into train and the `held_out` splits (split -> the paper's number of images).

  Held-out splits are filled in the order given. Only images that are not already known to be bad count
  towards the sizes (an image that turns out unreadable later is skipped from the split it was put in).
  Items without a patient (malformed lines) go to train, where they are counted as skipped.
  """
  usable = collections.Counter(item.patient for item in pool if item.reason is None and item.patient)
  total = sum(usable.values())
  paper_total = paper_train + sum(held_out.values())
  if total >= paper_total:
    targets = dict(held_out)
  else:
    targets = {split: round(total * size / paper_total) for split, size in held_out.items()}
    if total > len(held_out):
      targets = {split: max(1, n) for split, n in targets.items()}
    logging.warning(
        "%s: the download has %d usable images to split, fewer than the paper's %d (ConVIRT §4.2): the "
        "held-out splits keep the paper's proportions, %s images", dataset, total, paper_total,
        ", ".join(f"{split} {n}" for split, n in targets.items()))
  assigned, counts = {}, collections.Counter()
  for patient in sorted({item.patient for item in pool if item.patient},
                        key=lambda p: _patient_rank(seed, p)):
    split = next((s for s in held_out if counts[s] < targets[s]), "train")
    assigned[patient] = split
    counts[split] += usable[patient]
  splits = {split: [] for split in common.SPLITS}
  for item in pool:
    splits[assigned.get(item.patient, "train")].append(item)
  logging.info("%s: split by patient (seed %d): %s", dataset, seed,
               ", ".join(f"{split} {len(items)}" for split, items in splits.items()))
  return splits


def warn_shared_patients(pool: Sequence[Item], test: Sequence[Item], dataset: str) -> None:
  """Logs patients that the official training and test lists share (the official splits claim none)."""
  shared = {i.patient for i in pool if i.patient} & {i.patient for i in test if i.patient}
  if shared:
    logging.warning("%s: %d patients are in both the official training and test lists (e.g. %s)", dataset,
                    len(shared), ", ".join(sorted(shared)[:3]))


def load_image(path: str, size: int) -> bytes:
  """The stored JPEG of an image file: DICOM (.dcm) through `dicom`, anything else through Pillow."""
  if path.lower().endswith(".dcm"):
    return dicom.load_jpeg(path, size)
  return common.load_jpeg(path, size)


def find_download(root: str, marker: str, folders: Sequence[str], fail: Callable[[str], DataError]) -> str:
  """The download folder: `root` itself when it holds the file `marker`, else the one of its `folders` that
  does ("CheXpert-v1.0-small", "MURA-v1.1"); `fail(problem)` when none does."""
  if os.path.isfile(os.path.join(root, marker)):
    return root
  found = [os.path.join(root, f) for f in folders if os.path.isfile(os.path.join(root, f, marker))]
  if len(found) > 1:
    raise DataError(f"{root} holds both {' and '.join(folders)}: set config.data.dir to the one to use")
  if not found:
    raise fail(f"no {marker} in {root} nor in its {' or '.join(f + '/' for f in folders)}")
  return found[0]


def require_paths(root: str, fail: Callable[[str], DataError], *, files: Sequence[str] = (),
                  folders: Sequence[str] = ()) -> None:
  """`fail(problem)` naming the first of `files`, then of the image `folders`, missing under `root`."""
  for name in files:
    if not os.path.isfile(os.path.join(root, name)):
      raise fail(f"missing {os.path.join(root, name)}")
  for name in folders:
    if not os.path.isdir(os.path.join(root, name)):
      raise fail(f"missing the image folder {os.path.join(root, name)}/")


def resolve_listed_path(download_dir: str, listed: str) -> str:
  """Where a path from a CheXpert/MURA list is on disk.

  The lists write paths relative to the download's parent ("CheXpert-v1.0-small/train/...",
  "MURA-v1.1/train/..."); the first component is replaced by the download directory actually found, so
  the result does not depend on what the folder above is called.
  """
  parts = [p for p in listed.replace("\\", "/").split("/") if p]
  if parts and parts[0] not in ("train", "valid"):
    parts = parts[1:]
  return os.path.join(download_dir, *parts)


def path_component(path: str, prefix: str) -> str | None:
  """The first component of `path` that starts with `prefix` ("patient00001", "XR_SHOULDER"), or None."""
  return next((p for p in path.replace("\\", "/").split("/") if p.startswith(prefix)), None)


class ClassificationBuilder(common.LocalBuilder):
  """A downstream classification set: subclasses set the class attributes and implement `_open_download`
  and `_splits`."""

  VERSION = common.VERSION
  DOWNLOAD: Download
  LABEL_NAMES: tuple[str, ...] = ()
  TASK: str = common.MULTILABEL
  DESCRIPTION: str = ""

  def __init__(self, *, params: Params, **kwargs):
    """Checks the download in params.root (reads no image) before anything is built."""
    root = params.root
    fail = lambda problem: self.DOWNLOAD.error(problem, root)
    if not os.path.isdir(root):
      raise fail(f"the directory {root} does not exist")
    self._open_download(params, fail)
    super().__init__(params=params, **kwargs)

  @abc.abstractmethod
  def _open_download(self, params: Params, fail: Callable[[str], DataError]) -> None:
    """Finds the download's files in the existing params.root and checks their columns; `fail(problem)` is
    the DataError of a missing or incomplete download."""

  @abc.abstractmethod
  def _splits(self) -> dict[str, list[Item]]:
    """split -> its items (reads the lists, not the images)."""

  def _hold_out_validation(self, pool: Sequence[Item], test: list[Item],
                           paper_sizes: Mapping[str, int]) -> dict[str, list[Item]]:
    """The splits of a set whose official test list is `test`: validation is held out of the official
    training list `pool` by patient (`hold_out`), train keeps the rest."""
    dataset = self.DOWNLOAD.dataset
    warn_shared_patients(pool, test, dataset)
    splits = hold_out(pool, {"validation": paper_sizes["validation"]}, paper_sizes["train"],
                      self._params.split_seed, dataset)
    splits["test"] = test
    return splits

  def _metadata(self) -> dict[str, Any]:
    """Extra entries of the dataset's metadata (the parameters that define the labels and splits)."""
    return {"split_seed": self._params.split_seed}

  def _info(self) -> tfds.core.DatasetInfo:
    return common.dataset_info(self, label_names=self.LABEL_NAMES, task=self.TASK,
                               description=self.DESCRIPTION, source=self._params.root, skipped={},
                               **self._metadata())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # manual download: everything is read from params.root
    return {split: self._generate_examples(split, items) for split, items in self._splits().items() if items}

  def _generate_examples(self, split: str, items: list[Item]) -> Iterator[tuple[int, dict]]:
    bad = common.BadRecords(self.name, split, self._strict)
    size = self._params.stored_size

    def read(item: Item) -> tuple[bytes | None, common.BadImage | None]:
      if item.reason is not None:
        return None, None
      try:
        return load_image(item.image_path, size), None
      except common.BadImage as e:
        return None, e

    written = 0
    for item, (jpeg, error) in common.ordered_map(read, items, self._threads):
      if item.reason is not None:
        bad.reject(item.reason, item.record, item.detail)
      elif error is not None:
        bad.reject(error.reason, item.record, str(error))
      else:
        # No report: "" (see the module docstring).
        yield written, {"id": item.image_id, "image": jpeg, "report": "", "text": "",
                        "labels": np.asarray(item.labels, np.float32)}
        written += 1
    bad.finish(written)
    self.info.metadata["skipped"][split] = dict(bad.counts)
