"""MURA v1.1 (musculoskeletal radiographs) as a TFDS dataset: normal / abnormal per image, from its study.

Expected (free, but needs registration: https://stanfordmlgroup.github.io/competitions/mura/ leads to the
download at Stanford AIMI): `config.data.dir` is the MURA-v1.1 folder itself or the folder that holds it:
  MURA-v1.1/train_image_paths.csv, valid_image_paths.csv     one image path per line, no header:
      MURA-v1.1/train/XR_SHOULDER/patient00001/study1_positive/image1.png
  MURA-v1.1/train_labeled_studies.csv, valid_labeled_studies.csv    "study_dir,label", no header:
      MURA-v1.1/train/XR_SHOULDER/patient00001/study1_positive/,1
  MURA-v1.1/train/..., MURA-v1.1/valid/...                   the images
Paths are relative to the download's parent; their first component is replaced by the folder actually
found (`classification.resolve_listed_path`).

Task (ConVIRT §4.2): binary classification, abnormal vs. normal, scored by AUC. Every image takes the label
of its study (1 = abnormal / positive, 0 = normal); an image whose study is not in the labelled-studies
list is a MISSING_LABEL record, a label other than 0 / 1 a bad one. Label names ["Abnormal"], task
"multilabel" (one binary label). The body part is kept in the record's id, which is the image's path as
listed ("MURA-v1.1/train/XR_SHOULDER/..."): `body_part(record_id)` -> "XR_SHOULDER".

Splits (ConVIRT §4.2 and its Appendix dataset table): 33,078 / 3,730 / 3,197 images: the official
validation set (3,197 images) is the TEST split; 3,730 training images, held out by patient
(`classification.hold_out`, config.data.split_seed), are the validation split; 33,078 + 3,730 = 36,808,
the whole official training set.
"""
import csv
import dataclasses
import os

import ml_collections
import numpy as np

from convirt_jax.data.builders import classification
from convirt_jax.data.builders import common
from convirt_jax.errors import DataError

FOLDER = "MURA-v1.1"
LABEL_NAMES = ("Abnormal",)
DOWNLOAD = classification.Download(
    dataset="MURA v1.1", url="https://stanfordmlgroup.github.io/competitions/mura/ (Stanford AIMI)",
    access="free, but needs registration with Stanford AIMI",
    expected=(
        "MURA-v1.1/train_image_paths.csv, MURA-v1.1/valid_image_paths.csv  (one image path per line)",
        "MURA-v1.1/train_labeled_studies.csv, MURA-v1.1/valid_labeled_studies.csv  (study_dir,label)",
        "MURA-v1.1/train/XR_<BODY PART>/patientNNNNN/studyN_<positive|negative>/imageN.png, and valid/"))
# ConVIRT §4.2 / Appendix dataset table: images per split.
PAPER_SIZES = {"train": 33_078, "validation": 3_730, "test": 3_197}


def body_part(record_id: str) -> str | None:
  """The body part ("XR_SHOULDER", "XR_WRIST", ...) of a MURA record, from its id."""
  return classification.path_component(record_id, "XR_")


@dataclasses.dataclass(frozen=True)
class MuraParams(classification.Params):
  """The shared parameters only."""


def params_from_config(config: ml_collections.ConfigDict) -> MuraParams:
  return MuraParams(**classification.shared_params(config, DOWNLOAD))


def _study_key(listed: str) -> str:
  """A listed study folder without the download folder and the final "/": "train/XR_.../study1_positive"."""
  parts = [p for p in listed.strip().replace("\\", "/").split("/") if p]
  if parts and parts[0] not in ("train", "valid"):
    parts = parts[1:]
  return "/".join(parts)


class Mura(classification.ClassificationBuilder):
  """MURA v1.1 upper-extremity radiographs, abnormal vs. normal (the label of the image's study)."""

  name = "convirt_mura"
  DOWNLOAD = DOWNLOAD
  LABEL_NAMES = LABEL_NAMES
  TASK = common.MULTILABEL
  DESCRIPTION = ("MURA v1.1 musculoskeletal radiographs, abnormal (1) vs. normal (0) from the study; the "
                 "official validation set is the test split; the body part is in the record id.")

  def _open_download(self, params, fail):
    self._download = classification.find_download(params.root, "train_image_paths.csv", (FOLDER,), fail)
    for split in ("train", "valid"):
      classification.require_paths(
          self._download, fail, files=(f"{split}_image_paths.csv", f"{split}_labeled_studies.csv"),
          folders=(split,))

  def _read_studies(self, split: str) -> dict[str, tuple[float | None, str]]:
    """study key -> (label, or None when it is not 0 or 1; where it was read)."""
    name = f"{split}_labeled_studies.csv"
    studies = {}
    reader = csv.reader(common.text_lines(os.path.join(self._download, name)))
    for row in reader:
      if not row or not row[0].strip():
        continue
      value = row[1].strip() if len(row) > 1 else ""
      try:
        label = float(value)
      except ValueError:
        label = None
      studies[_study_key(row[0])] = (label if label in (0.0, 1.0) else None,
                                     f"{name} line {reader.line_num}: label={value!r}")
    return studies

  def _items(self, split: str) -> list[classification.Item]:
    name = f"{split}_image_paths.csv"
    studies = self._read_studies(split)
    items = []
    reader = csv.reader(common.text_lines(os.path.join(self._download, name)))
    for row in reader:
      listed = row[0].strip() if row else ""
      if not listed:
        continue
      record = f"{name} line {reader.line_num} ({listed})"
      path = classification.resolve_listed_path(self._download, listed)
      patient = classification.path_component(listed, "patient")
      if patient is None or body_part(listed) is None:
        items.append(classification.Item(record, listed, path, None, reason=classification.MALFORMED_ROW,
                                         detail="no XR_<BODY PART>/patientNNNNN folders in the path"))
        continue
      study = _study_key(os.path.dirname(listed.replace("\\", "/")))
      if study not in studies:
        items.append(classification.Item(record, listed, path, patient, reason=common.MISSING_LABEL,
                                         detail=f"study {study} is not in {split}_labeled_studies.csv"))
        continue
      label, where = studies[study]
      if label is None:
        items.append(classification.Item(record, listed, path, patient, reason=classification.BAD_LABEL,
                                         detail=f"{where} must be 0 or 1"))
      else:
        items.append(classification.Item(record, listed, path, patient, np.asarray([label], np.float32)))
    return items

  def _splits(self) -> dict[str, list[classification.Item]]:
    pool, test = self._items("train"), self._items("valid")
    if not pool:
      raise DataError(f"{os.path.join(self._download, 'train_image_paths.csv')} lists no image")
    return self._hold_out_validation(pool, test, PAPER_SIZES)
