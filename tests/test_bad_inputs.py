"""Fuzz (issue 12): seeded bad inputs across the builders; each is skipped and counted, or stops strictly.

From SEED, the builders that read files get bad inputs: the CSV of pairs and MIMIC-CXR-JPG (images, reports,
CSV rows, whole CSVs), and the downstream sets CheXpert, MURA and RSNA (images, labels).
Every input has one expected outcome:
  a skip reason  default build: the record is skipped and counted under that reason in the metadata;
                 strict build (the input after one good record): DataError naming the file and the line
                 (a CSV row; the image's path for an image, the report's for a report)
  KEPT           valid but unusual (16-bit, RGBA, CMYK, palette, EXIF-rotated images; NaN labels; quoted
                 newlines; a BOM; a long report): stored, converted, and checked, in both modes
  a file error   a whole file that cannot be used: DataError naming the file, in both modes
After a DataError no dataset directory, complete or partial, is left where a later load would look.
Any other exception is a crash, collected and reported. Each fuzz test checks that it tried its share of
the inputs (`MIN_TRIED`); the tally is printed by the last test.
Many records share one default build; a strict build that stops takes ~30 ms.
"""
import collections
import csv
import dataclasses
import importlib
import io
import os
import random
import struct
import zlib
from typing import Callable

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from convirt_jax.data import datasets
from convirt_jax.data.builders import common
from convirt_jax.errors import DataError
import fake_data  # shared fake data of the builders' tests

tfds.disable_progress_bar()
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

SEED = 12
KEPT = "kept"
TALLY = collections.Counter()  # tried, kept, skipped:<reason>, strict_errors, file_errors, crashes
CRASHES = []

# Inputs each fuzz test tries at least, per parametrisation (measured: the counts follow from SEED).
# Checked per test, so that the fuzz's size holds however pytest-xdist spreads the tests over workers.
MIN_TRIED = {"test_csv_pairs_bad_records": 148, "test_csv_pairs_bad_files[False]": 13,
             "test_csv_pairs_bad_files[True]": 13, "test_mimic_bad_records": 52, "test_mimic_bad_files": 20,
             "test_downstream_bad_records[chexpert]": 16, "test_downstream_bad_records[mura]": 16,
             "test_downstream_bad_records[rsna]": 11}


@pytest.fixture(autouse=True)
def _tried_at_least(request):
  before = TALLY["tried"]
  yield
  tried = TALLY["tried"] - before
  floor = MIN_TRIED.get(request.node.name)
  if floor is not None:
    assert tried >= floor, f"{request.node.name} tried {tried} bad inputs, fewer than {floor}"


WORDS = ("lungs", "are", "clear", "heart", "size", "normal", "no", "effusion", "mild", "opacity", "seen")


# --- Running a build and classifying what happened ---------------------------------------------------


def _load(config, tfds_dir: str, what: str):
  """The dataset, or the DataError; any other exception is recorded as a crash (and returned)."""
  try:
    return datasets.load_dataset(config, tfds_dir)
  except DataError as e:
    _assert_nothing_left(config, tfds_dir)
    return e
  except Exception as e:  # pylint: disable=broad-except
    CRASHES.append(f"{what}: {type(e).__name__}: {e}")
    TALLY["crashes"] += 1
    return e


def _assert_nothing_left(config, tfds_dir: str) -> None:
  """After a failed build: no dataset directory at the path a later load looks, and no partial one."""
  path = datasets.prepared_dir(config, tfds_dir)
  assert not os.path.exists(path), path
  for folder, dirs, _ in os.walk(tfds_dir):
    assert not [d for d in dirs if "incomplete" in d], folder


def _expect_default(dataset, cases, what: str) -> dict[str, dict]:
  """The default build of `cases`: each skip counted under its reason, each KEPT case stored and checked."""
  if not isinstance(dataset, datasets.Dataset):
    pytest.fail(f"{what}: the default build failed: {type(dataset).__name__}: {dataset}")
  expected = collections.Counter(c.expect for c in cases if c.expect != KEPT)
  assert fake_data.skipped(dataset) == expected, what
  records = fake_data.by_id(dataset)
  for case in cases:
    TALLY["tried"] += 1
    TALLY[f"tried:{what.split()[0]}"] += 1
    if case.expect == KEPT:
      TALLY["kept"] += 1
      if case.check is not None:
        case.check(records[case.record_id])
    else:
      TALLY[f"skipped:{case.expect}"] += 1
  return records


def _expect_strict_error(outcome, names: list[str], what: str) -> None:
  if isinstance(outcome, DataError):
    message = str(outcome)
    for name in names:
      assert name in message, (what, name, message)
    TALLY["strict_errors"] += 1
  elif not isinstance(outcome, Exception):  # a crash is already recorded
    pytest.fail(f"{what}: strict build did not stop")


def _expect_file_error(outcome, pattern: str, names: list[str], what: str) -> None:
  TALLY["tried"] += 1
  TALLY[f"tried:{what.split()[0]}"] += 1
  if isinstance(outcome, DataError):
    message = str(outcome)
    assert all(name in message for name in names), (what, names, message)
    import re  # pylint: disable=g-import-not-at-top
    assert re.search(pattern, message), (what, pattern, message)
    TALLY["file_errors"] += 1
  elif not isinstance(outcome, Exception):
    pytest.fail(f"{what}: expected a DataError, the build succeeded")


