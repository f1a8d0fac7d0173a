"""The data sources' decoder gives the stored pixels: Pillow's, exactly, for the formats the builders write."""
import io

import numpy as np
from PIL import Image
import pytest

from convirt_jax.data import decode


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def _texture(height: int, width: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / width
  grey = 120 + 60 * np.sin(9 * x) * np.cos(5 * y) + rng.normal(0, 10, x.shape)
  return np.clip(grey, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_stored_greyscale_images_decode_to_pillows_pixels(fmt):
  for seed, (height, width) in enumerate([(256, 256), (311, 256), (256, 300), (257, 259)]):
    data = _encoded(_texture(height, width, seed), fmt)
    with Image.open(io.BytesIO(data)) as reference:
      expected = np.asarray(reference)
    out = decode.image(data)
    assert out.dtype == np.uint8 and out.shape == (height, width, 1)
    np.testing.assert_array_equal(out[..., 0], expected)


def test_a_colour_image_is_made_grey_as_pillow_does():
  rgb = np.stack([_texture(64, 80, s) for s in range(3)], axis=-1)
  with Image.open(io.BytesIO(_encoded(rgb, "PNG"))) as reference:
    expected = np.asarray(reference.convert("L")).astype(int)
  out = decode.image(_encoded(rgb, "PNG"))[..., 0].astype(int)
  assert np.abs(out - expected).max() <= 1  # the same ITU-R 601 weights, rounded alike but for ties


@pytest.mark.parametrize("data", [b"", b"not an image", _encoded(_texture(32, 32), "PNG")[:60]])
def test_undecodable_bytes_are_a_clear_error(data):
  with pytest.raises(ValueError, match="cannot decode the stored image"):
    decode.image(data)
