"""The augmentations against torchvision's functional ops and against what each step must do on its own."""
import dataclasses
import math

import numpy as np
from PIL import Image
import pytest
import torch
from torchvision.transforms import InterpolationMode
import torchvision.transforms.functional as TF

from convirt_jax.config import base_config
from convirt_jax.data import augment
from convirt_jax.errors import ConfigError

SIZE = 32


def _image(height=40, width=48, seed=0) -> np.ndarray:
  """A smooth image with structure (so crops and shifts show) plus noise; uint8 [H, W, 1]."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  smooth = 128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0) + 2.0 * x - 1.5 * y
  noisy = smooth + rng.normal(0, 10, (height, width))
  return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)[..., None]


def _augment(**overrides) -> augment.TrainAugment:
  """Every step off, except those given."""
  off = dict(crop_scale=(1.0, 1.0), flip_prob=0.0, rotation=0.0, translation=0.0, scale=(1.0, 1.0),
             brightness=(1.0, 1.0), contrast=(1.0, 1.0), blur_sigma=(0.0, 0.0))
  return augment.TrainAugment(size=SIZE, **{**off, **overrides})


def _paper() -> augment.TrainAugment:
  return augment.TrainAugment.from_config(base_config().augment, SIZE)


def _plain_resize(image: np.ndarray) -> np.ndarray:
  return np.asarray(Image.fromarray(image[..., 0]).resize((SIZE, SIZE), Image.BILINEAR))


def test_output_shape_dtype_and_grey_channels():
  out = _paper()(_image(), np.random.default_rng(0))
  assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  assert out.std() > 5.0  # Not blanked out.
  evaluated = augment.eval_transform(_image(), SIZE)
  assert evaluated.shape == (SIZE, SIZE, 3) and evaluated.dtype == np.uint8


def test_same_seed_same_output_different_seed_different_crop():
  paper, image = _paper(), _image()
  a = paper(image, np.random.default_rng(7))
  np.testing.assert_array_equal(a, paper(image, np.random.default_rng(7)))
  boxes = {paper.sample(np.random.default_rng(seed), 40, 48).crop_box for seed in range(10)}
  assert len(boxes) == 10
  for seed in range(8, 12):
    assert np.abs(a.astype(int) - paper(image, np.random.default_rng(seed))).mean() > 5.0


def test_parameter_draws_stay_in_their_ranges():
  paper = _paper()
  rng = np.random.default_rng(0)
  params = [paper.sample(rng, 256, 300) for _ in range(2000)]
  area = np.array([p.crop_box[2] * p.crop_box[3] / (256 * 300) for p in params])
  aspect = np.array([p.crop_box[3] / p.crop_box[2] for p in params])
  # Rounding the crop's sides to pixels moves area and aspect by at most ~1%.
  assert area.min() >= 0.6 * 0.99 and area.max() <= 1.0
  assert aspect.min() >= 0.75 * 0.99 and aspect.max() <= 4 / 3 * 1.01
  for top, left, h, w in (p.crop_box for p in params):
    assert 0 <= top <= 256 - h and 0 <= left <= 300 - w
  flips = np.mean([p.flip for p in params])
  assert abs(flips - 0.5) < 0.05
  assert max(abs(p.angle) for p in params) <= 20.0
  assert max(max(abs(s) for s in p.shift) for p in params) <= round(0.1 * SIZE)
  assert all(0.95 <= p.zoom <= 1.05 and 0.6 <= p.brightness <= 1.4 and 0.6 <= p.contrast <= 1.4
             and 0.1 <= p.blur_sigma <= 3.0 for p in params)
  assert abs(np.mean([p.contrast_first for p in params]) - 0.5) < 0.05


def test_crop_fallback_is_torchvisions_centre_crop():
  # A 3:1 image cannot hold a 4/3 crop of the whole area: 10 misses, then the centre 4:3 crop.
  box = augment.random_resized_crop_box(np.random.default_rng(0), 30, 90, (1.0, 1.0))
  assert box == (0, 25, 30, 40)


def test_all_steps_off_is_a_plain_resize():
  image = _image()
  out = _augment()(image, np.random.default_rng(3))
  np.testing.assert_array_equal(out[..., 0], _plain_resize(image))
  reference = TF.resize(Image.fromarray(image[..., 0]), [SIZE, SIZE], InterpolationMode.BILINEAR)
  np.testing.assert_array_equal(out[..., 0], np.asarray(reference))


def test_flip_only_mirrors():
  image = _image()
  out = _augment(flip_prob=1.0)(image, np.random.default_rng(0))
  np.testing.assert_array_equal(out[..., 0], _plain_resize(image)[:, ::-1])


def test_brightness_only_scales_every_pixel():
  image = _image()
  out = _augment(brightness=(0.5, 0.5))(image, np.random.default_rng(0))[..., 0].astype(np.float64)
  plain = _plain_resize(image).astype(np.float64)
  assert np.abs(out - 0.5 * plain).max() <= 0.5  # One rounding.
  assert out.mean() / plain.mean() == pytest.approx(0.5, abs=0.5 / plain.mean())


def test_contrast_only_keeps_the_mean_and_scales_the_spread():
  image = _image()
  out = _augment(contrast=(0.4, 0.4))(image, np.random.default_rng(0))[..., 0].astype(np.float64)
  plain = _plain_resize(image).astype(np.float64)
  assert abs(out.mean() - plain.mean()) <= 0.5
  assert out.std() / plain.std() == pytest.approx(0.4, abs=0.01)


def test_blur_only_lowers_the_variance():
  noise = np.random.default_rng(0).integers(64, 192, (40, 48, 1), dtype=np.uint8)
  out = _augment(blur_sigma=(2.0, 2.0))(noise, np.random.default_rng(0))[..., 0].astype(np.float64)
  plain = _plain_resize(noise).astype(np.float64)
  # White noise keeps 1 / (4 pi sigma^2) = 2% of its variance; the resize already correlates it a little.
  assert out.var() < 0.1 * plain.var()
  assert abs(out.mean() - plain.mean()) < 1.0


def test_resized_crop_matches_torchvision():
  pil = Image.fromarray(_image(60, 50)[..., 0])
  box = (7, 3, 33, 41)
  ours = augment.resized_crop(pil, box, SIZE)
  theirs = TF.resized_crop(pil, *box, [SIZE, SIZE], InterpolationMode.BILINEAR)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("angle,shift,zoom",
                         [(17.3, (2, -3), 1.04), (-20.0, (0, 3), 0.95), (90.0, (0, 0), 1.0)])
def test_affine_matches_torchvision(angle, shift, zoom):
  pil = Image.fromarray(_image(SIZE, SIZE)[..., 0])
  ours = augment.affine(pil, angle, shift, zoom)
  theirs = TF.affine(pil, angle=angle, translate=list(shift), scale=zoom, shear=[0.0, 0.0],
                     interpolation=InterpolationMode.BILINEAR, fill=0)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_affine_shift_moves_right_and_down_and_fills_zero():
  grey = _image(SIZE, SIZE)[..., 0]
  shifted = np.asarray(augment.affine(Image.fromarray(grey), 0.0, (3, 2), 1.0))
  np.testing.assert_array_equal(shifted[2:, 3:], grey[:-2, :-3])
  assert not shifted[:2].any() and not shifted[:, :3].any()


def test_photometric_ops_match_torchvision_tensor_ops():
  x = _image(SIZE, SIZE)[..., 0].astype(np.float32)
  t = torch.from_numpy(x / 255.0)[None]
  for factor in (0.6, 1.4):
    np.testing.assert_allclose(augment.adjust_brightness(x, factor),
                               TF.adjust_brightness(t, factor)[0].numpy() * 255.0, atol=1e-3)
    np.testing.assert_allclose(augment.adjust_contrast(x, factor),
                               TF.adjust_contrast(t, factor)[0].numpy() * 255.0, atol=1e-3)
  for sigma in (0.1, 1.3, 3.0):
    k = augment.gaussian_kernel_size(sigma)
    assert k % 2 == 1 and k >= 6 * sigma
    np.testing.assert_allclose(augment.gaussian_blur(x, sigma),
                               TF.gaussian_blur(t, [k, k], [sigma, sigma])[0].numpy() * 255.0, atol=1e-3)


def test_train_transform_is_torchvisions_pipeline_in_the_paper_order():
  """Each draw, replayed through torchvision's functional ops in the documented order."""
  paper, image = _paper(), _image()
  pil = Image.fromarray(image[..., 0])
  for seed in range(6):
    params = paper.sample(np.random.default_rng(seed), 40, 48)
    p = dataclasses.replace(params, contrast_first=bool(seed % 2))
    ref = TF.resized_crop(pil, *p.crop_box, [SIZE, SIZE], InterpolationMode.BILINEAR)
    if p.flip:
      ref = TF.hflip(ref)
    ref = TF.affine(ref, angle=p.angle, translate=list(p.shift), scale=p.zoom, shear=[0.0, 0.0],
                    interpolation=InterpolationMode.BILINEAR, fill=0)
    t = TF.to_tensor(ref)
    jitter = [lambda v: TF.adjust_brightness(v, p.brightness), lambda v: TF.adjust_contrast(v, p.contrast)]
    for op in (jitter[::-1] if p.contrast_first else jitter):
      t = op(t)
    k = augment.gaussian_kernel_size(p.blur_sigma)
    t = TF.gaussian_blur(t, [k, k], [p.blur_sigma, p.blur_sigma])
    expected = torch.round(t[0] * 255.0).numpy()
    ours = paper.apply(image, p)[..., 0].astype(np.float32)
    # float32 sums in another order may round a pixel to the neighbouring level.
    assert np.abs(ours - expected).max() <= 1.0
    assert np.mean(ours != expected) < 0.005


