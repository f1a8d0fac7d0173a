"""Hugging Face BERT checkpoints <-> `BertEncoder` parameters, both directions.

Reading needs no torch for safetensors checkpoints; `pytorch_model.bin` needs torch. A checkpoint that
does not fit its config (missing key, unexpected encoder key, wrong shape) is refused, never partially
loaded. Parameter trees are plain nested dicts of numpy float32 arrays, as in `variables["params"]`.
"""
import json
import os
import re
import shutil
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from convirt_jax.errors import CheckpointError, WeightsNotFound
from convirt_jax.interop.state_dicts import read_safetensors, read_torch_weights
from convirt_jax.hub import resolve_hf_dir
from convirt_jax.models.bert import BertConfig, BertEncoder

Params = dict[str, Any]

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_BIN = "pytorch_model.bin"
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json")
# Checkpoint entries that are not encoder weights: HF's pooler (ConVIRT pools the token states itself),
# the LM/NSP heads of BertForPreTraining saved without the "bert." prefix, and non-learned buffers.
_IGNORED = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$|embeddings\.token_type_ids$)")
# Flax leaf name -> HF leaf name; a Dense kernel is the transpose of torch's Linear weight.
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def _flax_to_hf_key(path: tuple[str, ...]) -> str:
  names = [n.replace("layer_", "layer.") if re.fullmatch(r"layer_\d+", n) else n for n in path[:-1]]
  return ".".join(names + [_LEAF_TO_HF.get(path[-1], path[-1])])


def expected_hf_shapes(config: BertConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """HF key -> (Flax parameter path, HF-layout shape), from the Flax model's own abstract init."""
  ids = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda: BertEncoder(config).init(jax.random.key(0), ids, ids))["params"]
  table = {}
  for path, leaf in flax.traverse_util.flatten_dict(abstract).items():
    shape = leaf.shape[::-1] if path[-1] == "kernel" else leaf.shape
    table[_flax_to_hf_key(path)] = (path, tuple(shape))
  return table


