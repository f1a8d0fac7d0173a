"""What every builder shares: the feature spec, image conversion, bad-record accounting, build helpers.

Every dataset is one record per image with its study's report (see the data contract in
`convirt_jax.data.datasets`). Images are stored 8-bit grayscale with the shorter side exactly
`stored_size`: larger images are downscaled and smaller ones upscaled, so that the input pipeline can
rely on the size of every stored image (upscaling costs disk space only for the rare small image).
"""
import collections
import concurrent.futures
import csv
import dataclasses
import functools
import gzip
import hashlib
import io
import itertools
import json
import os
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from absl import logging
import numpy as np
from PIL import Image, ImageOps
import tensorflow_datasets as tfds

from convirt_jax.data import radiology_reports
from convirt_jax.errors import DataError

VERSION = tfds.core.Version("1.0.0")
SPLITS = ("train", "validation", "test")
MULTILABEL = "multilabel"
MULTICLASS = "multiclass"
JPEG_QUALITY = 95

# Reasons a record is skipped (or, with strict, stops the build).
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
MISSING_REPORT = "missing_report"
EMPTY_REPORT = "empty_report"
NO_FINDINGS = "no_findings_or_impression"
MISSING_LABEL = "missing_label"
BAD_LABEL = "bad_label"              # a label value outside its set (e.g. 2 or "maybe" in a binary column)
IMAGE_TOO_LARGE = "image_too_large"  # more pixels than Pillow's decompression-bomb limit (MAX_IMAGE_PIXELS)
IMAGE_TOO_SMALL = "image_too_small"  # shorter side under MIN_IMAGE_SIDE pixels: nothing left to learn from
MALFORMED_ROW = "malformed_row"      # a CSV line with more or fewer fields than its header
BAD_ENCODING = "bad_encoding"        # a CSV line with bytes that are not UTF-8
DUPLICATE = "duplicate_record"       # the same record listed again (the first one is kept)

MIN_IMAGE_SIDE = 8

_T = TypeVar("_T")
_R = TypeVar("_R")


def features(num_labels: int) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "image": tfds.features.Image(shape=(None, None, 1)),
      "report": tfds.features.Text(),
      "text": tfds.features.Text(),
      "labels": tfds.features.Tensor(shape=(num_labels,), dtype=np.float32),
  })


def dataset_info(builder: tfds.core.DatasetBuilder, *, label_names: Sequence[str], task: str,
                 description: str, **metadata: Any) -> tfds.core.DatasetInfo:
  """The DatasetInfo of a builder outside a TFDS dataset package; label names and task in the metadata."""
  if task not in (MULTILABEL, MULTICLASS):
    raise ValueError(f"task={task!r} must be {MULTILABEL!r} or {MULTICLASS!r}")
  return tfds.core.DatasetInfo(
      builder=builder,
      description=description,
      features=features(len(label_names)),
      metadata=tfds.core.MetadataDict(label_names=list(label_names), task=task, **metadata),
      # Records stay in generation order (grain shuffles at read time); no shuffle buckets on disk.
      disable_shuffling=True,
  )


class LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder of local data, named by its parameters: `params.config_name` becomes the BuilderConfig.

  Subclasses set `name`, `VERSION`, what `_info` needs, then call this `__init__`.
  """

  def __init__(self, *, params: Any, strict: bool = False, build_threads: int = 0, **kwargs):
    self._params = params
    self._strict = strict
    self._threads = default_threads(build_threads)
    super().__init__(config=tfds.core.BuilderConfig(name=params.config_name, description=str(params)),
                     file_format="array_record", **kwargs)

  # TFDS looks for a checksums file of download URLs next to a builder's code; for a builder outside a
  # TFDS dataset package that lookup needs `importlib_resources` (absent on Python >= 3.9). Nothing here
  # is downloaded, so there are no URLs to check.
  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> None:
    return None

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... Subsequent calls will reuse
  # this data." around every build: nothing is downloaded here, and `datasets.load_dataset` says what it
  # builds and what it built (with the split sizes).
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


def params_hash(params: Any, length: int = 10) -> str:
  """A short stable hash of a dataclass or JSON-able value: names a BuilderConfig after its parameters."""
  if dataclasses.is_dataclass(params):
    params = dataclasses.asdict(params)
  blob = json.dumps(params, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def report_text(report: str, min_tokens: int) -> tuple[str | None, str | None]:
  """(the "text" feature, None) or (None, reason) when the report has no usable sentence."""
  if not report.strip():
    return None, EMPTY_REPORT
  sentences = radiology_reports.report_sentences(report, min_tokens)
  if not sentences:
    return None, NO_FINDINGS
  return "\n".join(sentences), None


def printable(text: str) -> str:
  """`text` with undecodable bytes (surrogate escapes, e.g. from a non-UTF-8 file name) as \\udcXX: safe to
  print, log and encode."""
  return text.encode("utf-8", "backslashreplace").decode("utf-8")


def undecodable(text: str | None) -> bool:
  """True when `text` holds bytes that were not UTF-8 (read with errors="surrogateescape")."""
  return bool(text) and any("\udc80" <= ch <= "\udcff" for ch in text)


class CsvReader(csv.DictReader):
  """A DictReader that names the file and line of what it cannot read, as DataError.

  Bytes that are not UTF-8 are read with errors="surrogateescape": with undecodable_rows="error" (the
  default) a row holding any stops the build naming its line; with "keep" the row is returned as is, for
  the caller to skip it (see `undecodable`). A line the csv module cannot parse (e.g. a field over its
  128 KiB limit, usually an unbalanced quote that swallowed the lines after it) also stops, naming the line.
  `first_line` is the first line of the row last returned (`line_num` is its last one).
  """

  def __init__(self, f, path: str, undecodable_rows: str = "error"):
    super().__init__(f)
    self.path, self._undecodable_rows, self.first_line = path, undecodable_rows, 1

  @property
  def fieldnames(self):
    try:
      return csv.DictReader.fieldnames.fget(self)
    except csv.Error as e:
      raise DataError(f"{self.path} line 1: cannot parse the header: {e}") from e

  @fieldnames.setter
  def fieldnames(self, value):
    csv.DictReader.fieldnames.fset(self, value)

  def __next__(self) -> dict[str, Any]:
    self.fieldnames  # pylint: disable=pointless-statement  (reads the header first)
    self.first_line = self.line_num + 1
    try:
      row = super().__next__()
    except csv.Error as e:
      line = max(self.line_num, self.first_line)  # (the csv module does not count a line it fails on)
      raise DataError(f"{self.path} line {line}: cannot parse this CSV line ({e}); an unbalanced quote "
                      "makes a field run on over the lines after it") from e
    if self._undecodable_rows == "error":
      bad = [printable(str(k)) for k, v in row.items()
             if undecodable(k) or (isinstance(v, str) and undecodable(v))]
      if bad:
        raise DataError(f"{self.path} line {self.first_line}: bytes that are not UTF-8 in {', '.join(bad)} "
                        "(save the file as UTF-8)")
    return row


def open_csv(path: str, undecodable_rows: str = "error") -> tuple[Any, CsvReader]:
  """(file, CsvReader) of a .csv or .csv.gz file (UTF-8, with or without a BOM); close the file when done."""
  opener = gzip.open if path.endswith(".gz") else open
  f = opener(path, "rt", newline="", encoding="utf-8-sig", errors="surrogateescape")
  return f, CsvReader(f, path, undecodable_rows)


def text_lines(path: str) -> list[str]:
  """The lines of a headerless text list (UTF-8, with or without a BOM); bytes that are not UTF-8
  stop the build naming the file and line, rather than a UnicodeDecodeError."""
  with open(path, "rb") as f:
    raw = f.read().splitlines(keepends=True)
  lines = []
  for number, line in enumerate(raw, start=1):
    try:
      lines.append(line.decode("utf-8-sig" if number == 1 else "utf-8"))
    except UnicodeDecodeError as e:
      raise DataError(f"{path} line {number}: bytes that are not UTF-8 ({e.reason} at byte {e.start}); "
                      "save the file as UTF-8") from None
  return lines


def require_columns(reader: csv.DictReader, columns: Iterable[str], path: str) -> None:
  """Stops at once, naming the file and the column, when a required column is missing or appears twice."""
  header = reader.fieldnames or []
  for column in columns:
    if column not in header:
      found = printable(", ".join(header)) if header else "none: the file is empty"
      raise DataError(f"{path}: missing required column {column!r} (columns found: {found})")
    if header.count(column) > 1:
      raise DataError(f"{path} line 1: column {column!r} appears {header.count(column)} times in the header")


# --- Images ------------------------------------------------------------------------------------------


class BadImage(Exception):
  """An image that cannot be used; `reason` is MISSING_IMAGE or CORRUPT_IMAGE."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


