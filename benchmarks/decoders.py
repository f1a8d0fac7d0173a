"""Images per second per core of each available decoder on the stored records' formats.

The built data sets store greyscale images at a shorter side of 256 px: JPEG quality 95 for the real
sets (`builders/common.encode`), PNG for the synthetic one. Each decoder decodes the same records on one
thread, and its output is compared with Pillow's (the reference the builders wrote with):

  python -m benchmarks.decoders [--records=200] [--repeats=5]

Prints one row per format and decoder: images/s, the ratio to Pillow, and the largest difference in grey
levels from Pillow's pixels.
"""
import argparse
import io
import os
import sys
import time
from typing import Callable

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from convirt_jax.data import decode  # pylint: disable=wrong-import-position
from convirt_jax.data.jpeg_source import JpegSource  # pylint: disable=wrong-import-position


def _pil(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image)


def _decoders() -> dict[str, dict[str, Callable[[bytes], np.ndarray]]]:
  """{format: {decoder name: bytes -> uint8 [H, W]}} of the decoders importable here."""
  out = {"JPEG": {"pillow": _pil}, "PNG": {"pillow": _pil}}
  try:
    import cv2  # pylint: disable=g-import-not-at-top
    cv2.setNumThreads(1)

    def opencv(data: bytes) -> np.ndarray:
      return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    out["JPEG"]["opencv"] = out["PNG"]["opencv"] = opencv
  except ImportError:
    pass
  try:
    import simplejpeg  # pylint: disable=g-import-not-at-top
    out["JPEG"]["simplejpeg"] = lambda data: simplejpeg.decode_jpeg(data, colorspace="GRAY")[..., 0]
  except ImportError:
    pass
  out["JPEG"]["project (decode.image)"] = out["PNG"]["project (decode.image)"] = (
      lambda data: decode.image(data)[..., 0])
  return out


def _records(count: int) -> dict[str, list[bytes]]:
  source = JpegSource(count, 256)
  jpegs = [source.encoded(i) for i in range(count)]
  pngs = []
  for data in jpegs:
    buffer = io.BytesIO()
    Image.fromarray(_pil(data)).save(buffer, format="PNG")
    pngs.append(buffer.getvalue())
  return {"JPEG": jpegs, "PNG": pngs}


def builder_rates(repeats: int = 10) -> dict[str, tuple[float, np.ndarray]]:
  """Building a data set: one MIMIC-sized greyscale JPEG (3056 x 2544, quality 95) to a shorter side of
  256 px, by the builders' Pillow path (`common.load_gray`: JPEG draft scaling, antialiased resize) and
  by OpenCV's reduced decoding with INTER_AREA; {name: (images/s on one thread, output)}."""
  import cv2  # pylint: disable=g-import-not-at-top
  from convirt_jax.data.builders import common  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:3056, 0:2544] / 2544
  grey = np.clip(120 + 60 * np.sin(9 * x) * np.cos(5 * y) + rng.normal(0, 8, x.shape), 0, 255)
  buffer = io.BytesIO()
  Image.fromarray(grey.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
  data = buffer.getvalue()

  def opencv():
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
    scale = 256 / min(image.shape)
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)

  out = {}
  for name, fn in (("pillow (the builders)", lambda: np.asarray(common.load_gray(data, 256))),
                   ("opencv", opencv)):
    result = fn()
    start = time.perf_counter()
    for _ in range(repeats):
      fn()
    out[name] = (repeats / (time.perf_counter() - start), result)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--records", type=int, default=200)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  records = _records(args.records)
  print(f"{args.records} greyscale records, shorter side 256 px, one thread; best of {args.repeats}")
  print(f"{'format':6}  {'decoder':24} {'images/s':>9} {'vs pillow':>9} {'max |diff|':>10}")
  for fmt, decoders in _decoders().items():
    reference = [_pil(data) for data in records[fmt]]
    base = None
    for name, fn in decoders.items():
      best = 0.0
      for _ in range(args.repeats):
        start = time.perf_counter()
        for data in records[fmt]:
          fn(data)
        best = max(best, len(records[fmt]) / (time.perf_counter() - start))
      diff = max(int(np.abs(fn(d).astype(np.int16) - r).max()) for d, r in zip(records[fmt], reference))
      base = base or best
      print(f"{fmt:6}  {name:24} {best:9.0f} {best / base:8.2f}x {diff:10d}")
  rates = builder_rates()
  reference = rates["pillow (the builders)"]
  print("\nbuilding: a 3056 x 2544 JPEG to a 256 px shorter side, one thread")
  for name, (rate, result) in rates.items():
    diff = (int(np.abs(result.astype(np.int16) - reference[1]).max()) if result.shape == reference[1].shape
            else f"shape {result.shape}")
    print(f"  {name:24} {rate:7.1f} images/s {rate / reference[0]:5.2f}x  max |diff| {diff}")


if __name__ == "__main__":
  main()
