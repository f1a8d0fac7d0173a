"""The paper's downstream classification sets (RSNA, CheXpert, COVIDx, MURA), built from tiny fake trees.

Each fake tree has the layout of the data set's own download. Every dataset is built end to end through
`datasets.load_dataset` into tmp_path and read back through the TFDS data source, without TensorFlow.
"""
import logging
import os
import random
import shutil

import numpy as np
from PIL import Image
import pydicom
from pydicom.dataset import Dataset
import pytest
import tensorflow_datasets as tfds

from convirt_jax import config as config_lib
from convirt_jax.data import datasets
from convirt_jax.data.builders import chexpert
from convirt_jax.data.builders import classification
from convirt_jax.data.builders import common
from convirt_jax.data.builders import dicom
from convirt_jax.data.builders import mura
from convirt_jax.errors import ConfigError, DataError
import fake_data  # shared fake data of the builders' tests

tfds.disable_progress_bar()

HEIGHT, WIDTH = 24, 20  # every fake image; stored at 19 x 16


def _by_split(dataset) -> dict[str, list[dict]]:
  return {split: fake_data.records(source) for split, source in dataset.sources.items()}


def _resized(gray: np.ndarray) -> np.ndarray:
  return np.asarray(common.resize_shorter_side(Image.fromarray(gray), fake_data.SIZE), np.float64)


def _ramp(dtype=np.uint8, hi=255) -> np.ndarray:
  """A smooth horizontal ramp: survives JPEG and bicubic resizing within a few grey levels."""
  return np.tile(np.linspace(0, hi, WIDTH).round().astype(dtype), (HEIGHT, 1))


# --- DICOM ----------------------------------------------------------------------------------------