def _encoder_entries(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The encoder's entries under HF BertModel names: "bert." stripped, old gamma/beta renamed."""
  if any(k.startswith("bert.") for k in state_dict):
    # A model with heads (BertForPreTraining, ...): everything outside "bert." is a head.
    state_dict = {k[len("bert."):]: v for k, v in state_dict.items() if k.startswith("bert.")}
  renamed = {}
  for key, value in state_dict.items():
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
    key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
    if not _IGNORED.match(key):
      renamed[key] = value
  return renamed


def _check_keys_and_shapes(config: BertConfig, shapes: Mapping[str, tuple[int, ...]], what: str):
  expected = expected_hf_shapes(config)
  missing = sorted(set(expected) - set(shapes))
  if missing:
    raise ValueError(f"{what} lacks {len(missing)} key(s) the config needs, e.g. {missing[0]!r} "
                     f"(expected shape {expected[missing[0]][1]}); missing: {missing[:8]}")
  unexpected = sorted(set(shapes) - set(expected))
  if unexpected:
    raise ValueError(f"{what} has {len(unexpected)} encoder key(s) the config does not define, e.g. "
                     f"{unexpected[0]!r} with shape {tuple(shapes[unexpected[0]])}; unexpected: "
                     f"{unexpected[:8]}")
  wrong = [f"{key!r} has shape {tuple(shapes[key])}, the config expects {want}"
           for key, (_, want) in expected.items() if tuple(shapes[key]) != want]
  if wrong:
    raise ValueError(f"{what}: {len(wrong)} shape mismatch(es) (HF layout): " + "; ".join(wrong[:8]))
  return expected


def params_from_hf_state_dict(config: BertConfig, state_dict: Mapping[str, Any]) -> Params:
  """HF BertModel (or BertFor*) state dict of numpy arrays -> `BertEncoder` params (float32 numpy)."""
  entries = _encoder_entries(state_dict)
  expected = _check_keys_and_shapes(config, {k: np.shape(v) for k, v in entries.items()}, "checkpoint")
  flat = {}
  for key, (path, _) in expected.items():
    value = np.asarray(entries[key], dtype=np.float32)
    flat[path] = np.ascontiguousarray(value.T) if path[-1] == "kernel" else value
  return flax.traverse_util.unflatten_dict(flat)


def hf_state_dict(config: BertConfig, params: Params, with_pooler: bool = True) -> dict[str, np.ndarray]:
  """`BertEncoder` params -> HF BertModel state dict (float32 numpy, torch layout).

  `with_pooler` adds HF's pooler, which ConVIRT never trains, as dense = identity and bias = 0 (so
  `pooler_output` is tanh of the [CLS] state) rather than leaving it to random initialisation.
  """
  if set(params) == {"params"}:
    raise ValueError("got the variables dict {'params': ...}; pass variables['params'].")
  state = {}
  for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
    value = np.asarray(value, dtype=np.float32)
    state[_flax_to_hf_key(path)] = np.ascontiguousarray(value.T) if path[-1] == "kernel" else value
  _check_keys_and_shapes(config, {k: v.shape for k, v in state.items()}, "params")
  if with_pooler:
    state["pooler.dense.weight"] = np.eye(config.hidden_size, dtype=np.float32)
    state["pooler.dense.bias"] = np.zeros((config.hidden_size,), np.float32)
  return state


def _read_state_dict(directory: str) -> dict[str, np.ndarray]:
  # A truncated file, or a pickle holding more than tensors: CheckpointError naming the file.
  load_file = read_safetensors
  path = lambda name: os.path.join(directory, name)
  if os.path.isfile(path(_SAFETENSORS)):
    return load_file(path(_SAFETENSORS))
  if os.path.isfile(path(_SAFETENSORS_INDEX)):
    with open(path(_SAFETENSORS_INDEX), encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
      state.update(load_file(path(shard)))
    return state
  if os.path.isfile(path(_TORCH_BIN)):
    loaded = read_torch_weights(path(_TORCH_BIN))
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in loaded.items()}
  raise WeightsNotFound(f"{directory!r} has no {_SAFETENSORS}, {_SAFETENSORS_INDEX} or {_TORCH_BIN}.")


def load_hf_bert(path_or_hub_name: str | os.PathLike) -> tuple[BertConfig, Params]:
  """An HF BERT checkpoint (directory or Hub name) -> (config, `BertEncoder` params)."""
  directory = resolve_hf_dir(path_or_hub_name)
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise WeightsNotFound(f"{directory!r} has no config.json.")
  config = BertConfig.from_json_file(config_path)
  try:
    return config, params_from_hf_state_dict(config, _read_state_dict(directory))
  except WeightsNotFound:
    raise
  except ValueError as e:  # a checkpoint that does not fit: the user's to fix, so no traceback
    raise CheckpointError(f"{directory}: {e}") from e


def save_hf_bert(config: BertConfig, params: Params, out_dir: str | os.PathLike,
                 tokenizer_from: Any = None, with_pooler: bool = True) -> None:
  """Writes config.json + model.safetensors that `transformers.BertModel.from_pretrained` loads.

  `tokenizer_from`: a checkpoint directory / Hub name whose tokenizer files are copied alongside, or
  an object with a `save(out_dir)` method (`convirt_jax.tokenizer.Tokenizer`).
  Without the pooler (`with_pooler=False`) load with `BertModel.from_pretrained(out_dir,
  add_pooling_layer=False)`.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = hf_state_dict(config, params, with_pooler=with_pooler)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
  save_file(state, os.path.join(out_dir, _SAFETENSORS), metadata={"format": "pt"})
  if tokenizer_from is None:
    return
  if hasattr(tokenizer_from, "save"):
    tokenizer_from.save(out_dir)
    return
  source = resolve_hf_dir(tokenizer_from)
  copied = [name for name in _TOKENIZER_FILES if os.path.isfile(os.path.join(source, name))]
  if not copied:
    raise WeightsNotFound(f"tokenizer_from={tokenizer_from!r} has none of {_TOKENIZER_FILES}.")
  for name in copied:
    shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
