"""torchvision ResNet weights in and out: exact round trips, strict loading into torchvision, refusals."""
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convirt_jax.errors import CheckpointError, ConfigError
from convirt_jax.interop import load_torchvision_resnet, save_torchvision_resnet
from convirt_jax.interop.torchvision_resnet import load_imagenet_resnet, torchvision_state_dict
from convirt_jax.models.resnet import ResNet

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def _random_torch_state(depth: int, seed: int) -> dict:
  """torchvision's state dict (fc included) with every float tensor drawn at random."""
  torch.manual_seed(seed)
  state = getattr(torchvision.models, f"resnet{depth}")().state_dict()
  return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


def _random_flax_variables(depth: int, seed: int, width: float = 1.0, small_stem: bool = False):
  model = ResNet(depth, width, small_stem)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)


def _assert_trees_equal(a, b):
  flat_a, flat_b = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
  assert flat_a.keys() == flat_b.keys()
  for path, value in flat_a.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]), err_msg=str(path))


def _strict_torchvision(depth: int, state: dict):
  model = getattr(torchvision.models, f"resnet{depth}")()
  model.fc = torch.nn.Identity()
  model.load_state_dict(state, strict=True)
  return model


@pytest.mark.parametrize("depth", [18, 50])
def test_torch_to_flax_to_torch_is_exact(depth):
  torch_state = _random_torch_state(depth, seed=depth)
  variables = load_torchvision_resnet(torch_state, depth=depth)
  back = torchvision_state_dict(variables)
  assert set(back) == set(torch_state) - {"fc.weight", "fc.bias"}
  for key, value in back.items():
    assert value.dtype == torch_state[key].numpy().dtype, key
    np.testing.assert_array_equal(value, torch_state[key].numpy(), err_msg=key)
  # The Flax side has exactly the model's own variable tree.
  abstract = jax.eval_shape(
      lambda: ResNet(depth).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert jax.tree.structure(variables) == jax.tree.structure(abstract)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda a: a.shape, abstract)


@pytest.mark.parametrize("depth,suffix", [(18, ".pt"), (18, ".safetensors"), (50, ".pt"),
                                          (50, ".safetensors")])
def test_flax_to_file_to_torchvision_to_flax_is_exact(tmp_path, depth, suffix):
  variables = _random_flax_variables(depth, seed=depth)
  path = tmp_path / f"resnet{depth}{suffix}"
  save_torchvision_resnet(variables, path)
  if suffix == ".pt":
    state = torch.load(path, weights_only=True)
  else:
    import safetensors.torch  # pylint: disable=g-import-not-at-top
    state = safetensors.torch.load_file(str(path))
  model = _strict_torchvision(depth, state)
  _assert_trees_equal(load_torchvision_resnet(model.state_dict(), depth=depth), variables)
  _assert_trees_equal(load_torchvision_resnet(path, depth=depth), variables)


def test_tiny_model_round_trips_through_a_file(tmp_path):
  variables = _random_flax_variables(50, seed=0, width=0.125, small_stem=True)
  path = tmp_path / "tiny.safetensors"
  save_torchvision_resnet(variables, path)
  _assert_trees_equal(load_torchvision_resnet(path, depth=50, width=0.125, small_stem=True),
                      variables)
  with pytest.raises(ValueError, match=r"'conv1.weight' has shape \(8, 3, 3, 3\).*\(8, 3, 7, 7\)"):
    load_torchvision_resnet(path, depth=50, width=0.125, small_stem=False)


def test_exported_num_batches_tracked_matches_torch_buffers():
  state = torchvision_state_dict(_random_flax_variables(18, seed=1))
  torch_state = torchvision.models.resnet18().state_dict()
  for key, value in torch_state.items():
    if key.endswith("num_batches_tracked"):
      assert state[key].dtype == np.int64 and state[key].shape == tuple(value.shape), key


def test_wrong_depth_is_refused():
  with pytest.raises(CheckpointError) as error:
    load_torchvision_resnet(_random_torch_state(18, seed=0), depth=50)
  message = str(error.value)
  assert "ResNet50" in message and "missing keys" in message
  assert "'layer1.0.conv3.weight'" in message
  assert "its keys are those of ResNet18" in message


def test_missing_key_is_refused():
  state = _random_torch_state(18, seed=0)
  del state["layer2.0.bn1.running_var"]
  with pytest.raises(ValueError, match=r"missing keys 'layer2\.0\.bn1\.running_var'$"):
    load_torchvision_resnet(state, depth=18)


