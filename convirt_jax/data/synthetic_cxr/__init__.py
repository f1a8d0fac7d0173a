"""Synthetic frontal chest radiographs with faithful radiology reports: the embedded default data set.

Every study is a patient (anatomy, position, exposure) plus a set of findings. The findings are drawn as
small, local changes of the radiograph and described in a free-text report written from many templates
(synonyms, severity, laterality, hedging, negations, and incidental sentences that describe nothing
visible). Their strength is calibrated by `benchmarks/synthetic_calibration.py`: features of a randomly
initialised network barely see them with few labels, a network trained on the reports does.

A study is a pure function of (seed, split, index[, category]): each piece of randomness comes from its
own `np.random.SeedSequence` stream, so studies can be generated in any order or in parallel, the same
case rendered at any size has the same labels and report, and a case with a finding removed renders the
same patient (which is what the tests use to check where each finding is drawn).

Modules: `cases` (labels, `Finding`, `Case`, `sample_case`), `render` (`render_image`), `report_text`
(`write_report`, `RETRIEVAL_TEXT_QUERIES`); this package adds the study entry points and `encode_png`.
"""
import io

import numpy as np
from PIL import Image

from convirt_jax.data.synthetic_cxr.cases import (DEVICES, LABEL_NAMES, LOBES, SIDES, SPLITS, Case, Finding,
                                                  finding_sides, sample_case)
from convirt_jax.data.synthetic_cxr.render import render_image
from convirt_jax.data.synthetic_cxr.report_text import RETRIEVAL_TEXT_QUERIES, write_report

__all__ = ["DEVICES", "LABEL_NAMES", "LOBES", "RETRIEVAL_TEXT_QUERIES", "SIDES", "SPLITS", "Case", "Finding",
           "encode_png", "finding_sides", "generate_category_study", "generate_study", "render_image",
           "sample_case", "write_report"]


def generate_study(seed: int, split: str, index: int, image_size: int = 128, **shift: float) -> dict:
  """One study: {"image": uint8 [S, S], "report": str, "labels": float32 [8] (0/1)}.

  `shift`: `render_image`'s noise_scale / contrast_scale (a mild domain shift; default none)."""
  return _study(sample_case(seed, split, index), image_size, **shift)


def generate_category_study(seed: int, split: str, index: int, category: str,
                            image_size: int = 128, **shift: float) -> dict:
  """A study whose only positive label is `category` ("no_finding": a normal study)."""
  return _study(sample_case(seed, split, index, category=category), image_size, **shift)


def _study(case: Case, image_size: int, **shift: float) -> dict:
  return {"image": render_image(case, image_size, **shift), "report": write_report(case),
          "labels": case.labels}


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 [H, W] or [H, W, 1] grayscale image (how the data set stores images)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] == 1):
    raise ValueError(f"expected a uint8 [H, W] image, got {image.dtype} {image.shape}")
  buffer = io.BytesIO()
  Image.fromarray(image.reshape(image.shape[:2])).save(buffer, format="PNG")
  return buffer.getvalue()
