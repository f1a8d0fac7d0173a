"""MIMIC-CXR-JPG (manual download from PhysioNet) as a TFDS dataset: one record per image + its report.

Records are stored in study order, and the metadata's "study_sizes" holds, per split, the number of
records of each study in that order: the training pipeline can then draw a study (one report, several
images) and sample one of its images (`config.data.unit="study"`, the paper's pair).

Expected in `config.data.dir` (PhysioNet's layout, credentialed access):
  files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg      MIMIC-CXR-JPG images
  mimic-cxr-2.0.0-split.csv[.gz]                   dicom_id, study_id, subject_id, split (train/validate/test)
  mimic-cxr-2.0.0-metadata.csv[.gz]                dicom_id, ViewPosition, ...   (needed for frontal_only)
  mimic-cxr-2.0.0-chexpert.csv[.gz]                optional: subject_id, study_id, 14 CheXpert labels
  mimic-cxr-reports.zip                            the MIMIC-CXR reports (entries files/pXX/pN/sM.txt),
    or its files/pXX/pXXXXXXXX/sXXXXXXXX.txt extracted into the same tree.
Labels follow CheXpert: 1 positive, 0 negative, -1 uncertain, NaN not mentioned (blank, or NaN written out);
a study missing from the CheXpert file gets all NaN. A study whose CheXpert row has another value, or that is
listed twice with different values, is a bad_label record (strict: stops, naming the file and line); an image
listed twice in the split file is a duplicate_record (the first listing is kept).
"""
import dataclasses
import os
import re
import zipfile
from typing import Iterator

from absl import logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from convirt_jax.data.builders import common
from convirt_jax.errors import DataError

SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
REPORTS_ZIP = "mimic-cxr-reports.zip"
_SPLIT_NAMES = {"train": "train", "validate": "validation", "validation": "validation", "test": "test"}
_MISSING_VALUES = frozenset({"", "nan", "-nan", "na", "n/a", "null", "#n/a"})  # lower-cased

LAYOUT = (
    "Expected PhysioNet's MIMIC-CXR-JPG (https://physionet.org/content/mimic-cxr-jpg/) in {root}:\n"
    "  files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg\n"
    f"  {SPLIT_CSV}[.gz], {METADATA_CSV}[.gz], optionally {CHEXPERT_CSV}[.gz]\n"
    "and the reports of MIMIC-CXR (https://physionet.org/content/mimic-cxr/) in the same directory: "
    f"{REPORTS_ZIP}, or its files/pXX/pXXXXXXXX/sXXXXXXXX.txt extracted into the files/ tree.")


@dataclasses.dataclass(frozen=True)
class MimicParams:
  """Everything that changes the built dataset (its BuilderConfig name is a hash of these)."""
  root: str
  stored_size: int = 256
  frontal_only: bool = True
  frontal_views: tuple[str, ...] = ("PA", "AP")
  min_sentence_tokens: int = 3

  @property
  def config_name(self) -> str:
    return f"s{self.stored_size}_{common.params_hash(self)}"


def params_from_config(config: ml_collections.ConfigDict) -> MimicParams:
  if not config.data.dir:
    raise DataError("config.data.dir is empty: give the MIMIC-CXR-JPG directory. " + LAYOUT.format(root="it"))
  return MimicParams(root=os.path.abspath(os.path.expanduser(config.data.dir)),
                     stored_size=int(config.data.stored_size), frontal_only=bool(config.data.frontal_only),
                     frontal_views=tuple(str(v).upper() for v in config.data.frontal_views),
                     min_sentence_tokens=int(config.data.min_sentence_tokens))


def _find(root: str, name: str) -> str | None:
  for candidate in (name, name + ".gz"):
    path = os.path.join(root, candidate)
    if os.path.isfile(path):
      return path
  return None


def _require(root: str, name: str) -> str:
  path = _find(root, name)
  if path is None:
    raise DataError(f"missing {os.path.join(root, name)}[.gz]. " + LAYOUT.format(root=root))
  return path


def _study_key(subject_id: str, study_id: str) -> str:
  """"p10/p10000032/s50414267": the study's folder under files/ (and its report's path without .txt)."""
  return f"p{subject_id[:2]}/p{subject_id}/s{study_id}"


def _study_of(record_id: str) -> str:
  """"p10/p10000032/s50414267" of the record "p10/p10000032/s50414267/<dicom_id>.jpg"."""
  return record_id.rsplit("/", 1)[0]


def _field(row: dict[str, str | None], name: str) -> str:
  return (row.get(name) or "").strip()  # a short row has None for its missing fields


def _number(value: str) -> float | None:
  try:
    return float(value)
  except ValueError:
    return None


def _ids(row: dict[str, str | None], path: str, line: int) -> tuple[str, str]:
  subject_id, study_id = _field(row, "subject_id"), _field(row, "study_id")
  if not (subject_id.isdigit() and study_id.isdigit()):
    raise DataError(f"{path} line {line}: subject_id={subject_id!r}, study_id={study_id!r} must be numbers")
  return subject_id, study_id


