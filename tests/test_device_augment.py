"""The device augmentations equal the host's (Pillow's arithmetic) within 1 grey level for the same
parameters, step by step, and draw their parameters from the same distributions."""
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from scipy import stats

from convirt_jax.config import base_config
from convirt_jax.data import augment
from convirt_jax.data import device_augment as dev

SIZE = 48


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  grey = 110 + 70 * np.sin(11 * x + 3 * y) * np.cos(7 * y) + rng.normal(0, 20, x.shape)
  grey[height // 3:height // 3 + 2] = 255  # a thin bright line, as ribs and wires are
  return np.clip(grey, 0, 255).astype(np.uint8)


def _spec(**overrides) -> augment.TrainAugment:
  config = base_config()
  for key, value in overrides.items():
    config.augment[key] = value
  return augment.TrainAugment.from_config(config.augment, SIZE)


def _close(device: jax.Array, host: np.ndarray) -> None:
  diff = np.abs(np.asarray(jnp.round(device)).astype(int) - np.asarray(host).astype(int))
  assert diff.max() <= 1, f"{diff.max()} grey levels apart ({(diff > 1).sum()} pixels)"


@pytest.mark.parametrize("box", [(0, 0, 64, 60), (5, 7, 30, 41), (20, 3, 12, 10), (0, 0, 48, 48),
                                 (10, 0, 70, 60)])
def test_the_resized_crop_is_pillows(box):
  image = _image(80, 60)
  padded, _ = augment.pad_to(image, 96, 72)  # the padding must not leak into the crop
  host = np.asarray(augment.resized_crop(Image.fromarray(image), box, SIZE))
  _close(dev.resized_crop(jnp.asarray(padded, jnp.float32), jnp.asarray(box), SIZE), host)


@pytest.mark.parametrize("method", ["gather", "tiles"])  # the GPU's and CPU's warp, and the TPU's
@pytest.mark.parametrize("angle,shift,zoom", [(0.0, (0, 0), 1.0), (17.3, (0, 0), 1.0), (-8.0, (3, -2), 1.1),
                                              (4.5, (-5, 4), 0.9), (90.0, (1, 1), 1.0)])
def test_the_affine_transform_is_pillows(angle, shift, zoom, method):
  image = _image(SIZE, SIZE, 1)
  host = np.asarray(augment.affine(Image.fromarray(image), angle, shift, zoom))
  patch = dev.warp_patch(_spec(rotation=abs(angle), scale=(min(zoom, 1.0), 1.1)))
  _close(dev.affine(jnp.asarray(image, jnp.float32), jnp.float32(angle), jnp.asarray(shift), jnp.float32(zoom),
                    patch, method=method), host)


@pytest.mark.parametrize("size", [224, 50])  # the paper's size, and one the tiles do not divide
def test_the_tpus_warp_samples_as_the_gathers_do(size):
  """Over the config's whole ranges (their extremes included), the tiled warp's source blocks hold
  every sample: it equals the gathers' warp to float rounding, on an image of independent pixels."""
  spec = augment.TrainAugment.from_config(base_config().augment, size)
  patch = dev.warp_patch(spec)
  assert patch < size  # blocks, not the whole image
  gather = jax.jit(jax.vmap(lambda *a: dev.affine(*a, method="gather")))
  tiles = jax.jit(jax.vmap(lambda *a: dev.affine(*a, patch=patch, method="tiles")))
  rng = np.random.default_rng(size)
  n = 12
  images = jnp.asarray(rng.integers(0, 256, (n, size, size)), jnp.float32)
  max_shift = round(spec.translation * size)
  angle = rng.uniform(-spec.rotation, spec.rotation, n)
  zoom = rng.uniform(*spec.scale, n)
  shift = rng.integers(-max_shift, max_shift + 1, (n, 2))
  angle[:4], zoom[:4] = [spec.rotation, -spec.rotation] * 2, spec.scale[0]  # the widest footprints
  shift[:4] = [[max_shift, max_shift], [-max_shift, max_shift], [max_shift, -max_shift],
               [-max_shift, -max_shift]]
  args = (images, jnp.asarray(angle, jnp.float32), jnp.asarray(shift, jnp.int32), jnp.asarray(zoom, jnp.float32))
  np.testing.assert_allclose(tiles(*args), gather(*args), atol=1e-4, rtol=0)


def test_brightness_and_contrast_are_the_hosts():
  x = _image(SIZE, SIZE, 2).astype(np.float32)
  for factor in (0.6, 1.0, 1.3):
    np.testing.assert_allclose(dev.adjust_brightness(jnp.asarray(x), factor),
                               augment.adjust_brightness(x, factor), atol=1e-3)
    np.testing.assert_allclose(dev.adjust_contrast(jnp.asarray(x), factor),
                               augment.adjust_contrast(x, factor), atol=1e-3)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.7, 3.0])