@pytest.mark.parametrize("shape", [(40, 48), (48, 40), (SIZE, SIZE), (33, 70)])
def test_eval_transform_matches_torchvision_resize_and_centre_crop(shape):
  image = _image(*shape)
  pil = Image.fromarray(image[..., 0])
  reference = TF.center_crop(TF.resize(pil, SIZE, InterpolationMode.BILINEAR), SIZE)
  np.testing.assert_array_equal(augment.eval_transform(image, SIZE)[..., 0], np.asarray(reference))
  np.testing.assert_array_equal(augment.eval_transform(image[..., 0], SIZE)[..., 0], np.asarray(reference))


def test_bad_image_and_bad_config_are_named():
  with pytest.raises(ValueError, match="uint8"):
    _paper()(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0))
  with pytest.raises(ValueError, match="uint8"):
    augment.eval_transform(np.zeros((8, 8, 1), np.float32), SIZE)
  config = base_config().augment
  config.contrast = (1.4, 0.6)
  with pytest.raises(ConfigError, match="augment.contrast"):
    augment.TrainAugment.from_config(config, SIZE)
  config = base_config().augment
  config.flip_prob = 1.5
  with pytest.raises(ConfigError, match="augment.flip_prob"):
    augment.TrainAugment.from_config(config, SIZE)


def test_blur_kernel_size_rule():
  assert [augment.gaussian_kernel_size(s) for s in (0.1, 1.0, 1.01, 3.0)] == [3, 7, 9, 19]
  assert all(augment.gaussian_kernel_size(s) >= 6 * s + 1 for s in np.linspace(0.1, 3.0, 30))
  assert math.isclose(float(augment.gaussian_blur(np.full((5, 5), 7.0, np.float32), 3.0).mean()), 7.0,
                      rel_tol=1e-6)
