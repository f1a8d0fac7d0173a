"""The image encoders the transfer job compares: ConVIRT workdirs, ImageNet (torchvision) weights, random.

`config.encoders` entries:
  PATH, PATH@best   a ConVIRT pretraining workdir: its best checkpoint by validation loss (the latest,
                    with a warning, when no checkpoint has one: `checkpoints.resolve_step`)
  PATH@latest, PATH@STEP   another checkpoint of it
  "imagenet"        torchvision ResNet weights from config.imagenet_weights (a file, or "torchvision")
  "random"          torchvision's initialisation, seeded by config.random_init_seed

All encoders share one architecture: the ConVIRT workdirs' (depth, width, small_stem, input size), else
config.model.image and config.data.image_size. `parse_encoders` and `resolve_architecture` only read
files (no compile), so every bad entry is reported before anything runs.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from convirt_jax import storage
from convirt_jax.errors import CheckpointError, ConfigError
from convirt_jax.models.resnet import ResNet
from convirt_jax.training import checkpoints

CONVIRT, IMAGENET, RANDOM = "convirt", "imagenet", "random"
ROW_NAMES = {IMAGENET: "ImageNet Init.", RANDOM: "Random Init."}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  depth: int
  width: float
  small_stem: bool
  image_size: int

  def describe(self) -> str:
    return (f"ResNet{self.depth} (width {self.width:g}{', small stem' if self.small_stem else ''}) at "
            f"{self.image_size} px")


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
                          "torchvision ResNet .pth/.pt/.safetensors file, or \"torchvision\")")
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
      image, data = e.pretrain_config["model"]["image"], e.pretrain_config["data"]
      found[e.spec] = Architecture(int(image["depth"]), float(image["width"]), bool(image["small_stem"]),
                                   int(data["image_size"]))
  if not found:
    image = config.model.image
    return Architecture(int(image.depth), float(image.width), bool(image.small_stem),
                        int(config.data.image_size))
  first_spec, first = next(iter(found.items()))
  for spec, arch in found.items():
    if arch != first:
      raise ConfigError(f"config.encoders: {first_spec!r} is a {first.describe()}, {spec!r} a "
                        f"{arch.describe()}; every encoder must have the same architecture")
  return first


def resnet_shapes(arch: Architecture) -> dict[str, Any]:
  """{"params", "batch_stats"} of the architecture's ResNet as ShapeDtypeStructs (traced, not compiled)."""
  model = ResNet(depth=arch.depth, width=arch.width, small_stem=arch.small_stem)
  images = jax.ShapeDtypeStruct((1, arch.image_size, arch.image_size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)


def random_resnet_variables(arch: Architecture, seed: int) -> dict[str, Any]:
  """torchvision's ResNet initialisation drawn with numpy from `seed`: convolutions kaiming-normal
  (fan_out, ReLU gain: N(0, 2 / (k * k * out))), BatchNorm scale 1 / bias 0, running mean 0 / var 1.

  The distribution `ResNet.init` draws from, without compiling the network's forward pass (seconds to
  minutes on a CPU) for weights that are only a baseline.
  """
  shapes = resnet_shapes(arch)
  rng = np.random.default_rng(seed)
  out = {}
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(shapes[collection])
    values = {}
    for path in sorted(flat):
      shape, leaf = flat[path].shape, path[-1]
      if leaf == "kernel":
        fan_out = math.prod(shape[:-2]) * shape[-1]
        values[path] = rng.normal(0.0, math.sqrt(2.0 / fan_out), shape).astype(np.float32)
      elif leaf in ("scale", "var"):
        values[path] = np.ones(shape, np.float32)
      elif leaf in ("bias", "mean"):
        values[path] = np.zeros(shape, np.float32)
      else:
        raise ValueError(f"unexpected ResNet variable {collection}/{'/'.join(path)}")
    out[collection] = flax.traverse_util.unflatten_dict(values)
  return out


def load_encoder(encoder: Encoder, arch: Architecture, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"params", "batch_stats"} of the ResNet (no head): restored from the ConVIRT checkpoint, read from
  torchvision weights, or drawn (config.random_init_seed)."""
  if encoder.kind == CONVIRT:
    variables = checkpoints.restore_variables(encoder.path, encoder.step)
    return {"params": variables["params"]["image"], "batch_stats": variables["batch_stats"]["image"]}
  if encoder.kind == IMAGENET:
    # pylint: disable-next=g-import-not-at-top
    from convirt_jax.interop.torchvision_resnet import load_imagenet_resnet
    try:
      variables = load_imagenet_resnet(config.imagenet_weights, arch.depth, arch.width, arch.small_stem)
    except (ConfigError, CheckpointError) as e:
      raise type(e)(f"config.imagenet_weights={config.imagenet_weights!r} for a {arch.describe()}: "
                    f"{e}") from e
    return variables
  if encoder.kind == RANDOM:
    return random_resnet_variables(arch, int(config.random_init_seed))
  raise ValueError(f"unknown encoder kind {encoder.kind!r}")


def describe(encoder: Encoder, config: ml_collections.ConfigDict) -> str:
  if encoder.is_convirt:
    return f"{encoder.name}: {encoder.path} at step {encoder.step}"
  if encoder.kind == IMAGENET:
    return f"{encoder.name}: torchvision weights {config.imagenet_weights}"
  return f"{encoder.name}: random initialisation (seed {config.random_init_seed})"
