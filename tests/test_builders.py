"""TFDS builders (synthetic, MIMIC-CXR-JPG layout, CSV of pairs) and load_dataset, on tiny data made here.

Every dataset is built into tmp_path and read back through the TFDS data source, without TensorFlow.
"""
import csv
import functools
import gzip
import io
import os
import shutil
import threading
import time
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from convirt_jax.config import base_config
from convirt_jax.data import datasets
from convirt_jax.data import radiology_reports
from convirt_jax.data import synthetic_cxr
from convirt_jax.data.builders import common
from convirt_jax.data.builders import csv_pairs
from convirt_jax.data.builders import synthetic as synthetic_builder
from convirt_jax.errors import DataError
import fake_data  # shared fake data of the builders' tests

tfds.disable_progress_bar()

# --- Images ---------------------------------------------------------------------------------------


def test_to_gray8_scales_16_bit_by_its_own_range_and_drops_alpha():
  ramp = np.tile(np.linspace(1000, 3000, 9).round().astype(np.uint16), (3, 1))
  gray = np.asarray(common.to_gray8(Image.fromarray(ramp)))
  np.testing.assert_array_equal(gray, np.rint((ramp - 1000.0) * 255.0 / 2000.0).astype(np.uint8))
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  rgba = np.concatenate([rgb, np.full((5, 7, 1), 7, np.uint8)], axis=-1)
  np.testing.assert_array_equal(np.asarray(common.to_gray8(Image.fromarray(rgba))),
                                np.asarray(Image.fromarray(rgb).convert("L")))
  flat = np.full((4, 4), 500, np.uint16)
  np.testing.assert_array_equal(np.asarray(common.to_gray8(Image.fromarray(flat))), 0)


@pytest.mark.parametrize("size_in, size_out", [((60, 40), (24, 16)), ((40, 60), (16, 24)),
                                               ((12, 8), (24, 16)), ((16, 16), (16, 16)),
                                               ((17, 1000), (16, 941))])
def test_resize_shorter_side(size_in, size_out):
  assert common.resize_shorter_side(Image.new("L", size_in), 16).size == size_out


def test_jpeg_draft_decoding_matches_full_decoding():
  # A smooth 512x384 image decoded at a reduced DCT scale then resized vs decoded in full then resized.
  y, x = np.mgrid[0:384, 0:512]
  smooth = (127 + 100 * np.sin(x / 40.0) * np.cos(y / 50.0)).astype(np.uint8)
  encoded = common.encode(smooth, "JPEG")
  fast = np.asarray(common.load_gray(encoded, 64), np.float64)
  full = np.asarray(common.resize_shorter_side(Image.open(io.BytesIO(encoded)).convert("L"), 64), np.float64)
  assert fast.shape == full.shape == (64, 85)
  assert np.abs(fast - full).mean() < 1.5  # measured ~0.4 grey levels


# --- Synthetic ------------------------------------------------------------------------------------


def _synthetic_config(**synthetic_params):
  config = base_config()
  config.data.stored_size = 32
  s = config.data.synthetic
  s.num_train, s.num_validation, s.num_test = 5, 2, 2
  s.retrieval_per_category, s.retrieval_queries_per_category = 2, 1
  for key, value in synthetic_params.items():
    s[key] = value
  return config


