"""Fine-tuning's recipe options for encoders usually fine-tuned otherwise (ViTs): AdamW, warm-up with a
constant or cosine schedule, layer-wise learning-rate decay. The defaults are the paper's recipe (the
rest of the test suite runs them); here each option is checked against PyTorch or its formula."""
import math

import flax
import jax
import ml_collections
import numpy as np
import pytest
import torch

from convirt_jax import transfer_config
from convirt_jax.errors import ConfigError
from convirt_jax.jobs import transfer_finetune as finetune
from convirt_jax.models import registry
from convirt_jax.models.classifier import ImageClassifier
from convirt_jax import parallel
from convirt_jax.training import optimizer as optimizer_lib


def test_adamw_is_torchs_adamw():
  rng = np.random.default_rng(0)
  params = {"a": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(4)]
  lr, wd = 1e-2, 0.05
  optimizer = optimizer_lib.adam(params, lr, weight_decay=wd, decoupled_weight_decay=True)
  state, ours = optimizer.init(params), dict(params)
  theirs = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
  torch_opt = torch.optim.AdamW(list(theirs.values()), lr=lr, weight_decay=wd)
  for g in grads:
    updates, state = optimizer.update(g, state, ours)
    ours = jax.tree.map(lambda p, u: p + u, ours, updates)
    for k, p in theirs.items():
      p.grad = torch.tensor(g[k])
    torch_opt.step()
  for k in params:
    np.testing.assert_allclose(ours[k], theirs[k].detach().numpy(), rtol=1e-5, atol=1e-6)
  # Not Adam with L2 decay: the two differ after these steps.
  plain = optimizer_lib.adam(params, lr, weight_decay=wd)
  state, l2 = plain.init(params), dict(params)
  for g in grads:
    updates, state = plain.update(g, state, l2)
    l2 = jax.tree.map(lambda p, u: p + u, l2, updates)
  assert np.abs(l2["a"] - ours["a"]).max() > 1e-4


def test_learning_rates_warm_up_then_stay_or_follow_a_cosine():
  lr = 1e-3
  np.testing.assert_allclose(finetune.learning_rates(lr, 8, 4, "constant"),
                             lr * np.array([0, 0.25, 0.5, 0.75, 1, 1, 1, 1]), rtol=1e-6)
  cosine = finetune.learning_rates(lr, 10, 2, "cosine")
  want = [lr * k / 2 for k in range(2)] + [lr * 0.5 * (1 + math.cos(math.pi * (k - 2) / 8)) for k in range(2, 10)]
  np.testing.assert_allclose(cosine, want, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(finetune.learning_rates(lr, 5, 0, "constant"), lr)
  with pytest.raises(ConfigError, match="warmup_steps=5"):
    finetune.learning_rates(lr, 5, 5, "constant")


def _first_update_scales(name, options, decay):
  """The ratio, per parameter, of the first update with layer decay to the one without (Adam's first
  update is lr * g / (|g| + eps): with g = 1 it is lr * scale)."""
  arch = registry.ImageArch(name, options)
  encoder, width = registry.build_image_encoder(arch, axis_name=parallel.DATA_AXIS)
  model = ImageClassifier(encoder=encoder, features_dim=width, num_outputs=3)
  mesh = parallel.make_mesh(jax.devices()[:1])
  finetune.compiled_steps.cache_clear()
  with_decay, _, _ = finetune.compiled_steps(model, "multilabel", mesh, 1e-3, 0.0, layer_decay=decay, arch=arch)
  plain, _, _ = finetune.compiled_steps(model, "multilabel", mesh, 1e-3, 0.0)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 64, 64, 3), np.uint8))
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes["params"])
  ones = jax.tree.map(np.ones_like, params)
  got, want = (o.update(ones, o.init(params), params)[0] for o in (with_decay, plain))
  ratio = jax.tree.map(lambda a, b: float(np.mean(np.asarray(a) / np.asarray(b))), got, want)
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(ratio).items()}


def test_layer_decay_scales_a_vit_by_block():
  d = 0.5
  scales = _first_update_scales("vit_tiny", (), d)  # 4 blocks: embeddings 0, blocks 1-4, top 5
  assert scales["image/conv_proj/kernel"] == pytest.approx(d ** 5)
  assert scales["image/class_token"] == pytest.approx(d ** 5)
  assert scales["image/encoder/pos_embedding"] == pytest.approx(d ** 5)
  for i in range(4):
    assert scales[f"image/encoder/encoder_layer_{i}/mlp_0/kernel"] == pytest.approx(d ** (4 - i))
    assert scales[f"image/encoder/encoder_layer_{i}/self_attention/in_proj/bias"] == pytest.approx(d ** (4 - i))
  assert scales["image/encoder/ln/scale"] == pytest.approx(1.0)
  assert scales["classifier/kernel"] == pytest.approx(1.0)


def test_layer_decay_scales_a_resnet_by_stage():
  d = 0.8
  scales = _first_update_scales("resnet", (("depth", 18), ("width", 0.25), ("small_stem", False)), d)
  assert scales["image/conv1/kernel"] == pytest.approx(d ** 5) and scales["image/bn1/scale"] == pytest.approx(d ** 5)
  for stage in range(1, 5):
    stage_scales = {v for k, v in scales.items() if k.startswith(f"image/layer{stage}_")}
    assert stage_scales and all(v == pytest.approx(d ** (5 - stage)) for v in stage_scales)
  assert scales["classifier/bias"] == pytest.approx(1.0)


def test_bad_recipe_options_are_named_before_anything_compiles():
  config = transfer_config.transfer_config()
  for key, value, match in (("layer_decay", 0.0, "layer_decay"), ("layer_decay", 1.5, "layer_decay"),
                            ("optimizer", "sgd", "finetune.optimizer"), ("schedule", "linear", "schedule"),
                            ("warmup_steps", -1, "warmup_steps")):
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.finetune[key] = value
    with pytest.raises(ConfigError, match=match):
      transfer_config.validate_transfer(bad)
  settings = ml_collections.ConfigDict(config.finetune.to_dict())
  settings.update(epochs=1.0, min_steps=0, batch_size=10, warmup_steps=5)
  resnet = registry.ImageArch("resnet", (("depth", 18), ("width", 0.25), ("small_stem", False)))
  finetune.check_recipe({(1.0, 0): np.arange(100)}, settings, resnet)  # 10 steps: fine
  with pytest.raises(ConfigError, match=r"warmup_steps=5 is not below the 3 steps .* fraction 0.3, seed 2"):
    finetune.check_recipe({(1.0, 0): np.arange(100), (0.3, 2): np.arange(30)}, settings, resnet)


def test_defaults_are_the_papers_recipe_and_are_not_recorded():
  settings = transfer_config.transfer_config().finetune
  assert finetune.recipe_options(settings) == {}
  settings = ml_collections.ConfigDict(settings.to_dict())
  settings.optimizer, settings.layer_decay = "adamw", 0.75
  assert finetune.recipe_options(settings) == {"optimizer": "adamw", "layer_decay": 0.75}


def test_an_encoder_without_layers_cannot_use_layer_decay(monkeypatch):
  import types  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(registry, "model", lambda name: types.ModuleType("toy_encoder"))
  with pytest.raises(ConfigError, match="toy_encoder defines no layer_index: set finetune.layer_decay=1"):
    registry.check_layers(registry.ImageArch("toy", ()))
