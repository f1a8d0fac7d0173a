"""The train step a job jits, as an abstract program: the job's own factory, on ShapeDtypeStructs.

  pretraining  `training.steps.make_train_step` of `models.convirt.build_model` (train.*: remat,
               micro-batches), state from `training.state.init_train_state`, Adam from `make_optimizer`
  transfer     the fine-tuning step `training.classifier_steps.make_finetune_step` of the transfer job's
               classifier (`jobs.transfer.classifier_model`), with `jobs.transfer_finetune.compiled_steps`'s Adam
Both are jitted with the jobs' shardings (state replicated and donated, batch sharded over "data") on
the mesh they are given. Nothing is initialised: `jax.eval_shape` gives the state's shapes.

train.precision / finetune.precision and data.augment_on "auto" resolve for the target's platform here,
not for the CPU this runs on (`with_precision_for`): on a GPU the step compiled includes the device
augmentations, and its batch is the padded stored images.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from convirt_jax import parallel
from convirt_jax.data import datasets, device_augment
from convirt_jax.data.augment import padded_size, resolve_augment_on
from convirt_jax.errors import ConfigError
from convirt_jax.jobs import transfer_finetune as finetune
from convirt_jax.jobs import transfer as transfer_job
from convirt_jax.jobs.transfer_encoders import Architecture
from convirt_jax.models import convirt, registry
from convirt_jax.models.bert import BertConfig
from convirt_jax.models.convirt import resolve_precision
from convirt_jax.training import optimizer as optimizer_lib
from convirt_jax.training import state as state_lib
from convirt_jax.training import steps as steps_lib

JOBS = ("pretrain", "transfer")
MODES = ("plain", "remat", "micro")
DEFAULT_MICROBATCH = 32  # rows per device per micro-batch when the config has none (train.microbatch_size=0)


@dataclasses.dataclass
class Program:
  """A jitted train step and its abstract arguments (state, batch)."""
  step: Callable[..., Any]
  state: Any
  batch: dict[str, jax.ShapeDtypeStruct]
  global_batch: int
  rows_per_chip: int
  microbatch: int = 0

  def lower(self):
    return self.step.lower(self.state, self.batch)


def tree_bytes(tree: Any) -> int:
  return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def with_precision_for(config: ml_collections.ConfigDict, job: str,
                       platform: str) -> ml_collections.ConfigDict:
  """A copy of `config` whose precision key names the dtype "auto" means on `platform`, and whose
  data.augment_on names where the augmentations run there."""
  config = ml_collections.ConfigDict(config.to_dict())
  section = config.train if job == "pretrain" else config.finetune
  section.precision = resolve_precision(section.precision, platform)
  config.data.augment_on = resolve_augment_on(config.data.augment_on, platform)
  return config


def image_shapes(config: ml_collections.ConfigDict, batch: int, size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch's image entries as the job's loader makes them: augmented [B, S, S, 3], or with
  data.augment_on="device" the padded stored images and their extents."""
  if config.data.augment_on == "device":
    side = padded_size(int(config.data.stored_size))
    return {"image": jax.ShapeDtypeStruct((batch, side, side), jnp.uint8),
            "extent": jax.ShapeDtypeStruct((batch, 2), jnp.int32)}
  return {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)}


def with_batch(config: ml_collections.ConfigDict, job: str, rows_per_chip: int, chips: int,
               mode: str = "") -> ml_collections.ConfigDict:
  """A copy of `config` with the global batch rows_per_chip x chips and (pretraining) the step setting
  of `mode`: plain (no remat, no micro-batches), remat, or micro (train.microbatch_size,
  DEFAULT_MICROBATCH when the config sets none, at most the rows per chip). "" keeps the config's own."""
  config = ml_collections.ConfigDict(config.to_dict())
  global_batch = rows_per_chip * chips
  if job == "transfer":
    if mode not in ("", "plain"):
      raise ConfigError(f"the fine-tuning step has no {mode!r} setting (the transfer job fine-tunes "
                        "without remat or micro-batches)")
    config.finetune.batch_size = global_batch
    return config
  config.train.batch_size = global_batch
  if mode == "plain":
    config.train.remat, config.train.microbatch_size = False, 0
  elif mode == "remat":
    config.train.remat, config.train.microbatch_size = True, 0
  elif mode == "micro":
    config.train.remat = False
    config.train.microbatch_size = min(config.train.microbatch_size or DEFAULT_MICROBATCH, rows_per_chip)
  elif mode:
    raise ValueError(f"mode {mode!r}: one of {MODES}")
  return config


def global_batch(config: ml_collections.ConfigDict, job: str) -> int:
  return int(config.train.batch_size if job == "pretrain" else config.finetune.batch_size)