@dataclasses.dataclass(frozen=True)
class _Image:
  study: str       # "p10/p10000032/s50414267"
  dicom_id: str
  line: int = 0            # its line in the split file
  duplicate_of: int = 0    # the line that listed it first, when listed again

  @property
  def id(self) -> str:
    return f"{self.study}/{self.dicom_id}.jpg"


class _Reports:
  """Report text by study key, from mimic-cxr-reports.zip or from .txt files in the files/ tree."""

  def __init__(self, root: str):
    self._files = os.path.join(root, "files")
    zip_path = os.path.join(root, REPORTS_ZIP)
    try:
      self._zip = zipfile.ZipFile(zip_path) if os.path.isfile(zip_path) else None
    except zipfile.BadZipFile as e:
      raise DataError(f"{zip_path} is not a readable zip file ({e}): download it again from "
                      "https://physionet.org/content/mimic-cxr/") from e
    self._entries = {}
    if self._zip is not None:
      for name in self._zip.namelist():
        m = re.search(r"(p\d\d/p\d+/s\d+)\.txt$", name)
        if m:
          self._entries[m.group(1)] = name

  def has(self, study: str) -> bool:
    if self._zip is not None:
      return study in self._entries
    return os.path.isfile(os.path.join(self._files, study + ".txt"))

  def read(self, study: str) -> str | None:
    if self._zip is not None:
      name = self._entries.get(study)
      return None if name is None else self._zip.read(name).decode("utf-8-sig", errors="replace")
    path = os.path.join(self._files, study + ".txt")
    if not os.path.isfile(path):
      return None
    # Bytes that are not UTF-8 become U+FFFD: the rest of the report is still usable.
    with open(path, encoding="utf-8-sig", errors="replace") as f:
      return f.read()

  def close(self) -> None:
    if self._zip is not None:
      self._zip.close()


