"""Weights in and out: torchvision ResNets and ViTs, Hugging Face BertModels, both directions.

Imports are lazy so that `import convirt_jax` never pulls in torch.
"""
import importlib

_EXPORTS = {
    "load_torchvision_resnet": "torchvision_resnet",
    "save_torchvision_resnet": "torchvision_resnet",
    "load_torchvision_vit": "torchvision_vit",
    "save_torchvision_vit": "torchvision_vit",
    "load_hf_bert": "hf_bert",
    "save_hf_bert": "hf_bert",
    "resolve_hf_dir": "hf_bert",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
