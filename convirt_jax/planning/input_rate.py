"""The input side of a plan: the job's own training pipeline, timed on this machine's CPU, one core.

`pipeline.train_loader` with one read thread and no worker processes (so one core does the work):
JPEG decode at data.stored_size, the config's augmentations to data.image_size, one sentence per
record and batched tokenisation (pretraining), or images and labels only (fine-tuning). The records are
synthetic JPEGs (`data.jpeg_source`); the tokenizer is a WordPiece vocabulary learned from their
sentences (tokenising costs about the same whatever the vocabulary). A few seconds of batches after
a warm-up; the figure is this machine's and moves with its load.
"""
from __future__ import annotations

import dataclasses
import time

import ml_collections

from convirt_jax.data import pipeline
from convirt_jax.data.jpeg_source import JpegSource
from convirt_jax.tokenizer import Tokenizer

BATCH = 16
RECORDS = 96


@dataclasses.dataclass(frozen=True)
class InputRate:
  images_per_s_per_core: float
  seconds: float
  image_size: int
  stored_size: int
  with_text: bool


def measure(config: ml_collections.ConfigDict, *, with_text: bool, seconds: float = 3.0) -> InputRate:
  """Images per second of one core through the job's training pipeline at the config's sizes."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.num_threads, config.data.worker_count = 1, 0
  source = JpegSource(RECORDS, int(config.data.stored_size))
  tokenizer = None
  if with_text:
    length = config.model.text.max_length
    texts = [pipeline.whole_text(source[i]) for i in range(len(source))]
    tokenizer = Tokenizer.from_corpus(texts, 500, max_length=length if isinstance(length, int) else 128)
  batches = iter(pipeline.train_loader(source, tokenizer, config, local_batch_size=BATCH, seed=0))
  next(batches)  # thread start-up and the first decode
  images, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(batches)
    images += BATCH
  elapsed = time.perf_counter() - start
  return InputRate(images / elapsed, elapsed, int(config.data.image_size), int(config.data.stored_size),
                   with_text)


def cores_per_chip(images_per_s_per_chip: float, rate: InputRate) -> float:
  """Host cores one chip needs to be fed `images_per_s_per_chip` at `rate`."""
  return images_per_s_per_chip / rate.images_per_s_per_core
