"""ConVIRT's training augmentations in JAX, per example, inside the jitted step (`data.augment_on="device"`).

The same transform as `augment.TrainAugment` (see its module docstring for the steps and ranges), computed
from a fixed-shape uint8 image (the stored image padded or cut to [P, P] by the loader, `augment.pad_to`,
with its valid extent), so that batches keep static shapes and the host only decodes. Both train steps
(pretraining and fine-tuning) call `in_step` first inside their shard_map; `spec_for` says whether.

The parameters are drawn from one key per example with the same distributions as the host's draws
(`sample`; a test compares them on many draws); for the same parameters each step equals the host's
(Pillow's arithmetic) within 1 grey level (tests per step):
  - the resized crop is Pillow's antialiased bilinear resampling written as two weight matrices (rows and
    columns of the crop box only), so it runs as two small matmuls per example;
  - the affine transform samples bilinearly at Pillow's pixel centres, fill 0 outside the image: with
    per-pixel gathers on a GPU or a CPU, and on a TPU (whose gathers read far more than they return) as
    one-hot matrix products over the source block of each 16 x 16 output tile (`_warp_tiles`);
  - brightness, contrast and the blur are the host's float formulas; the blur's kernel has the largest
    radius the config allows, its taps past this example's radius set to 0.
Like the host, the image is rounded to whole grey levels after the crop and after the affine step (Pillow
works on uint8 images); a contrast or brightness factor above 1 can stretch a step's rounding difference
to 2 grey levels in the whole transform, in under 2% of the pixels.
"""
import math
from typing import Any

import jax
import jax.numpy as jnp

from convirt_jax.data.augment import (ASPECT_RATIO_RANGE, AugmentParams, TrainAugment, gaussian_kernel_size,
                                      resolve_augment_on)

Params = dict[str, jax.Array]  # one example's draw: see `sample`
_CROP_TRIES = 10
# fold_in data of the augmentations' stream in a step: the dropout streams fold in device indices.
_AUGMENT_STREAM = 2**31 - 1
# Bilinear weights on whole grey levels often land exactly on a rounding boundary (x.5, or a whole
# level for the affine step's truncation), where float32 noise that depends on XLA's fusion and
# summation order would pick either side: the same draw would give other pixels on another device
# count or in another program. A margin far above that noise (~1e-4 at 255) and far below a grey level
# puts every such value on Pillow's side.
_TIE = 1e-3


def _round(x: jax.Array) -> jax.Array:
  """Python's round() (half to even), as an int32."""
  return jnp.round(x).astype(jnp.int32)


def _randint(key: jax.Array, high: jax.Array) -> jax.Array:
  """Uniform integer in [0, high) for a traced high >= 1."""
  return jnp.minimum(jnp.floor(jax.random.uniform(key) * high).astype(jnp.int32), high - 1)


