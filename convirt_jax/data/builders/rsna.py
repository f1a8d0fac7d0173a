"""RSNA Pneumonia Detection Challenge (Kaggle, stage 2) as a TFDS dataset: binary pneumonia label per image.

Expected in `config.data.dir`, as Kaggle's download unpacks (a Kaggle account that has accepted the
competition's rules is needed: https://www.kaggle.com/competitions/rsna-pneumonia-detection-challenge/data):
  stage_2_train_labels.csv            patientId,x,y,width,height,Target: one row per box, one row with empty
                                      box fields for a patient without pneumonia
  stage_2_train_images/<patientId>.dcm  one DICOM per patient
The other files (stage_2_test_images/, stage_2_detailed_class_info.csv, ...) are not read.

Task (ConVIRT §4.2): binary classification, pneumonia vs. not, scored by AUC. The label is the patient's
Target (1 = lung opacity suggesting pneumonia, 0 = "Normal" and "No Lung Opacity / Not Normal"); a patient
whose rows disagree, or with a Target other than 0 or 1, is a bad record. One record per image, id
"stage_2_train_images/<patientId>.dcm", label names ["Pneumonia"], task "multilabel" (one binary label).

Splits (ConVIRT §4.2 and its Appendix dataset table): 25,184 / 1,500 / 3,000 images, all drawn at random
from stage_2_train by patient (`classification.hold_out`, seed config.data.split_seed). NOTE: those sizes
add up to 29,684, more than the 26,684 patients of the stage 2 training set, so a complete download gets
the paper's proportions (about 22,639 / 1,348 / 2,697) with a warning; which images the paper used beyond
stage_2_train is not known here.

DICOM decoding (MONOCHROME1, rescale, VOI LUT / window, 8- and 16-bit) is in `dicom`.
"""
import dataclasses
import os

import ml_collections
import numpy as np

from convirt_jax.data.builders import classification
from convirt_jax.data.builders import common
from convirt_jax.errors import DataError

LABELS_CSV = "stage_2_train_labels.csv"
IMAGES_DIR = "stage_2_train_images"
DOWNLOAD = classification.Download(
    dataset="RSNA Pneumonia Detection Challenge (stage 2)",
    url="https://www.kaggle.com/competitions/rsna-pneumonia-detection-challenge/data",
    access="needs a Kaggle account that has accepted the competition's rules",
    expected=(f"{LABELS_CSV}  (patientId,x,y,width,height,Target)", f"{IMAGES_DIR}/<patientId>.dcm"))
# ConVIRT §4.2 / Appendix dataset table: images per split.
PAPER_SIZES = {"train": 25_184, "validation": 1_500, "test": 3_000}


@dataclasses.dataclass(frozen=True)
class RsnaParams(classification.Params):
  """The shared parameters only."""


def params_from_config(config: ml_collections.ConfigDict) -> RsnaParams:
  return RsnaParams(**classification.shared_params(config, DOWNLOAD))


class RsnaPneumonia(classification.ClassificationBuilder):
  """RSNA Pneumonia Detection Challenge stage 2 training DICOMs with their binary Target."""

  name = "convirt_rsna_pneumonia"
  DOWNLOAD = DOWNLOAD
  LABEL_NAMES = ("Pneumonia",)
  TASK = common.MULTILABEL
  DESCRIPTION = "RSNA Pneumonia Detection Challenge stage 2 training images, pneumonia (Target) vs. not."

  def _open_download(self, params, fail):
    root = params.root
    classification.require_paths(root, fail, files=(LABELS_CSV,), folders=(IMAGES_DIR,))
    self._labels_csv = os.path.join(root, LABELS_CSV)
    f, reader = common.open_csv(self._labels_csv)
    with f:
      common.require_columns(reader, ("patientId", "Target"), self._labels_csv)

  def _splits(self) -> dict[str, list[classification.Item]]:
    first_line, targets, problems, malformed = {}, {}, {}, []
    f, reader = common.open_csv(self._labels_csv)
    with f:
      for row in reader:
        line = reader.line_num
        fields = classification.line_fields(row, ("patientId", "Target"))
        if fields is None or not fields[0]:
          malformed.append(classification.Item(
              f"{LABELS_CSV} line {line}", "", "", None, reason=classification.MALFORMED_ROW,
              detail="missing patientId or Target"))
          continue
        patient, target = fields
        first_line.setdefault(patient, line)
        try:
          value = float(target)
        except ValueError:
          value = None
        if value not in (0.0, 1.0):
          problems.setdefault(patient, f"line {line}: Target={target!r} must be 0 or 1")
        else:
          targets.setdefault(patient, {})[value] = line
    pool = list(malformed)
    for patient, line in first_line.items():
      image_id = f"{IMAGES_DIR}/{patient}.dcm"
      record = f"{LABELS_CSV} line {line} ({image_id})"
      path = os.path.join(self._params.root, IMAGES_DIR, f"{patient}.dcm")
      values = targets.get(patient, {})
      if patient in problems:
        pool.append(classification.Item(record, image_id, path, patient, reason=classification.BAD_LABEL,
                                        detail=problems[patient]))
      elif len(values) > 1:
        pool.append(classification.Item(
            record, image_id, path, patient, reason=classification.BAD_LABEL,
            detail="its rows disagree on Target (" + ", ".join(
                f"line {n}: {int(v)}" for v, n in sorted(values.items(), key=lambda kv: kv[1])) + ")"))
      else:
        (value,) = values
        pool.append(classification.Item(record, image_id, path, patient, np.asarray([value], np.float32)))
    if not first_line:
      raise DataError(f"{self._labels_csv}: no patient listed")
    held_out = {"test": PAPER_SIZES["test"], "validation": PAPER_SIZES["validation"]}
    return classification.hold_out(pool, held_out, PAPER_SIZES["train"], self._params.split_seed,
                                   DOWNLOAD.dataset)