def to_gray8(image: Image.Image) -> Image.Image:
  """Any Pillow mode -> 8-bit grayscale ("L").

  Colour is converted with Pillow's ITU-R 601-2 luma and alpha is dropped; 16/32-bit integer and float
  images are scaled linearly from their own minimum..maximum to 0..255 (their bit depth says nothing about
  the range actually used, e.g. 12-bit data in 16-bit PNGs).
  """
  if image.mode == "L":
    return image
  if image.mode.startswith("I") or image.mode == "F":
    pixels = np.asarray(image).astype(np.float64)
    lo, hi = float(pixels.min()), float(pixels.max())
    scaled = (pixels - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(pixels)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
  if image.mode in ("P", "PA"):
    image = image.convert("RGBA")  # palette images: through the colours they index
  return image.convert("L")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
  """Resizes so that the shorter side is exactly `size`, keeping the aspect ratio (bicubic, antialiased)."""
  width, height = image.size
  if min(width, height) == size:
    return image
  scale = size / min(width, height)
  if width <= height:
    new_size = (size, max(1, round(height * scale)))
  else:
    new_size = (max(1, round(width * scale)), size)
  return image.resize(new_size, Image.Resampling.BICUBIC)


def check_image_file(path: str) -> None:
  """Raises BadImage unless `path` is a non-empty regular file (or a link to one)."""
  name = printable(path)
  if os.path.isfile(path):
    if os.path.getsize(path) == 0:
      raise BadImage(CORRUPT_IMAGE, f"empty file (0 bytes): {name}")
  elif os.path.isdir(path):
    raise BadImage(MISSING_IMAGE, f"a directory, not an image file: {name}")
  elif os.path.islink(path):
    raise BadImage(MISSING_IMAGE, f"a broken symbolic link or a symbolic-link loop: {name}")
  else:
    raise BadImage(MISSING_IMAGE, f"no such file: {name}")


def load_gray(source: str | bytes, size: int) -> Image.Image:
  """Reads an image file (or encoded bytes) as 8-bit grayscale with the shorter side `size`.

  EXIF orientation is applied. Declared sizes are checked before any pixel is decoded: more pixels than
  Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) is IMAGE_TOO_LARGE, a shorter side under
  MIN_IMAGE_SIDE is IMAGE_TOO_SMALL.

  Raises:
    BadImage: the file is missing or not a file (MISSING_IMAGE), too large or too small (as above), or
      Pillow cannot decode it (CORRUPT_IMAGE: empty, corrupt, truncated, not an image).
  """
  name = printable(source) if isinstance(source, str) else "<bytes>"
  if isinstance(source, str):
    check_image_file(source)
  try:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
      width, height = image.size
      limit = Image.MAX_IMAGE_PIXELS
      if limit and width * height > limit:  # (beyond 2x the limit, Image.open raised already)
        raise BadImage(IMAGE_TOO_LARGE, f"{name} declares {width}x{height} pixels, more than Pillow's "
                       f"decompression-bomb limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)")
      if min(width, height) < MIN_IMAGE_SIDE:
        raise BadImage(IMAGE_TOO_SMALL,
                       f"{name} is {width}x{height} pixels: under {MIN_IMAGE_SIDE} on a side")
      if image.format == "JPEG":
        # Decode at a reduced DCT scale that is still >= size on both sides: MIMIC's ~2500 px JPEGs
        # decode several times faster this way.
        image.draft("L", (size, size))
      image.load()
      image = ImageOps.exif_transpose(image)
      return resize_shorter_side(to_gray8(image), size)
  except BadImage:
    raise
  except Image.DecompressionBombError as e:
    raise BadImage(IMAGE_TOO_LARGE, f"{name}: {e}") from e
  except Exception as e:  # pylint: disable=broad-except
    # Pillow's decoders raise many kinds of errors on damaged input (OSError, ValueError, SyntaxError,
    # EOFError, struct.error, IndexError, MemoryError, ...): every one makes this image unusable, which is a
    # bad record, not a crash (Pillow's own fuzzing harness treats them alike).
    raise BadImage(CORRUPT_IMAGE, f"cannot decode image {name}: {type(e).__name__}: {e}") from e


def encode(image: Image.Image | np.ndarray, image_format: str) -> bytes:
  """Encoded bytes for the Image feature: "JPEG" (quality 95) or "PNG"."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buffer = io.BytesIO()
  if image_format == "JPEG":
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
  elif image_format == "PNG":
    image.save(buffer, format="PNG", compress_level=1)  # fast; PNG is only used for small synthetic images
  else:
    raise ValueError(f"image_format={image_format!r} must be 'JPEG' or 'PNG'")
  return buffer.getvalue()


def load_jpeg(source: str | bytes, size: int) -> bytes:
  """`load_gray` then JPEG-encode: the stored form of every real image."""
  return encode(load_gray(source, size), "JPEG")


# --- Bad records -------------------------------------------------------------------------------------


class BadRecords:
  """Counts skipped records per reason, or stops at the first one when strict.

  One per split being generated; `finish` logs and prints the summary line and refuses an empty split.
  """

  def __init__(self, dataset: str, split: str, strict: bool):
    self.dataset, self.split, self.strict = dataset, split, strict
    self.counts: collections.Counter[str] = collections.Counter()

  def reject(self, reason: str, record: str, detail: str = "") -> None:
    message = printable(f"{self.dataset} {self.split}: {reason} in record {record}"
                        + (f": {detail}" if detail else ""))
    if self.strict:
      raise DataError(message + " (data.strict=True stops at the first bad record; set it to False to skip "
                      "such records)")
    self.counts[reason] += 1
    if self.counts[reason] <= 5:
      logging.warning("Skipping %s", message)

  def finish(self, num_written: int) -> dict[str, int]:
    skipped = sum(self.counts.values())
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items())) or "none"
    line = f"{self.dataset} {self.split}: wrote {num_written} records, skipped {skipped} ({reasons})"
    logging.info(line)
    print(line, flush=True)
    if num_written == 0:
      raise DataError(f"{self.dataset} {self.split}: no usable record ({reasons} skipped)")
    return dict(self.counts)


class LabelCounts:
  """Per label, how many records of one split are positive (1), negative (0), uncertain (-1), not mentioned
  (NaN): stored per split in the dataset's metadata ("label_counts"), so that what cannot be scored is known
  before training (`datasets.unscorable_labels`). For a multiclass (one-hot) label, positive = of that class.
  """
  KINDS = ("positive", "negative", "uncertain", "not_mentioned")

  def __init__(self, label_names: Sequence[str]):
    self.label_names = list(label_names)
    self._counts = np.zeros((len(self.label_names), len(self.KINDS)), np.int64)

  def add(self, labels: np.ndarray) -> None:
    labels = np.asarray(labels, np.float32)
    self._counts += np.stack([labels == 1, labels == 0, labels == -1, np.isnan(labels)], axis=-1)

  def counted(self, examples: Iterable[tuple[int, dict[str, Any]]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """`examples` unchanged, each one's "labels" added on the way."""
    for key, example in examples:
      self.add(example["labels"])
      yield key, example

  def as_dict(self) -> dict[str, dict[str, int]]:
    return {name: {kind: int(n) for kind, n in zip(self.KINDS, row)}
            for name, row in zip(self.label_names, self._counts)}


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], num_threads: int) -> Iterator[tuple[_T, _R]]:
  """Yields (item, fn(item)) in input order, computed on `num_threads` threads (inline for one).

  For Pillow work: it releases the GIL while decoding, resizing and encoding. At most 4 * num_threads
  items are in flight, so memory stays bounded on datasets of any size.
  """
  items = iter(items)
  if num_threads <= 1:
    yield from ((item, fn(item)) for item in items)
    return
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    pending = collections.deque((item, pool.submit(fn, item))
                                for item in itertools.islice(items, 4 * num_threads))
    while pending:
      item, future = pending.popleft()
      result = future.result()
      for next_item in itertools.islice(items, 1):
        pending.append((next_item, pool.submit(fn, next_item)))
      yield item, result


def default_threads(configured: int) -> int:
  return configured if configured > 0 else (os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A record before its image is read: every feature but "image", or the reason it is unusable."""
  record: str                        # names the record in messages (an id, a CSV line)
  image_path: str
  features: dict[str, Any] | None    # None when `reason` is set
  reason: str | None = None
  detail: str = ""


def _read_image(size: int, candidate: Candidate) -> tuple[bytes | None, BadImage | None]:
  if candidate.reason is not None:
    return None, None
  try:
    return load_jpeg(candidate.image_path, size), None
  except BadImage as e:
    return None, e


def examples_with_images(candidates: Iterable[Candidate], bad: BadRecords, *, size: int,
                         num_threads: int) -> Iterator[tuple[int, dict[str, Any]]]:
  """(key, example) of the usable candidates, images read on threads; bad records accounted in order."""
  written = 0
  for candidate, (jpeg, error) in ordered_map(functools.partial(_read_image, size), candidates, num_threads):
    if candidate.reason is not None:
      bad.reject(candidate.reason, candidate.record, candidate.detail)
    elif error is not None:
      bad.reject(error.reason, candidate.record, str(error))
    else:
      yield written, {**candidate.features, "image": jpeg}
      written += 1
  bad.finish(written)
