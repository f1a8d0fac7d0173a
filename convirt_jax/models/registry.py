"""The image encoders a config can name (`config.model.image.name`): one registration line each.

An image encoder is two modules, imported by name when first used, each with a fixed interface. Each
function takes `arch`, a mapping of "name" (the registered name: one module can serve several presets)
and the encoder's ARCH_KEYS fields:
  its model (convirt_jax.models.<...>)
    ARCH_KEYS             {config.model.image field: type}: the fields that define the architecture
    build(arch, *, axis_name, dtype, remat, batch_norm) -> (flax module, width of its pooled features)
                          the module maps normalised float NHWC images to pooled features [N, C]; one
                          with BatchNorm has an `axis_name` field (the steps check it), one without has
                          empty batch statistics
    title(arch), describe(arch)   "ResNet50"; "ResNet50 (width 1)", for tables and errors
    random_variables(arch, image_size, seed)  torchvision's initialisation, drawn with numpy
    check_image_size(arch, image_size)  optional: raises ConfigError for a size it cannot take
    layer_index(arch, path) -> (layer, number of layers)  optional: the layer of a parameter (path
                          within the encoder), for fine-tuning's layer-wise learning-rate decay
  its weights interop (convirt_jax.interop.<...>)
    load_torchvision(init_from, arch, image_size)   {"params", "batch_stats"} from a torchvision file
                          (or "torchvision": its published weights), fitted to the input size
    save_torchvision(variables, path)   a state dict torchvision's class loads with strict=True
    torch_builder(arch, image_size) -> (variable name, the torch code that builds the module, for the
                          export README)
A new image encoder is those two modules plus one `register` line below; every other part of the
project (both jobs, the plan, `ConVIRT.load`, the export) reaches it through `ImageArch` and this file.
"""
import dataclasses
import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from convirt_jax.errors import ConfigError

DEFAULT = "resnet"  # what a config (or a checkpoint's config) without model.image.name means


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str     # config.model.image.name
  model: str    # module path of its model
  interop: str  # module path of its torchvision interop


_ENTRIES: dict[str, Entry] = {}


def register(name: str, model: str, interop: str) -> Entry:
  """Adds an image encoder (modules imported by name when first used); the name must be new."""
  if name in _ENTRIES:
    raise ValueError(f"an image encoder named {name!r} is registered already ({_ENTRIES[name]})")
  _ENTRIES[name] = Entry(name, model, interop)
  return _ENTRIES[name]


def names() -> tuple[str, ...]:
  """The registered names, in registration order."""
  return tuple(_ENTRIES)


def entry(name: str) -> Entry:
  if name not in _ENTRIES:
    raise ConfigError(f"config.model.image.name={name!r} is not a registered image encoder; choose one of "
                      f"{list(_ENTRIES)}")
  return _ENTRIES[name]


@dataclasses.dataclass(frozen=True)
class ImageArch:
  """One image encoder architecture: its registered name and the values of its ARCH_KEYS."""
  name: str
  options: tuple[tuple[str, Any], ...]

  def get(self, key: str) -> Any:
    return dict(self.options)[key]

  def as_dict(self) -> dict[str, Any]:
    """The config.model.image fields it sets (with the name only when it is not the default, so that
    the records of a ResNet run read as they always have)."""
    return ({} if self.name == DEFAULT else {"name": self.name}) | dict(self.options)

  def values(self) -> dict[str, Any]:
    """What the encoder's functions take as `arch`: the name and the options."""
    return {"name": self.name, **dict(self.options)}

  def title(self) -> str:
    return model(self.name).title(self.values())

  def describe(self) -> str:
    return model(self.name).describe(self.values())


def model(name: str) -> ModuleType:
  """The encoder's model module."""
  return importlib.import_module(entry(name).model)


def interop(name: str) -> ModuleType:
  """The encoder's torchvision interop module."""
  return importlib.import_module(entry(name).interop)


def arch_from_config(image: Mapping[str, Any]) -> ImageArch:
  """The architecture of a config.model.image (a ConfigDict, or a stored config's dict)."""
  name = str(image.get("name", DEFAULT))
  keys = model(name).ARCH_KEYS
  missing = [k for k in keys if k not in image]
  if missing:
    raise ConfigError(f"config.model.image lacks {missing} that the {name!r} image encoder needs")
  return ImageArch(name, tuple((k, cast(image[k])) for k, cast in keys.items()))


def build_image_encoder(arch: ImageArch, *, axis_name: str | None = None, dtype: Any = None,
                        remat: bool = False, batch_norm: str = "batch"):
  """(the flax module, the width of its pooled features). `axis_name` is the mesh axis that
  training-mode normalisation statistics are averaged over (None outside shard_map); `dtype` the
  activations' (None: float32)."""
  return model(arch.name).build(arch.values(), axis_name=axis_name, dtype=dtype, remat=remat,
                                batch_norm=batch_norm)


def random_variables(arch: ImageArch, image_size: int, seed: int) -> dict[str, Any]:
  """torchvision's initialisation of the encoder, drawn with numpy from `seed` (nothing compiled)."""
  return model(arch.name).random_variables(arch.values(), image_size, seed)


def check_image_size(arch: ImageArch, image_size: int) -> None:
  """Raises ConfigError, naming config.data.image_size, when the encoder cannot take that size."""
  check = getattr(model(arch.name), "check_image_size", None)
  if check is not None:
    check(arch.values(), int(image_size))


def check_layers(arch: ImageArch) -> None:
  """Raises ConfigError when the encoder does not say which layer each parameter is in."""
  module = model(arch.name)
  if not hasattr(module, "layer_index"):
    raise ConfigError(f"config.finetune.layer_decay needs the layers of the image encoder {arch.name!r}, "
                      f"whose module {module.__name__} defines no layer_index: set finetune.layer_decay=1")


def layer_index(arch: ImageArch, path: tuple[str, ...]) -> tuple[int, int]:
  """(layer of the encoder parameter at `path`, number of layers; the head above is that number)."""
  check_layers(arch)
  return model(arch.name).layer_index(arch.values(), path)


def load_torchvision(arch: ImageArch, init_from: str, image_size: int) -> dict[str, Any]:
  """{"params", "batch_stats"} from torchvision weights (a file, or "torchvision") for `image_size`."""
  return interop(arch.name).load_torchvision(init_from, arch.values(), image_size)


def save_torchvision(arch: ImageArch, variables: dict[str, Any], path) -> None:
  """The encoder's variables as a torchvision state dict (.safetensors, .pt or .pth by the suffix)."""
  interop(arch.name).save_torchvision(variables, path)


def torch_builder(arch: ImageArch, image_size: int) -> tuple[str, str]:
  """(variable name, torch code that builds the encoder with torchvision) for the export's README."""
  return interop(arch.name).torch_builder(arch.values(), image_size)


register("resnet", "convirt_jax.models.resnet", "convirt_jax.interop.torchvision_resnet")
register("vit_b_16", "convirt_jax.models.vit", "convirt_jax.interop.torchvision_vit")
register("vit_b_32", "convirt_jax.models.vit", "convirt_jax.interop.torchvision_vit")
register("vit_l_16", "convirt_jax.models.vit", "convirt_jax.interop.torchvision_vit")
register("vit_tiny", "convirt_jax.models.vit", "convirt_jax.interop.torchvision_vit")
