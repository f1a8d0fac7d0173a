"""The image encoders the transfer job compares: ConVIRT workdirs, ImageNet (torchvision) weights, random.

`config.encoders` entries:
  PATH, PATH@best   a ConVIRT pretraining workdir: its best checkpoint by validation loss (the latest,
                    with a warning, when no checkpoint has one: `checkpoints.resolve_step`)
  PATH@latest, PATH@STEP   another checkpoint of it
  "imagenet"        torchvision weights of the image encoder from config.imagenet_weights (a file, or
                    "torchvision")
  "random"          torchvision's initialisation, seeded by config.random_init_seed

All encoders share one architecture: the ConVIRT workdirs' (model.image's encoder and its fields, input
size), else config.model.image and config.data.image_size. `parse_encoders` and `resolve_architecture`
only read files (no compile), so every bad entry is reported before anything runs.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from convirt_jax import storage
from convirt_jax.errors import CheckpointError, ConfigError
from convirt_jax.models import registry
from convirt_jax.models.convirt import image_variables
from convirt_jax.training import checkpoints

CONVIRT, IMAGENET, RANDOM = "convirt", "imagenet", "random"
ROW_NAMES = {IMAGENET: "ImageNet Init.", RANDOM: "Random Init."}
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pretrain_command(path: str) -> str:
  """The command that makes a pretraining run at `path` (configs/<its name>.py when there is one)."""
  name = os.path.basename(os.path.normpath(path))
  config = f"configs/{name}.py" if os.path.isfile(os.path.join(_REPO, "configs", f"{name}.py")) else (
      "configs/<config>.py")
  return f"python -m convirt_jax.main --config={config} --workdir={path}"


@dataclasses.dataclass(frozen=True)
class Encoder:
  """One row of the results: `name` (the tables' row), `slug` (its directory name), `kind`."""
  name: str
  slug: str
  kind: str
  spec: str                     # the config.encoders entry
  path: str = ""                # ConVIRT: the workdir
  step: int = 0                 # ConVIRT: the resolved checkpoint step
  pretrain_config: dict | None = None  # ConVIRT: the run's config (from the checkpoint's meta)

  @property
  def is_convirt(self) -> bool:
    return self.kind == CONVIRT


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The image encoder every row of a transfer shares, and its input size."""
  image: registry.ImageArch
  image_size: int

  def describe(self) -> str:
    return f"{self.image.describe()} at {self.image_size} px"

  def as_dict(self) -> dict[str, Any]:
    """config.model.image's fields and data.image_size (what a result's identity records)."""
    return {**self.image.as_dict(), "image_size": self.image_size}


def _split_spec(spec: str) -> tuple[str, str]:
  path, sep, which = spec.rpartition("@")
  if not sep or not path:
    return spec, "best"
  which = which.strip().lower()
  if which not in ("best", "latest", "last") and not which.isdigit():
    raise ConfigError(f"config.encoders has {spec!r}: after '@' give best, latest or a step number")
  return path, which


def _convirt_encoder(spec: str) -> Encoder:
  path, which = _split_spec(spec)
  path = storage.check(path, "config.encoders")
  if not storage.path(path).is_dir():
    raise ConfigError(f"config.encoders has {spec!r}: not \"imagenet\", \"random\" or an existing ConVIRT "
                      f"workdir (make one with {pretrain_command(path)})")
  if not storage.path(checkpoints.checkpoint_dir(path)).is_dir():
    raise CheckpointError(f"config.encoders has {spec!r}: {path} is not a ConVIRT workdir (it has no "
                          f"checkpoints/; make one with {pretrain_command(path)})")
  # "best" falls back to the latest step, with a warning, when no kept step has a validation loss.
  step, meta = checkpoints.chosen_step(path, which)
  if not storage.exists(os.path.join(path, checkpoints.TEXT_CONFIG_FILE)):
    raise CheckpointError(f"config.encoders has {spec!r}: {path} lacks {checkpoints.TEXT_CONFIG_FILE}; it "
                          "was not written by the pretraining job")
  return Encoder(name="ConVIRT", slug="convirt", kind=CONVIRT, spec=spec, path=path, step=int(step),
                 pretrain_config=meta["config"])


def parse_encoders(config: ml_collections.ConfigDict) -> list[Encoder]:
  """The encoders of config.encoders, in order, with unique row names and directory names.

  Raises ConfigError / CheckpointError naming the entry: an unknown kind, a path that is not a ConVIRT
  workdir, a checkpoint that is not there, an ImageNet weights file that is not there.
  """
  encoders = []
  for spec in config.encoders:
    spec = str(spec)
    if spec in (IMAGENET, RANDOM):
      if spec == IMAGENET and config.imagenet_weights != "torchvision" and not os.path.isfile(
          config.imagenet_weights):
        raise ConfigError(f"config.imagenet_weights={config.imagenet_weights!r}: no such file (give a "
                          "torchvision .pth/.pt/.safetensors file, or \"torchvision\")")
      encoders.append(Encoder(name=ROW_NAMES[spec], slug=spec, kind=spec, spec=spec))
    else:
      encoders.append(_convirt_encoder(spec))
  convirt = [e for e in encoders if e.is_convirt]
  if len(convirt) > 1:  # rows named after the workdirs (and the checkpoint when that is ambiguous)
    renamed = {}
    for e in convirt:
      base = os.path.basename(os.path.normpath(e.path)) or e.path
      renamed[e.spec] = base
    counts = {n: list(renamed.values()).count(n) for n in renamed.values()}
    for e in convirt:
      name = renamed[e.spec]
      if counts[name] > 1:
        name = f"{name}@{e.step}"
      renamed[e.spec] = name
    if len(set(renamed.values())) < len(renamed):
      raise ConfigError(f"config.encoders={tuple(config.encoders)} names the same checkpoint twice")
    encoders = [dataclasses.replace(e, name=renamed[e.spec], slug="convirt_" + _slug(renamed[e.spec]))
                if e.is_convirt else e for e in encoders]
  return encoders


def _slug(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def resolve_architecture(encoders: list[Encoder], config: ml_collections.ConfigDict) -> Architecture:
  """The one architecture of every encoder: the ConVIRT runs' (which must agree), else the config's."""
  found = {}
  for e in encoders:
    if e.is_convirt:
      found[e.spec] = Architecture(registry.arch_from_config(e.pretrain_config["model"]["image"]),
                                   int(e.pretrain_config["data"]["image_size"]))
  if not found:
    image = registry.arch_from_config(config.model.image)
    registry.check_image_size(image, config.data.image_size)
    return Architecture(image, int(config.data.image_size))
  first_spec, first = next(iter(found.items()))
  for spec, arch in found.items():
    if arch != first:
      raise ConfigError(f"config.encoders: {first_spec!r} is a {first.describe()}, {spec!r} a "
                        f"{arch.describe()}; every encoder must have the same architecture")
  return first


def load_encoder(encoder: Encoder, arch: Architecture, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"params", "batch_stats"} of the image encoder (no head): restored from the ConVIRT checkpoint,
  read from torchvision weights, or drawn (config.random_init_seed)."""
  if encoder.kind == CONVIRT:
    variables = checkpoints.restore_variables(encoder.path, encoder.step)
    return image_variables(variables)
  if encoder.kind == IMAGENET:
    try:
      variables = registry.load_torchvision(arch.image, config.imagenet_weights, arch.image_size)
    except (ConfigError, CheckpointError) as e:
      raise type(e)(f"config.imagenet_weights={config.imagenet_weights!r} for a {arch.describe()}: "
                    f"{e}") from e
    return variables
  if encoder.kind == RANDOM:
    return registry.random_variables(arch.image, arch.image_size, int(config.random_init_seed))
  raise ValueError(f"unknown encoder kind {encoder.kind!r}")


def describe(encoder: Encoder, config: ml_collections.ConfigDict) -> str:
  if encoder.is_convirt:
    return f"{encoder.name}: {encoder.path} at step {encoder.step}"
  if encoder.kind == IMAGENET:
    return f"{encoder.name}: torchvision weights {config.imagenet_weights}"
  return f"{encoder.name}: random initialisation (seed {config.random_init_seed})"