def _hand_window(stored, slope, intercept, center, width):
  """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) on the rescaled values, mapped to 0..255 by hand."""
  value = stored.astype(np.float64) * slope + intercept
  fraction = np.clip((value - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
  return np.rint(fraction * 255).astype(np.uint8)


def test_dicom_monochrome1_is_inverted_and_8_bit_values_kept(tmp_path):
  pixels = np.arange(HEIGHT * WIDTH, dtype=np.uint8).reshape(HEIGHT, WIDTH)
  fake_data.write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1")
  fake_data.write_dicom(tmp_path / "m2.dcm", pixels)
  np.testing.assert_array_equal(dicom.read_gray8(str(tmp_path / "m1.dcm")), 255 - pixels)
  np.testing.assert_array_equal(dicom.read_gray8(str(tmp_path / "m2.dcm")), pixels)


def test_dicom_16_bit_rescale_then_window_matches_the_hand_computation(tmp_path):
  stored = _ramp(np.uint16, 4095)  # 12 bits stored in 16
  fake_data.write_dicom(tmp_path / "w.dcm", stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1000,
                        WindowCenter=3000, WindowWidth=4001)
  gray = dicom.read_gray8(str(tmp_path / "w.dcm"))
  expected = _hand_window(stored, 2, -1000, 3000, 4001)
  np.testing.assert_array_equal(gray, expected)
  assert gray.min() == 0 and gray.max() == 255 and 0 < np.median(gray) < 255  # saturated at both ends
  # The same with MONOCHROME1: windowed, then inverted.
  fake_data.write_dicom(tmp_path / "w1.dcm", stored, photometric="MONOCHROME1", bits_stored=12,
                        RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=4001)
  np.testing.assert_array_equal(dicom.read_gray8(str(tmp_path / "w1.dcm")), 255 - expected)


def test_dicom_16_bit_without_window_is_stretched_and_voi_lut_is_applied(tmp_path):
  stored = _ramp(np.uint16, 3000) + 1000
  fake_data.write_dicom(tmp_path / "plain.dcm", stored, bits_stored=12)
  np.testing.assert_array_equal(dicom.read_gray8(str(tmp_path / "plain.dcm")),
                                np.rint((stored - 1000.0) * 255.0 / 3000.0).astype(np.uint8))
  # A VOI LUT (preferred over the window also present): entries 0..1023 map stored 0..4095 by 4.
  item = Dataset()
  item.LUTDescriptor = [4096, 0, 16]
  item.LUTData = [v // 4 for v in range(4096)]
  item["LUTData"].VR = "US"
  stored = _ramp(np.uint16, 4095)
  fake_data.write_dicom(tmp_path / "lut.dcm", stored, bits_stored=12, VOILUTSequence=pydicom.Sequence([item]),
                        WindowCenter=100, WindowWidth=10)
  expected = np.rint((stored // 4) * 255.0 / 1023.0).astype(np.uint8)
  np.testing.assert_array_equal(dicom.read_gray8(str(tmp_path / "lut.dcm")), expected)


def test_dicom_unreadable_or_missing_is_a_bad_image(tmp_path):
  (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
  with pytest.raises(common.BadImage) as error:
    dicom.read_gray8(str(tmp_path / "bad.dcm"))
  assert error.value.reason == common.CORRUPT_IMAGE and "bad.dcm" in str(error.value)
  with pytest.raises(common.BadImage) as error:
    dicom.read_gray8(str(tmp_path / "none.dcm"))
  assert error.value.reason == common.MISSING_IMAGE


# --- Splits ---------------------------------------------------------------------------------------


def _pool(num_patients, rng=None, prefix="p"):
  items = []
  for p in range(num_patients):
    for view in range(1 if rng is None else int(rng.integers(1, 4))):
      items.append(classification.Item(f"line {len(items) + 2}", f"{prefix}{p}/{view}", "", f"{prefix}{p}",
                                       np.ones((1,), np.float32)))
  return items


def _membership(splits):
  return {item.image_id: split for split, items in splits.items() for item in items}


def test_hold_out_is_by_patient_seeded_and_independent_of_line_order():
  pool = _pool(300, np.random.default_rng(0))
  held_out = {"test": 3000, "validation": 1500}
  first = classification.hold_out(pool, held_out, 25184, seed=0, dataset="t")
  shuffled = list(pool)
  random.Random(1).shuffle(shuffled)
  assert _membership(classification.hold_out(shuffled, held_out, 25184, seed=0, dataset="t")) == \
      _membership(first)
  other_seed = classification.hold_out(pool, held_out, 25184, seed=1, dataset="t")
  assert _membership(other_seed) != _membership(first)
  patients = {}
  for split, items in first.items():
    for item in items:
      assert patients.setdefault(item.patient, split) == split  # no patient in two splits
  # Proportions of 25,184 / 1,500 / 3,000 on len(pool) images, up to one patient (<= 3 images) more.
  for split, paper in (("test", 3000), ("validation", 1500)):
    target = round(len(pool) * paper / 29684)
    assert target <= len(first[split]) <= target + 2
  assert sum(len(v) for v in first.values()) == len(pool)


def test_hold_out_gives_paper_sizes_to_a_full_download_and_proportions_to_a_smaller_one(caplog):
  held_out = {"test": 3000, "validation": 1500}
  with caplog.at_level(logging.WARNING):
    full = classification.hold_out(_pool(29684), held_out, 25184, seed=0, dataset="RSNA")
  assert {k: len(v) for k, v in full.items()} == {"train": 25184, "validation": 1500, "test": 3000}
  assert "fewer than the paper's" not in caplog.text
  with caplog.at_level(logging.WARNING):
    small = classification.hold_out(_pool(26684), held_out, 25184, seed=0, dataset="RSNA")
  assert {k: len(v) for k, v in small.items()} == {"train": 22639, "validation": 1348, "test": 2697}
  assert "RSNA: the download has 26684 usable images to split, fewer than the paper's 29684" in caplog.text


# --- RSNA Pneumonia -------------------------------------------------------------------------------

RSNA_SPECIAL = {  # patient -> what is special about it
    "rsna-000": "monochrome1", "rsna-001": "window16", "rsna-002": "missing", "rsna-003": "corrupt",
    "rsna-004": "disagree", "rsna-005": "target2",
}
RSNA_BAD = {"missing", "corrupt", "disagree", "target2"}


def _fake_rsna(root, num_patients=40, bad=tuple(RSNA_BAD)):
  """stage_2_train_labels.csv (several rows for a positive patient) and stage_2_train_images/<id>.dcm."""
  images = root / "stage_2_train_images"
  images.mkdir(parents=True)
  rows = []
  for i in range(num_patients):
    patient = f"rsna-{i:03d}"
    kind = RSNA_SPECIAL.get(patient, "plain")
    if kind in RSNA_BAD and kind not in bad:
      kind = "plain"
    target = i % 2 if i > 5 else 1
    if kind == "monochrome1":
      fake_data.write_dicom(images / f"{patient}.dcm", _ramp(), photometric="MONOCHROME1")
    elif kind == "window16":
      fake_data.write_dicom(images / f"{patient}.dcm", _ramp(np.uint16, 4095), bits_stored=12, RescaleSlope=2,
                            RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=4001)
    elif kind == "corrupt":
      (images / f"{patient}.dcm").write_bytes(b"not a dicom file")
    elif kind != "missing":
      fake_data.write_dicom(images / f"{patient}.dcm", _ramp())
    if kind == "disagree":
      rows += [(patient, 10, 20, 30, 40, 1), (patient, "", "", "", "", 0)]
    elif kind == "target2":
      rows.append((patient, "", "", "", "", 2))
    elif target == 1:  # one row per box
      rows += [(patient, 264, 152, 213, 379, 1), (patient, 562, 152, 256, 453, 1)]
    else:
      rows.append((patient, "", "", "", "", 0))
  fake_data.write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"],
                      rows)
  return root


def _patient_splits(dataset, patient_of) -> dict[str, str]:
  patients = {}
  for split, records in _by_split(dataset).items():
    for record in records:
      assert patients.setdefault(patient_of(record["id"]), split) == split, record["id"]
  return patients


def test_rsna_builds_binary_labels_from_dicoms_with_bad_records_counted(tmp_path, capsys):
  root = _fake_rsna(tmp_path / "rsna")
  dataset = datasets.load_dataset(fake_data.dir_config("rsna", root), str(tmp_path / "tfds"))
  assert dataset.label_names == ["Pneumonia"] and dataset.task == "multilabel"
  splits = _by_split(dataset)
  # 38 patients with a usable label: test round(38 * 3000 / 29684) = 4, validation 2 (one image each); the
  # 4 bad records are skipped from the splits their patients fell in (seed 0: 3 in train, 1 in test).
  assert {k: len(v) for k, v in splits.items()} == {"train": 30, "validation": 2, "test": 4}
  assert fake_data.skipped(dataset) == {common.MISSING_IMAGE: 1, common.CORRUPT_IMAGE: 1,
                                        classification.BAD_LABEL: 2}
  assert "convirt_rsna_pneumonia train: wrote 30 records, skipped 3" in capsys.readouterr().out
  records = {r["id"]: r for rs in splits.values() for r in rs}
  for i in range(6, 40):
    record = records[f"stage_2_train_images/rsna-{i:03d}.dcm"]
    np.testing.assert_array_equal(record["labels"], [i % 2])
    assert record["report"] == "" and record["text"] == ""  # no reports, and none skipped for it
    assert record["image"].shape == (19, 16)
  np.testing.assert_array_equal(records["stage_2_train_images/rsna-000.dcm"]["labels"], [1.0])
  # MONOCHROME1: stored inverted; 16-bit: rescaled and windowed (JPEG q95 + resizing: a few levels).
  inverted = records["stage_2_train_images/rsna-000.dcm"]["image"].astype(np.float64)
  assert np.abs(inverted - _resized(255 - _ramp())).mean() < 2
  windowed = records["stage_2_train_images/rsna-001.dcm"]["image"].astype(np.float64)
  expected = _resized(_hand_window(_ramp(np.uint16, 4095), 2, -1000, 3000, 4001))
  assert np.abs(windowed - expected).mean() < 2
  _patient_splits(dataset, lambda record_id: record_id)  # one image per patient: ids are patients
  # Deterministic: the same seed elsewhere gives the same splits.
  again = datasets.load_dataset(fake_data.dir_config("rsna", root), str(tmp_path / "tfds2"))
  assert {s: [r["id"] for r in rs] for s, rs in _by_split(again).items()} == {
      s: [r["id"] for r in rs] for s, rs in splits.items()}


@pytest.mark.parametrize("bad, reason, patient, line", [
    ("corrupt", common.CORRUPT_IMAGE, "rsna-003", 8),  # patients 0-5 are positive here: two rows each
    ("missing", common.MISSING_IMAGE, "rsna-002", 6),
    ("disagree", classification.BAD_LABEL, "rsna-004", 10),
    ("target2", classification.BAD_LABEL, "rsna-005", 12),
])
def test_rsna_strict_names_the_file_and_line(tmp_path, bad, reason, patient, line):
  root = _fake_rsna(tmp_path / "rsna", num_patients=12, bad=(bad,))
  with pytest.raises(DataError, match=rf"{reason} in record stage_2_train_labels.csv line {line} "
                     rf"\(stage_2_train_images/{patient}.dcm\)"):
    datasets.load_dataset(fake_data.dir_config("rsna", root, strict=True), str(tmp_path / "tfds"))


# --- CheXpert -------------------------------------------------------------------------------------

CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
                    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                    "Pleural Other", "Fracture", "Support Devices"]
# Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion of patient00001's frontal view.
CHEXPERT_P1 = {"Atelectasis": "-1.0", "Cardiomegaly": "", "Consolidation": "1.0", "Edema": "0.0",
               "Pleural Effusion": "-1.0", "Pneumonia": "-1.0"}


def _chexpert_row(path, view, labels):
  values = {"Path": path, "Sex": "Female", "Age": "68", "Frontal/Lateral": view,
            "AP/PA": "AP" if view == "Frontal" else "", **labels}
  return [values.get(column, "") for column in CHEXPERT_COLUMNS]


def _fake_chexpert(root, folder="CheXpert-v1.0-small", num_patients=30, drop_column=None):
  """train.csv / valid.csv with Path relative to the download's parent, frontal and lateral JPEGs."""
  download = root / folder
  rng = np.random.default_rng(0)
  values = ["1.0", "0.0", "-1.0", ""]
  rows = {"train": [], "valid": []}
  patients = {"train": [f"patient{i:05d}" for i in range(1, num_patients + 1)],
              "valid": ["patient64541", "patient64542", "patient64543"]}
  for split, names in patients.items():
    for patient in names:
      for view, file in (("Frontal", "view1_frontal.jpg"), ("Lateral", "view2_lateral.jpg")):
        path = f"{folder}/{split}/{patient}/study1/{file}"
        if not (split == "train" and patient == "patient00003" and view == "Frontal"):  # missing image
          array = np.clip(rng.normal(128, 20, (HEIGHT, WIDTH)), 0, 255).astype(np.uint8)
          os.makedirs(download / split / patient / "study1", exist_ok=True)
          Image.fromarray(array).save(download / split / patient / "study1" / file, quality=95)
        if patient == "patient00001" and view == "Frontal":
          labels = CHEXPERT_P1
        elif patient == "patient00002" and view == "Frontal":
          labels = {"Edema": "2.0"}  # outside 1 / 0 / -1 / empty
        else:
          labels = {name: values[int(rng.integers(0, 4)) if split == "train" else int(rng.integers(0, 2))]
                    for name in chexpert.LABEL_NAMES}
        rows[split].append(_chexpert_row(path, view, labels))
  rows["train"].append(_chexpert_row(f"{folder}/train/patient00004/study2/view1_frontal.jpg", "Frontal",
                                     {})[:3])  # a short line
  header = [c for c in CHEXPERT_COLUMNS if c != drop_column]
  for split in rows:
    keep = [i for i, c in enumerate(CHEXPERT_COLUMNS) if c != drop_column]
    fake_data.write_csv(download / f"{split}.csv", header,
                        [[r[i] for i in keep if i < len(r)] for r in rows[split]])
  return root


def _chexpert_patient(record_id):
  return classification.path_component(record_id, "patient")


def test_chexpert_frontal_five_labels_uncertain_as_zeros_and_valid_as_test(tmp_path):
  root = _fake_chexpert(tmp_path / "chexpert")
  dataset = datasets.load_dataset(fake_data.dir_config("chexpert", root), str(tmp_path / "tfds"))
  assert dataset.label_names == list(chexpert.LABEL_NAMES) and dataset.task == "multilabel"
  assert dataset.info.metadata["uncertainty"] == "zeros" and dataset.info.metadata["frontal_only"]
  splits = _by_split(dataset)
  # The official valid.csv is the test split: its 3 frontal images.
  assert [r["id"] for r in splits["test"]] == [
      f"CheXpert-v1.0-small/valid/patient6454{i}/study1/view1_frontal.jpg" for i in (1, 2, 3)]
  # 30 frontal train images, 29 with a usable label: validation round(29 * 5000 / 223414) -> 1 (seed 0: with
  # the patient of the bad label, which does not count); train keeps the rest and the short line.
  assert len(splits["validation"]) == 1 and len(splits["train"]) == 27
  assert all(r["id"].endswith("_frontal.jpg") for rs in splits.values() for r in rs)
  assert fake_data.skipped(dataset) == {
      common.MISSING_IMAGE: 1, classification.BAD_LABEL: 1, classification.MALFORMED_ROW: 1}
  records = {r["id"]: r for rs in splits.values() for r in rs}
  p1 = records["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"]
  np.testing.assert_array_equal(p1["labels"], [0, 0, 1, 0, 0])  # -1 -> 0, empty -> 0
  assert p1["image"].shape == (19, 16) and p1["report"] == "" and p1["text"] == ""
  for record in records.values():
    assert set(np.unique(record["labels"])) <= {0.0, 1.0}
  _patient_splits(dataset, _chexpert_patient)


def test_chexpert_all_views_uncertain_ignored_full_download_folder(tmp_path):
  root = _fake_chexpert(tmp_path / "chexpert", folder="CheXpert-v1.0")
  # data.dir may also be the download folder itself.
  dataset = datasets.load_dataset(fake_data.dir_config("chexpert", root / "CheXpert-v1.0", frontal_only=False,
                                                       uncertainty="ignore"), str(tmp_path / "tfds"))
  splits = _by_split(dataset)
  assert len(splits["test"]) == 6 and sum(len(v) for v in splits.values()) == 6 + 60 - 2
  records = {r["id"]: r for rs in splits.values() for r in rs}
  assert "CheXpert-v1.0/train/patient00001/study1/view2_lateral.jpg" in records
  np.testing.assert_array_equal(
      records["CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg"]["labels"],
      [np.nan, 0, 1, 0, np.nan])
  patients = _patient_splits(dataset, _chexpert_patient)
  assert {split for patient, split in patients.items() if patient.startswith("patient6454")} == {"test"}


def test_chexpert_uncertainty_policies():
  assert [chexpert._label(v, chexpert.UNCERTAINTY["ones"]) for v in ("1.0", "0.0", "-1.0", "", "1")] == [
      1.0, 0.0, 1.0, 0.0, 1.0]
  assert chexpert._label("-1.0", chexpert.UNCERTAINTY["zeros"]) == 0.0
  assert np.isnan(chexpert._label("-1", chexpert.UNCERTAINTY["ignore"]))
  assert chexpert._label("2.0", 0.0) is None and chexpert._label("yes", 0.0) is None
  config = fake_data.dir_config("chexpert", "/nowhere", uncertainty="maybe")
  with pytest.raises(DataError, match="config.data.uncertainty='maybe'"):
    chexpert.params_from_config(config)


def test_chexpert_strict_names_the_file_and_line(tmp_path):
  root = _fake_chexpert(tmp_path / "chexpert")
  with pytest.raises(DataError, match=r"missing_image in record CheXpert-v1.0-small/train.csv line 6 "
                     r"\(CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg\): no such file"):
    datasets.load_dataset(fake_data.dir_config("chexpert", root, strict=True), str(tmp_path / "tfds"))


def test_chexpert_missing_label_column_stops_before_building(tmp_path):
  root = _fake_chexpert(tmp_path / "chexpert", num_patients=3, drop_column="Edema")
  with pytest.raises(DataError, match=r"train.csv: missing required column 'Edema'"):
    datasets.load_dataset(fake_data.dir_config("chexpert", root), str(tmp_path / "tfds"))
  assert not (tmp_path / "tfds").exists()


# --- COVIDx ---------------------------------------------------------------------------------------


def _fake_covidx(root, two_class=False, list_names=("train.txt", "test.txt")):
  """train.txt in the 4-column format (with a data source), test.txt in the older 3-column format."""
  classes = ["positive", "negative"] if two_class else ["COVID-19", "pneumonia", "normal"]
  rng = np.random.default_rng(0)
  lines = {"train": [], "test": []}
  for split, count in (("train", 24), ("test", 6)):
    for i in range(count):
      patient = f"{split[:2]}{i}"
      for view in range(1 + (i % 3 == 0)):  # some patients have two images
        filename = f"{patient}-{view}.png" if i != 7 else f"{patient} {view}.png"  # a space in the name
        rgb = np.clip(rng.normal(120, 25, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
        fake_data.save_image(str(root / split / filename), rgb)
        cls = classes[i % len(classes)]
        lines[split].append(f"{patient} {filename} {cls} cohen" if split == "train" else
                            f"{patient} {filename} {cls}")
  lines["train"].append("tr99 tr99-0.png unknown rsna")   # a class outside the three
  (root / "train" / "tr99-0.png").write_bytes(b"")
  lines["train"].append("tr98")                           # a malformed line
  (root / list_names[0]).write_text("\n".join(lines["train"]) + "\n")
  (root / list_names[1]).write_text("\n".join(lines["test"]) + "\n\n")
  return root


def test_covidx_three_classes_one_hot_from_both_line_formats(tmp_path):
  root = _fake_covidx(tmp_path / "covidx")
  dataset = datasets.load_dataset(fake_data.dir_config("covidx", root), str(tmp_path / "tfds"))
  assert dataset.label_names == ["normal", "pneumonia", "COVID-19"] and dataset.task == "multiclass"
  splits = _by_split(dataset)
  # train.txt: 24 patients, 32 images; validation round(32 * 300 / 13898) -> 1, plus that patient's others.
  assert 1 <= len(splits["validation"]) <= 2 and len(splits["train"]) + len(splits["validation"]) == 32
  assert len(splits["test"]) == 8
  assert dataset.info.metadata["skipped"]["train"] == {classification.BAD_LABEL: 1,
                                                       classification.MALFORMED_ROW: 1}
  records = {r["id"]: r for rs in splits.values() for r in rs}
  expected = {"COVID-19": [0, 0, 1], "pneumonia": [0, 1, 0], "normal": [1, 0, 0]}
  for i in range(6):
    cls = ["COVID-19", "pneumonia", "normal"][i % 3]
    np.testing.assert_array_equal(records[f"train/tr{i}-0.png"]["labels"], expected[cls])
    np.testing.assert_array_equal(records[f"test/te{i}-0.png"]["labels"], expected[cls])
  assert "train/tr7 0.png" in records and records["test/te0-0.png"]["image"].shape == (19, 16)
  _patient_splits(dataset, lambda record_id: record_id.split("/")[1].split("-")[0].split(" ")[0])


def test_covidx_refuses_a_two_class_release_and_finds_covidx_list_names(tmp_path):
  root = _fake_covidx(tmp_path / "two", two_class=True)
  with pytest.raises(DataError, match=r"train.txt line 1: class 'positive': this is a 2-class COVIDx "):
    datasets.make_builder(fake_data.dir_config("covidx", root), str(tmp_path / "tfds"))
  root = _fake_covidx(tmp_path / "v5", list_names=("train_COVIDx5.txt", "test_COVIDx5.txt"))
  with pytest.raises(DataError, match=r"bad_label in record train_COVIDx5.txt line 33 \(train/tr99-0.png\): "
                     r"class 'unknown' must be COVID-19, pneumonia or normal"):
    datasets.load_dataset(fake_data.dir_config("covidx", root, strict=True), str(tmp_path / "tfds"))


# --- MURA -----------------------------------------------------------------------------------------


def _fake_mura(root, missing_study=True):
  """MURA-v1.1 image lists and labelled studies (no headers), two body parts, two images per study."""
  download = root / "MURA-v1.1"
  rng = np.random.default_rng(0)
  image_rows, study_rows = {"train": [], "valid": []}, {"train": [], "valid": []}
  patients = {"train": range(1, 21), "valid": range(11185, 11189)}
  for split, numbers in patients.items():
    for n in numbers:
      part = "XR_SHOULDER" if n % 2 else "XR_WRIST"
      label = n % 3 == 0
      study = f"MURA-v1.1/{split}/{part}/patient{n:05d}/study1_{'positive' if label else 'negative'}/"
      for image in (1, 2):
        array = np.clip(rng.normal(100, 30, (HEIGHT, WIDTH)), 0, 255).astype(np.uint8)
        fake_data.save_image(str(root / study / f"image{image}.png"), array)
        image_rows[split].append([study + f"image{image}.png"])
      if n == 5 and missing_study:
        continue  # a study missing from the labelled studies
      study_rows[split].append([study, "2" if n == 7 else int(label)])
  for split in image_rows:
    fake_data.write_csv(download / f"{split}_image_paths.csv", None, image_rows[split])
    fake_data.write_csv(download / f"{split}_labeled_studies.csv", None, study_rows[split])
  return root


def test_mura_labels_from_studies_valid_as_test_body_part_in_id(tmp_path):
  root = _fake_mura(tmp_path / "mura")
  dataset = datasets.load_dataset(fake_data.dir_config("mura", root), str(tmp_path / "tfds"))
  assert dataset.label_names == ["Abnormal"] and dataset.task == "multilabel"
  splits = _by_split(dataset)
  assert len(splits["test"]) == 8 and all("/valid/" in r["id"] for r in splits["test"])
  # 36 of 40 train images with a usable label: validation round(36 * 3730 / 36808) = 4 (two patients);
  # train keeps 36 images, 4 of which are skipped (the studies of patients 5 and 7).
  assert len(splits["validation"]) == 4 and len(splits["train"]) == 32
  assert fake_data.skipped(dataset) == {common.MISSING_LABEL: 2, classification.BAD_LABEL: 2}
  records = {r["id"]: r for rs in splits.values() for r in rs}
  shoulder = "MURA-v1.1/train/XR_SHOULDER/patient00003/study1_positive/image2.png"
  np.testing.assert_array_equal(records[shoulder]["labels"], [1.0])
  assert mura.body_part(shoulder) == "XR_SHOULDER"
  np.testing.assert_array_equal(
      records["MURA-v1.1/valid/XR_SHOULDER/patient11185/study1_negative/image1.png"]["labels"], [0.0])
  assert {mura.body_part(i) for i in records} == {"XR_SHOULDER", "XR_WRIST"}
  _patient_splits(dataset, _chexpert_patient)


@pytest.mark.parametrize("missing_study, message", [
    (True, r"missing_label in record train_image_paths.csv line 9 \(MURA-v1.1/train/XR_SHOULDER/patient00005/"
     r"study1_negative/image1.png\): study train/XR_SHOULDER/patient00005/study1_negative is not in "
     r"train_labeled_studies.csv"),
    (False, r"bad_label in record train_image_paths.csv line 13 \(MURA-v1.1/train/XR_SHOULDER/patient00007/"
     r"study1_negative/image1.png\): train_labeled_studies.csv line 7: label='2' must be 0 or 1"),
])
def test_mura_strict_names_the_file_and_line(tmp_path, missing_study, message):
  root = _fake_mura(tmp_path / "mura", missing_study=missing_study)
  with pytest.raises(DataError, match=message):
    datasets.load_dataset(fake_data.dir_config("mura", root, strict=True), str(tmp_path / "tfds"))


# --- Missing downloads ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, make, remove, problem, parts", [
    ("rsna", lambda r: _fake_rsna(r, num_patients=2), "stage_2_train_labels.csv",
     r"missing .*stage_2_train_labels.csv",
     ["kaggle.com/competitions/rsna-pneumonia-detection-challenge", "Kaggle account",
      "stage_2_train_images/<patientId>.dcm"]),
    ("rsna", lambda r: _fake_rsna(r, num_patients=2), "stage_2_train_images",
     r"missing the image folder .*stage_2_train_images/", ["Kaggle account"]),
    ("chexpert", lambda r: _fake_chexpert(r, num_patients=2), "CheXpert-v1.0-small/valid.csv",
     r"missing .*valid.csv", ["stanfordmlgroup.github.io/competitions/chexpert", "registration",
                              "CheXpert-v1.0-small/train.csv"]),
    ("chexpert", lambda r: _fake_chexpert(r, num_patients=2), "CheXpert-v1.0-small",
     r"no train.csv in .* nor in its CheXpert-v1.0-small/ or CheXpert-v1.0/", ["registration"]),
    ("covidx", _fake_covidx, "test", r"missing the image folder .*test/",
     ["github.com/lindawangg/COVID-Net", "patient_id filename class"]),
    ("mura", _fake_mura, "MURA-v1.1/valid_labeled_studies.csv", r"missing .*valid_labeled_studies.csv",
     ["stanfordmlgroup.github.io/competitions/mura", "registration", "train_image_paths.csv"]),
])
def test_missing_download_stops_before_building_naming_files_and_source(tmp_path, name, make, remove, problem,
                                                                        parts):
  root = make(tmp_path / name)
  target = root / remove
  shutil.rmtree(target) if target.is_dir() else target.unlink()
  with pytest.raises(DataError, match=problem) as error:
    datasets.load_dataset(fake_data.dir_config(name, root), str(tmp_path / "tfds"))
  for part in parts:
    assert part in str(error.value)
  assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("name", ["rsna", "chexpert", "covidx", "mura"])
def test_config_accepts_the_downstream_sets_and_requires_their_directory(tmp_path, name):
  config = fake_data.dir_config(name, tmp_path)
  config.model.text.init_from = "x"
  config_lib.validate(config)
  config.data.dir = ""
  with pytest.raises(ConfigError, match="config.data.dir is empty"):
    config_lib.validate(config)
  with pytest.raises(DataError, match="config.data.dir is empty"):
    datasets.load_dataset(config, str(tmp_path / "tfds"))
  with pytest.raises(DataError, match="does not exist"):
    datasets.load_dataset(fake_data.dir_config(name, tmp_path / "nowhere"), str(tmp_path / "tfds"))