def test_unexpected_key_is_refused():
  state = _random_torch_state(18, seed=0)
  state["layer1.0.extra.weight"] = torch.zeros(3)
  with pytest.raises(ValueError, match=r"unexpected keys 'layer1\.0\.extra\.weight'$"):
    load_torchvision_resnet(state, depth=18)


def test_wrong_shape_is_refused_with_both_shapes():
  state = _random_torch_state(18, seed=0)
  state["layer3.1.conv2.weight"] = torch.zeros(256, 256, 1, 1)
  with pytest.raises(ValueError, match=r"'layer3\.1\.conv2\.weight' has shape \(256, 256, 1, 1\), "
                                       r"ResNet18 .* expects \(256, 256, 3, 3\)"):
    load_torchvision_resnet(state, depth=18)


def test_bad_files_and_entries_are_refused(tmp_path):
  variables = _random_flax_variables(18, seed=0)
  with pytest.raises(ValueError, match="resnet.npz"):
    save_torchvision_resnet(variables, tmp_path / "resnet.npz")
  with pytest.raises(CheckpointError, match="absent.pt"):
    load_torchvision_resnet(tmp_path / "absent.pt", depth=18)
  (tmp_path / "weights.bin").write_bytes(b"")
  with pytest.raises(ValueError, match="weights.bin"):
    load_torchvision_resnet(tmp_path / "weights.bin", depth=18)
  torch.save({"state_dict": {}}, tmp_path / "wrapped.pt")
  with pytest.raises(ValueError, match="'state_dict' is a dict"):
    load_torchvision_resnet(tmp_path / "wrapped.pt", depth=18)
  state = _random_torch_state(18, seed=0)
  state["bn1.running_mean"] = state["bn1.running_mean"].long()
  with pytest.raises(ValueError, match="'bn1.running_mean' has dtype int64"):
    load_torchvision_resnet(state, depth=18)
  with pytest.raises(ValueError, match="'batch_stats'"):
    torchvision_state_dict({"params": variables["params"]})


def test_half_precision_checkpoints_widen_to_float32():
  state = {k: v.bfloat16() if v.is_floating_point() else v
           for k, v in _random_torch_state(18, seed=2).items()}
  variables = load_torchvision_resnet(state, depth=18)
  kernel = variables["params"]["layer1_0"]["conv1"]["kernel"]
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(
      kernel, state["layer1.0.conv1.weight"].float().numpy().transpose(2, 3, 1, 0))


def test_load_imagenet_resnet_from_a_file_and_its_errors(tmp_path):
  variables = _random_flax_variables(18, seed=3)
  path = tmp_path / "imagenet.pth"
  save_torchvision_resnet(variables, path)
  _assert_trees_equal(load_imagenet_resnet(str(path), depth=18), variables)
  with pytest.raises(CheckpointError, match="nowhere.pth"):
    load_imagenet_resnet(str(tmp_path / "nowhere.pth"), depth=18)
  with pytest.raises(ConfigError, match="width=1.0, small_stem=False only"):
    load_imagenet_resnet("torchvision", depth=50, width=0.5)
  with pytest.raises(ValueError, match="depth=152"):
    load_imagenet_resnet("torchvision", depth=152)
  with pytest.raises(ConfigError, match="empty"):
    load_imagenet_resnet("", depth=50)


def test_without_torch_safetensors_load_and_save_and_the_download_is_refused(tmp_path):
  path = tmp_path / "resnet18.safetensors"
  variables = _random_flax_variables(18, seed=4)
  save_torchvision_resnet(variables, path)
  expected = variables["params"]["layer4_1"]["bn2"]["scale"]
  script = (
      "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
      "import numpy as np\n"
      "from convirt_jax.interop import load_torchvision_resnet, save_torchvision_resnet\n"
      f"v = load_torchvision_resnet({str(path)!r}, depth=18)\n"
      f"save_torchvision_resnet(v, {str(tmp_path / 'again.safetensors')!r})\n"
      "np.save(sys.argv[1], v['params']['layer4_1']['bn2']['scale'])\n"
      "from convirt_jax.interop.torchvision_resnet import load_imagenet_resnet\n"
      "try:\n"
      "  load_imagenet_resnet('torchvision', depth=50)\n"
      "except ValueError as e:\n"
      "  print(e)\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.npy")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert "needs torchvision installed" in result.stdout, result.stdout
  np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)
  _assert_trees_equal(load_torchvision_resnet(tmp_path / "again.safetensors", depth=18), variables)
