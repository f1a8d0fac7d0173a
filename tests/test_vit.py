"""The ViT image encoder against torchvision's: features, weights both ways, position embeddings at
other sizes, the registered presets; and a tiny ViT through pretraining, transfer, load and export."""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multiprocess_worker as tiny
from test_chexpert_retrieval import config_8x200, write_retrieval_tree
import tiny_config
from convirt_jax import parallel
from convirt_jax.api import ConVIRT
from convirt_jax.errors import CheckpointError, ConfigError
from convirt_jax.interop import torchvision_vit
from convirt_jax.jobs import export, pretrain
from convirt_jax.jobs import transfer as transfer_job
from convirt_jax.models import registry, vit
from convirt_jax.training import steps as steps_lib

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision.models import vision_transformer  # noqa: E402  pylint: disable=g-import-not-at-top

# A ViT of the B/16 layout, shrunk (2 layers, width 96) so that a forward pass at 224 px takes no time.
SMALL = dict(patch_size=16, num_layers=2, num_heads=3, hidden_dim=96, mlp_dim=192)


def _torch_vit(image_size: int, seed: int = 0, **hp):
  torch.manual_seed(seed)
  model = vision_transformer.VisionTransformer(image_size=image_size, **(hp or SMALL))
  model.heads = torch.nn.Identity()
  return model.eval()


def _images(size: int, n: int = 3, seed: int = 0) -> np.ndarray:
  """Normalised float NHWC images, as the model's encoders receive them."""
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _torch_features(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).numpy()


def _flax_features(variables, images: np.ndarray, hp=None) -> np.ndarray:
  return np.asarray(vit.ViT(**(hp or SMALL)).apply({"params": variables["params"]}, jnp.asarray(images)))


def _assert_trees_equal(a, b):
  flat_a, flat_b = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
  assert flat_a.keys() == flat_b.keys()
  for path, value in flat_a.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]), err_msg=str(path))


def test_features_equal_torchvisions_at_224_px():
  model = _torch_vit(224)
  variables = torchvision_vit.load_torchvision_vit(model.state_dict(), SMALL, 224)
  images = _images(224)
  np.testing.assert_allclose(_flax_features(variables, images), _torch_features(model, images), atol=1e-4)


def test_position_embeddings_at_another_size_are_torchvisions_interpolation():
  model = _torch_vit(224, seed=1)
  state = model.state_dict()
  for size in (112, 320, 80):  # the grid shrinks, grows, and to a size the patches do not tile evenly
    size -= size % 16
    theirs = vision_transformer.interpolate_embeddings(size, 16, dict(state))["encoder.pos_embedding"]
    ours = torchvision_vit.interpolate_position_embedding(state["encoder.pos_embedding"].numpy(), size // 16)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-6, err_msg=str(size))
  # And the features at that size: torchvision's model built at 112 px from the interpolated state.
  resized = _torch_vit(112)
  resized.load_state_dict(vision_transformer.interpolate_embeddings(112, 16, dict(state)), strict=False)
  variables = torchvision_vit.load_torchvision_vit(state, SMALL, 112)
  images = _images(112, seed=1)
  np.testing.assert_allclose(_flax_features(variables, images), _torch_features(resized, images),
                             atol=1e-4)


def test_weights_both_ways_are_exact_and_load_strictly(tmp_path):
  arch = registry.ImageArch("vit_tiny", ())
  variables = registry.random_variables(arch, 32, seed=3)
  for suffix in (".safetensors", ".pt"):
    path = str(tmp_path / f"vit{suffix}")
    registry.save_torchvision(arch, variables, path)
    model = vision_transformer.VisionTransformer(image_size=32, **vit.preset("vit_tiny"))
    model.heads = torch.nn.Identity()
    state = (torch.load(path, weights_only=True) if suffix == ".pt"
             else __import__("safetensors.torch").torch.load_file(path))
    model.load_state_dict(state, strict=True)
    _assert_trees_equal(registry.load_torchvision(arch, path, 32), variables)
  # A torchvision file with its classifier still on: the head is not the encoder's, and is skipped.
  full = vision_transformer.VisionTransformer(image_size=32, **vit.preset("vit_tiny"))
  torch.save(full.state_dict(), tmp_path / "full.pth")
  loaded = registry.load_torchvision(arch, str(tmp_path / "full.pth"), 32)
  np.testing.assert_array_equal(loaded["params"]["class_token"], full.class_token.detach().numpy())


def test_a_wrong_file_names_what_does_not_fit(tmp_path):
  arch = registry.ImageArch("vit_tiny", ())
  small = _torch_vit(32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=768)
  torch.save(small.state_dict(), tmp_path / "two_layers.pth")
  with pytest.raises(CheckpointError, match=r"not a torchvision .* state dict: missing .*encoder_layer_2"):
    registry.load_torchvision(arch, str(tmp_path / "two_layers.pth"), 32)
  with pytest.raises(ConfigError, match="torchvision has no weights for vit_tiny"):
    registry.load_torchvision(arch, "torchvision", 32)


@pytest.mark.parametrize("name", ["vit_b_16", "vit_b_32", "vit_l_16"])
def test_presets_have_torchvisions_keys_and_shapes(name):
  with torch.device("meta"):  # shapes only: no memory, no initialisation
    theirs = getattr(torchvision.models, name)().state_dict()
  theirs = {k: tuple(v.shape) for k, v in theirs.items() if not k.startswith("heads.")}
  arch = registry.ImageArch(name, ())
  module, features = registry.build_image_encoder(arch)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  ours = {k: v.shape for k, v in torchvision_vit.torchvision_state_dict(
      jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)).items()}
  assert ours == theirs
  assert features == vit.preset(name)["hidden_dim"] and name in registry.names()


