"""The Flax ResNet against torchvision's: eval and train mode, initialisation, SyncBatchNorm, bfloat16."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from convirt_jax.interop.torchvision_resnet import load_torchvision_resnet, torchvision_state_dict
from convirt_jax.models.resnet import ResNet, resnet_features_dim

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

TOLERANCE = 1e-4


def _torchvision_resnet(depth: int, seed: int):
  """torchvision's resnetNN (fc removed) with random BatchNorm affine parameters and statistics.

  The gammas are kept below 1: with torchvision's init and gammas near 1 the residual sums of ResNet50
  grow to pooled features in the thousands, where float32 rounding alone exceeds 1e-4.
  """
  torch.manual_seed(seed)
  model = getattr(torchvision.models, f"resnet{depth}")()
  model.fc = torch.nn.Identity()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        n = module.num_features
        module.weight.copy_(0.1 + 0.4 * torch.rand(n, generator=gen))
        module.bias.copy_(0.1 * torch.randn(n, generator=gen))
        module.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
        module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
  return model.eval()


def _torch_forward(model, images_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).numpy()


def _images(batch: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32)


def _random_variables(model: ResNet, image_shape: tuple[int, ...], seed: int):
  """Random weights and non-trivial BatchNorm statistics without compiling an init."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image_shape)))
  rng = np.random.default_rng(seed)
  draw = {"kernel": lambda s: 0.1 * rng.standard_normal(s), "scale": lambda s: rng.uniform(0.5, 1.5, s),
          "bias": lambda s: 0.1 * rng.standard_normal(s), "mean": lambda s: 0.1 * rng.standard_normal(s),
          "var": lambda s: rng.uniform(0.5, 1.5, s)}
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: draw[path[-1].key](leaf.shape).astype(np.float32), abstract)


@functools.cache
def _reference(depth: int):
  torch_model = _torchvision_resnet(depth, seed=depth)
  return torch_model, load_torchvision_resnet(torch_model.state_dict(), depth=depth)


@pytest.mark.parametrize("depth,size", [(18, 224), (18, 193), (50, 224), (50, 193)])
def test_eval_features_match_torchvision(depth, size):
  torch_model, variables = _reference(depth)
  images = _images(2, size)
  expected = _torch_forward(torch_model, images)
  got = jax.jit(ResNet(depth).apply)(variables, images)
  assert got.shape == (2, resnet_features_dim(depth)) and got.dtype == jnp.float32
  assert expected.std() > 0.01  # features are not degenerate
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=TOLERANCE)


def test_train_mode_matches_torchvision():
  # 64 px leaves 2x2 maps in layer4: 8 values per channel, where torch's unbiased running variance
  # (x 8/7) and a biased one would differ by far more than the tolerance.
  torch_model = _torchvision_resnet(18, seed=3)
  variables = load_torchvision_resnet(torch_model.state_dict(), depth=18)
  before = torchvision_state_dict(variables)
  images = _images(2, 64, seed=1)
  expected = _torch_forward(torch_model.train(), images)
  expected_state = {k: v.numpy() for k, v in torch_model.state_dict().items()}

  model = ResNet(18)
  got, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      variables, images)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=TOLERANCE)
  got_state = torchvision_state_dict({"params": variables["params"], **updates})
  running = [k for k in expected_state if k.endswith(("running_mean", "running_var"))]
  assert len(running) == 2 * 20  # every BatchNorm of ResNet18
  for key in running:
    assert not np.allclose(expected_state[key], before[key], atol=TOLERANCE), f"{key} did not move"
    # Measured 2.4e-7 apart; a biased variance update is 2e-4 off, so 1e-5 keeps a wide margin.
    np.testing.assert_allclose(got_state[key], expected_state[key], rtol=0, atol=1e-5,
                               err_msg=key)


