"""The users' API: load a trained ConVIRT from its workdir and embed images and report text.

  from convirt_jax import ConVIRT
  m = ConVIRT.load("runs/synthetic")            # latest checkpoint; "best" or a step number also work
  v = m.encode_images(images)                   # uint8 [N, H, W] or [N, H, W, C], any size -> [N, 512]
  u = m.encode_texts(["No pleural effusion."])  # -> [N, 512]; v @ u.T are cosine similarities

Images get the evaluation transform (grey; shorter side resized, centre crop); embeddings are L2-normalised
projections, or with `project=False` the encoders' pooled features (2048 for ResNet50, BERT's hidden size).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from convirt_jax import checkpoints
from convirt_jax.data.augment import eval_transform
from convirt_jax.errors import CheckpointError
from convirt_jax.models.bert import BertConfig
from convirt_jax.models.convirt import ConVIRTModel, build_model
from convirt_jax.tokenizer import Tokenizer


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
  def load(cls, workdir: str, checkpoint: str | int = "latest") -> "ConVIRT":
    """Loads the "latest" or "best" (lowest validation loss) checkpoint, or the given step."""
    manager = checkpoints.make_manager(workdir, read_only=True)
    steps = manager.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {checkpoints.checkpoint_dir(workdir)}: train first with "
                            f"python -m convirt_jax.main --workdir={workdir} ...")
    if checkpoint == "latest":
      step = manager.latest_step()
    elif checkpoint == "best":
      meta = checkpoints.restore_meta(manager, manager.latest_step())
      step = checkpoints.best_step(manager, meta["config"]["checkpoint"]["keep_best_metric"])
      if step is None:
        raise CheckpointError(f"no checkpoint in {workdir} has a validation metric; use 'latest'")
    else:
      step = int(checkpoint)
      if step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {workdir}; there are {steps}")
    config = ml_collections.ConfigDict(checkpoints.restore_meta(manager, step)["config"])
    text_config = BertConfig.from_json_file(os.path.join(workdir, checkpoints.TEXT_CONFIG_FILE))
    tokenizer = Tokenizer.from_pretrained(os.path.join(workdir, checkpoints.TOKENIZER_DIR),
                                          max_length=config.model.text.max_length)
    model = build_model(config, text_config)
    variables = restore_variables(manager, step, model, config)
    return cls(config, model, variables, tokenizer, text_config, step)

  def encode_images(self, images: np.ndarray | Sequence[np.ndarray], *, project: bool = True,
                    batch_size: int = 64) -> np.ndarray:
    """uint8 images, [N, H, W], [N, H, W, C] (C = 1 or 3) or a list of differently sized ones."""
    size = self.config.data.image_size
    prepared = np.stack([eval_transform(_channels_last(image), size) for image in images])
    return self._encode(self._encode_images_fn, (prepared,), project, batch_size)

  def encode_texts(self, texts: Sequence[str], *, project: bool = True,
                   batch_size: int = 256) -> np.ndarray:
    if isinstance(texts, str):
      raise TypeError("encode_texts takes a list of strings, not a single string")
    tokens = self.tokenizer(list(texts))
    return self._encode(self._encode_texts_fn, (tokens["input_ids"], tokens["attention_mask"]),
                        project, batch_size)

  def _encode(self, fn, arrays: tuple[np.ndarray, ...], project: bool, batch_size: int) -> np.ndarray:
    n = len(arrays[0])
    outputs = []
    for start in range(0, n, batch_size):
      chunk = [a[start:start + batch_size] for a in arrays]
      real = len(chunk[0])
      # Pad to a fixed batch so that one compiled function serves every call.
      chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - real, axis=0)]) for c in chunk]
      features, projection = fn(self.variables, *chunk)
      outputs.append(np.asarray(projection if project else features)[:real])
    out = np.concatenate(outputs) if outputs else np.zeros((0, self.config.model.projection_dim))
    return _l2_normalize(out) if project else out

  @functools.cached_property
  def _encode_images_fn(self):
    return jax.jit(lambda v, x: self.model.apply(v, x, method=ConVIRTModel.encode_images))

  @functools.cached_property
  def _encode_texts_fn(self):
    return jax.jit(lambda v, ids, mask: self.model.apply(v, ids, mask, method=ConVIRTModel.encode_texts))


def restore_variables(manager, step: int, model: ConVIRTModel,
                      config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"params", "batch_stats"} of a checkpoint, restored onto the default device."""
  from convirt_jax import train  # pylint: disable=g-import-not-at-top  (train imports this module's deps)
  optimizer = train.make_optimizer(config, train.param_shapes(
      model, config.data.image_size, config.model.text.max_length), steps_total=1)
  abstract = jax.eval_shape(lambda: train.init_train_state(
      model, optimizer, jax.random.key(0), config.data.image_size, config.model.text.max_length))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  state, _ = checkpoints.restore(manager, step, abstract)
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


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


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
