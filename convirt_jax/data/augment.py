"""ConVIRT's image augmentations for 8-bit greyscale chest X-rays, per example, in numpy and Pillow.

Training (`TrainAugment`), in the order of the paper's torchvision pipeline (ranges from `config.augment`):
  1. RandomResizedCrop to S x S: area fraction ~ U(crop_scale), log aspect ratio ~ U(log 3/4, log 4/3),
     10 tries then torchvision's centre-crop fallback; bilinear (antialiased by Pillow).
  2. RandomHorizontalFlip with probability flip_prob.
  3. RandomAffine about the image centre: angle ~ U(-rotation, rotation) degrees, shift ~ U(+-translation
     * S) pixels rounded per axis, zoom ~ U(scale); bilinear, fill 0. (torchvision's default is nearest;
     bilinear avoids jagged edges on the thin lines of devices and ribs.)
  4. ColorJitter: brightness factor b ~ U(brightness) multiplies the image; contrast factor c ~ U(contrast)
     blends it with its mean grey level (c * x + (1 - c) * mean). Both clip to [0, 255] and run in random
     order, as torchvision does.
  5. GaussianBlur: sigma ~ U(blur_sigma), kernel size 2 * ceil(3 sigma) + 1 (covers +-3 sigma, whatever the
     image size), reflect padding. Always applied, like torchvision's GaussianBlur.
Evaluation (`eval_transform`): resize the shorter side to S (bilinear), then centre-crop S x S.

A range of (1, 1) (scale, brightness, contrast, crop_scale when the image's aspect is within [3/4, 4/3]),
0 (flip_prob, rotation, translation) or (0, 0) (blur_sigma) turns that step off. Every random draw is
taken whether or not its step is on, so turning one step off leaves the others' parameters unchanged.

The geometric steps run on Pillow 'L' images exactly as torchvision's PIL backend computes them; the
photometric steps run in float32 and the result is rounded once. Output: uint8 [S, S, 3], the grey
channel repeated (normalisation happens on the device).
"""
import dataclasses
import math

import ml_collections
import numpy as np
from PIL import Image

from convirt_jax.config import AUGMENT_ON
from convirt_jax.errors import ConfigError

ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_CROP_TRIES = 10

Box = tuple[int, int, int, int]  # top, left, height, width


def as_grey(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W] or [H, W, 1] -> uint8 [H, W]; anything else is an error."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim != 2 or image.dtype != np.uint8 or min(image.shape) == 0:
    raise ValueError(f"image must be a non-empty uint8 [H, W, 1] greyscale array, got {image.dtype} "
                     f"{list(image.shape)}")
  return np.ascontiguousarray(image)


def _to_rgb(grey: np.ndarray) -> np.ndarray:
  return np.repeat(grey[..., None], 3, axis=-1)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float],
                            ratio: tuple[float, float] = ASPECT_RATIO_RANGE) -> Box:
  """torchvision's RandomResizedCrop.get_params, drawn from `rng`."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(_CROP_TRIES):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest centred crop whose aspect ratio is inside `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, box: Box, size: int) -> Image.Image:
  """Crops `box` (top, left, height, width), then resizes it to size x size, bilinear."""
  top, left, h, w = box
  return image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)


def affine(image: Image.Image, angle: float, translate: tuple[int, int], scale: float) -> Image.Image:
  """Rotates by `angle` degrees (counter-clockwise), zooms by `scale` about the centre, then shifts by
  `translate` (x, y) pixels; bilinear, fill 0. Same geometry as torchvision.transforms.functional.affine."""
  width, height = image.size
  cx, cy = width * 0.5, height * 0.5
  tx, ty = translate
  rot = math.radians(angle)
  # Pillow maps each output pixel back to the input: the inverse of T * C * R * S * C^-1.
  m = [math.cos(rot) / scale, math.sin(rot) / scale, 0.0,
       -math.sin(rot) / scale, math.cos(rot) / scale, 0.0]
  m[2] = m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
  m[5] = m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
  return image.transform((width, height), Image.AFFINE, m, Image.BILINEAR, fillcolor=0)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """float [H, W] in [0, 255] scaled by `factor`, clipped."""
  return np.clip(image * np.float32(factor), 0.0, 255.0)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """float [H, W] in [0, 255] blended with its mean grey level: factor 0 = flat grey, 1 = unchanged."""
  mean = np.float32(image.mean())
  return np.clip(np.float32(factor) * image + np.float32(1.0 - factor) * mean, 0.0, 255.0)


def gaussian_kernel_size(sigma: float) -> int:
  """Odd kernel size covering +-3 sigma."""
  return 2 * math.ceil(3.0 * sigma) + 1


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of float [H, W] with torchvision's kernel and reflect padding."""
  radius = gaussian_kernel_size(sigma) // 2
  taps = np.arange(-radius, radius + 1, dtype=np.float32)
  kernel = np.exp(-0.5 * (taps / np.float32(sigma)) ** 2)
  kernel /= kernel.sum()
  image = image.astype(np.float32)
  for axis in (0, 1):
    n = image.shape[axis]
    padding = [(0, 0), (0, 0)]
    padding[axis] = (radius, radius)
    padded = np.moveaxis(np.pad(image, padding, mode="reflect"), axis, 0)
    out = kernel[radius] * padded[radius:radius + n]
    for k in range(radius):  # The kernel is symmetric: one multiply per pair of taps.
      out += kernel[k] * (padded[k:k + n] + padded[2 * radius - k:2 * radius - k + n])
    image = np.moveaxis(out, 0, axis)
  return image


