"""Synthetic training records whose images are JPEG bytes decoded on every read, as the data sources are.

For timing the input pipeline without a data set (benchmarks/pipeline_throughput.py, the plan's input
side): greyscale textures at the stored size (the longer side up to 5/4 of it), JPEG quality 95, and
2-5 report sentences each.
"""
import io
from typing import Any

import numpy as np
from PIL import Image

from convirt_jax.data import decode

_SENTENCES = (
    "The lungs are clear without focal consolidation.", "There is no pleural effusion or pneumothorax.",
    "Heart size is mildly enlarged.", "Mediastinal contours are within normal limits.",
    "Endotracheal tube terminates 4 cm above the carina.", "Mild pulmonary vascular congestion.",
    "Bibasilar atelectasis is noted.", "No acute cardiopulmonary process.",
)


class JpegSource:
  """Random-access records whose images are kept as JPEG bytes and decoded per read (`decode.image`)."""

  def __init__(self, num_records: int, stored_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self._jpegs, self._texts = [], []
    for _ in range(num_records):
      long_side = int(rng.integers(stored_size, stored_size * 5 // 4 + 1))
      y, x = np.mgrid[0:long_side, 0:stored_size] / stored_size
      phase = rng.uniform(0, 2 * np.pi, 3)
      grey = (120 + 50 * np.sin(6 * x + phase[0]) * np.cos(4 * y + phase[1])
              + 30 * np.sin(25 * x * y + phase[2]) + rng.normal(0, 8, x.shape))
      buffer = io.BytesIO()
      Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
      self._jpegs.append(buffer.getvalue())
      lines = rng.choice(_SENTENCES, size=int(rng.integers(2, 6)), replace=False)
      self._texts.append("\n".join(lines).encode())

  def __len__(self) -> int:
    return len(self._jpegs)

  def encoded(self, index: int) -> bytes:
    """The record's image as stored: JPEG bytes."""
    return self._jpegs[index]

  def __getitem__(self, index: int) -> dict[str, Any]:
    pixels = decode.image(self._jpegs[index])
    return {"id": f"bench/{index}".encode(), "image": pixels, "report": self._texts[index],
            "text": self._texts[index], "labels": np.zeros((8,), np.float32)}

  def __repr__(self) -> str:  # grain checks the source's repr when restoring; keep it short.
    return f"JpegSource({len(self)})"
