"""torch state dict files, read and written the one safe way: .safetensors (no torch needed) or
.pt/.pth read with torch.load(weights_only=True), which never runs code from a file. Shared by the
weight interop modules; torch is imported only where a torch file or tensor is involved."""
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from convirt_jax.errors import CheckpointError, ConfigError, WeightsNotFound

TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
MAX_KEYS_IN_ERROR = 8


def as_numpy(key: str, value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so widen that first
    value = value.detach().cpu()
    if value.is_floating_point() and value.element_size() < 4:
      value = value.float()
    return value.numpy()
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value)
  raise CheckpointError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor or array")


def read_state_dict(source: str | os.PathLike | Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
  """numpy arrays of a state dict given as a mapping or a file; `what` names the checkpoint in errors
  ("torchvision ResNet")."""
  if isinstance(source, Mapping):
    return {k: as_numpy(k, v) for k, v in source.items()}
  path = Path(source)
  if not path.is_file():
    raise CheckpointError(f"no {what} checkpoint at {str(path)!r}")
  if path.suffix == SAFETENSORS_SUFFIX:
    return read_safetensors(path)
  if path.suffix not in TORCH_SUFFIXES:
    raise CheckpointError(f"cannot tell the format of {str(path)!r}: use a .safetensors, .pt or .pth file")
  loaded = read_torch_weights(path)
  if not isinstance(loaded, Mapping):
    raise CheckpointError(f"{str(path)!r} holds a {type(loaded).__name__}, not a state dict")
  return {k: as_numpy(k, v) for k, v in loaded.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The arrays of a .safetensors file; CheckpointError naming the file when it does not read
  (truncated by an interrupted download or copy, or not a safetensors file)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  try:
    return dict(safetensors.numpy.load_file(os.fspath(path)))
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError, OSError)
    raise CheckpointError(f"{os.fspath(path)!r} is not a readable safetensors file "
                          f"({type(e).__name__}: {first_line(e)}): was its download or copy cut "
                          "short? Fetch it again") from None


def read_torch_weights(path: str | os.PathLike) -> Any:
  """A torch file read with torch.load(weights_only=True): tensors and plain containers only, never code.

  A pickle that names anything else (a function to call, a class to build: what a crafted file
  would run on load) is refused with the reason, as is a truncated file; both as a CheckpointError
  naming the file.
  """
  import torch  # pylint: disable=g-import-not-at-top
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?:\. Please|\n|$)", str(e))
    reason = detail[1].strip() if detail and detail[1].strip() else first_line(e)
    raise CheckpointError(
        f"refused to load {os.fspath(path)!r}: it holds more than tensors ({reason}), and weights are "
        "only read with torch.load(weights_only=True), which never runs code from a file. Save just "
        "the state dict of tensors (torch.save(model.state_dict(), path)) or use .safetensors") from None
  except Exception as e:  # pylint: disable=broad-except  (truncated zip, not a torch file)
    raise CheckpointError(f"{os.fspath(path)!r} is not a readable torch file ({type(e).__name__}: "
                          f"{first_line(e)}): was its download or copy cut short?") from None


def save_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes a state dict of numpy arrays: `.safetensors` (no torch needed) or `.pt`/`.pth` by the
  file's suffix."""
  path = Path(path)
  if path.suffix not in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES):
    raise ValueError(f"cannot tell the format of {str(path)!r}: use a .safetensors, .pt or .pth suffix")
  state = {k: np.ascontiguousarray(v) for k, v in state.items()}
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == SAFETENSORS_SUFFIX:
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    safetensors.numpy.save_file(state, str(path))
  else:
    import torch  # pylint: disable=g-import-not-at-top
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, path)  # writable copies


def first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0][:200] if lines else ""


def list_keys(keys: list[str]) -> str:
  shown = ", ".join(repr(k) for k in keys[:MAX_KEYS_IN_ERROR])
  more = len(keys) - MAX_KEYS_IN_ERROR
  return f"{shown} and {more} more" if more > 0 else shown


def imagenet_source(init_from: str, model_name: str, example_file: str) -> Any:
  """What `model.image.init_from` names, for an encoder's loader: "torchvision" -> the state dict of
  torchvision's IMAGENET1K_V1 weights of `model_name` (downloaded; needs torchvision and a network),
  else the weights file, which must exist. One-line errors name the key (`example_file`: the path the
  error suggests, "/path/to/resnet.pth")."""
  if init_from == "torchvision":
    try:
      import torchvision  # pylint: disable=g-import-not-at-top  (optional: only this option needs it)
    except ImportError as e:
      raise ConfigError("model.image.init_from='torchvision' needs torchvision installed; or set it "
                        "to a downloaded .pth/.pt/.safetensors file") from e
    try:
      return getattr(torchvision.models, model_name)(weights="IMAGENET1K_V1").state_dict()
    except Exception as e:  # pylint: disable=broad-except  (URLError offline, HTTP errors, ...)
      weights = torchvision.models.get_model_weights(model_name).IMAGENET1K_V1
      raise WeightsNotFound(
          f"could not download torchvision's ImageNet weights for {model_name} ({type(e).__name__}: "
          f"{first_line(e)}). Without network access, download {weights.url} elsewhere and pass the "
          f"file: --config.model.image.init_from={example_file}") from None
  if not init_from:
    raise ConfigError("model.image.init_from is empty: there is nothing to load")
  if not Path(init_from).is_file():
    raise WeightsNotFound(f"model.image.init_from={init_from!r}: no such file")
  return init_from
