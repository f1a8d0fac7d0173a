"""Rendering a case of the synthetic corpus as a frontal radiograph (`render_image`): anatomy, findings,
support devices, then exposure, detector blur and noise.

Geometry is in "body" coordinates: x in [-1, 1] from the image's left to right, y in [-1, 1] from top
to bottom. Images are PA views, so the patient's RIGHT side is on the image's LEFT (x < 0).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np
from PIL import Image, ImageDraw

from convirt_jax.data.synthetic_cxr.cases import (FINDING_STREAM, LABEL_NAMES, NOISE_STREAM, SIDES,
                                                  TEXTURE_STREAM, Case, Finding, lobe_side)


def _ramp(d, width):
  """Soft step from 0 (d <= -width/2) to 1 (d >= width/2): anti-aliased region edges."""
  return np.clip(0.5 + d / width, 0.0, 1.0)


def _smooth_noise(rng, cells: int, size: int) -> np.ndarray:
  """Band-limited noise in [0, 1]: a random `cells`x`cells` grid, bicubically upsampled."""
  grid = rng.random((cells, cells), dtype=np.float32)
  return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC))


def _bilinear(grid: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
  """Bilinear lookup of grid at fractional (i, j); i wraps around (an angle), j is clamped."""
  n, m = grid.shape
  j = np.clip(j, 0, m - 1.001)
  i0, j0 = np.floor(i).astype(np.int64), np.floor(j).astype(np.int64)
  fi, fj = i - i0, j - j0
  i0 %= n
  i1 = (i0 + 1) % n
  top = grid[i0, j0] * (1 - fj) + grid[i0, j0 + 1] * fj
  bottom = grid[i1, j0] * (1 - fj) + grid[i1, j0 + 1] * fj
  return top * (1 - fi) + bottom * fi


def _segment_distance(x, y, a, b):
  """Distance from every (x, y) to the segment a-b."""
  (ax, ay), (bx, by) = a, b
  dx, dy = bx - ax, by - ay
  t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0, 1)
  return np.hypot(x - ax - t * dx, y - ay - t * dy)


def _detector_blur(img: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian blur (+-3 sigma, edge padding, float64) of the exposure; none below sigma 0.2 pixel.

  Not `augment.gaussian_blur`: that one (torchvision's float32 kernel, reflect padding, taps summed in
  pairs) rounds differently, and the corpus must stay bit-identical to the one it was calibrated on.
  """
  if sigma < 0.2:
    return img
  radius = int(math.ceil(3 * sigma))
  k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  k /= k.sum()
  out = img
  for axis in (0, 1):
    padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
    n = out.shape[axis]
    out = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
  return out


