"""CheXpert v1.0 (small or full download) as a TFDS dataset: the paper's five labels per image.

Expected (free, but needs registration; https://stanfordmlgroup.github.io/competitions/chexpert/ leads to
the download at Stanford AIMI): `config.data.dir` is the download folder itself or the folder that holds
it, as unpacked:
  CheXpert-v1.0-small/train.csv, valid.csv   (or CheXpert-v1.0/..., the full-resolution download)
  CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg, .../valid/...
The CSVs' `Path` is relative to the download's parent ("CheXpert-v1.0-small/train/..."); its first
component is replaced by the folder actually found (`classification.resolve_listed_path`). Columns:
Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,...,Support Devices; values 1 / 0 / -1 (uncertain) / empty.

Task (ConVIRT §4.2): multi-label binary classification of Atelectasis, Cardiomegaly, Consolidation, Edema
and Pleural Effusion (the CheXpert competition's five), AUC per label. Labels, float32 [5]:
  1 -> 1, 0 -> 0, empty (not mentioned) -> 0, and -1 (uncertain) by config.data.uncertainty:
  "zeros" -> 0 (U-Zeros), "ones" -> 1 (U-Ones), "ignore" -> NaN (meant to be left out of training and
  scoring: the evaluator has to honour NaN; see `convirt_jax.evaluate.linear_probe` for what it does).
  ASSUMPTION: the default "zeros" is not verified against the paper's text (its policy for uncertain labels
  could not be checked here); the official validation set, the test set here, has no uncertain labels, so
  the policy only changes the training and validation labels.
  Any other value is a bad record.

Splits (ConVIRT §4.2 and its Appendix dataset table): the official validation set (234 images) is the
TEST set; 5,000 training images, held out by patient (`classification.hold_out`, config.data.split_seed),
are the validation set; the rest (218,414) is train.

Views: config.data.frontal_only (default True) keeps the rows whose Frontal/Lateral is "Frontal".
NOTE: the paper's sizes, 218,414 + 5,000 = 223,414 = every training image and 234 = every validation image
of CheXpert v1.0, imply that the paper used all views (frontal and lateral); set data.frontal_only=False to
reproduce them. With frontal only, the held-out sizes keep the paper's proportions (a warning says so).
"""
import dataclasses
import os

from absl import logging
import ml_collections
import numpy as np

from convirt_jax.data.builders import classification
from convirt_jax.data.builders import common
from convirt_jax.errors import DataError

FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
LABEL_NAMES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
UNCERTAINTY = {"zeros": 0.0, "ones": 1.0, "ignore": float("nan")}
VIEW_COLUMN = "Frontal/Lateral"
DOWNLOAD = classification.Download(
    dataset="CheXpert v1.0", url="https://stanfordmlgroup.github.io/competitions/chexpert/ (Stanford AIMI)",
    access="free, but needs registration with Stanford AIMI",
    expected=("CheXpert-v1.0-small/train.csv, CheXpert-v1.0-small/valid.csv  (or CheXpert-v1.0/...)",
              "CheXpert-v1.0-small/train/patientNNNNN/studyN/viewN_frontal.jpg, and valid/ likewise"))
# ConVIRT §4.2 / Appendix dataset table: images per split.
PAPER_SIZES = {"train": 218_414, "validation": 5_000, "test": 234}


@dataclasses.dataclass(frozen=True)
class ChexpertParams(classification.Params):
  """The shared parameters, and how uncertain labels are stored and which views are kept."""
  uncertainty: str = "zeros"
  frontal_only: bool = True


def params_from_config(config: ml_collections.ConfigDict) -> ChexpertParams:
  shared = classification.shared_params(config, DOWNLOAD)
  uncertainty = str(config.data.uncertainty)
  if uncertainty not in UNCERTAINTY:
    raise DataError(f"config.data.uncertainty={uncertainty!r}: must be one of {', '.join(UNCERTAINTY)}")
  return ChexpertParams(**shared, uncertainty=uncertainty, frontal_only=bool(config.data.frontal_only))


def _label(value: str, uncertain: float) -> float | None:
  """A CSV value -> the stored label, or None when it is not 1, 0, -1 or empty."""
  if not value:
    return 0.0  # not mentioned: negative
  try:
    number = float(value)
  except ValueError:
    return None
  return {1.0: 1.0, 0.0: 0.0, -1.0: uncertain}.get(number)


class Chexpert(classification.ClassificationBuilder):
  """CheXpert v1.0 images with the five competition labels."""

  name = "convirt_chexpert"
  DOWNLOAD = DOWNLOAD
  LABEL_NAMES = LABEL_NAMES
  TASK = common.MULTILABEL
  DESCRIPTION = ("CheXpert v1.0: Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion; the "
                 "official validation set is the test split.")

  def _open_download(self, params, fail):
    self._download = classification.find_download(params.root, "train.csv", FOLDERS, fail)
    classification.require_paths(self._download, fail, files=("valid.csv",), folders=("train", "valid"))
    self._columns = ("Path", *LABEL_NAMES) + ((VIEW_COLUMN,) if params.frontal_only else ())
    for name in ("train.csv", "valid.csv"):
      path = os.path.join(self._download, name)
      f, reader = common.open_csv(path)
      with f:
        common.require_columns(reader, self._columns, path)

  def _metadata(self):
    return {**super()._metadata(), "uncertainty": self._params.uncertainty,
            "frontal_only": self._params.frontal_only}

  def _read(self, csv_name: str) -> list[classification.Item]:
    path = os.path.join(self._download, csv_name)
    shown = f"{os.path.basename(self._download)}/{csv_name}"
    uncertain = UNCERTAINTY[self._params.uncertainty]
    items, excluded = [], 0
    f, reader = common.open_csv(path)
    with f:
      for row in reader:
        line = reader.line_num
        fields = classification.line_fields(row, self._columns)
        if fields is None or not fields[0]:
          items.append(classification.Item(f"{shown} line {line}", "", "", None,
                                           reason=classification.MALFORMED_ROW,
                                           detail=f"fewer fields than the {len(reader.fieldnames)} columns"))
          continue
        listed = fields[0]
        if self._params.frontal_only and fields[-1].lower() != "frontal":
          excluded += 1
          continue
        record = f"{shown} line {line} ({listed})"
        image_path = classification.resolve_listed_path(self._download, listed)
        patient = classification.path_component(listed, "patient")
        if patient is None:
          items.append(classification.Item(record, listed, image_path, None,
                                           reason=classification.MALFORMED_ROW,
                                           detail="no patientNNNNN folder in Path"))
          continue
        labels, bad = [], None
        for name, value in zip(LABEL_NAMES, fields[1:1 + len(LABEL_NAMES)]):
          number = _label(value, uncertain)
          if number is None and bad is None:
            bad = f"{name}={value!r} must be 1, 0, -1 or empty"
          labels.append(number)
        if bad is not None:
          items.append(classification.Item(record, listed, image_path, patient,
                                           reason=classification.BAD_LABEL, detail=bad))
        else:
          items.append(classification.Item(record, listed, image_path, patient,
                                           np.asarray(labels, np.float32)))
    if self._params.frontal_only:
      logging.info("%s: excluded %d lateral images (data.frontal_only=True)", shown, excluded)
    return items

  def _splits(self) -> dict[str, list[classification.Item]]:
    pool, test = self._read("train.csv"), self._read("valid.csv")
    if not any(item.patient for item in pool):
      raise DataError(f"{os.path.join(self._download, 'train.csv')} lists no usable image "
                      f"(frontal_only={self._params.frontal_only})")
    return self._hold_out_validation(pool, test, PAPER_SIZES)