# --- Images ------------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _noise(rng: random.Random) -> np.ndarray:
  shape = (rng.randint(24, 64), rng.randint(24, 64))
  return np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, shape, dtype=np.uint8)


def _png_header(width: int, height: int) -> bytes:
  """A PNG that declares width x height and holds no pixel: cheap to write, a bomb to decode."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
          + chunk(b"IEND", b""))


def _jpeg_declaring(width: int, height: int) -> bytes:
  data = bytearray(_encode(Image.new("L", (16, 16)), "JPEG"))
  sof = data.index(b"\xff\xc0")
  data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
  return bytes(data)


def _write(path, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


def _flat(expected: int, tolerance: int = 2) -> Callable[[dict], None]:
  def check(record):
    image = record["image"].astype(int)
    assert image.shape == (fake_data.SIZE, fake_data.SIZE), (expected, image)
    assert np.abs(image - expected).max() <= tolerance, (expected, image)
  return check


# Each writes a file (or not) at `path` and returns (expected outcome, check of the stored record or None).
def _zero_byte(rng, path):
  _write(path, b"")
  return common.CORRUPT_IMAGE, None


def _truncated_jpeg(rng, path):
  data = _encode(Image.fromarray(_noise(rng)), "JPEG")
  _write(path, data[:rng.randint(len(data) // 10, len(data) * 9 // 10)])
  return common.CORRUPT_IMAGE, None


def _truncated_png(rng, path):
  data = _encode(Image.fromarray(_noise(rng)), "PNG")
  _write(path, data[:rng.randint(len(data) // 10, len(data) * 9 // 10)])
  return common.CORRUPT_IMAGE, None


def _text_named_jpg(rng, path):
  _write(path, " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 300))).encode())
  return common.CORRUPT_IMAGE, None


def _garbage(rng, path):
  # A format's magic, then noise. (Not GIF: its noise declares sizes, often huge: image_too_large.)
  magic = rng.choice([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b""])
  _write(path, magic + bytes(rng.randrange(256) for _ in range(rng.randint(0, 3000))))
  return common.CORRUPT_IMAGE, None


def _tiny(rng, path):
  size = rng.choice([(1, 1), (1, 40), (40, 3), (common.MIN_IMAGE_SIDE - 1, 30)])
  _write(path, _encode(Image.new("L", size, rng.randrange(256)), rng.choice(["PNG", "JPEG"])))
  return common.IMAGE_TOO_SMALL, None


def _bomb(rng, path):
  side = rng.choice([10_000, 12_000, 30_000, 65_535])  # 10000^2 > Pillow's 89.5M; 13380^2 > 2x that
  _write(path, rng.choice([_png_header, _jpeg_declaring])(side, side - rng.randint(0, 100)))
  return common.IMAGE_TOO_LARGE, None


def _directory(rng, path):
  os.mkdir(path)
  return common.MISSING_IMAGE, None


def _symlink_loop(rng, path):
  other = path + ".loop"
  os.symlink(other, path)
  os.symlink(path, other)
  return common.MISSING_IMAGE, None


def _broken_symlink(rng, path):
  os.symlink(path + ".nowhere", path)
  return common.MISSING_IMAGE, None


def _missing(rng, path):
  return common.MISSING_IMAGE, None


def _gray16(rng, path):
  lo = rng.randint(0, 20_000)
  hi = rng.randint(lo + 100, 65_535)
  ramp = np.tile(np.linspace(lo, hi, 32).round().astype(np.uint16), (rng.randint(16, 40), 1))
  _write(path, _encode(Image.fromarray(ramp), "PNG"))

  def check(record):
    image = record["image"]
    assert image.min() <= 8 and image.max() >= 247, (lo, hi)  # stretched from its own range to 8 bits
    assert (np.diff(image.astype(int).mean(axis=0)) >= -3).all()  # still a left-to-right ramp
  return KEPT, check


def _luma(rgb) -> int:
  return round(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _rgba(rng, path):
  rgba = tuple(rng.randrange(256) for _ in range(4))
  _write(path, _encode(Image.new("RGBA", (24, 24), rgba), "PNG"))
  return KEPT, _flat(_luma(rgba))  # alpha dropped


def _cmyk(rng, path):
  cmyk = tuple(rng.randrange(256) for _ in range(4))
  data = _encode(Image.new("CMYK", (24, 24), cmyk), "JPEG", quality=100)
  _write(path, data)
  return KEPT, _flat(round(np.asarray(Image.open(io.BytesIO(data)).convert("L"), float).mean()), 3)


def _palette(rng, path):
  rgb = tuple(rng.randrange(256) for _ in range(3))
  image = Image.new("P", (24, 24), 0)
  image.putpalette(list(rgb) + [0, 0, 0] * 255)
  _write(path, _encode(image, "PNG"))
  return KEPT, _flat(_luma(rgb))


def _gray_alpha(rng, path):
  level = rng.randrange(256)
  _write(path, _encode(Image.new("LA", (24, 24), (level, rng.randrange(256))), "PNG"))
  return KEPT, _flat(level)


def _exif_rotated(rng, path):
  orientation = rng.choice([3, 6, 8])
  array = np.zeros((24, 48), np.uint8)
  array[:, :24] = 255  # stored landscape, white on the left
  exif = Image.Exif()
  exif[0x0112] = orientation
  _write(path, _encode(Image.fromarray(array), "JPEG", exif=exif.tobytes(), quality=95))

  def check(record):
    image = record["image"].astype(float)
    if orientation == 3:  # 180 degrees: white on the right
      assert image.shape == (16, 32) and image[:, -4:].mean() > 200 and image[:, :4].mean() < 50
    elif orientation == 6:  # shown turned 90 degrees clockwise: the left edge is on top
      assert image.shape == (32, 16) and image[:4].mean() > 200 and image[-4:].mean() < 50
    else:  # 8: counter-clockwise: the left edge is at the bottom
      assert image.shape == (32, 16) and image[-4:].mean() > 200 and image[:4].mean() < 50
  return KEPT, check


BAD_IMAGES = [_zero_byte, _truncated_jpeg, _truncated_png, _text_named_jpg, _garbage, _tiny, _bomb,
              _directory, _symlink_loop, _broken_symlink, _missing]
ODD_IMAGES = [_gray16, _rgba, _cmyk, _palette, _gray_alpha, _exif_rotated]


def _good_image(path, level: int = 100) -> None:
  _write(path, _encode(Image.new("L", (24, 20), level), "PNG"))


# --- CSV of pairs ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
  kind: str
  expect: str                       # a skip reason, or KEPT
  fields: tuple = ()                # image, text, split, finding (str; surrogate escapes for raw bytes)
  raw_line: str | None = None       # a line written as is instead of `fields`
  check: Callable | None = None     # KEPT: check of the stored record
  record_id: str = ""
  last: bool = False                # must be the CSV's last line (it swallows what follows)


def _good_row(k: int) -> tuple:
  return (f"good_{k}.png", f"FINDINGS: The lungs are clear in study {k}. IMPRESSION: No acute process {k}.",
          "train", str(k % 2))


def _text(rng) -> str:
  return "FINDINGS: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "."


def _csv_cases(rng: random.Random, folder: str, variants: int) -> list[Case]:
  cases = []
  for kind in BAD_IMAGES + ODD_IMAGES:
    for _ in range(variants):
      name = f"c{len(cases):03d}_{kind.__name__.strip('_')}.{rng.choice(['jpg', 'png'])}"
      expect, check = kind(rng, os.path.join(folder, name))
      cases.append(Case(kind.__name__, expect, (name, _text(rng), "train", rng.choice("01")), check=check,
                        record_id=name))
  good, good_text = _good_row(0)[0], _good_row(0)[1]
  for _ in range(variants):
    n = len(cases)
    value = rng.choice(["maybe", "2", "-2", "0.5", "yes", "positive", "1,0", "?", "inf"])
    cases.append(Case("bad_label", common.BAD_LABEL, (good, _text(rng), "train", value)))
    text = _text(rng)
    value = rng.choice(["nan", "NaN", "NA", "", "null", "N/A", "  "])
    cases.append(Case("nan_label", KEPT, (good, text, "train", value), record_id=good,
                      check=None))  # the id is shared: NaN checked through the label counts below
    cases.append(Case("short_row", common.MALFORMED_ROW, raw_line=f"{good},{_text(rng)}\n"))
    cases.append(Case("long_row", common.MALFORMED_ROW,
                      raw_line=f"{good},FINDINGS: lungs are clear, heart is normal {n}.,train,1\n"))
    cases.append(Case("non_utf8_text", common.BAD_ENCODING,
                      (good, _text(rng) + b" caf\xe9 \xff".decode("utf-8", "surrogateescape"), "train", "1")))
    raw_name = f"c{n:03d}_name_".encode() + bytes([rng.choice([0xff, 0xfe, 0xe9, 0x80])]) + b".png"
    _good_image(os.path.join(os.fsencode(folder), raw_name))
    cases.append(Case("non_utf8_file_name", common.BAD_ENCODING,
                      (raw_name.decode("utf-8", "surrogateescape"), _text(rng), "train", "0")))
    cases.append(Case("duplicate", common.DUPLICATE, _good_row(0)))
    cases.append(Case("empty_report", common.EMPTY_REPORT,
                      (good, rng.choice(["", "   ", "\n\n"]), "train", "1")))
    cases.append(Case("section_headers_only", common.NO_FINDINGS,
                      (good, rng.choice(["INDICATION:\nCOMPARISON:\n", "FINDINGS:\n\nIMPRESSION:\n",
                                         "HISTORY: \nTECHNIQUE:",
                                         f"FINAL REPORT\n EXAMINATION: CHEST {n}\n"]), "train", "0")))
    cases.append(Case("empty_image_field", common.MISSING_IMAGE, ("", _text(rng), "train", "1")))
    name = f"c{n:03d}_newlines.png"
    _good_image(os.path.join(folder, name))
    report = f"FINDINGS:\n  The lungs are clear, \"no\" effusion {n}.\n\nIMPRESSION:\r\nNo acute process."
    cases.append(Case("quoted_newlines", KEPT, (name, report, "train", "1"), record_id=name,
                      check=lambda record, report=report: (
                          record["report"] == report or pytest.fail(repr(record["report"])))))
    cases.append(Case("same_image_other_report", KEPT, (good, _text(rng) + f" other {n}", "train", "0")))
  name = "long_report.png"
  _good_image(os.path.join(folder, name))
  long_report = "FINDINGS: " + "The lungs are clear and the heart size is normal today. " * 2000  # 110 KB
  cases.append(Case("long_report", KEPT, (name, long_report, "train", "1"), record_id=name,
                    check=lambda record: len(record["text"].splitlines()) == 2000 or pytest.fail("text")))
  cases.append(Case("unbalanced_quote", common.MALFORMED_ROW, last=True,
                    raw_line=f'{good},"FINDINGS: lungs are clear.\n{good},{good_text} again,train,1\n'))
  return cases


def _csv_bytes(rows: list) -> bytes:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["image", "text", "split", "finding"])
  for row in rows:
    if isinstance(row, Case) and row.raw_line is not None:
      out.write(row.raw_line)
    else:
      writer.writerow(row.fields if isinstance(row, Case) else row)
  return out.getvalue().encode("utf-8", "surrogateescape")


def _csv_config(path, **data):
  """The config of a CSV of pairs with the binary label column "finding" (`data` may say otherwise)."""
  return fake_data.csv_config(path, **{"label_columns": ("finding",), "task": "binary", **data})


@pytest.fixture(scope="module")
def csv_tree(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("csv_fuzz"))
  for k in range(3):
    _good_image(os.path.join(folder, f"good_{k}.png"), 60 + 40 * k)
  cases = _csv_cases(random.Random(SEED), folder, variants=5)
  return folder, cases


def test_csv_pairs_bad_records(csv_tree):
  folder, cases = csv_tree
  tfds_dir = os.path.join(folder, "tfds")
  ordered = [c for c in cases if not c.last] + [c for c in cases if c.last]
  test_row = ("good_2.png", "FINDINGS: A test study with clear lungs.", "test", "1")
  _write(os.path.join(folder, "all.csv"), _csv_bytes([_good_row(0), _good_row(1), test_row, *ordered]))

  # "auto" does not guess past the stray label values: one file error naming the CSV.
  outcome = _load(_csv_config(os.path.join(folder, "all.csv"), task="auto"), tfds_dir, "csv auto")
  _expect_file_error(outcome, r"label column 'finding' was inferred to be categorical.*only because of",
                     [os.path.join(folder, "all.csv")], "csv auto")

  dataset = _load(_csv_config(os.path.join(folder, "all.csv")), tfds_dir, "csv default")
  _expect_default(dataset, cases, "csv default")
  kept = [c for c in cases if c.expect == KEPT]
  nan_labels = sum(c.kind == "nan_label" for c in cases)
  assert dataset.info.metadata["label_counts"]["train"]["finding"]["not_mentioned"] == nan_labels
  assert len(dataset.sources["train"]) == 2 + len(kept)

  # Strict: every bad record, after one good record, stops the build naming the CSV and line 3.
  for i, case in enumerate(c for c in cases if c.expect != KEPT):
    path = os.path.join(folder, f"strict_{i:03d}.csv")
    _write(path, _csv_bytes([_good_row(0), case]))
    outcome = _load(_csv_config(path, strict=True), tfds_dir, f"csv strict {case.kind}")
    _expect_strict_error(outcome, [path, "line 3", case.expect], f"csv strict {case.kind}")
  # ... and the valid-but-odd ones do not.
  _write(os.path.join(folder, "kept.csv"), _csv_bytes([_good_row(0), test_row, *kept]))
  dataset = _load(_csv_config(os.path.join(folder, "kept.csv"), strict=True), tfds_dir, "csv strict kept")
  assert isinstance(dataset, datasets.Dataset) and len(dataset.sources["train"]) == 1 + len(kept)
  assert not CRASHES, CRASHES


FILE_CASES = [  # (name, CSV bytes, config overrides, expected message)
    ("empty_file", b"", {}, r"missing required column 'image' \(columns found: none: the file is empty\)"),
    ("bom_only", b"\xef\xbb\xbf", {}, r"missing required column 'image'"),
    ("header_only", b"image,text,split,finding\n", {}, r"no rows"),
    ("header_only_crlf_bom", b"\xef\xbb\xbfimage,text,split,finding\r\n", {}, r"no rows"),
    ("missing_column", b"image,report,finding\ngood_0.png,Lungs are clear.,1\n", {},
     r"missing required column 'text'"),
    ("missing_label_column", b"image,text\ngood_0.png,Lungs are clear today.\n", {},
     r"missing required column 'finding'"),
    ("duplicated_column", b"image,text,text,finding\ngood_0.png,Lungs are clear.,Again.,1\n", {},
     r"line 1: column 'text' appears 2 times"),
    ("field_over_the_csv_limit", b"image,text,finding\ngood_0.png,FINDINGS: " + b"lungs are clear " * 65_536 +
     b",1\n", {}, r"line 2: cannot parse this CSV line"),
    ("non_utf8_header", b"im\xffage,text,finding\ngood_0.png,Lungs are clear.,1\n", {},
     r"missing required column 'image' \(columns found: im\\udcffage"),
    ("bad_split_value", b"image,text,split,finding\ngood_0.png,Lungs are clear.,train,1\n"
     b"good_1.png,Lungs are clear.,holdout,0\n", {}, r"line 3: split='holdout'"),
    ("empty_group", b"image,text,group,finding\ngood_0.png,Lungs are clear.,p1,1\n"
     b"good_1.png,Lungs are clear.,,0\n", {}, r"line 3: empty 'group'"),
    ("multiclass_two_columns", b"image,text,finding,other\ngood_0.png,Lungs are clear.,1,0\n",
     {"task": "multiclass", "label_columns": ("finding", "other")}, r"needs exactly one label column"),
]


@pytest.mark.parametrize("strict", [False, True])
def test_csv_pairs_bad_files(csv_tree, strict):
  folder, _ = csv_tree
  tfds_dir = os.path.join(folder, "tfds_files")
  for name, content, overrides, pattern in FILE_CASES:
    path = os.path.join(folder, f"file_{name}.csv")
    _write(path, content)
    outcome = _load(_csv_config(path, strict=strict, **overrides), tfds_dir, f"csv file {name}")
    _expect_file_error(outcome, pattern, [path], f"csv file {name}")
  # A BOM and CRLF line endings are fine.
  path = os.path.join(folder, "bom_crlf.csv")
  _write(path, b"\xef\xbb\xbfimage,text,split,finding\r\ngood_0.png,Lungs are clear today.,train,1\r\n"
         b"good_1.png,\"FINDINGS:\r\nNo effusion is seen.\",test,0\r\n")
  dataset = _load(_csv_config(path, strict=strict), tfds_dir, "csv bom crlf")
  assert isinstance(dataset, datasets.Dataset) and {k: len(v) for k, v in dataset.sources.items()} == {
      "train": 1, "test": 1}
  TALLY["tried"] += 1
  TALLY["tried:csv"] += 1
  TALLY["kept"] += 1
  assert not CRASHES, CRASHES


# --- MIMIC-CXR-JPG -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Study:
  subject: str
  study: str
  dicom: str
  split: str = "train"
  image: Callable | None = None      # writes the image file (default: a good one)
  report: bytes | None = b"FINDINGS: The lungs are clear. IMPRESSION: No acute process."
  labels: list | None = None         # CheXpert rows of this study (each a list of values)
  listed: int = 1                    # lines of the split file listing the image
  other_split: str | None = None     # also listed in this split
  case: Case | None = None           # an image case learns its expectation when its file is written


MIMIC_LABELS = ["Edema", "Pleural Effusion"]


def _mimic_tree(root: str, studies: list[Study], rng: random.Random) -> None:
  """A MIMIC-CXR-JPG tree of `studies` (all PA views)."""
  split_rows, meta_rows, chexpert_rows = [], [], []
  for s in studies:
    folder = os.path.join(root, "files", f"p{s.subject[:2]}", f"p{s.subject}", f"s{s.study}")
    os.makedirs(folder, exist_ok=True)
    image_path = os.path.join(folder, f"{s.dicom}.jpg")
    if s.image is None:
      _good_image(image_path)
    else:
      s.case.expect, s.case.check = s.image(rng, image_path)
    if s.report is not None:
      _write(folder + ".txt", s.report)
    for _ in range(s.listed):
      split_rows.append([s.dicom, s.study, s.subject, s.split])
    if s.other_split:
      split_rows.append([s.dicom, s.study, s.subject, s.other_split])
    meta_rows.append([s.dicom, s.subject, s.study, "PA"])
    for values in s.labels or []:
      chexpert_rows.append([s.subject, s.study, *values])
  for name, header, rows in (("split", ["dicom_id", "study_id", "subject_id", "split"], split_rows),
                             ("metadata", ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta_rows),
                             ("chexpert", ["subject_id", "study_id", *MIMIC_LABELS], chexpert_rows)):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    _write(os.path.join(root, f"mimic-cxr-2.0.0-{name}.csv"), out.getvalue().encode())


def _mimic_cases(rng: random.Random) -> list[tuple[Case, Study]]:
  cases = []

  def add(kind, expect, check=None, **study):
    n = len(cases)
    subject, study_id, dicom = f"1{n:07d}", f"5{n:07d}", f"d{n:03d}"
    case = Case(kind, expect, check=check, record_id=f"p{subject[:2]}/p{subject}/s{study_id}/{dicom}.jpg")
    cases.append((case, Study(subject, study_id, dicom, case=case, **study)))

  for kind in BAD_IMAGES + ODD_IMAGES:
    for _ in range(2):
      add(kind.__name__, "?", image=kind)  # the expectation is known once the file is written
  report_cases = [
      ("empty_report", common.EMPTY_REPORT, b"", None),
      ("whitespace_report", common.EMPTY_REPORT, b" \n \n", None),
      ("section_headers_only", common.NO_FINDINGS, b"FINAL REPORT\n INDICATION: cough\n COMPARISON: None.\n",
       None),
      ("headings_without_text", common.NO_FINDINGS, b"FINDINGS:\n\nIMPRESSION:\n", None),
      ("missing_report", common.MISSING_REPORT, None, None),
      ("non_utf8_report", KEPT, b"FINDINGS: Lungs are clear caf\xe9 \xff today. IMPRESSION: Normal.",
       lambda r: "\ufffd" in r["report"] or pytest.fail(r["report"])),
      ("bom_report", KEPT, b"\xef\xbb\xbfFINDINGS: The lungs are clear today.",
       lambda r: r["text"] == "The lungs are clear today." or pytest.fail(repr(r["text"]))),
      ("one_megabyte_report", KEPT, b"FINDINGS: " + b"the lungs are clear " * 52_429 + b".",
       lambda r: len(r["report"]) > 1_000_000 or pytest.fail("short")),
  ]
  for kind, expect, report, check in report_cases:
    add(kind, expect, check, report=report)
  for value in rng.sample(["2", "maybe", "-2", "0.5", "yes", "1.0.0"], 3):
    add("label_outside_its_set", common.BAD_LABEL, labels=[[value, "1"]])
  for value in rng.sample(["nan", "NaN", "", "NA", "null"], 3):
    add("nan_label", KEPT, lambda r: np.isnan(r["labels"][0]) or pytest.fail(str(r["labels"])),
        labels=[[value, "1"]])
  add("study_twice_with_other_labels", common.BAD_LABEL, labels=[["1", "0"], ["0", "0"]])
  add("study_twice_with_same_labels", KEPT, labels=[["1", "0"], ["1.0", "0.0"]])
  add("image_listed_twice", common.DUPLICATE, listed=2)
  add("image_in_two_splits", common.DUPLICATE, other_split="test")
  return cases


def _good_studies(prefix: str) -> list[Study]:
  return [Study(f"9{prefix}{k:05d}", f"9{prefix}{k:05d}", f"g{k}", split=split)
          for k, split in enumerate(["train", "validate", "test"])]


def test_mimic_bad_records(tmp_path):
  rng = random.Random(SEED + 1)
  cases = _mimic_cases(rng)
  tfds_dir = str(tmp_path / "tfds")
  root = str(tmp_path / "all")
  _mimic_tree(root, _good_studies("1") + [s for _, s in cases], rng)
  dataset = _load(fake_data.dir_config("mimic_cxr", root), tfds_dir, "mimic default")
  # The study listed in two splits: its first listing (train) is kept, the second is the duplicate (test).
  _expect_default(dataset, [c for c, _ in cases], "mimic default")

  rng = random.Random(SEED + 1)
  for i, (case, study) in enumerate(_mimic_cases(rng)):
    if case.expect == KEPT or study.image in ODD_IMAGES:
      continue
    root = str(tmp_path / f"strict_{i:03d}")
    _mimic_tree(root, _good_studies("2") + [study], rng)
    names = [case.record_id]
    if case.expect in (common.BAD_LABEL,):
      names += ["mimic-cxr-2.0.0-chexpert.csv", "line"]
    elif case.expect == common.DUPLICATE:
      names += ["mimic-cxr-2.0.0-split.csv", "line 6"]
    elif case.expect in (common.EMPTY_REPORT, common.NO_FINDINGS, common.MISSING_REPORT):
      names += [f"report {case.record_id.rsplit('/', 1)[0]}.txt"]
    outcome = _load(fake_data.dir_config("mimic_cxr", root, strict=True), tfds_dir,
                    f"mimic strict {case.kind}")
    _expect_strict_error(outcome, names + [case.expect], f"mimic strict {case.kind}")
  assert not CRASHES, CRASHES


def test_mimic_bad_files(tmp_path):
  rng = random.Random(SEED + 2)
  tfds_dir = str(tmp_path / "tfds")

  def tree(name):
    root = str(tmp_path / name)
    _mimic_tree(root, _good_studies("3"), rng)
    return root

  edits = [  # (name, file, new content or edit, expected message)
      ("split_not_utf8", "split", lambda t: t.replace(b"g1,", b"g\xff1,"),
       r"split.csv line 3: bytes that are not UTF-8"),
      ("split_empty", "split", lambda t: b"",
       r"split.csv: missing required column 'dicom_id'.*the file is empty"),
      ("split_missing_column", "split", lambda t: t.replace(b",split", b",fold"),
       r"missing required column 'split'"),
      ("split_bad_value", "split", lambda t: t.replace(b"validate", b"holdout"),
       r"split.csv line 3: split='holdout'"),
      ("split_short_row", "split", lambda t: t + b"g9,123\n", r"split.csv line 5: subject_id=''"),
      ("split_field_over_limit", "split", lambda t: t + b"g9," + b"1" * 200_000 + b",1,train\n",
       r"split.csv line 5: cannot parse this CSV line"),
      ("chexpert_duplicated_column", "chexpert", lambda t: t.replace(b"Pleural Effusion", b"Edema"),
       r"chexpert.csv line 1: column 'Edema' appears 2 times"),
      ("chexpert_not_utf8", "chexpert", lambda t: t + b"1\xff,2,1,0\n",
       r"chexpert.csv line 2: bytes that are not UTF-8"),
      ("metadata_missing_column", "metadata", lambda t: t.replace(b"ViewPosition", b"View"),
       r"missing required column 'ViewPosition'"),
  ]
  for name, which, edit, pattern in edits:
    root = tree(name)
    path = os.path.join(root, f"mimic-cxr-2.0.0-{which}.csv")
    with open(path, "rb") as f:
      content = f.read()
    _write(path, edit(content))
    for strict in (False, True):
      outcome = _load(fake_data.dir_config("mimic_cxr", root, strict=strict), tfds_dir, f"mimic file {name}")
      _expect_file_error(outcome, pattern, [path], f"mimic file {name}")
  # A garbage reports zip, and no extracted report.
  root = tree("bad_zip")
  for folder, _, files in os.walk(os.path.join(root, "files")):
    for file in files:
      if file.endswith(".txt"):
        os.remove(os.path.join(folder, file))
  _write(os.path.join(root, "mimic-cxr-reports.zip"), b"PK\x03\x04 not a zip")
  outcome = _load(fake_data.dir_config("mimic_cxr", root), tfds_dir, "mimic file bad zip")
  _expect_file_error(outcome, r"is not a readable zip file", [os.path.join(root, "mimic-cxr-reports.zip")],
                     "mimic file bad zip")
  # CSVs with a BOM (and CRLF) are fine.
  root = tree("bom")
  for which in ("split", "metadata"):
    path = os.path.join(root, f"mimic-cxr-2.0.0-{which}.csv")
    with open(path, "rb") as f:
      content = f.read()
    _write(path, b"\xef\xbb\xbf" + content.replace(b"\n", b"\r\n"))
  dataset = _load(fake_data.dir_config("mimic_cxr", root, strict=True), tfds_dir, "mimic bom")
  assert isinstance(dataset, datasets.Dataset) and sum(len(s) for s in dataset.sources.values()) == 3
  TALLY["tried"] += 1
  TALLY["tried:mimic"] += 1
  TALLY["kept"] += 1
  assert not CRASHES, CRASHES


# --- Downstream classification sets (CheXpert, MURA, RSNA) --------------------------------------------


def _builder(name):
  """An in-tree builder's module: one that does not import is a failure, not a skip."""
  return importlib.import_module(f"convirt_jax.data.builders.{name}")