def test_sync_batchnorm_under_shard_map_equals_whole_batch():
  model = ResNet(18, width=0.125, small_stem=True)
  synced = ResNet(18, width=0.125, small_stem=True, axis_name="data")
  images = _images(16, 16, seed=2)
  variables = _random_variables(model, images.shape, seed=0)

  def train_forward(module, variables, images):
    out, updates = module.apply(variables, images, train=True, mutable=["batch_stats"])
    return out, updates["batch_stats"]

  expected, expected_stats = jax.jit(functools.partial(train_forward, model))(variables, images)

  mesh = jax.make_mesh((8,), ("data",))
  sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
  replicated = jax.device_put(variables, NamedSharding(mesh, P()))
  per_device = jax.shard_map(functools.partial(train_forward, synced), mesh=mesh,
                             in_specs=(P(), P("data")), out_specs=(P("data"), P()))
  got, got_stats = jax.jit(per_device)(replicated, sharded)

  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-5)
  for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(got_stats),
                          jax.tree.leaves(expected_stats)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=0, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  # Without the axis the per-device statistics (2 images each) would differ: the test can fail.
  unsynced = jax.shard_map(functools.partial(train_forward, model), mesh=mesh,
                           in_specs=(P(), P("data")), out_specs=(P("data"), P()), check_vma=False)
  _, unsynced_stats = jax.jit(unsynced)(replicated, sharded)
  assert not np.allclose(unsynced_stats["bn1"]["var"], expected_stats["bn1"]["var"], atol=1e-5)


def test_init_matches_torchvision_init():
  torch.manual_seed(0)
  torch_state = torchvision.models.resnet18().state_dict()
  variables = jax.jit(ResNet(18).init)(jax.random.key(0), _images(1, 64))
  flax_state = torchvision_state_dict(variables)
  assert set(flax_state) == set(torch_state) - {"fc.weight", "fc.bias"}
  for key, value in flax_state.items():
    reference = torch_state[key].numpy()
    if key.endswith("num_batches_tracked") or value.ndim == 1:  # BN: gamma 1, beta 0, stats 0 / 1
      np.testing.assert_array_equal(value, reference, err_msg=key)
    else:  # kaiming normal (fan_out): same spread as torch's draw of the same layer
      np.testing.assert_allclose(value.std(), reference.std(), rtol=0.05, err_msg=key)
      assert abs(value.mean()) < 0.05 * value.std(), key
  # A plain normal, not a truncated one: ~4.55% of the draws lie beyond 2 standard deviations.
  kernel = flax_state["layer4.1.conv2.weight"]
  beyond = np.mean(np.abs(kernel) > 2 * np.sqrt(2 / (512 * 9)))
  assert 0.04 < beyond < 0.051, beyond


@pytest.mark.parametrize("depth,width,expected", [(18, 1.0, 512), (34, 1.0, 512), (50, 1.0, 2048),
                                                  (101, 1.0, 2048), (50, 0.25, 512),
                                                  (18, 0.125, 64)])
def test_features_dim(depth, width, expected):
  assert resnet_features_dim(depth, width) == expected
  shape = jax.eval_shape(
      lambda: ResNet(depth, width).init_with_output(jax.random.key(0), jnp.zeros((2, 64, 64, 3))))
  assert shape[0].shape == (2, expected)


def test_bfloat16_computation_keeps_float32_params():
  model16 = ResNet(18, dtype=jnp.bfloat16)
  images = _images(2, 64, seed=4)
  abstract = jax.eval_shape(lambda: model16.init(jax.random.key(0), images))
  assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  _, variables = _reference(18)
  out16 = jax.jit(model16.apply)(variables, images)
  out32 = jax.jit(ResNet(18).apply)(variables, images)
  assert out16.dtype == jnp.float32
  relative = np.abs(np.asarray(out16) - np.asarray(out32)).max() / np.abs(np.asarray(out32)).max()
  assert 0 < relative < 3e-2, relative


def test_bad_configuration_and_input_raise():
  with pytest.raises(ValueError, match="depth=152"):
    ResNet(152).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="width=0.001"):
    resnet_features_dim(50, 0.001)
  with pytest.raises(ValueError, match=r"NHWC.*\(1, 3, 32, 32\)"):
    ResNet(18).init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