class MimicCxr(common.LocalBuilder):
  """MIMIC-CXR-JPG images with their MIMIC-CXR reports and CheXpert labels (manual download)."""

  name = "convirt_mimic_cxr"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Records in study order; the images per study in the metadata (study_sizes)."}

  def __init__(self, *, params: MimicParams, **kwargs):
    root = params.root
    if not os.path.isdir(root):
      raise DataError(f"MIMIC-CXR-JPG directory {root} does not exist. " + LAYOUT.format(root=root))
    # Validate the required files before anything is read.
    self._split_csv = _require(root, SPLIT_CSV)
    self._metadata_csv = _require(root, METADATA_CSV) if params.frontal_only else _find(root, METADATA_CSV)
    if not os.path.isdir(os.path.join(root, "files")):
      raise DataError(f"missing the image folder {os.path.join(root, 'files')}/. " + LAYOUT.format(root=root))
    self._chexpert_csv = _find(root, CHEXPERT_CSV)
    self._label_names = self._read_label_names(root)
    super().__init__(params=params, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return common.dataset_info(
        self, label_names=self._label_names, task=common.MULTILABEL,
        description="MIMIC-CXR-JPG chest X-rays with the findings/impression of their MIMIC-CXR report.",
        source=self._params.root, skipped={}, label_counts={}, study_sizes={})

  def _read_label_names(self, root: str) -> list[str]:
    if self._chexpert_csv is None:
      logging.warning("%s not found in %s: the dataset has no labels", CHEXPERT_CSV, root)
      return []
    f, reader = common.open_csv(self._chexpert_csv)
    with f:
      names = [c for c in reader.fieldnames or [] if c not in ("subject_id", "study_id")]
      if "" in names:
        logging.warning("%s: a column without a name (an index column?) is not a label", self._chexpert_csv)
      names = [c for c in names if c]
      common.require_columns(reader, ("subject_id", "study_id", *names), self._chexpert_csv)
      return names

  def _read_labels(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(study -> labels, study -> why its labels cannot be used: file, line and value)."""
    labels, bad, lines = {}, {}, {}
    if self._chexpert_csv is None:
      return labels, bad
    f, reader = common.open_csv(self._chexpert_csv)
    with f:
      for row in reader:
        line = reader.first_line
        subject_id, study_id = _ids(row, self._chexpert_csv, line)
        study = _study_key(subject_id, study_id)
        values, problem = [], None
        for name in self._label_names:
          value = _field(row, name)
          number = float("nan") if value.lower() in _MISSING_VALUES else _number(value)
          if number is None or not (np.isnan(number) or number in (-1.0, 0.0, 1.0)):
            problem = problem or (f"{self._chexpert_csv} line {line}: {name}={value!r} is not 1, 0, -1 "
                                  "(uncertain), blank or NaN")
          values.append(np.nan if number is None else number)
        if problem:
          bad.setdefault(study, problem)
        elif study in labels and not np.array_equal(labels[study], np.asarray(values, np.float32),
                                                    equal_nan=True):
          bad.setdefault(study, f"{self._chexpert_csv} lines {lines[study]} and {line}: the study is listed "
                                "twice with different labels")
        else:
          labels.setdefault(study, np.asarray(values, np.float32))
          lines.setdefault(study, line)
    return labels, bad

  def _read_views(self) -> dict[str, str]:
    if self._metadata_csv is None:
      return {}
    f, reader = common.open_csv(self._metadata_csv)
    with f:
      common.require_columns(reader, ("dicom_id", "ViewPosition"), self._metadata_csv)
      return {_field(row, "dicom_id"): _field(row, "ViewPosition").upper() for row in reader}

  def _read_splits(self) -> dict[str, list[_Image]]:
    views = self._read_views()
    frontal = set(self._params.frontal_views)
    splits = {name: [] for name in common.SPLITS}
    excluded = 0
    f, reader = common.open_csv(self._split_csv)
    with f:
      common.require_columns(reader, ("dicom_id", "study_id", "subject_id", "split"), self._split_csv)
      first_line = {}
      for row in reader:
        line = reader.first_line
        subject_id, study_id = _ids(row, self._split_csv, line)
        split = _SPLIT_NAMES.get(_field(row, "split").lower())
        if split is None:
          raise DataError(f"{self._split_csv} line {line}: split={_field(row, 'split')!r} must be "
                          "one of train, validate, test")
        dicom_id = _field(row, "dicom_id")
        if not dicom_id or "/" in dicom_id or dicom_id in (".", ".."):
          raise DataError(f"{self._split_csv} line {line}: dicom_id={dicom_id!r} is not a file name")
        if self._params.frontal_only and views.get(dicom_id) not in frontal:
          excluded += 1
          continue
        study = _study_key(subject_id, study_id)
        first = first_line.setdefault((study, dicom_id), line)
        splits[split].append(_Image(study, dicom_id, line, first if first != line else 0))
    if self._params.frontal_only:
      logging.info("MIMIC-CXR: excluded %d images whose ViewPosition is not one of %s", excluded,
                   ", ".join(sorted(frontal)))
    return {name: sorted(images, key=lambda im: (im.study, im.dicom_id))
            for name, images in splits.items() if images}

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # manual download: everything is read from params.root
    splits = self._read_splits()
    if not splits:
      raise DataError(f"{self._split_csv} lists no image to use (frontal_only={self._params.frontal_only})")
    reports = _Reports(self._params.root)
    studies = {image.study for images in splits.values() for image in images}
    found = any(reports.has(study) for study in studies)
    reports.close()
    if not found:
      zip_path = os.path.join(self._params.root, REPORTS_ZIP)
      raise DataError(f"no report found for any study: missing {zip_path} "
                      "(or the extracted files/pXX/pXXXXXXXX/sXXXXXXXX.txt). "
                      + LAYOUT.format(root=self._params.root))
    labels, bad_labels = self._read_labels()
    return {name: self._generate_examples(name, images, labels, bad_labels)
            for name, images in splits.items()}

  def _study_text(self, reports: _Reports, study: str) -> tuple[str, str | None, str | None]:
    """(report, text, reason) of one study; reason says why it cannot be used."""
    report = reports.read(study)
    if report is None:
      return "", None, common.MISSING_REPORT
    text, reason = common.report_text(report, self._params.min_sentence_tokens)
    return report, text, reason

  def _generate_examples(self, split: str, images: list[_Image], labels: dict[str, np.ndarray],
                         bad_labels: dict[str, str]) -> Iterator[tuple[int, dict]]:
    bad = common.BadRecords(self.name, split, self._strict)
    counts = common.LabelCounts(self._label_names)
    reports = _Reports(self._params.root)
    no_labels = np.full((len(self._label_names),), np.nan, np.float32)
    files = os.path.join(self._params.root, "files")

    def candidates() -> Iterator[common.Candidate]:
      study, study_text = None, None
      for image in images:
        if image.study != study:  # images are sorted by study: each report is read and parsed once
          study, study_text = image.study, self._study_text(reports, image.study)
        report, text, reason = study_text
        detail = f"report {image.study}.txt"
        if image.duplicate_of:
          reason, detail = common.DUPLICATE, (f"{self._split_csv} line {image.line} lists it again (first at "
                                              f"line {image.duplicate_of})")
        elif reason is None and image.study in bad_labels:
          reason, detail = common.BAD_LABEL, bad_labels[image.study]
        features = None if reason else {"id": image.id, "report": report, "text": text,
                                        "labels": labels.get(image.study, no_labels)}
        yield common.Candidate(image.id, os.path.join(files, image.id), features, reason, detail)

    sizes, study = [], None  # records per study, in record order (images are sorted by study)
    for key, example in counts.counted(common.examples_with_images(
        candidates(), bad, size=self._params.stored_size, num_threads=self._threads)):
      if _study_of(example["id"]) != study:
        study = _study_of(example["id"])
        sizes.append(0)
      sizes[-1] += 1
      yield key, example
    reports.close()
    print(f"{self.name} {split}: {len(sizes)} studies, {sum(sizes) / len(sizes):.2f} images per study",
          flush=True)
    self.info.metadata["skipped"][split] = dict(bad.counts)
    self.info.metadata["label_counts"][split] = counts.as_dict()
    self.info.metadata["study_sizes"][split] = sizes