def _chexpert_tree(root, rng, cases, good_valid=2, good_train=6):
  """CheXpert-v1.0-small of good training patients; the cases follow good rows in valid.csv (test split)."""
  download = os.path.join(root, "CheXpert-v1.0-small")
  header = ["Path", "Frontal/Lateral", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
            "Pleural Effusion"]
  lists = {"train": [header], "valid": [header]}
  n = 0
  for split, count in (("train", good_train), ("valid", good_valid)):
    for _ in range(count):
      listed = f"CheXpert-v1.0-small/{split}/patient{n:05d}/study1/view1_frontal.jpg"
      os.makedirs(os.path.dirname(os.path.join(root, listed)), exist_ok=True)
      _good_image(os.path.join(root, listed))
      lists[split].append([listed, "Frontal", "1.0", "0.0", "", "0.0", str(n % 2) + ".0"])
      n += 1
  for case in cases:
    listed = f"CheXpert-v1.0-small/valid/patient{n:05d}/study1/view1_frontal.jpg"
    os.makedirs(os.path.dirname(os.path.join(root, listed)), exist_ok=True)
    labels = ["1.0", "0.0", "", "0.0", "1.0"]
    if case.kind == "label_outside_its_set":
      labels[rng.randrange(5)] = rng.choice(["2", "maybe", "-2", "0.5"])
      _good_image(os.path.join(root, listed))
    else:
      case.expect, case.check = case.image(rng, os.path.join(root, listed))
    lists["valid"].append([listed, "Frontal", *labels])
    case.record_id = listed
    n += 1
  for split, rows in lists.items():
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    _write(os.path.join(download, f"{split}.csv"), out.getvalue().encode())
  return root


