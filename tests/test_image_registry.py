"""The image encoder registry: every part of the project reaches the encoder through it, so a new encoder
is its two modules plus one `register` line (here a module written at run time, as the README says)."""
import os
import sys
import textwrap

import numpy as np
import pytest

import tiny_config
from convirt_jax import config as config_lib
from convirt_jax import transfer_config
from convirt_jax.jobs import export, pretrain
from convirt_jax.jobs import transfer as transfer_job
from convirt_jax.api import ConVIRT
from convirt_jax.errors import ConfigError
from convirt_jax.models import registry
from convirt_jax.models.resnet import ResNet, resnet_features_dim

# One strided 3x3 convolution, ReLU, global average pool; no BatchNorm (so no `axis_name` and empty
# batch statistics, as a ViT's), with its torchvision-side interop in the same file.
TOY_MODULE = '''
from typing import Any
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from convirt_jax.errors import ConfigError

ARCH_KEYS = {"width": float}


class Toy(nn.Module):
  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(self.features, (3, 3), strides=(2, 2), dtype=self.dtype, name="conv")(x))
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


def features(arch):
  return int(16 * arch["width"])


def build(arch, *, axis_name, dtype, remat, batch_norm):
  return Toy(features(arch), dtype), features(arch)


def title(arch):
  return "Toy"


def describe(arch):
  return f"Toy (width {arch['width']:g})"


def random_variables(arch, image_size, seed):
  rng = np.random.default_rng(seed)
  f = features(arch)
  return {"params": {"conv": {"kernel": rng.normal(0, 0.1, (3, 3, 3, f)).astype(np.float32),
                              "bias": np.zeros((f,), np.float32)}}, "batch_stats": {}}


def load_torchvision(init_from, arch, image_size):
  raise ConfigError(f"model.image.init_from={init_from!r}: the toy encoder has no torchvision weights")


def save_torchvision(variables, path):
  conv = variables["params"]["conv"]
  state = {"0.weight": np.ascontiguousarray(np.transpose(np.asarray(conv["kernel"]), (3, 2, 0, 1))),
           "0.bias": np.asarray(conv["bias"])}
  if str(path).endswith(".safetensors"):
    import safetensors.numpy
    safetensors.numpy.save_file(state, str(path))
  else:
    import torch
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, str(path))


def torch_builder(arch, image_size):
  f = features(arch)
  return "toy", (f"toy = torch.nn.Sequential(torch.nn.Conv2d(3, {f}, 3, 2, 1), torch.nn.ReLU(),\\n"
                 "                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())")
'''


@pytest.fixture
def toy_encoder(tmp_path, monkeypatch):
  """"toy" registered for this test only, from a module written under tmp_path."""
  (tmp_path / "toy_image_encoder.py").write_text(TOY_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))
  registry.register("toy", "toy_image_encoder", "toy_image_encoder")
  yield "toy"
  sys.modules.pop("toy_image_encoder", None)


def test_resnet_is_the_default_and_its_records_read_as_before():
  config = config_lib.base_config()
  arch = registry.arch_from_config(config.model.image)
  assert arch == registry.ImageArch("resnet", (("depth", 50), ("width", 1.0), ("small_stem", False)))
  assert arch.as_dict() == {"depth": 50, "width": 1.0, "small_stem": False}  # no "name": as before
  assert arch.title() == "ResNet50" and arch.describe() == "ResNet50 (width 1)"
  # A stored config from before the registry (no model.image.name) is a ResNet.
  old = {"depth": 18, "width": 0.25, "small_stem": True}
  assert registry.arch_from_config(old).describe() == "ResNet18 (width 0.25, small stem)"
  module, features = registry.build_image_encoder(registry.arch_from_config(old), axis_name="data")
  assert isinstance(module, ResNet) and module.axis_name == "data" and module.small_stem
  assert features == resnet_features_dim(18, 0.25) == 128


def test_an_unknown_encoder_name_lists_the_registered_ones():
  config = config_lib.base_config()
  config.model.image.name = "vit_b_17"
  with pytest.raises(ConfigError, match=r"config.model.image.name='vit_b_17': must be one of \('resnet',"):
    config_lib.validate(config)
  transfer = transfer_config.transfer_config()
  transfer.model.image.name = "vit_b_17"
  transfer.encoders = ("random",)
  with pytest.raises(ConfigError, match=r"config.model.image.name='vit_b_17': must be one of \('resnet',"):
    transfer_config.validate_transfer(transfer)
  # A checkpoint's stored config naming an encoder this install does not have.
  with pytest.raises(ConfigError, match=r"'vit_b_17' is not a registered image encoder; choose one of "
                                        r"\['resnet'"):
    registry.arch_from_config({"name": "vit_b_17"})
  with pytest.raises(ValueError, match="registered already"):
    registry.register("resnet", "convirt_jax.models.resnet", "convirt_jax.interop.torchvision_resnet")


def test_a_stored_config_missing_an_encoder_field_is_named():
  with pytest.raises(ConfigError, match=r"lacks \['small_stem'\] that the 'resnet' image encoder needs"):
    registry.arch_from_config({"depth": 18, "width": 1.0})


def test_an_encoder_registered_at_run_time_pretrains_transfers_loads_and_exports(toy_encoder, tmp_path,
                                                                                   tiny_tfds_dir):
  # Pretraining: the job's model, steps, evaluations and checkpoints, with nothing but the name changed.
  workdir = str(tmp_path / "pretrained")
  config = tiny_config.tiny(tiny_tfds_dir, model__image__name=toy_encoder, train__steps=4,
                            eval__every_steps=4, checkpoint__every_steps=4)
  results = pretrain.run(config, workdir)
  assert results["run"]["evaluated_step"] == 4 and "ConVIRT" in results["methods"]
  # The transfer job: that workdir and Random Init., linear and fine-tuning; the architecture is the
  # workdir's (the transfer config's own model.image is a ResNet's and is overridden by it).
  root = str(tmp_path / "transfer")
  transfer = tiny_config.transfer(root, (workdir, "random"))
  transfer.protocols, transfer.fractions = ("linear", "finetune"), (1.0,)
  out = transfer_job.run(transfer, os.path.join(root, "job"))
  assert out["run"]["architecture"] == "Toy (width 0.25) at 32 px"
  for method in out["methods"].values():
    for protocol in ("linear", "finetune"):
      assert 0.0 <= method[protocol]["fractions"][0]["mean"] <= 1.0
  # The API and the export.
  model = ConVIRT.load(workdir)
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
  features = model.encode_images(list(images), project=False)
  assert features.shape == (3, 4) and np.all(np.isfinite(features))
  output = str(tmp_path / "export")
  export.export(model, output)
  assert {"image_encoder.safetensors", "image_encoder.pt", "README.md"} <= set(os.listdir(output))
  readme = open(os.path.join(output, "README.md")).read()
  assert "Toy image encoder (torchvision)" in readme
  assert textwrap.dedent("""\
      toy = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
      toy.load_state_dict(""") in textwrap.dedent(readme.split("```python")[1])
  # What the README builds takes the exported weights strictly.
  torch = pytest.importorskip("torch")
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  name, code = registry.torch_builder(registry.ImageArch(toy_encoder, (("width", 0.25),)), 32)
  scope = {"torch": torch}
  exec(code, scope)  # pylint: disable=exec-used
  scope[name].load_state_dict(load_file(os.path.join(output, "image_encoder.safetensors")), strict=True)