def test_synthetic_builds_and_reads_back_what_the_generator_made(tmp_path):
  dataset = datasets.load_dataset(_synthetic_config(), str(tmp_path))
  assert {k: len(v) for k, v in dataset.sources.items()} == {
      "train": 5, "validation": 2, "test": 2, "retrieval_candidates": 16, "retrieval_queries": 8}
  assert dataset.label_names == list(synthetic_cxr.LABEL_NAMES)
  assert dataset.task == "multilabel"
  assert dataset.retrieval_text_queries == synthetic_cxr.RETRIEVAL_TEXT_QUERIES
  assert dataset.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  # Readable by name through TFDS too (no TensorFlow): the same records.
  path = datasets.prepared_dir(_synthetic_config(), str(tmp_path))
  name, config_name, version = path.split(os.sep)[-3:]
  by_name = tfds.data_source(f"{name}/{config_name}:{version}", data_dir=str(tmp_path), split="test")
  assert ([r["report"] for r in fake_data.records(by_name)]
          == [r["report"] for r in fake_data.records(dataset.sources["test"])])
  raw = dataset.sources["train"][3]
  assert isinstance(raw["text"], bytes) and isinstance(raw["id"], bytes)
  assert raw["image"].shape == (32, 32, 1) and raw["image"].dtype == np.uint8
  for split in ("train", "test"):
    for index, record in enumerate(fake_data.records(dataset.sources[split])):
      study = synthetic_cxr.generate_study(0, split, index, 32)
      assert record["id"] == f"synthetic/{split}/{index}"
      np.testing.assert_array_equal(record["image"], study["image"])  # PNG: lossless
      np.testing.assert_array_equal(record["labels"], study["labels"])
      assert record["report"] == study["report"]
      assert record["text"] == "\n".join(radiology_reports.report_sentences(study["report"]))
  for split, per_category in (("retrieval_candidates", 2), ("retrieval_queries", 1)):
    labels = np.stack([r["labels"] for r in fake_data.records(dataset.sources[split])])
    np.testing.assert_array_equal(labels.sum(axis=1), 1.0)  # exactly one positive
    np.testing.assert_array_equal(labels.argmax(axis=1), np.arange(len(labels)) // per_category)


def test_synthetic_config_name_changes_with_every_parameter(tmp_path, monkeypatch):
  base = synthetic_builder.params_from_config(_synthetic_config())
  changed = [synthetic_builder.params_from_config(_synthetic_config(**{key: value}))
             for key, value in [("num_train", 6), ("num_validation", 3), ("num_test", 3),
                                ("retrieval_per_category", 3), ("retrieval_queries_per_category", 2),
                                ("seed", 1)]]
  resized = _synthetic_config()
  resized.data.stored_size = 48
  changed.append(synthetic_builder.params_from_config(resized))
  names = {p.config_name for p in [base, *changed]}
  assert len(names) == 1 + len(changed)
  assert synthetic_builder.params_from_config(_synthetic_config()).config_name == base.config_name

  config = _synthetic_config(num_train=3, num_validation=0, num_test=0, retrieval_per_category=0,
                             retrieval_queries_per_category=0)
  first = datasets.load_dataset(config, str(tmp_path))
  assert list(first.sources) == ["train"]  # splits without records are not made
  # A second load reuses the build: the builder is not even constructed.
  monkeypatch.setattr(datasets, "make_builder", lambda *a, **k: pytest.fail("rebuilt an existing dataset"))
  again = datasets.load_dataset(config, str(tmp_path))
  assert ([r["id"] for r in fake_data.records(again.sources["train"])]
          == [f"synthetic/train/{i}" for i in range(3)])
  other = datasets.prepared_dir(_synthetic_config(num_train=4), str(tmp_path))
  assert other != datasets.prepared_dir(config, str(tmp_path)) and not os.path.exists(other)


# --- CSV of pairs ---------------------------------------------------------------------------------


def test_csv_reads_every_image_kind_to_gray_shorter_side(tmp_path):
  rows = []
  # (file, expected grey level of a constant image, height, width)
  cases = [
      (fake_data.save_image(tmp_path / "gray.png", np.full((20, 30), 90, np.uint8)), 90, 16, 24),
      (fake_data.save_image(tmp_path / "rgb.jpg", np.full((40, 20, 3), (200, 100, 50), np.uint8),
                            quality=100),
       round(0.299 * 200 + 0.587 * 100 + 0.114 * 50), 32, 16),
      (fake_data.save_image(tmp_path / "rgba.png", np.full((8, 8, 4), (10, 200, 30, 0), np.uint8)),
       round(0.299 * 10 + 0.587 * 200 + 0.114 * 30), 16, 16),
      (fake_data.save_image(tmp_path / "gray.jpg", np.full((64, 48), 170, np.uint8)), 170, 21, 16),
  ]
  ramp16 = np.tile(np.linspace(300, 4000, 64).astype(np.uint16), (32, 1))
  fake_data.save_image(tmp_path / "ramp16.png", ramp16)
  palette = Image.fromarray(np.full((16, 16, 3), (0, 0, 255), np.uint8)).convert("P")
  palette.save(tmp_path / "palette.png")
  cases.append(("palette.png", round(0.114 * 255), 16, 16))
  for file, *_ in cases:
    rows.append((file, f"The {file} image shows clear lungs.", "train", "1", ""))
  rows.append(("ramp16.png", "A sixteen bit ramp image here.", "validation", "-1", "0"))
  fake_data.write_csv(tmp_path / "pairs.csv", ["image", "text", "split", "edema", "effusion"], rows)

  config = fake_data.csv_config(tmp_path / "pairs.csv", label_columns=("edema", "effusion"))
  dataset = datasets.load_dataset(config, str(tmp_path / "tfds"))
  assert dataset.label_names == ["edema", "effusion"] and dataset.task == "multilabel"
  records = fake_data.by_id(dataset)
  for file, level, height, width in cases:
    image = records[file]["image"]
    assert image.dtype == np.uint8 and image.shape == (height, width), file
    assert np.abs(image.astype(int) - level).max() <= 1, file  # JPEG q95 of a flat image: +-1
    np.testing.assert_array_equal(records[file]["labels"], [1.0, np.nan])
  ramp = records["ramp16.png"]["image"].astype(float)
  assert ramp.shape == (16, 32)
  expected = np.interp(np.arange(32) * 2 + 0.5, np.arange(64), (ramp16[0] - 300) * 255.0 / 3700.0)
  assert np.abs(ramp.mean(axis=0) - expected).max() < 4  # measured ~1.3 (JPEG + bicubic at the edges)
  assert ramp.min() <= 3 and ramp.max() >= 250  # 16-bit range stretched to 8 bits
  np.testing.assert_array_equal(records["ramp16.png"]["labels"], [-1.0, 0.0])


def test_csv_text_is_findings_and_impression_or_all_sentences(tmp_path):
  fake_data.save_image(tmp_path / "a.png", np.zeros((16, 16), np.uint8))
  headed = ("INDICATION: Cough for two weeks.\nFINDINGS: The lungs are clear. Heart size is normal.\n"
            "IMPRESSION: No acute cardiopulmonary process.")
  plain = "Small left pleural effusion. Mild cardiomegaly is present."
  fake_data.write_csv(tmp_path / "pairs.csv", ["image", "text", "split"], [("a.png", headed, "train"),
                                                                   ("a.png", plain, "test")])
  dataset = datasets.load_dataset(fake_data.csv_config(tmp_path / "pairs.csv"), str(tmp_path / "tfds"))
  (train,), (test,) = fake_data.records(dataset.sources["train"]), fake_data.records(dataset.sources["test"])
  assert train["text"] == ("The lungs are clear.\nHeart size is normal.\nNo acute cardiopulmonary process.")
  assert train["report"] == headed
  assert test["text"] == "Small left pleural effusion.\nMild cardiomegaly is present."
  assert train["labels"].shape == (0,) and dataset.label_names == []


def test_planned_split_is_80_10_10_by_rows():
  rng = np.random.default_rng(0)
  groups = {f"patient-{i}": (int(rng.integers(1, 4)), np.zeros(0), np.zeros(0)) for i in range(3000)}
  plan = csv_pairs.plan_splits(groups)
  rows = {name: sum(groups[k][0] for k, s in plan.items() if s == name) for name in common.SPLITS}
  total = sum(rows.values())
  assert abs(rows["train"] / total - 0.8) < 0.002 and abs(rows["validation"] / total - 0.1) < 0.002
  assert abs(rows["test"] / total - 0.1) < 0.002
  assert csv_pairs.plan_splits(dict(reversed(list(groups.items())))) == plan  # input order does not matter


def test_csv_group_split_keeps_groups_together_and_is_deterministic(tmp_path):
  rows = []
  for group in range(30):
    for view in range(3):
      name = f"g{group}_{view}.png"
      fake_data.save_image(tmp_path / name, np.full((8, 8), group, np.uint8))
      rows.append((name, f"Report of patient {group} view {view}.", f"patient-{group}"))
  fake_data.write_csv(tmp_path / "pairs.csv", ["image", "text", "group"], rows)
  fake_data.write_csv(tmp_path / "shuffled.csv", ["image", "text", "group"], rows[::-1])

  def membership(csv_name):
    dataset = datasets.load_dataset(fake_data.csv_config(tmp_path / csv_name), str(tmp_path / "tfds"))
    return {r["id"]: split for split, source in dataset.sources.items() for r in fake_data.records(source)}

  first, second = membership("pairs.csv"), membership("shuffled.csv")
  assert first == second and len(first) == 90
  for group in range(30):
    assert len({first[f"g{group}_{view}.png"] for view in range(3)}) == 1
  assert set(first.values()) == set(common.SPLITS)


def test_csv_categorical_column_is_one_hot_multiclass(tmp_path):
  fake_data.save_image(tmp_path / "a.png", np.zeros((16, 16), np.uint8))
  views = ["PA", "AP", "LATERAL", "AP", ""]
  rows = [("a.png", f"Study number {i} is unremarkable.", "train", view) for i, view in enumerate(views)]
  fake_data.write_csv(tmp_path / "pairs.csv", ["image", "text", "split", "view"], rows)
  # Classes of 1 or 2 rows: "auto" does not guess, the task must be confirmed.
  with pytest.raises(DataError, match=r"'view' was inferred to be categorical .* 'AP' \(2 rows: lines 3, "
                                      r"5\), 'LATERAL' \(1 row: line 4\), 'PA' \(1 row: line 2\).*"
                                      r"task='multiclass'"):
    datasets.make_builder(fake_data.csv_config(tmp_path / "pairs.csv", label_columns=("view",)),
                          str(tmp_path / "tfds"))
  dataset = datasets.load_dataset(
      fake_data.csv_config(tmp_path / "pairs.csv", label_columns=("view",), task="multiclass"),
      str(tmp_path / "tfds"))
  assert dataset.label_names == ["AP", "LATERAL", "PA"] and dataset.task == "multiclass"
  labels = np.stack([r["labels"] for r in fake_data.records(dataset.sources["train"])])
  np.testing.assert_array_equal(labels, [[0, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0, 0]])
  assert dataset.info.metadata["skipped"]["train"] == {common.MISSING_LABEL: 1}


def test_csv_label_column_errors(tmp_path):
  fake_data.write_csv(tmp_path / "pairs.csv", ["image", "text", "edema", "view"],
                      [("a.png", "Lungs are clear today.", "1", "PA"),
                       ("b.png", "Lungs are clear today.", "0", "2")])
  with pytest.raises(DataError, match=r"label column 'view' is binary but for '2' \(1 row: line 3\), 'PA' "
                                      r"\(1 row: line 2\).*"
                                      r"task='multilabel'"):
    datasets.make_builder(fake_data.csv_config(tmp_path / "pairs.csv", label_columns=("edema", "view")),
                          str(tmp_path))
  with pytest.raises(DataError, match=r"needs exactly one label column"):
    datasets.make_builder(fake_data.csv_config(tmp_path / "pairs.csv", label_columns=("edema", "view"),
                                               task="multiclass"), str(tmp_path))
  many = [(f"{i}.png", "Lungs are clear today.", "1", "PA" if i % 2 else "1") for i in range(10)]
  fake_data.write_csv(tmp_path / "many.csv", ["image", "text", "edema", "view"], many)
  with pytest.raises(DataError, match=r"line 3: label column 'view' has value 'PA'; with several"):
    datasets.make_builder(fake_data.csv_config(tmp_path / "many.csv", label_columns=("edema", "view")),
                          str(tmp_path))
  with pytest.raises(DataError, match=r"pairs.csv: missing required column 'effusion'"):
    datasets.make_builder(fake_data.csv_config(tmp_path / "pairs.csv", label_columns=("edema", "effusion")),
                          str(tmp_path))


@pytest.mark.parametrize("header, missing", [(["image", "report"], "text"), (["path", "text"], "image")])
def test_csv_missing_required_column_stops_before_reading_images(tmp_path, header, missing):
  fake_data.write_csv(tmp_path / "pairs.csv", header, [("nowhere.png", "Lungs are clear today.")])
  with pytest.raises(DataError, match=rf"pairs.csv: missing required column '{missing}'"):
    datasets.load_dataset(fake_data.csv_config(tmp_path / "pairs.csv"), str(tmp_path / "tfds"))


def test_csv_bad_split_value_names_the_line(tmp_path):
  fake_data.save_image(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
  fake_data.write_csv(tmp_path / "pairs.csv", ["image", "text", "split"],
                      [("a.png", "Lungs are clear today.", "train"),
                       ("a.png", "Lungs are clear today.", "holdout")])
  with pytest.raises(DataError, match=r"line 3: split='holdout'"):
    datasets.load_dataset(fake_data.csv_config(tmp_path / "pairs.csv"), str(tmp_path / "tfds"))


GOOD_ROW = ("good.png", "FINDINGS: Lungs are clear. IMPRESSION: No acute process seen.", "train")
BAD_ROWS = {
    common.CORRUPT_IMAGE: ("corrupt.jpg", "Lungs are clear today.", "train"),
    "truncated": ("truncated.jpg", "Lungs are clear today.", "train"),
    common.MISSING_IMAGE: ("missing.png", "Lungs are clear today.", "train"),
    common.EMPTY_REPORT: ("good.png", "   ", "train"),
    common.NO_FINDINGS: ("good.png", "INDICATION: Cough.\nCOMPARISON: None.", "train"),
}


def _bad_input_csv(tmp_path, rows):
  fake_data.save_image(tmp_path / "good.png", np.zeros((16, 16), np.uint8))
  (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
  (tmp_path / "truncated.jpg").write_bytes(common.encode(np.zeros((64, 64), np.uint8), "JPEG")[:200])
  fake_data.write_csv(tmp_path / "pairs.csv", ["image", "text", "split"], rows)
  return tmp_path / "pairs.csv"


def test_bad_records_are_skipped_and_counted(tmp_path, capsys):
  rows = [GOOD_ROW, *BAD_ROWS.values(), ("good.png", "Mild cardiomegaly is present.", "test")]
  dataset = datasets.load_dataset(fake_data.csv_config(_bad_input_csv(tmp_path, rows)),
                                  str(tmp_path / "tfds"))
  assert {k: len(v) for k, v in dataset.sources.items()} == {"train": 1, "test": 1}
  expected = {common.CORRUPT_IMAGE: 2, common.MISSING_IMAGE: 1, common.EMPTY_REPORT: 1, common.NO_FINDINGS: 1}
  assert dataset.info.metadata["skipped"] == {"train": expected, "test": {}}
  out = capsys.readouterr().out
  assert ("convirt_csv_pairs train: wrote 1 records, skipped 5 (corrupt_image: 2, empty_report: 1, "
          "missing_image: 1, no_findings_or_impression: 1)") in out


@pytest.mark.parametrize("reason, file", [
    (common.CORRUPT_IMAGE, "corrupt.jpg"), ("truncated", "truncated.jpg"),
    (common.MISSING_IMAGE, "missing.png"),
    (common.EMPTY_REPORT, "good.png"), (common.NO_FINDINGS, "good.png")])
def test_strict_stops_at_the_bad_record_naming_it(tmp_path, reason, file):
  csv_path = _bad_input_csv(tmp_path, [GOOD_ROW, BAD_ROWS[reason]])
  reason = common.CORRUPT_IMAGE if reason == "truncated" else reason
  with pytest.raises(DataError, match=rf"{reason} in record .*pairs.csv line 3 \({file}\)"):
    datasets.load_dataset(fake_data.csv_config(csv_path, strict=True), str(tmp_path / "tfds"))


def test_a_split_left_empty_is_an_error(tmp_path):
  fake_data.write_csv(tmp_path / "pairs.csv", ["image", "text", "split"],
                      [("missing.png", "Lungs are clear today.", "train")])
  with pytest.raises(DataError, match="convirt_csv_pairs train: no usable record"):
    datasets.load_dataset(fake_data.csv_config(tmp_path / "pairs.csv"), str(tmp_path / "tfds"))


def test_csv_split_without_split_column_is_stratified_by_label_within_groups(tmp_path):
  # 40 patients x 2 views. Positives: "common" in every other patient, "rare" in 3 patients, "pair" in 2,
  # "single" in 1 (a hash split of so few groups often leaves a split with one class).
  rows = []
  for patient in range(40):
    for view in range(2):
      name = f"p{patient}_{view}.png"
      fake_data.save_image(tmp_path / name, np.full((8, 8), patient, np.uint8))
      labels = [patient % 2, patient in (5, 17, 33), patient in (8, 21), patient == 12]
      rows.append((name, f"Patient {patient} view {view} report.", f"patient-{patient}",
                   *(str(int(v)) for v in labels)))
  names = ["common", "rare", "pair", "single"]
  fake_data.write_csv(tmp_path / "pairs.csv", ["image", "text", "group", *names], rows)
  dataset = datasets.load_dataset(fake_data.csv_config(tmp_path / "pairs.csv", label_columns=tuple(names)),
                                  str(tmp_path / "tfds"))
  records = {split: fake_data.records(source) for split, source in dataset.sources.items()}
  assert set(records) == set(common.SPLITS) and sum(map(len, records.values())) == 80
  split_of = {r["id"]: split for split, rs in records.items() for r in rs}
  for patient in range(40):
    assert split_of[f"p{patient}_0.png"] == split_of[f"p{patient}_1.png"]  # patients never cross splits
  positives = {split: np.stack([r["labels"] for r in rs]).sum(axis=0) for split, rs in records.items()}
  sizes = {split: len(rs) for split, rs in records.items()}
  for split in common.SPLITS:
    for j in (0, 1):  # common and rare: both classes in every split
      assert 0 < positives[split][j] < sizes[split], (split, names[j])
  assert positives["train"][2] > 0 and positives["test"][2] > 0  # two positive patients: train and test
  assert sizes["train"] >= 56 and sizes["validation"] >= 6 and sizes["test"] >= 6
  # The counts are in the metadata, and say what the probe cannot score.
  for split, rs in records.items():
    labels = np.stack([r["labels"] for r in rs])
    assert dataset.info.metadata["label_counts"][split] == {
        name: {"positive": int((labels[:, j] == 1).sum()), "negative": int((labels[:, j] == 0).sum()),
               "uncertain": 0, "not_mentioned": 0} for j, name in enumerate(names)}
  assert datasets.unscorable_labels(dataset) == {
      "single": f"single class in the test split: 0 positive, {sizes['test']} negative ({sizes['test']} "
                "labelled 0, 0 uncertain, 0 not mentioned)"}
  assert set(datasets.unscorable_labels(dataset, ("validation",))) == {"pair", "single"}


def test_unscorable_labels_counts_the_records_when_the_metadata_has_no_counts(tmp_path):
  dataset = datasets.load_dataset(_synthetic_config(num_test=3), str(tmp_path))  # synthetic: no label_counts
  labels = np.stack([r["labels"] for r in fake_data.records(dataset.sources["test"])])
  expected = {name for j, name in enumerate(dataset.label_names)
              if labels[:, j].all() or not labels[:, j].any()}
  assert set(datasets.unscorable_labels(dataset, ("test",))) == expected
  first = dataset.label_names[0]
  assert datasets.label_counts(dataset, "test")[first]["positive"] == int((labels[:, 0] == 1).sum())


def test_strict_load_refuses_a_dataset_built_without_strict_that_skipped_records(tmp_path):
  csv_path = _bad_input_csv(tmp_path, [GOOD_ROW, BAD_ROWS[common.CORRUPT_IMAGE],
                                       BAD_ROWS[common.MISSING_IMAGE],
                                       ("good.png", "Mild cardiomegaly is present.", "test")])
  tfds_dir = str(tmp_path / "tfds")
  datasets.load_dataset(fake_data.csv_config(csv_path), tfds_dir)
  strict = fake_data.csv_config(csv_path, strict=True)
  path = datasets.prepared_dir(strict, tfds_dir)
  # strict does not name the directory
  assert path == datasets.prepared_dir(fake_data.csv_config(csv_path), tfds_dir)
  with pytest.raises(DataError) as error:
    datasets.load_dataset(strict, tfds_dir, is_builder_process=False)  # every process refuses it
  message = str(error.value)
  for part in ("config.data.strict=True", path, "train: corrupt_image 1, missing_image 1", f"rm -r {path}",
               "config.data.tfds_dir"):
    assert part in message
  assert "test:" not in message  # nothing skipped there
  shutil.rmtree(path)  # as the message says: the rebuild is strict and stops at the bad record
  with pytest.raises(DataError, match=r"corrupt_image in record .*pairs.csv line 3"):
    datasets.load_dataset(strict, tfds_dir)
  assert not os.path.exists(path)
  fake_data.write_csv(tmp_path / "clean.csv", ["image", "text", "split"], [GOOD_ROW])
  datasets.load_dataset(fake_data.csv_config(tmp_path / "clean.csv"), tfds_dir)
  clean = datasets.load_dataset(fake_data.csv_config(tmp_path / "clean.csv", strict=True), tfds_dir)
  assert len(clean.sources["train"]) == 1


def test_csv_stray_label_value_stops_auto_and_is_a_bad_label_once_binary_is_confirmed(tmp_path):
  fake_data.save_image(tmp_path / "a.png", np.zeros((16, 16), np.uint8))
  values = ["1", "0"] * 10 + ["maybe", "nan", "", "NA", "2"]
  rows = [("a.png", f"Report number {i} shows clear lungs.", "train", v) for i, v in enumerate(values)]
  fake_data.write_csv(tmp_path / "pairs.csv", ["image", "text", "split", "edema"], rows)
  config = lambda **data: fake_data.csv_config(tmp_path / "pairs.csv", label_columns=("edema",), **data)
  tfds_dir = str(tmp_path / "tfds")
  with pytest.raises(DataError, match=r"pairs.csv: label column 'edema' was inferred to be categorical "
                                      r"\(task 'multiclass', one class per value\) from its values '0' \(10 "
                                      r"rows\), '1' \(10 rows\), '2' \(1 row: line 26\), 'maybe' \(1 row: "
                                      r"line 22\), only because of '2' .*, 'maybe' .*task='binary'.*"
                                      r"task='multiclass'"):
    datasets.load_dataset(config(), tfds_dir)
  with pytest.raises(DataError, match=r"bad_label in record .*pairs.csv line 22 \(a.png\): edema='maybe' "
                                      r"is not 1, 0, -1 \(uncertain\), blank or NaN"):
    datasets.load_dataset(config(task="binary", strict=True), tfds_dir)
  binary = datasets.load_dataset(config(task="binary"), tfds_dir)
  assert binary.task == "multilabel" and binary.label_names == ["edema"]
  assert binary.info.metadata["skipped"]["train"] == {common.BAD_LABEL: 2}
  labels = [r["labels"][0] for r in fake_data.records(binary.sources["train"])]
  assert labels[:20] == [1.0, 0.0] * 10 and len(labels) == 23
  assert np.isnan(labels[20:]).all()  # nan, "", NA: not mentioned
  assert binary.info.metadata["label_counts"]["train"]["edema"] == {
      "positive": 10, "negative": 10, "uncertain": 0, "not_mentioned": 3}
  multiclass = datasets.load_dataset(config(task="multiclass"), tfds_dir)
  assert multiclass.label_names == ["0", "1", "2", "maybe"] and multiclass.task == "multiclass"
  assert multiclass.info.metadata["skipped"]["train"] == {common.MISSING_LABEL: 3}
  # A value that is not rare makes a categorical label without asking.
  fake_data.write_csv(tmp_path / "views.csv", ["image", "text", "split", "edema"],
                      [(f"{i}.png", "Lungs are clear.", "train", v)
                       for i, v in enumerate(["1", "0", "maybe"] * 4)])
  builder = datasets.make_builder(fake_data.csv_config(tmp_path / "views.csv", label_columns=("edema",)),
                                  tfds_dir)
  assert builder.info.metadata["task"] == "multiclass" and builder.info.metadata["label_names"] == [
      "0", "1", "maybe"]


# --- MIMIC-CXR-JPG --------------------------------------------------------------------------------

CHEXPERT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
            "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
            "Pneumothorax", "Support Devices"]

MIMIC_REPORTS = {
    "50000001": """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___M with dyspnea  // eval for effusion
 
 COMPARISON:  ___.
 
 FINDINGS: 
 
 The heart is moderately enlarged.  There is mild interstitial edema, possibly
 slightly improved.  Possible small right pleural effusion.
 
 IMPRESSION: 
 
 Cardiomegaly with mild interstitial edema.
""",
    "50000002": """                                 FINAL REPORT
 EXAMINATION:  CHEST PORTABLE AP
 
 INDICATION:  ___ year old man s/p line placement.
 
 IMPRESSION: 
 
 Right internal jugular catheter ends in the mid SVC.  No pneumothorax is seen.
""",
    "50000003": """                                 FINAL REPORT
 HISTORY:  Fever.
 
 PA AND LATERAL VIEWS OF THE CHEST:  Lungs are clear without consolidation.
 The cardiomediastinal silhouette is normal.
""",
    "50000004": """ FINAL REPORT
 FINDINGS:  No focal consolidation, pleural effusion, or pneumothorax.  Heart size
 is normal.
 
 IMPRESSION:  No acute cardiopulmonary process.
 
 NOTIFICATION:  Findings were discussed with Dr. ___ at 10:15 a.m. on ___.
""",
    "50000005": """                                 FINAL REPORT
 INDICATION:  ___F with chest pain.
 
 COMPARISON:  None.
""",
    "50000006": "FINDINGS: Stable mild cardiomegaly is seen.\n",
    "50000007": "",
    "50000008": "FINDINGS: Left lower lobe opacity is present.\n",
}

# (subject, study, dicom, view, split); the lateral and the missing/corrupt images are the odd ones out.
MIMIC_IMAGES = [
    ("10000032", "50000001", "d01-pa", "PA", "train"),
    ("10000032", "50000001", "d02-lat", "LATERAL", "train"),
    ("10000032", "50000002", "d03-ap", "AP", "train"),
    ("11000011", "50000003", "d04-pa", "PA", "validate"),
    ("12000012", "50000004", "d05-pa", "PA", "test"),
    ("12000012", "50000005", "d06-pa", "PA", "test"),   # report without findings/impression
    ("12000012", "50000006", "d07-pa", "PA", "train"),  # image missing
    ("12000012", "50000007", "d08-pa", "PA", "train"),  # empty report
    ("12000012", "50000008", "d09-pa", "PA", "train"),  # corrupt image
    ("12000012", "50000009", "d10-pa", "PA", "train"),  # no report
]

CHEXPERT_ROWS = {  # study -> {label: value}; blank = not mentioned; 50000003 is absent from the file
    "50000001": {"Cardiomegaly": "1.0", "Edema": "1.0", "Pleural Effusion": "-1.0"},
    "50000002": {"Support Devices": "1.0", "Pneumothorax": "0.0"},
    "50000004": {"No Finding": "1.0", "Pleural Effusion": "0.0", "Pneumothorax": "0.0"},
}


def _open_text(path, gz):
  return gzip.open(str(path) + ".gz", "wt", newline="") if gz else open(path, "w", newline="")


def _fake_mimic(root, *, reports_as="txt", gz=False, chexpert=True):
  """A tiny MIMIC-CXR-JPG tree (PhysioNet layout) with the reports as .txt files or as the zip."""
  files = root / "files"
  rng = np.random.default_rng(0)
  for subject, study, dicom, _, _ in MIMIC_IMAGES:
    folder = files / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
    folder.mkdir(parents=True, exist_ok=True)
    if dicom == "d07-pa":
      continue
    if dicom == "d09-pa":
      (folder / f"{dicom}.jpg").write_bytes(b"\xff\xd8\xff garbage")
      continue
    image = np.clip(rng.normal(120, 30, (40, 32)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(folder / f"{dicom}.jpg", quality=95)
  if reports_as == "txt":
    for subject, study, *_ in MIMIC_IMAGES:
      if study in MIMIC_REPORTS:
        (files / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt").write_text(MIMIC_REPORTS[study])
  elif reports_as == "zip":
    with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w") as z:
      for subject, study in dict.fromkeys((s[0], s[1]) for s in MIMIC_IMAGES if s[1] in MIMIC_REPORTS):
        z.writestr(f"files/p{subject[:2]}/p{subject}/s{study}.txt", MIMIC_REPORTS[study])
  with _open_text(root / "mimic-cxr-2.0.0-split.csv", gz) as f:
    w = csv.writer(f)
    w.writerow(["dicom_id", "study_id", "subject_id", "split"])
    w.writerows([dicom, study, subject, split] for subject, study, dicom, _, split in MIMIC_IMAGES)
  with _open_text(root / "mimic-cxr-2.0.0-metadata.csv", gz) as f:
    w = csv.writer(f)
    w.writerow(["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                "Rows", "Columns"])
    w.writerows([dicom, subject, study, "CHEST (PA AND LAT)", view, 40, 32]
                for subject, study, dicom, view, _ in MIMIC_IMAGES)
  if chexpert:
    with _open_text(root / "mimic-cxr-2.0.0-chexpert.csv", gz) as f:
      w = csv.writer(f)
      w.writerow(["subject_id", "study_id", *CHEXPERT])
      for subject, study in dict.fromkeys((s[0], s[1]) for s in MIMIC_IMAGES):
        if study in CHEXPERT_ROWS:
          w.writerow([subject, study, *(CHEXPERT_ROWS[study].get(name, "") for name in CHEXPERT)])
  return root


_mimic_config = functools.partial(fake_data.dir_config, "mimic_cxr")


def _expected_labels(study):
  values = CHEXPERT_ROWS.get(study, {})
  return np.asarray([float(values[n]) if n in values else np.nan for n in CHEXPERT], np.float32)


def test_mimic_builds_one_record_per_frontal_image_with_its_report_and_chexpert_labels(tmp_path, capsys):
  root = _fake_mimic(tmp_path / "mimic")
  dataset = datasets.load_dataset(_mimic_config(root), str(tmp_path / "tfds"))
  assert dataset.label_names == CHEXPERT and dataset.task == "multilabel"
  ids = {split: [r["id"] for r in fake_data.records(source)] for split, source in dataset.sources.items()}
  assert ids == {"train": ["p10/p10000032/s50000001/d01-pa.jpg", "p10/p10000032/s50000002/d03-ap.jpg"],
                 "validation": ["p11/p11000011/s50000003/d04-pa.jpg"],
                 "test": ["p12/p12000012/s50000004/d05-pa.jpg"]}
  records = fake_data.by_id(dataset)
  for record_id, record in records.items():
    study = record_id.split("/")[2][1:]
    assert record["report"] == MIMIC_REPORTS[study]
    assert record["text"] == "\n".join(radiology_reports.report_sentences(MIMIC_REPORTS[study]))
    np.testing.assert_array_equal(record["labels"], _expected_labels(study))  # NaN == NaN here
    assert record["image"].shape == (20, 16) and record["image"].dtype == np.uint8
  assert records["p10/p10000032/s50000001/d01-pa.jpg"]["text"] == (
      "The heart is moderately enlarged.\nThere is mild interstitial edema, possibly slightly improved.\n"
      "Possible small right pleural effusion.\nCardiomegaly with mild interstitial edema.")
  labels = records["p10/p10000032/s50000001/d01-pa.jpg"]["labels"]
  assert labels[CHEXPERT.index("Cardiomegaly")] == 1 and labels[CHEXPERT.index("Pleural Effusion")] == -1
  assert np.isnan(labels[CHEXPERT.index("Pneumonia")])
  assert np.isnan(records["p11/p11000011/s50000003/d04-pa.jpg"]["labels"]).all()  # not in the CheXpert file
  assert dataset.info.metadata["skipped"] == {
      "train": {common.MISSING_IMAGE: 1, common.EMPTY_REPORT: 1, common.CORRUPT_IMAGE: 1,
                common.MISSING_REPORT: 1},
      "validation": {}, "test": {common.NO_FINDINGS: 1}}
  out = capsys.readouterr().out
  assert "convirt_mimic_cxr test: wrote 1 records, skipped 1 (no_findings_or_impression: 1)" in out


def test_mimic_reports_zip_and_gzipped_csvs_give_the_same_dataset(tmp_path):
  from_txt = datasets.load_dataset(_mimic_config(_fake_mimic(tmp_path / "a")), str(tmp_path / "tfds"))
  from_zip = datasets.load_dataset(_mimic_config(_fake_mimic(tmp_path / "b", reports_as="zip", gz=True)),
                                   str(tmp_path / "tfds"))
  a, b = fake_data.by_id(from_txt), fake_data.by_id(from_zip)
  assert sorted(a) == sorted(b) and len(a) == 4
  for record_id in a:
    for key in ("text", "report"):
      assert a[record_id][key] == b[record_id][key]
    np.testing.assert_array_equal(a[record_id]["labels"], b[record_id]["labels"])
    np.testing.assert_array_equal(a[record_id]["image"], b[record_id]["image"])


def test_mimic_all_views_and_no_chexpert_file(tmp_path, capsys):
  root = _fake_mimic(tmp_path / "mimic", chexpert=False)
  dataset = datasets.load_dataset(_mimic_config(root, frontal_only=False), str(tmp_path / "tfds"))
  assert "p10/p10000032/s50000001/d02-lat.jpg" in fake_data.by_id(dataset)
  assert dataset.label_names == [] and dataset.sources["train"][0]["labels"].shape == (0,)
  # Study s50000001 has a PA and a lateral image: its records are adjacent and counted as one study.
  assert [r["id"] for r in fake_data.records(dataset.sources["train"])] == [
      "p10/p10000032/s50000001/d01-pa.jpg", "p10/p10000032/s50000001/d02-lat.jpg",
      "p10/p10000032/s50000002/d03-ap.jpg"]
  assert datasets.study_sizes(dataset, "train").tolist() == [2, 1]
  assert datasets.study_sizes(dataset, "test").tolist() == [1]
  assert "convirt_mimic_cxr train: 2 studies, 1.50 images per study" in capsys.readouterr().out


def test_study_sizes_none_without_studies_and_checked_against_the_records(tmp_path):
  dataset = datasets.load_dataset(_mimic_config(_fake_mimic(tmp_path / "mimic")), str(tmp_path / "tfds"))
  assert datasets.study_sizes(dataset, "train").tolist() == [1, 1]  # frontal views only
  dataset.info.metadata["study_sizes"]["train"] = [1, 2]
  with pytest.raises(DataError, match=r"study_sizes \(2 studies, 3 records\) do not match its 2 records"):
    datasets.study_sizes(dataset, "train")
  del dataset.info.metadata["study_sizes"]
  assert datasets.study_sizes(dataset, "train") is None


def test_mimic_strict_names_the_bad_record(tmp_path):
  root = _fake_mimic(tmp_path / "mimic")
  with pytest.raises(DataError, match=r"missing_image in record p12/p12000012/s50000006/d07-pa.jpg"):
    datasets.load_dataset(_mimic_config(root, strict=True), str(tmp_path / "tfds"))


@pytest.mark.parametrize("remove, message", [
    ("mimic-cxr-2.0.0-split.csv", r"missing .*mimic-cxr-2.0.0-split.csv\[.gz\]"),
    ("mimic-cxr-2.0.0-metadata.csv", r"missing .*mimic-cxr-2.0.0-metadata.csv\[.gz\]"),
    ("files", r"missing the image folder .*files/"),
    ("reports", r"no report found for any study: missing .*mimic-cxr-reports.zip"),
])
def test_mimic_missing_file_names_it_and_the_expected_layout(tmp_path, remove, message):
  root = _fake_mimic(tmp_path / "mimic")
  if remove == "files":
    shutil.rmtree(root / "files")
  elif remove == "reports":
    for txt in (root / "files").rglob("*.txt"):
      txt.unlink()
  else:
    (root / remove).unlink()
  with pytest.raises(DataError, match=message) as error:
    datasets.load_dataset(_mimic_config(root), str(tmp_path / "tfds"))
  for part in ("MIMIC-CXR-JPG", "https://physionet.org/content/mimic-cxr-jpg/",
               "https://physionet.org/content/mimic-cxr/", "files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg"):
    assert part in str(error.value)


def test_mimic_bad_chexpert_value_is_a_bad_label_or_names_the_line(tmp_path):
  root = _fake_mimic(tmp_path / "mimic")
  path = root / "mimic-cxr-2.0.0-chexpert.csv"
  path.write_text(path.read_text().replace("-1.0", "maybe").replace("0.0", "NaN", 1))
  with pytest.raises(DataError, match=r"bad_label in record p10/p10000032/s50000001/d01-pa.jpg: "
                                      r".*chexpert.csv line 2: Pleural Effusion='maybe' is not 1, 0, -1"):
    datasets.load_dataset(_mimic_config(root, strict=True), str(tmp_path / "tfds"))
  dataset = datasets.load_dataset(_mimic_config(root), str(tmp_path / "tfds"))
  assert dataset.info.metadata["skipped"]["train"][common.BAD_LABEL] == 1
  labels = fake_data.by_id(dataset)["p10/p10000032/s50000002/d03-ap.jpg"]["labels"]
  assert np.isnan(labels[CHEXPERT.index("Pneumothorax")])  # "NaN" written out: not mentioned


# --- load_dataset and decode_record ---------------------------------------------------------------


def test_non_builder_process_waits_for_the_build(tmp_path):
  config = _synthetic_config(num_train=2, num_validation=0, num_test=0, retrieval_per_category=0,
                             retrieval_queries_per_category=0)
  with pytest.raises(DataError, match="was not built within"):
    datasets.load_dataset(config, str(tmp_path), is_builder_process=False, wait_timeout_s=0.2,
                          poll_interval_s=0.05)
  waiting = {}
  waiter = threading.Thread(target=lambda: waiting.update(dataset=datasets.load_dataset(
      config, str(tmp_path), is_builder_process=False, wait_timeout_s=60, poll_interval_s=0.05)))
  waiter.start()
  time.sleep(0.3)
  assert waiter.is_alive()  # nothing built yet
  built = datasets.load_dataset(config, str(tmp_path))
  waiter.join(timeout=60)
  assert [r["id"] for r in fake_data.records(waiting["dataset"].sources["train"])] == [
      r["id"] for r in fake_data.records(built.sources["train"])]


def test_unknown_dataset_name(tmp_path):
  config = base_config()
  config.data.name = "imagenet"
  with pytest.raises(DataError, match="config.data.name='imagenet'"):
    datasets.load_dataset(config, str(tmp_path))


def test_decode_record():
  raw = {"id": b"x/1", "image": np.zeros((3, 4, 1), np.uint8), "report": b"FINDINGS: clear.",
         "text": "Lungs are clear.".encode(), "labels": np.array([1, np.nan], np.float32)}
  record = datasets.decode_record(raw)
  assert record["id"] == "x/1" and record["text"] == "Lungs are clear."
  assert record["report"] == "FINDINGS: clear."
  assert record["image"].shape == (3, 4) and record["labels"].dtype == np.float32
  with pytest.raises(DataError, match="record 'x/1' lacks labels"):
    datasets.decode_record({k: v for k, v in raw.items() if k != "labels"})
  with pytest.raises(DataError, match="image must be uint8"):
    datasets.decode_record({**raw, "image": np.zeros((3, 4, 3), np.uint8)})
