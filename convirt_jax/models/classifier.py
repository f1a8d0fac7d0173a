"""The fine-tuning model: the ConVIRT image encoder with a new linear head."""
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convirt_jax.models.convirt import normalize_images, torch_linear_bias_init, torch_linear_kernel_init


class ImageClassifier(nn.Module):
  """uint8 NHWC images -> logits [N, num_outputs]: the image encoder ("image", the ConVIRT group's name
  and layout, so encoder weights load unchanged) and a linear head ("classifier", torch.nn.Linear's init).

  `encoder` and `features_dim` are what `registry.build_image_encoder` returns."""
  encoder: nn.Module
  features_dim: int
  num_outputs: int

  def setup(self):
    self.image = self.encoder.clone(parent=self, name="image")
    fan_in = self.features_dim
    self.classifier = nn.Dense(
        self.num_outputs, param_dtype=jnp.float32,
        kernel_init=torch_linear_kernel_init, bias_init=torch_linear_bias_init(fan_in))

  def features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """The pooled encoder features f_v [N, C] (what the linear protocol classifies)."""
    return self.image(normalize_images(images), train=train)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    return self.classifier(self.features(images, train=train).astype(jnp.float32))


def head_variables(seed: int, in_features: int, num_outputs: int) -> dict[str, np.ndarray]:
  """The new linear head, torch.nn.Linear's initialisation (U(+-1/sqrt(in_features))) drawn with numpy."""
  rng = np.random.default_rng(seed)
  bound = 1.0 / math.sqrt(in_features)
  return {"kernel": rng.uniform(-bound, bound, (in_features, num_outputs)).astype(np.float32),
          "bias": rng.uniform(-bound, bound, (num_outputs,)).astype(np.float32)}


def classifier_variables(model: ImageClassifier, encoder: Mapping[str, Any],
                         seed: int) -> dict[str, Any]:
  """The classifier's {"params", "batch_stats"}: the encoder's and a head drawn from `seed`."""
  return {"params": {"image": encoder["params"],
                     "classifier": head_variables(seed, model.features_dim, model.num_outputs)},
          "batch_stats": {"image": encoder["batch_stats"]}}
