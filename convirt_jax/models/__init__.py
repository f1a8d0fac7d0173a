"""The encoders (torchvision-exact ResNet, Hugging Face-exact BERT; image encoders by name in
`models.registry`) and ConVIRT's dual encoder.

Imports are lazy so that the configs can read the registry without importing jax.
"""
import importlib

_EXPORTS = {
    "BertConfig": "bert", "BertEncoder": "bert", "pool_text": "bert",
    "ConVIRTModel": "convirt", "ProjectionHead": "convirt", "build_model": "convirt",
    "ResNet": "resnet", "resnet_features_dim": "resnet",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