def _check_range(name: str, value, low: float, high: float) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.augment.{name}={value!r}: must be a (low, high) pair") from e
  if not low <= lo <= hi <= high:
    raise ConfigError(f"config.augment.{name}={(lo, hi)}: must satisfy {low} <= low <= high <= {high}")
  return lo, hi


def _check_value(name: str, value, low: float, high: float) -> float:
  if not low <= float(value) <= high:
    raise ConfigError(f"config.augment.{name}={value!r}: must be in [{low}, {high}]")
  return float(value)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """One draw of the training transform's parameters."""
  crop_box: Box          # top, left, height, width in the stored image
  flip: bool
  angle: float           # degrees, counter-clockwise
  shift: tuple[int, int]  # x, y pixels of the S x S image
  zoom: float
  contrast_first: bool   # ColorJitter order
  brightness: float
  contrast: float
  blur_sigma: float      # <= 0: no blur


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """The training transform (see the module docstring); call it as `augment(image, rng)`."""
  size: int
  crop_scale: tuple[float, float]
  flip_prob: float
  rotation: float
  translation: float
  scale: tuple[float, float]
  brightness: tuple[float, float]
  contrast: tuple[float, float]
  blur_sigma: tuple[float, float]

  @classmethod
  def from_config(cls, augment: ml_collections.ConfigDict, size: int) -> "TrainAugment":
    """From `config.augment` and the model input size, checking every range."""
    if int(size) <= 0:
      raise ConfigError(f"config.data.image_size={size!r}: must be > 0")
    inf = math.inf
    return cls(
        size=int(size),
        crop_scale=_check_range("crop_scale", augment.crop_scale, 1e-6, 1.0),
        flip_prob=_check_value("flip_prob", augment.flip_prob, 0.0, 1.0),
        rotation=_check_value("rotation", augment.rotation, 0.0, 180.0),
        translation=_check_value("translation", augment.translation, 0.0, 1.0),
        scale=_check_range("scale", augment.scale, 1e-6, inf),
        brightness=_check_range("brightness", augment.brightness, 0.0, inf),
        contrast=_check_range("contrast", augment.contrast, 0.0, inf),
        blur_sigma=_check_range("blur_sigma", augment.blur_sigma, 0.0, inf))

  def sample(self, rng: np.random.Generator, height: int, width: int) -> AugmentParams:
    """Draws every parameter, in a fixed order, for an image of height x width."""
    box = random_resized_crop_box(rng, height, width, self.crop_scale)
    flip = bool(rng.random() < self.flip_prob)
    angle = float(rng.uniform(-self.rotation, self.rotation))
    max_shift = self.translation * self.size
    shift = (int(round(rng.uniform(-max_shift, max_shift))), int(round(rng.uniform(-max_shift, max_shift))))
    zoom = float(rng.uniform(*self.scale))
    contrast_first = bool(rng.random() < 0.5)
    return AugmentParams(crop_box=box, flip=flip, angle=angle, shift=shift, zoom=zoom,
                         contrast_first=contrast_first, brightness=float(rng.uniform(*self.brightness)),
                         contrast=float(rng.uniform(*self.contrast)),
                         blur_sigma=float(rng.uniform(*self.blur_sigma)))

  def apply(self, image: np.ndarray, params: AugmentParams) -> np.ndarray:
    """uint8 [H, W, 1] -> uint8 [S, S, 3] with the given parameters."""
    p = params
    pil = resized_crop(Image.fromarray(as_grey(image)), p.crop_box, self.size)
    if p.flip:
      pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    if p.angle != 0.0 or p.shift != (0, 0) or p.zoom != 1.0:
      pil = affine(pil, p.angle, p.shift, p.zoom)
    if p.brightness == 1.0 and p.contrast == 1.0 and p.blur_sigma <= 0.0:
      return _to_rgb(np.asarray(pil))

    x = np.asarray(pil, np.float32)
    if p.contrast_first:
      x = adjust_brightness(adjust_contrast(x, p.contrast), p.brightness)
    else:
      x = adjust_contrast(adjust_brightness(x, p.brightness), p.contrast)
    if p.blur_sigma > 0.0:
      x = gaussian_blur(x, p.blur_sigma)
    return _to_rgb(np.clip(np.rint(x), 0, 255).astype(np.uint8))

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 1] -> uint8 [S, S, 3] with parameters drawn from `rng`."""
    height, width = as_grey(image).shape
    return self.apply(image, self.sample(rng, height, width))


def resolve_augment_on(augment_on: str, platform: str | None = None) -> str:
  """config.data.augment_on -> "host" | "device": "auto" is "device" on a GPU and "host" elsewhere.

  Measured with the plan (configs/mimic.py, 32 rows per chip): on an H100 the augmentations add 1.6% to
  the step's bytes (and bound); on a TPU v5e, with the gather-free warp a TPU compiles, 5% (44.7 GB
  against 42.5), while the host-mode pipeline needs under 2 of the host's 28 cores per v5e chip at the
  bound. On the CPU the step's XLA programs would only compete with the model for the same cores."""
  if augment_on not in AUGMENT_ON:
    raise ConfigError(f"config.data.augment_on={augment_on!r}: must be one of {AUGMENT_ON}")
  if augment_on != "auto":
    return augment_on
  if platform is None:
    import jax  # pylint: disable=g-import-not-at-top  (grain's workers never get here)
    platform = jax.default_backend()
  return "device" if platform in ("gpu", "cuda", "rocm") else "host"


