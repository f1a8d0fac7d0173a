"""Decoding the stored images on every read: OpenCV, chosen by measurement (`benchmarks/decoders.py`).

The built data sets store 8-bit greyscale images at a shorter side of 256 px, JPEG quality 95 (the real
sets) or PNG (the synthetic one). On one core OpenCV's `imdecode` gave exactly Pillow's pixels for both
(the decoders measured link libjpeg-turbo and share its default integer IDCT) and was faster than
Pillow in every run (JPEG 1.16x, PNG 1.04x in a quiet one; 1.04x and 1.17x in another); simplejpeg was
1.21x on JPEG and reads no PNG. One decoder for both formats wins over a second dependency for a few
percent on JPEG. The data sources decode with it in place of TFDS's own choice.

The builders keep Pillow for the original files (`builders/common.load_gray`): it reads a file's
declared size before decoding it (the decompression-bomb and minimum-size checks), applies EXIF
orientation, and its draft scaling and antialiased resize define the stored pixels; OpenCV's reduced
decoding was 1.07x as fast on a MIMIC-sized JPEG and differs by a grey level.
"""
import cv2
import numpy as np
import tensorflow_datasets as tfds

cv2.setNumThreads(1)  # grain parallelises over records; OpenCV's own threads would only compete.


def image(data: bytes) -> np.ndarray:
  """Encoded JPEG/PNG bytes -> uint8 [H, W, 1], as stored (no EXIF rotation: the builders applied it)."""
  pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
  if pixels is None:
    raise ValueError(f"cannot decode the stored image ({len(data)} bytes): not a JPEG or PNG OpenCV reads")
  if pixels.ndim == 3:  # not written by this project's builders: make it grey as they would
    pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2GRAY if pixels.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
  if pixels.dtype != np.uint8:
    raise ValueError(f"the stored image is {pixels.dtype}, not 8-bit")
  return pixels[..., None]


class ImageDecoder(tfds.decode.Decoder):
  """The "image" feature of a data source decoded by `image` (numpy data sources only)."""

  def decode_example(self, serialized_example):
    raise NotImplementedError("convirt_jax reads its data sets as numpy data sources")

  def decode_example_np(self, serialized_example):
    return image(bytes(serialized_example))
