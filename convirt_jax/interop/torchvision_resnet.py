"""torchvision ResNet state dicts <-> `convirt_jax.models.resnet.ResNet` variables, both directions.

Keys map by name (`layer1_0/downsample_conv/kernel` <-> `layer1.0.downsample.0.weight`); conv kernels
change layout OIHW <-> HWIO; BatchNorm `scale`/`bias`/`mean`/`var` are torch's `weight`/`bias`/
`running_mean`/`running_var`. Loading checks the checkpoint against the key and shape set of the Flax
model itself (from `jax.eval_shape` of its init), so a checkpoint of another architecture is refused
rather than partly loaded. torch is imported only where a torch file or tensor is involved.
"""
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from convirt_jax.errors import CheckpointError, ConfigError
from convirt_jax.interop import state_dicts
from convirt_jax.models.resnet import SUPPORTED_DEPTHS, ResNet, base_channels

Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...}

_COLLECTIONS = ("params", "batch_stats")
# (collection, Flax leaf name) -> torch parameter/buffer name
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _torch_module_name(flax_module_path: tuple[str, ...]) -> str:
  parts = []
  for name in flax_module_path:
    block = re.fullmatch(r"(layer\d+)_(\d+)", name)
    if block:
      parts += [block[1], block[2]]
    elif name == "downsample_conv":
      parts += ["downsample", "0"]
    elif name == "downsample_bn":
      parts += ["downsample", "1"]
    else:
      parts.append(name)
  return ".".join(parts)


def _is_conv_kernel(flax_path: tuple[str, ...]) -> bool:
  return flax_path[-1] == "kernel"


def _to_torch_layout(flax_path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  return np.transpose(array, (3, 2, 0, 1)) if _is_conv_kernel(flax_path) else array


def _to_flax_layout(flax_path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  return np.transpose(array, (2, 3, 1, 0)) if _is_conv_kernel(flax_path) else array


def _torch_shape(flax_path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(shape[i] for i in (3, 2, 0, 1)) if _is_conv_kernel(flax_path) else tuple(shape)


def _torch_entries(variables: Variables) -> Iterator[tuple[str, str, tuple[str, ...], Any]]:
  """Yields (torch key, collection, Flax path inside the collection, leaf) for every leaf."""
  for collection in _COLLECTIONS:
    if collection not in variables:
      raise ValueError(f"ResNet variables need a {collection!r} collection, got {sorted(variables)}")
    for path, leaf in flax.traverse_util.flatten_dict(variables[collection]).items():
      torch_leaf = _LEAF_NAMES.get((collection, path[-1]))
      if torch_leaf is None:
        raise ValueError(f"{collection}/{'/'.join(path)} is not a ResNet variable torchvision has")
      yield f"{_torch_module_name(path[:-1])}.{torch_leaf}", collection, path, leaf


def torchvision_state_dict(variables: Variables) -> dict[str, np.ndarray]:
  """The torchvision state dict (numpy arrays, torch layout) of `ResNet` variables, without `fc`.

  Every BatchNorm also gets the `num_batches_tracked` buffer torch has; it is 0 because Flax does not
  count batches (torch reads it only when momentum is None, which torchvision never sets).
  """
  state = {}
  for key, _, path, leaf in _torch_entries(variables):
    state[key] = _to_torch_layout(path, np.asarray(jax.device_get(leaf)))
    if key.endswith(".running_var"):
      state[key.removesuffix("running_var") + "num_batches_tracked"] = np.array(0, np.int64)
  return state


def save_torchvision_resnet(variables: Variables, path: str | os.PathLike) -> None:
  """Writes `variables` as a state dict `torchvision.models.resnetNN()` with `fc = nn.Identity()`
  loads with strict=True; `.safetensors` (no torch needed) or `.pt`/`.pth` by the file's suffix."""
  state_dicts.save_state_dict(torchvision_state_dict(variables), path)


def _abstract_variables(depth: int, width: float, small_stem: bool) -> Variables:
  model = ResNet(depth=depth, width=width, small_stem=small_stem)
  # Shapes only: nothing is computed, so the image size just has to survive the strides.
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))


def _expected_layout(depth: int, width: float,
                     small_stem: bool) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """torch key -> (collection, Flax path, Flax shape) of the configured model."""
  variables = _abstract_variables(depth, width, small_stem)
  return {key: (collection, path, tuple(leaf.shape))
          for key, collection, path, leaf in _torch_entries(variables)}


def _matching_depths(keys: set[str]) -> list[int]:
  """Depths whose torchvision key set the checkpoint's keys are exactly (for a hint in errors)."""
  return [d for d in SUPPORTED_DEPTHS if set(_expected_layout(d, 1.0, False)) == keys]


def load_torchvision_resnet(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                            depth: int = 50, width: float = 1.0,
                            small_stem: bool = False) -> Variables:
  """`ResNet(depth, width, small_stem)` variables from a torchvision state dict.

  Args:
    path_or_state_dict: a `.pt`/`.pth` file (read with torch.load(weights_only=True)), a
      `.safetensors` file (read without torch), or a mapping of names to torch tensors / numpy arrays.
    depth, width, small_stem: the architecture the checkpoint must be exactly.

  Returns:
    {"params": ..., "batch_stats": ...} of float32 numpy arrays. `fc.*` and `num_batches_tracked`
    entries are ignored.

  Raises:
    CheckpointError (a ValueError): naming the keys the checkpoint lacks or has in excess, or a key
      whose shape differs (with both shapes, in torch layout); or an unreadable / absent file.
  """
  state = {k: v for k, v in state_dicts.read_state_dict(path_or_state_dict, "torchvision ResNet").items()
           if not k.startswith("fc.") and not k.endswith(".num_batches_tracked")}
  expected = _expected_layout(depth, width, small_stem)
  arch = f"ResNet{depth} (width={width}, small_stem={small_stem})"
  source = ("checkpoint" if isinstance(path_or_state_dict, Mapping)
            else f"checkpoint {os.fspath(path_or_state_dict)!r}")

  missing = [k for k in expected if k not in state]
  unexpected = [k for k in state if k not in expected]
  if missing or unexpected:
    problems = []
    if missing:
      problems.append(f"missing keys {state_dicts.list_keys(missing)}")
    if unexpected:
      problems.append(f"unexpected keys {state_dicts.list_keys(unexpected)}")
    hint = [d for d in _matching_depths(set(state)) if d != depth]
    hint = f"; its keys are those of ResNet{hint[0]}" if hint else ""
    raise CheckpointError(f"{source} does not fit {arch}: {'; '.join(problems)}{hint}")

  wrong = []
  for key, (_, path, shape) in expected.items():
    want = _torch_shape(path, shape)
    if state[key].shape != want:
      wrong.append(f"{key!r} has shape {tuple(state[key].shape)}, {arch} expects {want}")
  if wrong:
    raise CheckpointError(f"{source} does not fit: " + "; ".join(wrong[:state_dicts.MAX_KEYS_IN_ERROR]) +
                     (f"; and {len(wrong) - state_dicts.MAX_KEYS_IN_ERROR} more" if len(wrong) > state_dicts.MAX_KEYS_IN_ERROR
                      else ""))

  flat = {}
  for key, (collection, path, _) in expected.items():
    if not np.issubdtype(state[key].dtype, np.floating):
      raise CheckpointError(f"checkpoint entry {key!r} has dtype {state[key].dtype}, expected floats")
    flat[(collection, *path)] = _to_flax_layout(path, state[key]).astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat)


