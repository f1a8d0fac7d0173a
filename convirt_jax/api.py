"""The users' API: load a trained ConVIRT from its workdir and embed images and report text.

  from convirt_jax import ConVIRT
  m = ConVIRT.load("runs/synthetic")            # best checkpoint; "latest" or a step number also work
  v = m.encode_images(images)                   # uint8 [N, H, W] or [N, H, W, C], any size -> [N, 512]
  u = m.encode_texts(["No pleural effusion."])  # -> [N, 512]; v @ u.T are cosine similarities

Images get the evaluation transform (grey; shorter side resized, centre crop); embeddings are L2-normalised
projections, or with `project=False` the encoders' pooled features (2048 for ResNet50, BERT's hidden size).
"""
from __future__ import annotations

import functools
import logging as std_logging
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from convirt_jax import logs, parallel, storage
from convirt_jax.data.augment import eval_transform
from convirt_jax.evaluate.features import Embedder, Reading
from convirt_jax.errors import CheckpointError
from convirt_jax.losses import l2_normalize
from convirt_jax.models.bert import BertConfig
from convirt_jax.models.convirt import ConVIRTModel, build_model
from convirt_jax.tokenizer import Tokenizer
from convirt_jax.training import checkpoints


# Reading a checkpoint read-only makes orbax warn about what it is not asked to restore: noise for users.
std_logging.getLogger("absl").addFilter(logs.quiet_third_party)


class ConVIRT:
  """A trained dual encoder: `model`, its `variables` ({"params", "batch_stats"}), `tokenizer`, `config`."""

  def __init__(self, config: ml_collections.ConfigDict, model: ConVIRTModel, variables: dict[str, Any],
               tokenizer: Tokenizer, text_config: BertConfig, step: int):
    self.config = config
    self.model = model
    self.variables = variables
    self.tokenizer = tokenizer
    self.text_config = text_config
    self.step = step

  @classmethod
  def load(cls, workdir: str, checkpoint: str | int = "best") -> "ConVIRT":
    """Loads a checkpoint of a pretraining run: "best" (lowest validation loss, the default; the latest
    when no checkpoint has one), "latest" (or "last"), or a step number."""
    workdir = storage.check(workdir, "workdir")
    if not storage.path(checkpoints.checkpoint_dir(workdir)).is_dir():
      raise CheckpointError(f"{workdir} is not a convirt_jax pretraining workdir: it has no checkpoints/ "
                            f"(train first: python -m convirt_jax.main --config=... --workdir={workdir})")
    step, meta = checkpoints.chosen_step(workdir, checkpoint)
    config = ml_collections.ConfigDict(meta["config"])
    text_config = BertConfig.from_dict(
        storage.read_json(os.path.join(workdir, checkpoints.TEXT_CONFIG_FILE)))
    tokenizer = Tokenizer.from_pretrained(os.path.join(workdir, checkpoints.TOKENIZER_DIR),
                                          max_length=config.model.text.max_length)
    model = build_model(config, text_config)
    variables = checkpoints.restore_variables(workdir, step)
    return cls(config, model, variables, tokenizer, text_config, step)

  def encode_images(self, images: np.ndarray | Sequence[np.ndarray], *, project: bool = True,
                    batch_size: int = 64) -> np.ndarray:
    """uint8 images, [N, H, W], [N, H, W, C] (C = 1 or 3) or a list of differently sized ones."""
    size = self.config.data.image_size
    prepared = [eval_transform(_channels_last(image), size) for image in images]
    prepared = np.stack(prepared) if prepared else np.zeros((0, size, size, 3), np.uint8)
    out = self._embedder.arrays({"image": prepared}, batch_size)
    return l2_normalize(out["image_emb"]) if project else out["image_features"]

  def encode_texts(self, texts: Sequence[str], *, project: bool = True,
                   batch_size: int = 256) -> np.ndarray:
    if isinstance(texts, str):
      raise TypeError("encode_texts takes a list of strings, not a single string")
    tokens = self.tokenizer(list(texts))
    out = self._embedder.arrays({k: np.asarray(tokens[k], np.int32) for k in ("input_ids", "attention_mask")},
                                batch_size)
    return l2_normalize(out["text_emb"]) if project else out["text_features"]

  @functools.cached_property
  def _embedder(self) -> Embedder:
    """The evaluators' embedding path, on this process's devices (the API is per process)."""
    return Embedder(self.model, self.variables, parallel.make_mesh(jax.local_devices()),
                    Reading.of(self.config))


def _channels_last(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"images must be uint8; got {image.dtype}")
  if image.ndim == 2:
    return image[..., None]
  if image.ndim == 3 and image.shape[-1] == 1:
    return image
  if image.ndim == 3 and image.shape[-1] == 3:
    # The encoder was trained on grey radiographs: RGB is converted with ITU-R 601 luma (PIL's "L").
    return np.asarray(Image.fromarray(image).convert("L"))[..., None]
  raise ValueError(f"an image must be [H, W] or [H, W, C] with C = 1 or 3; got shape {image.shape}")