def crop_box(key: jax.Array, height: jax.Array, width: jax.Array, scale: tuple[float, float],
             ratio: tuple[float, float] = ASPECT_RATIO_RANGE) -> jax.Array:
  """torchvision's RandomResizedCrop.get_params for a (traced) height x width: int32 [top, left, h, w]."""
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = (height * width).astype(jnp.float32)
  target_area = area * jax.random.uniform(k_area, (_CROP_TRIES,), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (_CROP_TRIES,), minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  ws = _round(jnp.sqrt(target_area * aspect))
  hs = _round(jnp.sqrt(target_area / aspect))
  ok = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = jnp.argmax(ok)
  # The fallback: the largest centred crop whose aspect ratio is inside `ratio`.
  in_ratio = width / height
  fw = jnp.where(in_ratio < min(ratio), width,
                 jnp.where(in_ratio > max(ratio), _round(height * max(ratio)), width))
  fh = jnp.where(in_ratio < min(ratio), _round(width / min(ratio)), height)
  found = ok.any()
  h = jnp.where(found, hs[first], fh)
  w = jnp.where(found, ws[first], fw)
  top = jnp.where(found, _randint(k_top, height - h + 1), (height - h) // 2)
  left = jnp.where(found, _randint(k_left, width - w + 1), (width - w) // 2)
  return jnp.stack([top, left, h, w]).astype(jnp.int32)


def sample(key: jax.Array, spec: TrainAugment, height: jax.Array, width: jax.Array) -> Params:
  """One example's parameters for an image of (traced) height x width, from one key."""
  keys = jax.random.split(key, 10)
  uniform = lambda k, bounds: jax.random.uniform(k, minval=bounds[0], maxval=bounds[1])
  max_shift = spec.translation * spec.size
  return {
      "crop_box": crop_box(keys[0], height, width, spec.crop_scale),
      "flip": jax.random.uniform(keys[1]) < spec.flip_prob,
      "angle": uniform(keys[2], (-spec.rotation, spec.rotation)),
      "shift": jnp.stack([_round(uniform(keys[3], (-max_shift, max_shift))),
                          _round(uniform(keys[4], (-max_shift, max_shift)))]),
      "zoom": uniform(keys[5], spec.scale),
      "contrast_first": jax.random.uniform(keys[6]) < 0.5,
      "brightness": uniform(keys[7], spec.brightness),
      "contrast": uniform(keys[8], spec.contrast),
      "blur_sigma": uniform(keys[9], spec.blur_sigma),
  }


def from_host(params: AugmentParams) -> Params:
  """The host's draw as device parameters (to apply the same draw on both sides)."""
  return {"crop_box": jnp.asarray(params.crop_box, jnp.int32), "flip": jnp.asarray(params.flip),
          "angle": jnp.float32(params.angle), "shift": jnp.asarray(params.shift, jnp.int32),
          "zoom": jnp.float32(params.zoom), "contrast_first": jnp.asarray(params.contrast_first),
          "brightness": jnp.float32(params.brightness), "contrast": jnp.float32(params.contrast),
          "blur_sigma": jnp.float32(params.blur_sigma)}


def _resize_weights(start: jax.Array, length: jax.Array, in_size: int, out_size: int) -> jax.Array:
  """[out_size, in_size] weights of Pillow's bilinear resampling of input [start, start + length) to
  out_size samples: a triangle widened by the reduction factor (antialiasing), normalised per row."""
  scale = length.astype(jnp.float32) / out_size
  filter_scale = jnp.maximum(scale, 1.0)
  centre = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale  # in crop coordinates
  j = jnp.arange(in_size, dtype=jnp.float32) - start.astype(jnp.float32)
  w = jnp.maximum(0.0, 1.0 - jnp.abs((j[None, :] - centre[:, None] + 0.5) / filter_scale))
  inside = (j >= 0) & (j < length.astype(jnp.float32))
  w = jnp.where(inside[None, :], w, 0.0)
  return w / w.sum(axis=1, keepdims=True)


def resized_crop(image: jax.Array, box: jax.Array, size: int) -> jax.Array:
  """float [H, W] -> [size, size] whole grey levels: the box (top, left, h, w) resampled as Pillow's crop +
  resize."""
  rows = _resize_weights(box[0], box[2], image.shape[0], size)
  cols = _resize_weights(box[1], box[3], image.shape[1], size)
  hi = jax.lax.Precision.HIGHEST  # float32 matmuls on TPU/GPU: bf16 passes would cost grey levels
  # Pillow's order and roundings (half up): the horizontal pass to a uint8 image, then the vertical one.
  across = jnp.floor(jnp.matmul(image, cols.T, precision=hi) + 0.5 + _TIE)
  return jnp.floor(jnp.matmul(rows, across, precision=hi) + 0.5 + _TIE)


_WARP_TILE = 16  # output pixels per tile side of the TPU's warp


def warp_patch(spec: TrainAugment, tile: int = _WARP_TILE) -> int:
  """The source patch side that holds every sample of a tile x tile block of the affine step's output,
  for any draw of `spec` (rotation up to spec.rotation, zoom from spec.scale[0]), and 2 pixels more
  for the bilinear neighbours and rounding."""
  turn = math.radians(min(spec.rotation, 45.0))  # |cos| + |sin| is largest at 45 degrees
  return min(spec.size, math.ceil(tile * (math.cos(turn) + math.sin(turn)) / spec.scale[0]) + 3)


def _samples(size: int, grid: int, angle, shift, zoom) -> dict[str, jax.Array]:
  """Pillow's bilinear sample of each output pixel of a [grid, grid] canvas (>= size; the pixels past
  `size` are outside): its four source pixels' rows and columns (edges clamped, the row below the last
  one being the last one itself), the weights dx, dy, and whether it falls outside the image."""
  c_x = c_y = size * 0.5
  rot = jnp.deg2rad(angle)
  a, b = jnp.cos(rot) / zoom, jnp.sin(rot) / zoom
  d, e = -jnp.sin(rot) / zoom, jnp.cos(rot) / zoom
  tx, ty = shift[0].astype(jnp.float32), shift[1].astype(jnp.float32)
  c = a * (-c_x - tx) + b * (-c_y - ty) + c_x
  f = d * (-c_x - tx) + e * (-c_y - ty) + c_y
  y, x = jnp.mgrid[0:grid, 0:grid].astype(jnp.float32) + 0.5
  xin, yin = a * x + b * y + c, d * x + e * y + f
  outside = (xin < 0) | (xin >= size) | (yin < 0) | (yin >= size) | (x > size) | (y > size)
  xin, yin = xin - 0.5, yin - 0.5
  x0, y0 = jnp.floor(xin), jnp.floor(yin)
  dx, dy = xin - x0, yin - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  clip = lambda v: jnp.clip(v, 0, size - 1)
  return {"left": clip(x0), "right": clip(x0 + 1), "top": clip(y0),
          "below": jnp.where(y0 + 1 < size, clip(y0 + 1), clip(y0)), "dx": dx, "dy": dy,
          "outside": outside}


def _blend(top_left, top_right, below_left, below_right, s) -> jax.Array:
  top = top_left * (1 - s["dx"]) + top_right * s["dx"]
  bottom = below_left * (1 - s["dx"]) + below_right * s["dx"]
  return jnp.where(s["outside"], 0.0, top * (1 - s["dy"]) + bottom * s["dy"])


def _warp_gather(image: jax.Array, angle, shift, zoom) -> jax.Array:
  """The affine step as four per-pixel gathers (cheap on a GPU or a CPU)."""
  s = _samples(image.shape[0], image.shape[0], angle, shift, zoom)
  return _blend(image[s["top"], s["left"]], image[s["top"], s["right"]], image[s["below"], s["left"]],
                image[s["below"], s["right"]], s)


def _warp_tiles(image: jax.Array, angle, shift, zoom, patch: int, tile: int = _WARP_TILE) -> jax.Array:
  """The affine step without per-pixel gathers, for a TPU, where a gather reads far more than it
  returns (XLA counts 34 GB for 32 images of 224 px against 1.9 GB here). The output is cut into tiles;
  each tile's samples lie in one [patch, patch] source block (a dynamic slice); a one-hot matrix product
  picks the samples' columns from the block (exact: whole grey levels are exact in bfloat16) and a
  one-hot sum their rows. The arithmetic of each sample is `_warp_gather`'s."""
  size = image.shape[0]
  n = -(-size // tile)
  grid, patch = n * tile, min(patch, size)
  s = _samples(size, grid, angle, shift, zoom)
  tiles = lambda v: v.reshape(n, tile, n, tile).transpose(0, 2, 1, 3).reshape(n * n, tile * tile)
  s = {k: tiles(v) for k, v in s.items()}
  # Each tile's block: from its inside samples' smallest row and column, kept inside the image.
  row0 = jnp.clip(jnp.min(jnp.where(s["outside"], size, s["top"]), axis=1), 0, size - patch)[:, None]
  col0 = jnp.clip(jnp.min(jnp.where(s["outside"], size, s["left"]), axis=1), 0, size - patch)[:, None]
  blocks = jax.vmap(lambda r, c: jax.lax.dynamic_slice(image, (r, c), (patch, patch)))(row0[:, 0], col0[:, 0])
  k = jnp.arange(patch)[None, :, None]
  columns = jnp.concatenate([s["left"] - col0, s["right"] - col0], axis=1)[:, None, :]
  picked = jnp.einsum("nrc,ncq->nrq", blocks.astype(jnp.bfloat16), (k == columns).astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32)  # [tiles, patch rows, 2 x tile pixels]
  left, right = jnp.split(picked, 2, axis=2)
  row = lambda rows, v: jnp.sum(jnp.where(k == (rows - row0)[:, None, :], v, 0.0), axis=1)
  out = _blend(row(s["top"], left), row(s["top"], right), row(s["below"], left), row(s["below"], right), s)
  return out.reshape(n, n, tile, tile).transpose(0, 2, 1, 3).reshape(grid, grid)[:size, :size]


def affine(image: jax.Array, angle: jax.Array, shift: jax.Array, zoom: jax.Array, patch: int = 0,
           method: str = "") -> jax.Array:
  """float [S, S]: rotation by `angle` degrees, zoom about the centre, then shift (x, y); Pillow's
  bilinear sampling at pixel centres (edge pixels clamped), 0 where the source is outside the image.

  On a TPU the gather-free tiled warp (`patch`: `warp_patch(spec)`, 0: the whole image), elsewhere the
  gathers: the platform the step is compiled for decides. `method` ("gather" or "tiles") forces one.
  """
  tiles = lambda *a: _warp_tiles(*a, patch=patch or image.shape[0])
  if method:
    return {"gather": _warp_gather, "tiles": tiles}[method](image, angle, shift, zoom)
  return jax.lax.platform_dependent(image, angle, shift, zoom, tpu=tiles, default=_warp_gather)


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(image * factor, 0.0, 255.0)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(factor * image + (1.0 - factor) * image.mean(), 0.0, 255.0)


def max_blur_radius(spec: TrainAugment) -> int:
  """The kernel radius of the largest sigma the config draws (0: no blur)."""
  return gaussian_kernel_size(spec.blur_sigma[1]) // 2 if spec.blur_sigma[1] > 0 else 0


def gaussian_blur(image: jax.Array, sigma: jax.Array, max_radius: int) -> jax.Array:
  """float [S, S]: the host's separable Gaussian (radius ceil(3 sigma), reflect padding) with a kernel
  of `max_radius`, the taps past this sigma's radius 0; sigma <= 0 leaves the image as it is."""
  radius = jnp.ceil(3.0 * sigma)
  taps = jnp.arange(-max_radius, max_radius + 1, dtype=jnp.float32)
  kernel = jnp.where(jnp.abs(taps) <= radius, jnp.exp(-0.5 * (taps / jnp.maximum(sigma, 1e-6)) ** 2), 0.0)
  kernel = kernel / kernel.sum()
  out = image
  for axis in (0, 1):
    n = out.shape[axis]
    padding = [(0, 0), (0, 0)]
    padding[axis] = (max_radius, max_radius)
    padded = jnp.moveaxis(jnp.pad(out, padding, mode="reflect"), axis, 0)
    acc = sum(kernel[k] * padded[k:k + n] for k in range(2 * max_radius + 1))
    out = jnp.moveaxis(acc, 0, axis)
  return jnp.where(sigma > 0, out, image)


def apply(image: jax.Array, params: Params, spec: TrainAugment) -> jax.Array:
  """uint8 [H, W] (the valid extent at the top left) -> float32 [S, S] of whole grey levels."""
  # Whole grey levels after the two geometric steps, as the host's uint8 images (Pillow truncates the
  # affine step's samples).
  x = resized_crop(image.astype(jnp.float32), params["crop_box"], spec.size)
  x = jnp.where(params["flip"], x[:, ::-1], x)
  x = jnp.floor(affine(x, params["angle"], params["shift"], params["zoom"], warp_patch(spec)) + _TIE)
  bc = adjust_contrast(adjust_brightness(x, params["brightness"]), params["contrast"])
  cb = adjust_brightness(adjust_contrast(x, params["contrast"]), params["brightness"])
  x = jnp.where(params["contrast_first"], cb, bc)
  radius = max_blur_radius(spec)
  if radius:
    x = gaussian_blur(x, params["blur_sigma"], radius)
  return jnp.clip(jnp.round(x), 0.0, 255.0)


def augment_batch(images: jax.Array, extents: jax.Array, key: jax.Array, spec: TrainAugment,
                  first_row: Any = 0) -> jax.Array:
  """uint8 [b, H, W] images with their valid [b, 2] (height, width) -> uint8 [b, S, S, 3].

  Example i's key is `fold_in(key, first_row + i)`: with `first_row` the rows' place in the global batch,
  each example's draw depends only on the step's key and its row, not on the devices or processes."""
  rows = first_row + jnp.arange(images.shape[0])

  def one(image, extent, row):
    params = sample(jax.random.fold_in(key, row), spec, extent[0], extent[1])
    return apply(image, params, spec)

  grey = jax.vmap(one)(images, extents, rows).astype(jnp.uint8)
  return jnp.repeat(grey[..., None], 3, axis=-1)


def spec_for(augment_on: str, augment_config, size: int) -> TrainAugment | None:
  """The transform a train step applies (config.data.augment_on resolved "device"), else None."""
  if resolve_augment_on(augment_on) == "host":
    return None
  return TrainAugment.from_config(augment_config, size)


def in_step(batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array, spec: TrainAugment | None,
            axis: str) -> dict[str, jax.Array]:
  """Inside a train step's shard_map: with `spec`, this device's rows of a device-mode batch ("image"
  uint8 [b, H, W], "extent" [b, 2]) augmented to [b, S, S, 3], drawn from (the state's key, the step,
  the row's place in the global batch), so a resumed run and any device count draw the same."""
  if spec is None:
    if "extent" in batch:
      raise ValueError("the batch was made for device augmentation but the step augments on the host")
    return batch
  if "extent" not in batch:
    raise ValueError("the step augments on the device but the batch has no \"extent\" (host-augmented)")
  batch = dict(batch)
  key = jax.random.fold_in(jax.random.fold_in(rng, step), _AUGMENT_STREAM)
  first_row = jax.lax.axis_index(axis) * batch["image"].shape[0]
  batch["image"] = augment_batch(batch["image"], batch.pop("extent"), key, spec, first_row)
  return batch