def _mura_tree(root, rng, cases, good_valid=2, good_train=6):
  download = os.path.join(root, "MURA-v1.1")
  paths, studies = {"train": [], "valid": []}, {"train": [], "valid": []}
  n = 0
  items = [("train", None)] * good_train + [("valid", None)] * good_valid + [("valid", c) for c in cases]
  for split, case in items:
    study = f"MURA-v1.1/{split}/XR_HAND/patient{n:05d}/study1_positive/"
    listed = study + "image1.png"
    os.makedirs(os.path.join(root, study), exist_ok=True)
    label = str(n % 2)
    if case is None or case.kind == "label_outside_its_set":
      _good_image(os.path.join(root, listed))
      if case is not None:
        label = rng.choice(["2", "maybe", "-1", "0.5"])
    else:
      case.expect, case.check = case.image(rng, os.path.join(root, listed))
    if case is not None:
      case.record_id = listed
    paths[split].append(listed + "\n")
    studies[split].append(f"{study},{label}\n")
    n += 1
  for split in ("train", "valid"):
    _write(os.path.join(download, f"{split}_image_paths.csv"), "".join(paths[split]).encode())
    _write(os.path.join(download, f"{split}_labeled_studies.csv"), "".join(studies[split]).encode())
  return root


def _dicom_bytes(rng) -> bytes:
  path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fuzz_{os.getpid()}.dcm")
  # PatientID "x" keeps the file's length, which sets the seeded truncation points, as it was.
  fake_data.write_dicom(path, _noise(rng), PatientID="x")
  with open(path, "rb") as f:
    data = f.read()
  os.remove(path)
  return data