def padded_size(stored_size: int) -> int:
  """The side of the square each stored image is padded to for the device augmentations: the longer
  side of a 4:3 image at the stored shorter side, rounded up to a multiple of 8 (344 for 256 px). A
  longer side beyond it is cut, centred (chest X-rays are mostly within 5:4)."""
  return -(-math.ceil(stored_size * 4 / 3) // 8) * 8


def pad_to(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [h, w] or [h, w, 1] -> (uint8 [height, width], int32 [2] its valid (h, w)): zero-padded at the
  bottom and right, or cut, centred, where the image is larger. The device augmentations crop inside
  the valid extent only, so the padding never reaches the model."""
  grey = as_grey(image)
  h, w = grey.shape
  top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)
  grey = grey[top:top + height, left:left + width]
  out = np.zeros((height, width), np.uint8)
  out[:grey.shape[0], :grey.shape[1]] = grey
  return out, np.asarray(grey.shape, np.int32)


def eval_transform(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 1] -> uint8 [S, S, 3]: shorter side resized to `size` (bilinear), centre crop."""
  grey = as_grey(image)
  h, w = grey.shape
  # torchvision.transforms.Resize(size): the longer side is truncated, not rounded.
  if h <= w:
    new_h, new_w = size, int(size * w / h)
  else:
    new_h, new_w = int(size * h / w), size
  pil = Image.fromarray(grey)
  if (new_h, new_w) != (h, w):
    pil = pil.resize((new_w, new_h), Image.BILINEAR)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  pil = pil.crop((left, top, left + size, top + size))
  return _to_rgb(np.asarray(pil))
