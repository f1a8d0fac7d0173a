"""COVIDx (the COVID-Net data set) as a TFDS dataset: COVID-19 / pneumonia / normal per image.

Expected in `config.data.dir`, as COVID-Net's instructions build it or its Kaggle release unpacks
(https://github.com/lindawangg/COVID-Net/blob/master/docs/COVIDx.md; built from public sources, one of
which, the RSNA Pneumonia Challenge, needs a Kaggle account):
  train.txt, test.txt       (or one train_COVIDx*.txt / test_COVIDx*.txt, the names of COVID-Net's labels/)
  train/<filename>, test/<filename>
Lines "patient_id filename class data_source" (later releases), or "patient_id filename class"
(earlier ones), separated by spaces; a filename may itself hold spaces. Classes "COVID-19",
"pneumonia" (non-COVID) and "normal" (case-insensitive). The 2-class releases (COVIDx CXR-2 and later,
"positive" / "negative") are refused: the paper's task has three classes.

Task (ConVIRT §4.2): three-class classification scored by accuracy. Labels: one-hot float32 [3] over
["normal", "pneumonia", "COVID-19"] (COVID-Net's class order), task "multiclass". Record id
"<train|test>/<filename>"; a class outside the three is a bad record.

Splits (ConVIRT §4.2 and its Appendix dataset table): 13,598 / 300 / 300 images: the official test list is
the test split, 300 images of the official training list, held out by patient
(`classification.hold_out`, config.data.split_seed), are the validation split. Which COVIDx release the
paper used is not stated here; releases differ in size, so the split sizes follow `hold_out`'s rules.
"""
import dataclasses
import glob
import os

import ml_collections
import numpy as np

from convirt_jax.data.builders import classification
from convirt_jax.data.builders import common
from convirt_jax.errors import DataError

LABEL_NAMES = ("normal", "pneumonia", "COVID-19")
_CLASSES = {"normal": 0, "pneumonia": 1, "covid-19": 2, "covid19": 2, "covid": 2}
_TWO_CLASS = ("positive", "negative")
DOWNLOAD = classification.Download(
    dataset="COVIDx", url="https://github.com/lindawangg/COVID-Net/blob/master/docs/COVIDx.md",
    access="built from public sources; its RSNA part needs a Kaggle account",
    expected=("train.txt, test.txt  (lines: patient_id filename class [data_source]); or train_COVIDx*.txt, "
              "test_COVIDx*.txt", "train/<filename>, test/<filename>"))
# ConVIRT §4.2 / Appendix dataset table: images per split.
PAPER_SIZES = {"train": 13_598, "validation": 300, "test": 300}


@dataclasses.dataclass(frozen=True)
class CovidxParams(classification.Params):
  """The shared parameters only."""


def params_from_config(config: ml_collections.ConfigDict) -> CovidxParams:
  return CovidxParams(**classification.shared_params(config, DOWNLOAD))


@dataclasses.dataclass(frozen=True)
class _Line:
  number: int
  patient: str | None   # None when the line is malformed
  filename: str
  class_name: str       # as written
  problem: str = ""     # why a line is malformed

  @property
  def label(self) -> int | None:
    """Index into LABEL_NAMES, or None for a class outside them."""
    return _CLASSES.get(self.class_name.lower())


def _parse(number: int, text: str) -> _Line | None:
  tokens = text.split()
  if not tokens:
    return None  # a blank line
  known = lambda token: token.lower() in _CLASSES or token.lower() in _TWO_CLASS
  if len(tokens) >= 4 and known(tokens[-2]):    # patient_id filename class data_source
    return _Line(number, tokens[0], " ".join(tokens[1:-2]), tokens[-2])
  if len(tokens) >= 3 and known(tokens[-1]):    # patient_id filename class
    return _Line(number, tokens[0], " ".join(tokens[1:-1]), tokens[-1])
  if len(tokens) < 3:
    return _Line(number, None, "", "", f"{len(tokens)} fields, expected 'patient_id filename class "
                 "[data_source]'")
  return _Line(number, tokens[0], tokens[1], tokens[2])  # an unknown class: a bad label


class Covidx(classification.ClassificationBuilder):
  """COVIDx chest X-rays: normal, pneumonia (non-COVID), COVID-19."""

  name = "convirt_covidx"
  DOWNLOAD = DOWNLOAD
  LABEL_NAMES = LABEL_NAMES
  TASK = common.MULTICLASS
  DESCRIPTION = "COVIDx chest X-rays, three classes: normal, pneumonia (non-COVID-19), COVID-19."

  def _open_download(self, params, fail):
    root = params.root
    self._lists, self._lines = {}, {}
    for split in ("train", "test"):
      plain = os.path.join(root, f"{split}.txt")
      found = ([plain] if os.path.isfile(plain)
               else sorted(glob.glob(os.path.join(root, f"{split}_COVIDx*.txt"))))
      if not found:
        raise fail(f"missing {plain} (or {split}_COVIDx*.txt)")
      if len(found) > 1:
        names = ", ".join(os.path.basename(p) for p in found)
        raise DataError(f"{root} holds several {split} lists ({names}): keep the one of the release to use")
      classification.require_paths(root, fail, folders=(split,))
      self._lists[split] = found[0]
      self._lines[split] = [line for number, text in enumerate(common.text_lines(found[0]), 1)
                            if (line := _parse(number, text))]
      two_class = next((line for line in self._lines[split] if line.class_name.lower() in _TWO_CLASS), None)
      if two_class is not None:
        raise DataError(
            f"{found[0]} line {two_class.number}: class {two_class.class_name!r}: this is a 2-class COVIDx "
            "release (COVIDx CXR-2 or later, positive/negative). The paper's task has three classes: use a "
            f"release whose classes are COVID-19, pneumonia and normal (see {DOWNLOAD.url}).")

  def _items(self, split: str) -> list[classification.Item]:
    shown = os.path.basename(self._lists[split])
    items = []
    for line in self._lines[split]:
      image_id = f"{split}/{line.filename}" if line.filename else ""
      record = f"{shown} line {line.number}" + (f" ({image_id})" if image_id else "")
      path = os.path.join(self._params.root, split, line.filename)
      if line.patient is None:
        items.append(classification.Item(record, image_id, path, None, reason=classification.MALFORMED_ROW,
                                         detail=line.problem))
      elif line.label is None:
        items.append(classification.Item(record, image_id, path, line.patient,
                                         reason=classification.BAD_LABEL,
                                         detail=f"class {line.class_name!r} must be COVID-19, pneumonia or "
                                         "normal"))
      else:
        labels = np.zeros((len(LABEL_NAMES),), np.float32)
        labels[line.label] = 1.0
        items.append(classification.Item(record, image_id, path, line.patient, labels))
    return items

  def _splits(self) -> dict[str, list[classification.Item]]:
    pool, test = self._items("train"), self._items("test")
    return self._hold_out_validation(pool, test, PAPER_SIZES)