def test_random_initialisation_follows_torchvisions():
  hp = vit.preset("vit_tiny")
  torch.manual_seed(0)
  theirs = vision_transformer.VisionTransformer(image_size=64, **hp).state_dict()
  ours = torchvision_vit.torchvision_state_dict(registry.random_variables(registry.ImageArch("vit_tiny", ()),
                                                                          64, seed=0))
  for key, value in ours.items():
    reference = theirs[key].numpy()
    assert value.shape == reference.shape, key
    if value.size >= 1000:
      np.testing.assert_allclose(value.std(), reference.std(), rtol=0.1, err_msg=key)
      np.testing.assert_allclose(value.mean(), reference.mean(), atol=0.2 * reference.std() + 1e-9,
                                 err_msg=key)
    else:
      assert (value == 0).all() == (reference == 0).all() and (value == 1).all() == (reference == 1).all(), key


def test_remat_and_bfloat16_keep_the_function():
  hp = dict(SMALL, patch_size=8)
  images = jnp.asarray(_images(32))
  variables = vit.ViT(**hp).init(jax.random.PRNGKey(0), images)

  # Not the sum of squares: after the final LayerNorm that is nearly constant and its gradient is noise.
  direction = jax.random.normal(jax.random.PRNGKey(1), (hp["hidden_dim"],))

  def loss(params, **options):
    return jnp.sum(jnp.tanh(vit.ViT(**hp, **options).apply({"params": params}, images) @ direction))

  plain, remat = (jax.grad(loss)(variables["params"]), jax.grad(lambda p: loss(p, remat=True))(variables["params"]))
  # Rematerialisation recomputes the same float32 arithmetic, possibly fused differently.
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(a).max()))
  full = vit.ViT(**hp).apply(variables, images)
  half = vit.ViT(**hp, dtype=jnp.bfloat16).apply(variables, images)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, atol=0.1 * float(jnp.abs(full).max()))


def test_a_tiny_vit_pretrains_transfers_loads_and_exports(tmp_path, tiny_tfds_dir, monkeypatch):
  # Started from a torchvision file of the same ViT built for 64 px: the run (at 32 px) starts from
  # exactly its weights, position embeddings interpolated to the 4 x 4 grid.
  torch.manual_seed(5)
  torch.save(vision_transformer.VisionTransformer(image_size=64, **vit.preset("vit_tiny")).state_dict(),
             tmp_path / "vit_tiny.pth")
  arch = registry.ImageArch("vit_tiny", ())
  want = registry.load_torchvision(arch, str(tmp_path / "vit_tiny.pth"), 32)
  assert want["params"]["encoder"]["pos_embedding"].shape == (1, 17, 192)
  start = {}
  real_step = steps_lib.make_train_step

  def capture_start(*args, **kwargs):
    step_fn = real_step(*args, **kwargs)

    def train_step(state, batch):
      start.setdefault("image", jax.device_get(state["params"]["image"]))  # before the first update
      return step_fn(state, batch)
    return train_step

  monkeypatch.setattr(steps_lib, "make_train_step", capture_start)
  workdir = str(tmp_path / "pretrained")
  config = tiny_config.tiny(tiny_tfds_dir, model__image__name="vit_tiny", train__steps=4,
                            eval__every_steps=4, checkpoint__every_steps=4)
  config.model.image.init_from = str(tmp_path / "vit_tiny.pth")
  results = pretrain.run(config, workdir)
  assert results["run"]["evaluated_step"] == 4
  _assert_trees_equal(start["image"], want["params"])
  assert "ImageNet Init." in results["methods"]
  root = str(tmp_path / "transfer")
  transfer = tiny_config.transfer(root, (workdir, "random"))
  transfer.protocols, transfer.fractions = ("linear", "finetune", "zeroshot"), (1.0,)
  out = transfer_job.run(transfer, os.path.join(root, "job"))
  assert out["run"]["architecture"] == "ViT-Tiny/8 (4 layers, width 192, 3 heads, patch 8) at 32 px"
  assert set(out["methods"]["ConVIRT"]) == {"linear", "finetune", "zeroshot"}
  # The 8x200 retrieval (the paper's Table 2) on a fake CheXpert tree.
  chexpert_dir, sets, _ = write_retrieval_tree(str(tmp_path / "tree"))
  retrieved = transfer_job.run(config_8x200(chexpert_dir, sets, (workdir,), tmp_path), str(tmp_path / "8x200"))
  scores = retrieved["methods"]["ConVIRT"]["retrieval"]
  assert scores["image_to_image"]["n_candidates"] == 24 and 0 <= scores["text_to_image"]["prec@5"] <= 1
  model = ConVIRT.load(workdir)
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
  features = model.encode_images(list(images), project=False)
  output = str(tmp_path / "export")
  export.export(model, output)
  # What the exported README builds, with the exported weights, computes the same features.
  name, code = registry.torch_builder(registry.arch_from_config(model.config.model.image), 32)
  scope = {"torch": torch, "torchvision": torchvision}
  exec(code, scope)  # pylint: disable=exec-used
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  scope[name].load_state_dict(load_file(os.path.join(output, "image_encoder.safetensors")), strict=True)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  normalised = ((np.repeat(images[..., None], 3, -1) / 255.0 - mean) / std).astype(np.float32)
  np.testing.assert_allclose(_torch_features(scope[name].eval(), normalised), features, atol=1e-4)
  assert code in open(os.path.join(output, "README.md")).read()