def test_the_blur_is_the_hosts_for_every_sigma_under_the_largest(sigma):
  x = _image(SIZE, SIZE, 3).astype(np.float32)
  out = dev.gaussian_blur(jnp.asarray(x), jnp.float32(sigma), max_radius=augment.gaussian_kernel_size(3.0) // 2)
  np.testing.assert_allclose(out, augment.gaussian_blur(x, sigma), atol=1e-3)
  np.testing.assert_array_equal(dev.gaussian_blur(jnp.asarray(x), jnp.float32(0.0), 9), x)


def test_the_whole_transform_for_the_hosts_draws_is_within_a_rounding():
  spec = _spec(blur_sigma=(0.1, 2.0))
  rng = np.random.default_rng(0)
  apply = jax.jit(lambda image, params: dev.apply(image, params, spec))
  worst = []
  for i in range(12):
    image = _image(int(rng.integers(50, 80)), int(rng.integers(50, 80)), i)
    params = spec.sample(rng, *image.shape)
    host = spec.apply(image[..., None], params)[..., 0].astype(int)
    padded, _ = augment.pad_to(image, 80, 80)
    device = np.asarray(apply(jnp.asarray(padded), dev.from_host(params))).astype(int)
    diff = np.abs(device - host)
    # Each step is within 1 of the host's (the tests above), mostly equal; a contrast or brightness
    # factor above 1 can stretch an earlier step's rounding difference of 1 to 2 (at most 1% of the pixels
    # in these draws).
    assert diff.max() <= 2 and (diff > 1).mean() < 0.02, (i, params, diff.max(), (diff > 1).mean())
    worst.append(diff.mean())
  assert np.mean(worst) < 0.1  # mostly equal: the differences are the odd rounding


def _host_draws(spec, n, height, width):
  rng = np.random.default_rng(1)
  return [spec.sample(rng, height, width) for _ in range(n)]


@pytest.mark.parametrize("height,width", [(64, 64), (80, 56), (30, 100)])
def test_the_parameters_have_the_hosts_distribution(height, width):
  spec = _spec(blur_sigma=(0.1, 2.0), flip_prob=0.5)
  n = 3000
  host = _host_draws(spec, n, height, width)
  keys = jax.random.split(jax.random.key(0), n)
  device = jax.vmap(lambda k: dev.sample(k, spec, jnp.int32(height), jnp.int32(width)))(keys)
  device = jax.tree.map(np.asarray, device)
  columns = {
      "top": ([p.crop_box[0] for p in host], device["crop_box"][:, 0]),
      "left": ([p.crop_box[1] for p in host], device["crop_box"][:, 1]),
      "h": ([p.crop_box[2] for p in host], device["crop_box"][:, 2]),
      "w": ([p.crop_box[3] for p in host], device["crop_box"][:, 3]),
      "angle": ([p.angle for p in host], device["angle"]),
      "shift_x": ([p.shift[0] for p in host], device["shift"][:, 0]),
      "zoom": ([p.zoom for p in host], device["zoom"]),
      "brightness": ([p.brightness for p in host], device["brightness"]),
      "contrast": ([p.contrast for p in host], device["contrast"]),
      "blur_sigma": ([p.blur_sigma for p in host], device["blur_sigma"]),
  }
  for name, (h, d) in columns.items():
    result = stats.ks_2samp(np.asarray(h, np.float64), np.asarray(d, np.float64))
    # 30 comparisons of fixed draws: a bias KS can see at this n gives p far below 1e-4.
    assert result.pvalue > 1e-4, (name, result)
  for name in ("flip", "contrast_first"):
    h = np.mean([getattr(p, name) for p in host])
    assert abs(h - device[name].mean()) < 0.04, name
  box = device["crop_box"]
  assert (box[:, 0] + box[:, 2] <= height).all() and (box[:, 1] + box[:, 3] <= width).all()
  assert (box[:, 2] > 0).all() and (box[:, 3] > 0).all()


def test_a_batch_draws_by_global_row_whatever_the_split():
  spec = _spec()
  images, extents = zip(*(augment.pad_to(_image(60, 50 + i, i), 64, 64) for i in range(4)))
  images, extents = jnp.asarray(np.stack(images)), jnp.asarray(np.stack(extents))
  key = jax.random.key(3)
  batch = jax.jit(dev.augment_batch, static_argnames="spec")
  whole = batch(images, extents, key, spec)
  halves = jnp.concatenate([batch(images[:2], extents[:2], key, spec, first_row=0),
                            batch(images[2:], extents[2:], key, spec, first_row=2)])
  assert whole.shape == (4, SIZE, SIZE, 3) and whole.dtype == jnp.uint8
  np.testing.assert_array_equal(whole, halves)
  assert not np.array_equal(whole, batch(images, extents, jax.random.key(4), spec))


def test_padding_and_cutting_keep_the_valid_extent():
  image = _image(70, 40)
  padded, extent = augment.pad_to(image[..., None], 64, 64)
  assert padded.shape == (64, 64) and list(extent) == [64, 40]
  np.testing.assert_array_equal(padded[:, :40], image[3:67])
  assert not padded[:, 40:].any()


# ----------------------------------------------------------------------------------------------------
# In the train steps.


def _device_batch(config, seed=0):
  """tiny's global batch with the images as the device-mode loader sends them: padded, with extents."""
  import multiprocess_worker as tiny  # pylint: disable=g-import-not-at-top
  batch = tiny.global_batch(seed)
  rng = np.random.default_rng(seed)
  side = augment.padded_size(config.data.stored_size)
  padded, extents = zip(*(augment.pad_to(_image(int(rng.integers(32, side + 4)), int(rng.integers(30, 44)), i),
                                         side, side) for i in range(len(batch["image"]))))
  return dict(batch, image=np.stack(padded), extent=np.stack(extents))


def _augmented_in_step(batch, rng, spec, mesh):
  """The images `in_step` makes at step 0 under shard_map on `mesh`, as the train steps call it."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from convirt_jax import parallel  # pylint: disable=g-import-not-at-top
  fn = jax.jit(jax.shard_map(lambda b, r, s: dev.in_step(b, r, s, spec, "data")["image"], mesh=mesh,
                             in_specs=(P("data"), P(), P()), out_specs=P("data")))
  inputs = parallel.shard_batch({"image": batch["image"], "extent": batch["extent"]}, mesh)
  return np.asarray(fn(inputs, rng, jnp.int32(0)))


def _cosine(a: dict, b: dict, prefix: str) -> float:
  keys = [k for k in a if k.startswith(prefix)]
  x = np.concatenate([a[k].ravel() for k in keys]).astype(np.float64)
  y = np.concatenate([b[k].ravel() for k in keys]).astype(np.float64)
  return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def test_the_pretraining_step_augments_on_the_device_as_the_host_fed_step_would():
  import multiprocess_worker as tiny  # pylint: disable=g-import-not-at-top
  from convirt_jax import parallel  # pylint: disable=g-import-not-at-top
  config = tiny.tiny_config(**{"data.augment_on": "device", "data.stored_size": 32})
  batch = _device_batch(config)
  mesh8, mesh1 = parallel.make_mesh(), parallel.make_mesh(jax.devices()[:1])
  on_device = tiny.step_results(*tiny.run_steps(config, mesh8, batch))
  spec = augment.TrainAugment.from_config(config.augment, config.data.image_size)
  rng = jnp.asarray(tiny.initial_variables(config)["rng"])
  images = _augmented_in_step(batch, rng, spec, mesh8)
  # Drawn by global row: the same images on one device as on eight, in another program (`_TIE`), and as
  # `augment_batch` draws them.
  key = jax.random.fold_in(jax.random.fold_in(rng, 0), dev._AUGMENT_STREAM)
  np.testing.assert_array_equal(_augmented_in_step(batch, rng, spec, mesh1), images)
  np.testing.assert_array_equal(
      dev.augment_batch(jnp.asarray(batch["image"]), jnp.asarray(batch["extent"]), key, spec), images)
  # The host-mode step on these images: the same step, up to float32 summation order.
  host_config = tiny.tiny_config(**{"data.augment_on": "host", "data.stored_size": 32})
  host_batch = {k: v for k, v in batch.items() if k != "extent"} | {"image": images}
  host_fed = tiny.step_results(*tiny.run_steps(host_config, mesh1, host_batch))
  for name in ("loss", "loss_image_to_text", "loss_text_to_image"):
    np.testing.assert_allclose(on_device[f"metrics/{name}"], host_fed[f"metrics/{name}"], rtol=1e-5)
  assert _cosine(on_device, host_fed, "adam_mu/") > 1 - 1e-9
  for key_ in (k for k in host_fed if k.startswith("batch_stats/")):
    np.testing.assert_allclose(on_device[key_], host_fed[key_], atol=1e-5)
  with pytest.raises(ValueError, match="no \"extent\""):
    tiny.run_steps(config, mesh1, host_batch)


def test_the_fine_tuning_step_augments_on_the_device_as_the_host_fed_step_would():
  import optax  # pylint: disable=g-import-not-at-top
  import multiprocess_worker as tiny  # pylint: disable=g-import-not-at-top
  from convirt_jax import parallel  # pylint: disable=g-import-not-at-top
  from convirt_jax.models.classifier import ImageClassifier  # pylint: disable=g-import-not-at-top
  from convirt_jax.models import registry  # pylint: disable=g-import-not-at-top
  from convirt_jax.training import classifier_steps  # pylint: disable=g-import-not-at-top
  from convirt_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  config = tiny.tiny_config(**{"data.stored_size": 32})
  size = config.data.image_size
  spec = augment.TrainAugment.from_config(config.augment, size)
  encoder, features_dim = registry.build_image_encoder(
      registry.ImageArch("resnet", (("depth", 18), ("width", 0.125), ("small_stem", True))),
      axis_name=parallel.DATA_AXIS)
  classifier = ImageClassifier(encoder=encoder, features_dim=features_dim, num_outputs=3)
  variables = classifier.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.uint8))
  optimizer = optax.adam(1e-3)
  batch = _device_batch(config)
  labels = np.random.default_rng(0).integers(0, 2, (len(batch["image"]), 3)).astype(np.float32)
  mesh8, mesh1 = parallel.make_mesh(), parallel.make_mesh(jax.devices()[:1])
  state = lambda mesh: parallel.replicate(state_lib.new_state(variables, optimizer, jax.random.PRNGKey(5)),
                                          mesh)
  on_device = classifier_steps.make_finetune_step(classifier, optimizer, "multilabel", mesh8, spec)
  _, device_metrics = on_device(state(mesh8), parallel.shard_batch(
      {"image": batch["image"], "extent": batch["extent"], "labels": labels}, mesh8))
  images = _augmented_in_step(batch, jax.random.PRNGKey(5), spec, mesh8)
  host_fed = classifier_steps.make_finetune_step(classifier, optimizer, "multilabel", mesh1)
  _, host_metrics = host_fed(state(mesh1), parallel.shard_batch({"image": np.asarray(images), "labels": labels},
                                                                mesh1))
  np.testing.assert_allclose(float(device_metrics["loss"]), float(host_metrics["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(device_metrics["grad_norm"]), float(host_metrics["grad_norm"]), rtol=1e-5)
