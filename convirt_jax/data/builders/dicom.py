"""DICOM images -> 8-bit grayscale, with the display transforms the file's header asks for.

The DICOM grayscale pipeline (PS3.4 Annex N.2.1): stored values -> Modality LUT (a LUT, or Rescale Slope /
Intercept) -> VOI LUT (a LUT, or Window Center / Width with its VOI LUT Function) -> display, where
MONOCHROME1 means that the lowest value is displayed white. pydicom applies the first two
(`pydicom.pixels.apply_modality_lut`, `apply_voi_lut`); what is done here:

  1. the first frame of the pixel data; colour images (RGB, YBR, PALETTE COLOR) go through Pillow's luma;
  2. the Modality LUT / rescale, when the header has one;
  3. the VOI LUT when the header has one (the LUT wins over a window, as pydicom prefers), else the first
     window; the result is mapped linearly from the VOI output range to 0..255: the window's range as
     pydicom defines it (saturated values at 0 and 255), or a LUT's lowest..highest entry;
  4. without any VOI transform, 8-bit data without a modality transform is kept as it is (its values are
     already grey levels, as in the RSNA Pneumonia DICOMs); anything else is mapped linearly from the
     image's own minimum..maximum to 0..255 (as `common.to_gray8` does for 16-bit PNGs);
  5. MONOCHROME1 is inverted last (255 - value), so that every stored image is "high = bright".
"""
import io
import os

import numpy as np
from PIL import Image
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

from convirt_jax.data.builders import common

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def _has_voi_lut(ds: pydicom.Dataset) -> bool:
  sequence = ds.get("VOILUTSequence")
  return bool(sequence) and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]


def _has_window(ds: pydicom.Dataset) -> bool:
  return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
  if hi <= lo:
    return np.zeros(values.shape, np.uint8)
  scaled = (np.asarray(values, np.float64) - lo) * (255.0 / (hi - lo))
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _monochrome_to_gray8(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
  has_modality = bool(ds.get("ModalityLUTSequence")) or (
      "RescaleSlope" in ds and "RescaleIntercept" in ds)
  values = apply_modality_lut(stored, ds)
  if _has_voi_lut(ds):
    if not np.issubdtype(values.dtype, np.integer):
      values = np.rint(values).astype(np.int64)  # a LUT is indexed by integers
    lut = np.asarray(ds.VOILUTSequence[0].LUTData, np.float64).ravel()
    gray = _scale(apply_voi_lut(values, ds), float(lut.min()), float(lut.max()))
  elif _has_window(ds):
    # pydicom maps values at or below the window to its output minimum and above it to its maximum:
    # windowing -inf and +inf gives the output range the window is mapped onto, whatever it is.
    with np.errstate(over="ignore"):
      lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)
    gray = _scale(apply_voi_lut(values, ds), float(lo), float(hi))
  elif not has_modality and int(ds.get("BitsStored", 8)) <= 8 and int(ds.get("PixelRepresentation", 0)) == 0:
    gray = np.asarray(values).astype(np.uint8)
  else:
    gray = _scale(values, float(np.min(values)), float(np.max(values)))
  if ds.PhotometricInterpretation == "MONOCHROME1":
    gray = 255 - gray
  return gray


def to_gray8(ds: pydicom.Dataset) -> np.ndarray:
  """uint8 [rows, columns] of a read DICOM dataset (see the module docstring for the transforms)."""
  pixels = ds.pixel_array
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  samples = int(ds.get("SamplesPerPixel", 1))
  if frames > 1:
    pixels = pixels[0]
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  if samples == 1 and photometric in _MONOCHROME:
    return _monochrome_to_gray8(ds, pixels)
  if photometric == "PALETTE COLOR":
    from pydicom.pixels import apply_color_lut  # pylint: disable=g-import-not-at-top
    pixels = apply_color_lut(pixels, ds)
    if pixels.dtype != np.uint8:  # 16-bit palette entries
      pixels = (pixels.astype(np.float64) / 257.0).round().astype(np.uint8)
  if pixels.ndim != 3 or pixels.shape[-1] != 3:
    raise ValueError(f"unsupported PhotometricInterpretation {photometric!r} with {samples} samples/pixel")
  # pydicom converts YBR_FULL* pixel data to RGB by default.
  return np.asarray(Image.fromarray(np.asarray(pixels, np.uint8), mode="RGB").convert("L"))


def read_gray8(source: str | bytes) -> np.ndarray:
  """uint8 [rows, columns] of a DICOM file (a path, or its bytes).

  Raises:
    common.BadImage: the file is missing (MISSING_IMAGE), or is not a DICOM file pydicom can decode,
      or its pixels cannot be decoded or shown in gray (CORRUPT_IMAGE).
  """
  if isinstance(source, str) and not os.path.isfile(source):
    raise common.BadImage(common.MISSING_IMAGE, f"no such file: {source}")
  name = source if isinstance(source, str) else "<bytes>"
  try:
    ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)
    return to_gray8(ds)
  except Exception as e:  # pylint: disable=broad-except
    # pydicom and its decoders raise many kinds of errors on a damaged or unsupported file (InvalidDicomError,
    # AttributeError for a missing pixel module, NotImplementedError for an unsupported compression, ...):
    # every one of them makes this image unusable, which is a bad record, not a crash.
    raise common.BadImage(common.CORRUPT_IMAGE, f"cannot decode DICOM {name}: {type(e).__name__}: {e}") from e


def load_jpeg(source: str | bytes, size: int) -> bytes:
  """A DICOM file in the stored form of every real image: gray, shorter side `size`, JPEG (as common's)."""
  gray = Image.fromarray(read_gray8(source), mode="L")
  return common.encode(common.resize_shorter_side(gray, size), "JPEG")