# ----------------------------------------------------------------------------------------------------
# The pretraining step with a ViT: 8 devices equal 1, and micro-batches equal the plain step (no
# BatchNorm, so nothing differs between them but the order of float sums).


def _vit_config(**overrides):
  return tiny.tiny_config(**{"model.image.name": "vit_tiny", **overrides})


def _assert_steps_equal(got, want, lr):
  diffs = tiny.compare_step_results(got, want, lr=lr)
  for kind in ("metrics", "gradient", "params"):
    assert diffs[kind] <= 1e-5, (kind, diffs)
  assert diffs["entries_beyond_atol"] <= 1e-4 * sum(v.size for k, v in want.items() if k.startswith("params/"))
  assert 0.1 < want["metrics/grad_norm"] < 1e3  # not vacuous
  return diffs


def test_a_vit_train_step_on_8_devices_equals_1_device_and_micro_batches_equal_the_plain_step():
  mesh8 = parallel.make_mesh()
  config = _vit_config()
  variables = tiny.initial_variables(config)
  assert not any(k.startswith("batch_stats/") for k in variables)
  plain = tiny.step_results(*tiny.run_steps(config, mesh8, tiny.global_batch()))
  reference = tiny.reference_step(config)  # the same global batch on one device
  print("ViT, 8 devices vs 1:", _assert_steps_equal(plain, reference, config.optimizer.lr))
  micro_config = _vit_config(**{"train.microbatch_size": 1})  # 2 rows per device, one at a time
  micro = tiny.step_results(*tiny.run_steps(micro_config, mesh8, tiny.global_batch(), variables=variables))
  print("ViT, micro-batches of 1 vs plain:", _assert_steps_equal(micro, plain, config.optimizer.lr))


def test_an_image_size_the_patches_do_not_tile_is_named_before_anything_runs(tmp_path):
  from convirt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config()
  config.model.image.name, config.data.image_size = "vit_b_16", 100
  with pytest.raises(ConfigError, match=r"config.data.image_size=100: a ViT-B/16 .* patch, 16 \(e.g. 96 or 112\)"):
    config_lib.validate(config)
  transfer = tiny_config.transfer(str(tmp_path), ("random",))
  transfer.model.image.name, transfer.data.image_size = "vit_tiny", 36
  transfer.protocols = ("linear",)
  with pytest.raises(ConfigError, match="config.data.image_size=36"):
    transfer_job.run(transfer, str(tmp_path / "job"))
  assert not (tmp_path / "job").exists()


def test_the_vit_default_config_is_the_embedded_default_with_a_tiny_vit():
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
  from configs import synthetic, synthetic_vit  # pylint: disable=g-import-not-at-top
  from convirt_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  ours, base = synthetic_vit.get_config(), synthetic.get_config()
  config_lib.validate(ours)
  assert ours.model.image.name == "vit_tiny" and ours.optimizer.lr == 3e-4
  ours.model.image.name, ours.optimizer.lr = base.model.image.name, base.optimizer.lr
  assert ours.to_dict() == base.to_dict()
