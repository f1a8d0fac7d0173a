"""ConVIRT in JAX/Flax: contrastive pretraining of medical image encoders on paired images and reports.

  from convirt_jax import ConVIRT
  model = ConVIRT.load("runs/synthetic")
"""

__all__ = ["ConVIRT"]


def __getattr__(name):
  # Lazy, so that `import convirt_jax.config` (every config file does) stays light.
  if name == "ConVIRT":
    from convirt_jax.api import ConVIRT  # pylint: disable=g-import-not-at-top
    return ConVIRT
  raise AttributeError(f"module 'convirt_jax' has no attribute {name!r}")
