"""Hugging Face checkpoint directories: a local directory as is, or a Hub model's snapshot.

Used by the tokenizer and the BERT weight interop; nothing else touches the Hub.
"""
import os

from convirt_jax.errors import WeightsNotFound


def resolve_hf_dir(path_or_hub_name: str | os.PathLike) -> str:
  """A local checkpoint directory as is; otherwise the Hub snapshot directory (downloaded if needed)."""
  path_or_hub_name = os.fspath(path_or_hub_name)
  if os.path.isdir(path_or_hub_name):
    return path_or_hub_name
  if os.path.exists(path_or_hub_name) or path_or_hub_name.startswith(("/", ".", "~")):
    raise WeightsNotFound(f"{path_or_hub_name!r} is not a directory: give a Hugging Face BERT "
                          "directory (config.json, vocab.txt, model.safetensors) or a Hub model name")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    # Configs, vocabulary and safetensors weights only: no TF/Flax/ONNX copies of the same weights.
    local = huggingface_hub.snapshot_download(
        path_or_hub_name, allow_patterns=["*.json", "*.txt", "*.safetensors"])
    if not any(f.endswith(".safetensors") for f in os.listdir(local)):
      local = huggingface_hub.snapshot_download(
          path_or_hub_name, allow_patterns=["*.json", "*.txt", "pytorch_model*.bin"])
  except Exception as e:  # pylint: disable=broad-except  (offline, unknown name, no access, ...)
    detail = str(e).splitlines()[0] if str(e) else ""
    raise WeightsNotFound(
        f"could not fetch the Hugging Face model {path_or_hub_name!r} ({type(e).__name__}: {detail}). "
        "Without network access, download it elsewhere (e.g. `hf download "
        f"{path_or_hub_name} --local-dir DIR`) and pass the directory instead "
        "(--config.model.text.init_from=DIR).") from None
  return local