def load_imagenet_resnet(init_from: str, depth: int = 50, width: float = 1.0,
                         small_stem: bool = False) -> Variables:
  """Variables for `model.image.init_from`: "torchvision" downloads torchvision's ImageNet weights
  (IMAGENET1K_V1; needs torchvision and internet), anything else is a checkpoint file to load."""
  if init_from == "torchvision":
    if width != 1.0 or small_stem:
      raise ConfigError("model.image.init_from='torchvision' has weights for width=1.0, "
                       f"small_stem=False only, got width={width}, small_stem={small_stem}")
    if depth not in SUPPORTED_DEPTHS:
      raise ConfigError(f"model.image.depth={depth!r} is not supported; choose one of "
                       f"{list(SUPPORTED_DEPTHS)}")
  source = state_dicts.imagenet_source(init_from, f"resnet{depth}", "/path/to/resnet.pth")
  return load_torchvision_resnet(source, depth, width, small_stem)


# --- The image encoder registry's interface (`convirt_jax.models.registry`) ----------------------------


def load_torchvision(init_from: str, arch: Mapping[str, Any], image_size: int) -> Variables:
  del image_size  # a ResNet's weights fit every input size
  return load_imagenet_resnet(init_from, arch["depth"], arch["width"], arch["small_stem"])


def save_torchvision(variables: Variables, path: str | os.PathLike) -> None:
  save_torchvision_resnet(variables, path)


def torch_builder(arch: Mapping[str, Any], image_size: int) -> tuple[str, str]:
  """("resnet", the torch lines that build the architecture with torchvision, fc an Identity)."""
  del image_size  # a ResNet takes every input size
  depth, base, small_stem = arch["depth"], base_channels(arch["width"]), arch["small_stem"]
  if arch["width"] == 1.0 and not small_stem:
    return "resnet", f"resnet = torchvision.models.resnet{depth}()\nresnet.fc = torch.nn.Identity()"
  # Not a torchvision preset: the same ResNet class with convirt_jax's widths and stem.
  block, layers = {18: ("BasicBlock", [2, 2, 2, 2]), 34: ("BasicBlock", [3, 4, 6, 3]),
                   50: ("Bottleneck", [3, 4, 6, 3]), 101: ("Bottleneck", [3, 4, 23, 3])}[depth]
  stem = ("torch.nn.Conv2d(3, base, 3, 1, 1, bias=False)" if small_stem
          else "torch.nn.Conv2d(3, base, 7, 2, 3, bias=False)")
  lines = [
      f"# ResNet{depth} with {base} base channels"
      + (" and a 3x3 stride-1 stem without max-pool" if small_stem else ""),
      "from torchvision.models.resnet import ResNet, BasicBlock, Bottleneck",
      f"resnet, base = ResNet({block}, {layers}), {base}",
      f"resnet.inplanes, resnet.conv1, resnet.bn1 = base, {stem}, torch.nn.BatchNorm2d(base)",
  ]
  if small_stem:
    lines.append("resnet.maxpool = torch.nn.Identity()")
  lines += [
      f"resnet.layer1 = resnet._make_layer({block}, base, {layers[0]})",
      f"resnet.layer2 = resnet._make_layer({block}, base * 2, {layers[1]}, stride=2)",
      f"resnet.layer3 = resnet._make_layer({block}, base * 4, {layers[2]}, stride=2)",
      f"resnet.layer4 = resnet._make_layer({block}, base * 8, {layers[3]}, stride=2)",
      "resnet.fc = torch.nn.Identity()",
  ]
  return "resnet", "\n".join(lines)