def _spline(points, n: int = 40) -> np.ndarray:
  """Catmull-Rom curve through `points` (k x 2), sampled at about n points."""
  p = np.asarray(points, np.float64)
  p = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
  per = max(2, n // (len(p) - 3))
  t = np.linspace(0, 1, per, endpoint=False)[:, None]
  out = []
  for i in range(1, len(p) - 2):
    p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
    out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2 +
                      (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
  out.append(p[-2:-1])
  return np.concatenate(out)


class _Geometry:
  """The patient's anatomy on the pixel grid of one image size, in body coordinates."""

  def __init__(self, patient: Mapping[str, float], size: int, heart_ctr: float):
    p = patient
    self.size = size
    self.p = p
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    u, v = np.meshgrid(coords, coords)
    u, v = (u - p["shift_x"]) / p["scale"], (v - p["shift_y"]) / p["scale"]
    c, s = math.cos(math.radians(p["rotation"])), math.sin(math.radians(p["rotation"]))
    self.x, self.y = c * u + s * v, -s * u + c * v
    self.pixel = 2.0 / (size * p["scale"])  # one pixel in body units
    self.edge = 1.5 * self.pixel
    self.med, self.width, self.apex = p["mediastinum"], p["lung_width"], p["apex"]
    self.lateral_wall = self.med + self.width * 1.04
    self.lungs = {side: self._lung(side) for side in SIDES}
    self.heart, self.heart_centre, self.heart_half_size = self._heart(heart_ctr)

  def side_sign(self, side: str) -> float:
    return -1.0 if side == "right" else 1.0  # the patient's right is on the image's left

  def base(self, side: str) -> float:
    return self.p["base_" + side]

  def to_body(self, side: str, r: float, t: float) -> tuple[float, float]:
    """Lung-relative (r: medial 0 -> lateral 1, t: apex 0 -> base 1) to body (x, y)."""
    y = self.apex + t * (self.base(side) - self.apex)
    return self.side_sign(side) * (self.med + r * self.width), y

  def _lung(self, side: str) -> dict[str, np.ndarray]:
    xm = self.side_sign(side) * self.x  # distance from the midline towards this lung's wall
    t = (self.y - self.apex) / (self.base(side) - self.apex)
    rise = np.clip(t / 0.55, -1, 1)
    lateral = self.med + self.width * (
        np.sqrt(np.clip(1 - (1 - rise) ** 2, 0, 1)) + 0.04 * np.clip(t, 0, 1))
    medial = self.med + self.width * 0.33 * np.clip(1 - t / 0.22, 0, 1) ** 2
    r = np.clip((xm - self.med) / (self.width * 1.04), 0, 1)
    diaphragm = self.base(side) - self.p["dome"] * (4 * r * (1 - r)) ** 0.6
    margin = lateral - xm
    inside = np.minimum(np.minimum(margin, xm - medial), diaphragm - self.y)
    return dict(xm=xm, t=t, r=r, margin=margin, diaphragm=diaphragm,
                mask=_ramp(inside, self.edge), pleura=np.minimum(margin, self.y - self.apex))

  def _heart(self, ctr: float):
    """Soft mask, centre and half extents of the heart shadow with cardiothoracic ratio `ctr`."""
    p = self.p
    angle = math.radians(p["heart_angle"])
    b = p["heart_height"]
    half_width = ctr * self.lateral_wall  # ctr * thoracic width / 2
    a = math.sqrt(max(half_width ** 2 - (b * math.sin(angle)) ** 2, 1e-4)) / math.cos(angle)
    half_height = math.sqrt((a * math.sin(angle)) ** 2 + (b * math.cos(angle)) ** 2)
    cx = half_width * (1 - 2 * p["heart_right_fraction"])
    # Widest near the diaphragm; the part below it disappears into the abdomen.
    cy = p["base_left"] - 0.6 * p["dome"] - 0.15 * half_height
    dx, dy = self.x - cx, self.y - cy
    # Tilted so the apex points down towards the patient's left.
    along = math.cos(angle) * dx + math.sin(angle) * dy
    across = -math.sin(angle) * dx + math.cos(angle) * dy
    rho = np.sqrt((along / a) ** 2 + (across / b) ** 2)
    return _ramp((1 - rho) * min(a, b), self.edge), (cx, cy), (half_width, half_height)

  def to_pixels(self, points) -> np.ndarray:
    """Body (x, y) points to continuous image pixel coordinates (column, row)."""
    p = self.p
    pts = np.asarray(points, np.float64)
    c, s = math.cos(math.radians(p["rotation"])), math.sin(math.radians(p["rotation"]))
    u = p["scale"] * (c * pts[:, 0] - s * pts[:, 1]) + p["shift_x"]
    v = p["scale"] * (s * pts[:, 0] + c * pts[:, 1]) + p["shift_y"]
    return np.stack([(u + 1) / 2 * self.size, (v + 1) / 2 * self.size], axis=1)


def render_image(case: Case, image_size: int = 128, *, noise_scale: float = 1.0,
                 contrast_scale: float = 1.0) -> np.ndarray:
  """The radiograph of a case: uint8 [image_size, image_size] grayscale.

  `noise_scale` and `contrast_scale` multiply the patient's detector noise and exposure contrast: a mild
  domain shift for transfer experiments; at 1.0 (the default) the output is bit-identical to the
  calibrated corpus.
  """
  if not isinstance(image_size, (int, np.integer)) or image_size < 32:
    raise ValueError(f"image_size={image_size!r} must be an integer >= 32")
  p = case.patient
  cardiomegaly = case.finding("cardiomegaly")
  g = _Geometry(p, int(image_size), cardiomegaly.sizes[0] if cardiomegaly else p["heart_ctr"])
  texture_rng = np.random.default_rng([*case.entropy, TEXTURE_STREAM])
  x, y, size = g.x, g.y, g.size

  # Density (attenuation) layers; the pixel value rises with density.
  lung = g.lungs["right"]["mask"] + g.lungs["left"]["mask"]
  above = _ramp(np.minimum(g.lungs["right"]["diaphragm"], g.lungs["left"]["diaphragm"]) - y, 0.06)
  aortic_knob = _ramp(1 - np.hypot((x - g.med + 0.01) / 0.075, (y - g.apex - 0.4) / 0.06), 0.2)
  heart = g.heart * above
  air = lung * (1 - g.heart) * (1 - aortic_knob)
  vessels = _vessels(g, texture_rng) * p["vessels"]
  parenchyma = 0.05 * (_smooth_noise(texture_rng, 20, size) - 0.5)
  layers = dict(air=air, vessels=vessels, extra=np.zeros_like(x))
  for finding in case.findings:
    if finding.name in _DRAW:
      rng = np.random.default_rng(
          [*case.entropy, FINDING_STREAM, LABEL_NAMES.index(finding.name)])
      _DRAW[finding.name](g, finding, layers, rng)
  air = np.clip(layers["air"], 0, 1.2)

  body = _body(g)
  mediastinum = _ramp(g.med + 0.015 - np.abs(x - 0.01), 2 * g.edge) * above
  density = p["tissue"] * body * (1 + 0.05 * y)
  density = density + 0.24 * np.maximum(np.maximum(mediastinum, heart), aortic_knob)
  density = density - 0.26 * _airways(g) + 0.06 * (1 - above) * body
  # Less air is traversed towards the bases (diaphragm and soft tissue in front of and behind them).
  density = density - 0.62 * air * (1 - 0.18 * np.clip(y, 0, 1))
  density = density + (layers["vessels"] + parenchyma) * np.clip(air, 0, 1) + layers["extra"]
  density = density + _bones(g) * body + _soft_tissue(g) * body
  density = density + _devices(g, case.finding("support_devices"))

  # Exposure, detector blur and quantum noise.
  image = np.clip(density / 1.75, 0, 1) ** p["gamma"]
  image = 0.5 + (contrast_scale * p["contrast"]) * (image - 0.5) + p["brightness"]
  image = _detector_blur(image, p["blur"] / g.pixel)
  noise_rng = np.random.default_rng([*case.entropy, NOISE_STREAM])
  image = image + (noise_scale * p["noise"]) * noise_rng.standard_normal(image.shape, dtype=np.float32)
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def _airways(g: _Geometry) -> np.ndarray:
  """The trachea and the two main bronchi: air columns in the mediastinum."""
  carina = g.apex + 0.42 * (g.base("right") - g.apex)
  airways = _ramp(0.032 - np.abs(g.x - 0.005 * (g.y - g.apex)), g.edge) * _ramp(carina - g.y, 0.03)
  for s in (-1, 1):
    bronchus = _segment_distance(g.x, g.y, (0.0, carina - 0.01), (s * 0.09, carina + 0.07))
    airways = np.maximum(airways, 0.6 * _ramp(0.018 - bronchus, g.edge))
  return airways


def _vessels(g: _Geometry, rng) -> np.ndarray:
  """Pulmonary vessel markings: ridges of angular noise around each hilum, tapering outwards."""
  total = np.zeros_like(g.x)
  cells = 90
  for side in SIDES:
    lung = g.lungs[side]
    hx, hy = g.med + 0.07, g.apex + 0.5 * (g.base(side) - g.apex)
    radius = np.hypot(lung["xm"] - hx, g.y - hy)
    angle = np.arctan2(g.y - hy, lung["xm"] - hx)
    noise = _bilinear(rng.standard_normal((cells, 8)).astype(np.float32),
                      (angle + np.pi) / (2 * np.pi) * cells, radius * 7)
    # Zero crossings of the noise are the vessels; their width is set in body units.
    width = np.maximum(0.014 * np.exp(-radius / 0.5), 0.6 * g.pixel)
    sharpness = np.minimum(width * cells / (2 * np.pi * np.maximum(radius, 1e-3)), 1.0)
    ridges = np.exp(-(noise / sharpness) ** 2)
    total += lung["mask"] * (0.2 * ridges * np.exp(-radius / 0.5) +
                             0.08 * np.exp(-(radius / 0.1) ** 2))
  return total


def _body(g: _Geometry) -> np.ndarray:
  """Soft tissue of the trunk, shoulders and (in some patients) the arms beside the chest."""
  p = g.p
  shoulders = _ramp(g.apex + 0.05 - g.y, 0.3)
  waist = np.clip((g.y - 0.2) / 0.8, 0, 1)
  half_width = g.lateral_wall + p["chest_wall"] + 0.12 * shoulders - 0.05 * waist
  trunk = _ramp(half_width - np.abs(g.x), 4 * g.edge)
  if p["arms"] <= 0:
    return trunk
  inner = half_width + 0.06 + 0.15 * np.clip((g.y - g.apex) / 0.8, 0, 1) ** 2
  arms = _ramp(np.abs(g.x) - inner, 4 * g.edge) * _ramp(inner + 0.3 - np.abs(g.x), 6 * g.edge)
  return trunk + p["arms"] * arms * _ramp(g.apex + 0.6 - g.y, 0.3)


def _bones(g: _Geometry) -> np.ndarray:
  """Posterior and anterior ribs, clavicles, spine and humeral heads."""
  p = g.p
  bones = np.zeros_like(g.x)
  y = g.y
  for side in SIDES:
    xm = g.side_sign(side) * g.x
    within = _ramp(xm - 0.04, 0.04) * _ramp(g.lateral_wall + 0.04 - xm, 0.04)
    # Posterior ribs leave the spine, rise a little, then sweep down along the lateral wall;
    # the fainter anterior ribs run down towards the midline.
    posterior = (y + 0.3 * xm - 0.85 * xm ** 2 - g.apex + 0.1 - p["rib_phase"] * 0.1) / p[
        "rib_spacing"]
    band = _ramp(np.cos(2 * np.pi * posterior) - 0.35, 0.5)
    band *= _ramp(posterior + 0.3, 0.3) * _ramp(9.6 - posterior, 0.3)
    anterior = (y + 0.5 * xm - g.apex - 0.15 - p["rib_phase"] * 0.1) / (p["rib_spacing"] * 1.25)
    aband = _ramp(np.cos(2 * np.pi * anterior) - 0.5, 0.5)
    aband *= _ramp(xm - 0.2, 0.1) * _ramp(anterior, 0.3) * _ramp(5.5 - anterior, 0.3)
    bones += within * (0.09 * band + 0.04 * aband)
    s = g.side_sign(side)
    clavicle = np.minimum(
        _segment_distance(g.x, y, (s * 0.05, g.apex + 0.07), (s * 0.3, g.apex + 0.01)),
        _segment_distance(g.x, y, (s * 0.3, g.apex + 0.01), (s * 0.62, g.apex - 0.08)))
    bones += 0.18 * _ramp(0.028 - clavicle, 0.016)
    humerus = np.hypot(g.x - s * (g.lateral_wall + 0.24), y - (g.apex - 0.12))
    bones += 0.2 * _ramp(0.15 - humerus, 0.03)
  vertebrae = _ramp(np.cos(2 * np.pi * (y - g.apex) / 0.085) + 0.5, 0.5)
  bones += 0.07 * vertebrae * _ramp(0.065 - np.abs(g.x), g.edge)
  return bones


def _soft_tissue(g: _Geometry) -> np.ndarray:
  """Breast shadows over the lower lateral zones and the gastric air bubble under the left dome."""
  p = g.p
  extra = np.zeros_like(g.x)
  if p["breast"] > 0:
    for side in SIDES:
      xm = g.side_sign(side) * g.x
      lower = g.base(side) + 0.05 - 0.35 * ((xm - g.med - 0.6 * g.width) / g.width) ** 2
      extra += p["breast"] * (_ramp(g.y - g.base(side) + 0.45, 0.3) * _ramp(lower - g.y, 0.03) *
                              _ramp(xm - g.med - 0.2 * g.width, 0.2))
  if p["gastric_bubble"] > 0:
    cx, cy = g.med + 0.35 * g.width, g.base("left") + 0.08
    bubble = ((g.x - cx) / 0.1) ** 2 + ((g.y - cy) / 0.055) ** 2
    extra -= 0.25 * p["gastric_bubble"] * _ramp(1 - bubble, 0.3)
  return extra


# Findings: each edits the air fraction (opacities replace air), the vessel markings, or adds density.


def _draw_effusion(g, finding, layers, rng):
  for side, height in zip(finding.sites, finding.sizes):
    lung = g.lungs[side]
    # Meniscus: the fluid surface climbs towards the lateral chest wall.
    top = g.base(side) - height - (0.04 + 0.35 * height) * lung["r"] ** 2
    depth = np.clip((g.y - top) / (0.05 + 0.25 * height), 0, 1) ** 0.7
    opacity = rng.uniform(0.9, 1.0) * depth * _ramp(lung["xm"] - g.med + 0.02, 0.04)
    layers["air"] = layers["air"] * (1 - opacity)


_LOBE_CENTRES = {"upper": (0.5, 0.3), "middle": (0.28, 0.66), "lingula": (0.32, 0.62),
                 "lower": (0.55, 0.82)}


def _draw_consolidation(g, finding, layers, rng):
  density = (0.8, 0.9, 1.0)[finding.severity]
  for lobe, radius in zip(finding.sites, finding.sizes):
    side = lobe_side(lobe)
    key = "lingula" if lobe == "lingula" else lobe.split()[1]
    r0, t0 = _LOBE_CENTRES[key]
    cx, cy = g.to_body(side, r0 + rng.uniform(-0.08, 0.08), t0 + rng.uniform(-0.05, 0.05))
    envelope = np.exp(-(((g.x - cx) / radius) ** 2 + ((g.y - cy) / (0.8 * radius)) ** 2))
    patches = np.clip((_smooth_noise(rng, 14, g.size) - 0.3) / 0.35, 0, 1)
    opacity = density * envelope ** 0.8 * (0.3 + 0.7 * patches)
    layers["air"] = layers["air"] * (1 - opacity * g.lungs[side]["mask"])


def _draw_pneumothorax(g, finding, layers, rng):
  side, rim = finding.sites[0], finding.sizes[0]
  lung = g.lungs[side]
  extent = _ramp((0.45, 0.7, 0.92)[finding.severity] - lung["t"], 0.15)
  gap = lung["mask"] * _ramp(rim - lung["pleura"], g.edge) * extent
  # No lung markings lateral to the visceral pleural line, which shows as a thin white line.
  layers["vessels"] = layers["vessels"] * (1 - gap)
  collapsed = lung["mask"] * _ramp(rim + 0.05 - lung["pleura"], 0.03) * extent - gap
  layers["air"] = layers["air"] * (1 - 0.3 * np.clip(collapsed, 0, 1)) + 0.5 * gap
  width = max(0.008, 0.6 * g.pixel)
  line = lung["mask"] * np.exp(-((lung["pleura"] - rim) / width) ** 2) * extent
  layers["extra"] = layers["extra"] + 0.3 * line


def _draw_edema(g, finding, layers, rng):
  haze = finding.sizes[0]
  spread = 0.2 + 0.06 * finding.severity
  for side in SIDES:
    lung = g.lungs[side]
    hx, hy = g.med + 0.08, g.apex + 0.5 * (g.base(side) - g.apex)
    batwing = np.exp(-((lung["xm"] - hx) / spread) ** 2 - ((g.y - hy) / (1.2 * spread)) ** 2)
    layers["air"] = layers["air"] * (1 - haze * batwing * _ramp(lung["xm"] - g.med, 0.04))
    # Kerley B lines: short horizontal septal lines at the lateral lung bases.
    phase = rng.uniform(0, 1)
    septa = _ramp(np.cos(2 * np.pi * (g.y / 0.035 + phase)) - 0.8, 0.15)
    septa *= _ramp(0.07 - lung["margin"], 0.02) * _ramp(lung["t"] - 0.55, 0.1)
    layers["extra"] = layers["extra"] + (0.05 + 0.03 * finding.severity) * septa * lung["mask"]
  layers["vessels"] = layers["vessels"] * (1 + 0.4 * haze)


def _draw_atelectasis(g, finding, layers, rng):
  thickness = (0.03, 0.04, 0.05)[finding.severity]
  for side, length in zip(finding.sites, finding.sizes):
    lung = g.lungs[side]
    r0 = rng.uniform(0.35, 0.6)
    cx, _ = g.to_body(side, r0, 0.0)
    dome = g.base(side) - g.p["dome"] * (4 * r0 * (1 - r0)) ** 0.6
    cy = dome - rng.uniform(0.05, 0.11)
    angle = math.radians(rng.uniform(-12, 12) * g.side_sign(side))
    along = math.cos(angle) * (g.x - cx) + math.sin(angle) * (g.y - cy)
    across = -math.sin(angle) * (g.x - cx) + math.cos(angle) * (g.y - cy)
    plate = np.exp(-(across / thickness) ** 2) * _ramp(length / 2 - np.abs(along), 0.06)
    layers["air"] = layers["air"] * (1 - rng.uniform(0.85, 0.95) * plate * lung["mask"])


# Cardiomegaly is drawn through the heart size, devices on top of everything by `_devices`.
_DRAW = {"pleural_effusion": _draw_effusion, "consolidation": _draw_consolidation,
         "pneumothorax": _draw_pneumothorax, "edema": _draw_edema, "atelectasis": _draw_atelectasis}


def _device_paths(g: _Geometry, finding: Finding) -> list[tuple[np.ndarray, float, float]]:
  """(body-coordinate polyline, width, density) of each tube, line, lead and generator outline."""
  carina = g.apex + 0.42 * (g.base("right") - g.apex)
  paths = []
  for device, size in zip(finding.sites, finding.sizes):
    if device == "endotracheal tube":
      tip = carina - size
      path = _spline([(0.03, -1.15), (0.01, -0.9), (0.0, tip)])
      paths += [(path, 0.05, 0.15), (path, 0.02, 0.6)]
    elif device == "enteric tube":
      stomach_y = g.base("left") + 0.2
      path = _spline([(0.02, -1.15), (0.03, carina), (0.06, g.base("left") - 0.05),
                      (g.med + 0.2, stomach_y), (g.med + 0.32, stomach_y - 0.02)])
      paths += [(path, 0.025, 0.55)]
    elif device == "right internal jugular line":
      path = _spline([(-0.24, -1.15), (-0.14, g.apex - 0.05), (-0.06, carina - 0.2),
                      (-0.04, carina + 0.02)])
      paths += [(path, 0.02, 0.6)]
    elif device.endswith("picc"):
      s = g.side_sign(device.split()[0])
      path = _spline([(s * (g.lateral_wall + 0.35), g.apex + 0.15),
                      (s * (g.lateral_wall - 0.05), g.apex + 0.05), (s * 0.3, g.apex + 0.1),
                      (s * 0.06, carina - 0.15), (-0.03, carina + 0.03)])
      paths += [(path, 0.02, 0.6)]
    elif device == "pacemaker":
      gx, gy = 0.5, g.apex + 0.13
      box = np.array([(gx - 0.08, gy - 0.05), (gx + 0.08, gy - 0.05), (gx + 0.08, gy + 0.05),
                      (gx - 0.08, gy + 0.05), (gx - 0.08, gy - 0.05)])
      paths += [(box, -1.0, 0.9)]  # negative width: a filled polygon
      (cx, cy), (hw, hh) = g.heart_centre, g.heart_half_size
      atrium, ventricle = (cx - 0.75 * hw, cy - 0.45 * hh), (cx + 0.2 * hw, cy - 0.05 * hh)
      for end in (atrium, ventricle):
        lead = _spline([(gx - 0.06, gy), (0.2, g.apex + 0.05), (0.02, carina - 0.1),
                        (cx - 0.6 * hw, cy - 0.75 * hh), end])
        paths += [(lead, 0.015, 0.6)]
  return paths


def _devices(g: _Geometry, finding: Optional[Finding]) -> np.ndarray:
  """Rasterised with PIL at 4x resolution and box-filtered down: thin anti-aliased curves."""
  if finding is None:
    return np.zeros_like(g.x)
  factor = 4
  canvas = Image.new("F", (g.size * factor, g.size * factor), 0.0)
  draw = ImageDraw.Draw(canvas)
  for path, width, density in _device_paths(g, finding):
    xy = [tuple(q) for q in g.to_pixels(path) * factor]
    if width < 0:
      draw.polygon(xy, fill=density)
    else:
      pixels = max(1, int(round(width / g.pixel * factor)))
      draw.line(xy, fill=density, width=pixels, joint="curve")
  return np.asarray(canvas.resize((g.size, g.size), Image.BOX))