def text_config(config: ml_collections.ConfigDict) -> tuple[BertConfig, str]:
  """The pretraining job's BERT shape and where it came from, without downloading anything.

  model.text.init_from's config.json when it is a local directory or already in the Hugging Face cache;
  otherwise model.text.config (BERT-base by default), with the vocabulary of the config's tokenizer
  where it is known (a corpus tokenizer's model.text.vocab_size) and BERT's 30,522 otherwise.
  """
  text = config.model.text
  if text.init_from:
    path = ""
    if os.path.isdir(text.init_from):
      path = os.path.join(text.init_from, "config.json")
    else:
      import huggingface_hub  # pylint: disable=g-import-not-at-top
      cached = huggingface_hub.try_to_load_from_cache(text.init_from, "config.json")
      path = cached if isinstance(cached, str) else ""
    if path and os.path.isfile(path):
      with open(path) as f:
        return BertConfig.from_dict(json.load(f)), f"{text.init_from} (config.json)"
  vocab = int(text.vocab_size) if text.tokenizer == "corpus" else 30522
  values = {**text.config.to_dict(), "vocab_size": vocab}
  where = ("model.text.config" if not text.init_from else
           f"model.text.config (BERT-base shape: {text.init_from} is not on this machine)")
  return BertConfig.from_dict(values), where


def text_length(config: ml_collections.ConfigDict) -> int:
  length = config.model.text.max_length
  if isinstance(length, bool) or not isinstance(length, int):
    raise ConfigError(f"config.model.text.max_length={length!r}: the plan compiles for a fixed length; "
                      "give it with --config.model.text.max_length=N")
  return length


def _steps_for_schedule(config: ml_collections.ConfigDict) -> int:
  # The schedule's length only sets constants in the step; the data set is not read to count it.
  return int(config.train.steps) if config.train.steps > 0 else 1000


def pretrain_program(config: ml_collections.ConfigDict, bert: BertConfig, mesh) -> Program:
  """The pretraining job's jitted train step (`make_train_step`) on `mesh`, with abstract arguments."""
  batch = global_batch(config, "pretrain")
  parallel.local_batch_size(batch, mesh)  # the job's own ConfigError when the batch does not split
  size, length = config.data.image_size, text_length(config)
  model = convirt.build_model(config, bert, axis_name=parallel.DATA_AXIS)
  optimizer = optimizer_lib.make_optimizer(config, state_lib.param_shapes(model, size, length),
                                           _steps_for_schedule(config))
  state = jax.eval_shape(lambda: state_lib.init_train_state(
      model, optimizer, jax.random.key(config.train.seed), size, length))
  step = steps_lib.make_train_step(model, optimizer, config, mesh)
  batch_shapes = {**image_shapes(config, batch, size),
                  "input_ids": jax.ShapeDtypeStruct((batch, length), jnp.int32),
                  "attention_mask": jax.ShapeDtypeStruct((batch, length), jnp.int32)}
  return Program(step, state, batch_shapes, batch, batch // mesh.size,
                 int(config.train.microbatch_size))


def num_labels(config: ml_collections.ConfigDict) -> int:
  """The transfer set's label count where the config or its builder declares it (1 otherwise: the head
  is 2,048 x labels, a rounding error in the step)."""
  if config.data.label_columns:
    return len(config.data.label_columns)
  return max(1, len(datasets.declared_label_names(config)))


def transfer_program(config: ml_collections.ConfigDict, mesh) -> Program:
  """The transfer job's fine-tuning step on `mesh`, for config.model.image at data.image_size (the
  architecture the job uses when no ConVIRT workdir is among the encoders)."""
  batch = global_batch(config, "transfer")
  try:
    parallel.local_batch_size(batch, mesh)
  except ConfigError as e:
    raise ConfigError(f"config.finetune.batch_size: {e}") from None  # as the transfer job says it
  arch = Architecture(registry.arch_from_config(config.model.image), int(config.data.image_size))
  labels = num_labels(config)
  model = transfer_job.classifier_model(config, arch, labels)
  task = "multiclass" if config.data.task == "multiclass" else "multilabel"
  ft = config.finetune
  optimizer, step, _ = finetune.compiled_steps(
      model, task, mesh, float(ft.lr), float(ft.weight_decay),
      device_augment.spec_for(config.data.augment_on, config.augment, config.data.image_size),
      optimizer=ft.optimizer, layer_decay=float(ft.layer_decay),
      arch=arch.image if ft.layer_decay != 1 else None)
  size = arch.image_size
  state = jax.eval_shape(lambda: state_lib.new_state(
      model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.uint8)), optimizer,
      jax.random.PRNGKey(0)))
  batch_shapes = {**image_shapes(config, batch, size),
                  "labels": jax.ShapeDtypeStruct((batch, labels), jnp.float32)}
  return Program(step, state, batch_shapes, batch, batch // mesh.size)


def build(config: ml_collections.ConfigDict, job: str, mesh, bert: BertConfig | None = None) -> Program:
  if job == "pretrain":
    return pretrain_program(config, bert, mesh)
  return transfer_program(config, mesh)