def _dicom_truncated(rng, path):
  data = _dicom_bytes(rng)
  _write(path, data[:rng.randint(len(data) // 3, len(data) - 50)])
  return common.CORRUPT_IMAGE, None


DICOM_BAD = [_zero_byte, _text_named_jpg, _garbage, _dicom_truncated, _directory, _symlink_loop,
             _broken_symlink, _missing]


def _rsna_tree(root, rng, cases, good=40):
  images = os.path.join(root, "stage_2_train_images")
  os.makedirs(images, exist_ok=True)
  rows = ["patientId,x,y,width,height,Target"]
  for k in range(good):
    fake_data.write_dicom(os.path.join(images, f"good{k:03d}.dcm"), np.full((24, 20), 40 + k, np.uint8))
    rows.append(f"good{k:03d},,,,,{k % 2}")
  for n, case in enumerate(cases):
    patient = f"case{n:03d}"
    case.record_id = f"stage_2_train_images/{patient}.dcm"
    if case.kind == "label_outside_its_set":
      fake_data.write_dicom(os.path.join(images, f"{patient}.dcm"), np.full((24, 20), 90, np.uint8))
      rows.append(f"{patient},,,,,{rng.choice(['2', 'maybe', '-1', '', 'nan'])}")
    elif case.kind == "rows_disagree":
      fake_data.write_dicom(os.path.join(images, f"{patient}.dcm"), np.full((24, 20), 90, np.uint8))
      rows += [f"{patient},1,2,3,4,1", f"{patient},,,,,0"]
    else:
      case.expect, case.check = case.image(rng, os.path.join(images, f"{patient}.dcm"))
      rows.append(f"{patient},,,,,1")
  _write(os.path.join(root, "stage_2_train_labels.csv"), ("\n".join(rows) + "\n").encode())
  return root


@dataclasses.dataclass
class ImageCase(Case):
  image: Callable | None = None


def _downstream_cases(rng, image_kinds, variants, label_kinds) -> list[ImageCase]:
  cases = [ImageCase(kind.__name__, "?", image=kind) for kind in image_kinds for _ in range(variants)]
  cases += [ImageCase(kind, common.BAD_LABEL) for kind in label_kinds]
  return cases


@pytest.mark.parametrize("name", ["chexpert", "mura", "rsna"])
def test_downstream_bad_records(tmp_path, name):
  _builder(name)
  rng = random.Random(SEED + 3)
  tree = {"chexpert": _chexpert_tree, "mura": _mura_tree, "rsna": _rsna_tree}[name]
  if name == "rsna":
    cases = _downstream_cases(rng, DICOM_BAD, 1, ["label_outside_its_set"] * 2 + ["rows_disagree"])
  else:
    cases = _downstream_cases(rng, BAD_IMAGES + ODD_IMAGES[:3], 1, ["label_outside_its_set"] * 2)
  tfds_dir = str(tmp_path / "tfds")
  root = tree(str(tmp_path / "all"), rng, cases)
  dataset = _load(fake_data.dir_config(name, root), tfds_dir, f"{name} default")
  _expect_default(dataset, cases, f"{name} default")

  for i, case in enumerate(cases):
    if case.expect == KEPT:
      continue
    single = dataclasses.replace(case)
    root = tree(str(tmp_path / f"strict_{i:03d}"), rng, [single], **({"good": 3} if name == "rsna" else {}))
    outcome = _load(fake_data.dir_config(name, root, strict=True), tfds_dir, f"{name} strict {case.kind}")
    _expect_strict_error(outcome, [single.record_id, "line", single.expect], f"{name} strict {case.kind}")
  assert not CRASHES, CRASHES


def test_mura_list_with_bytes_that_are_not_utf8(tmp_path):
  """MURA's headerless lists: bytes that are not UTF-8 stop the build naming the file and line."""
  _builder("mura")
  root = _mura_tree(str(tmp_path / "mura"), random.Random(SEED), [])
  path = os.path.join(root, "MURA-v1.1", "valid_labeled_studies.csv")
  with open(path, "rb") as f:
    content = f.read()
  _write(path, content.replace(b"patient", b"pati\xffent", 1))
  with pytest.raises(DataError, match=r"valid_labeled_studies.csv line \d+: bytes that are not UTF-8"):
    datasets.load_dataset(fake_data.dir_config("mura", root), str(tmp_path / "tfds"))


# --- The tally -----------------------------------------------------------------------------------------


def test_tally():
  """Prints this worker's counts; the fuzz tries at least 200 inputs in all (each test checks its share,
  `MIN_TRIED`) and no crash."""
  print("\nbad-input fuzz (seed %d): %s" % (SEED, ", ".join(f"{k}={v}" for k, v in sorted(TALLY.items()))))
  assert not CRASHES, CRASHES
  assert sum(MIN_TRIED.values()) >= 200, MIN_TRIED
