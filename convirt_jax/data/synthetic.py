"""Synthetic frontal chest radiographs with faithful radiology reports: the embedded default data set.

Every study is a patient (anatomy, position, exposure) plus a set of findings. The findings are drawn as
small, local changes of the radiograph and described in a free-text report written from many templates
(synonyms, severity, laterality, hedging, negations, and incidental sentences that describe nothing
visible). Their strength is calibrated by `benchmarks/synthetic_calibration.py`: features of a randomly
initialised network barely see them with few labels, a network trained on the reports does.

A study is a pure function of (seed, split, index[, category]): each piece of randomness comes from its
own `np.random.SeedSequence` stream, so studies can be generated in any order or in parallel, the same
case rendered at any size has the same labels and report, and a case with a finding removed renders the
same patient (which is what the tests use to check where each finding is drawn).

Geometry is in "body" coordinates: x in [-1, 1] from the image's left to right, y in [-1, 1] from top
to bottom. Images are PA views, so the patient's RIGHT side is on the image's LEFT (x < 0).
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Mapping, Optional

import numpy as np
from PIL import Image, ImageDraw

LABEL_NAMES: tuple[str, ...] = (
    "no_finding", "cardiomegaly", "pleural_effusion", "consolidation", "pneumothorax", "edema",
    "atelectasis", "support_devices")
SPLITS: tuple[str, ...] = (
    "train", "validation", "test", "retrieval_candidates", "retrieval_queries")
SIDES: tuple[str, ...] = ("right", "left")  # the patient's sides
LOBES: tuple[str, ...] = (
    "right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "lingula",
    "left lower lobe")
DEVICES: tuple[str, ...] = (
    "endotracheal tube", "enteric tube", "right internal jugular line", "right picc", "left picc",
    "pacemaker")

# Short queries per category, phrased like report sentences but not copied from the templates.
RETRIEVAL_TEXT_QUERIES: dict[str, list[str]] = {
    "no_finding": [
        "No acute cardiopulmonary process.", "Normal chest radiograph.",
        "The lungs are clear and the heart size is normal.",
        "No focal consolidation, pleural effusion, or pneumothorax.",
        "No acute intrathoracic abnormality."],
    "cardiomegaly": [
        "Enlarged cardiac silhouette.", "Moderate cardiomegaly.", "The heart is enlarged.",
        "Marked enlargement of the heart.", "Mild cardiomegaly."],
    "pleural_effusion": [
        "Moderate left pleural effusion.", "Small right pleural effusion.",
        "Bilateral pleural effusions.", "Blunting of the costophrenic angle consistent with effusion.",
        "Large pleural effusion with a meniscus."],
    "consolidation": [
        "Right lower lobe consolidation.", "Patchy airspace opacity concerning for pneumonia.",
        "Focal consolidation in the left upper lobe.", "Findings compatible with pneumonia.",
        "Dense lobar consolidation."],
    "pneumothorax": [
        "Small right apical pneumothorax.", "Large left pneumothorax.",
        "Visible pleural line with absent lung markings, consistent with pneumothorax.",
        "Moderate pneumothorax."],
    "edema": [
        "Moderate pulmonary edema.", "Perihilar haziness consistent with interstitial edema.",
        "Mild pulmonary edema.", "Severe bilateral pulmonary edema."],
    "atelectasis": [
        "Bibasilar atelectasis.", "Plate-like atelectasis at the left lung base.",
        "Linear opacity at the right base, likely atelectasis.", "Subsegmental basilar atelectasis."],
    "support_devices": [
        "Endotracheal tube in standard position.",
        "Right internal jugular central venous catheter with tip in the SVC.",
        "Enteric tube with tip in the stomach.", "Left chest wall pacemaker with leads in the heart."],
}

_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
_FINDINGS = LABEL_NAMES[1:]
_CM_PER_UNIT = 19.0  # body units -> cm, for the measurements the reports quote
# Independent seed-sequence streams per study.
_CASE_STREAM, _TEXTURE_STREAM, _NOISE_STREAM, _REPORT_STREAM, _FINDING_STREAM = range(5)


@dataclasses.dataclass(frozen=True)
class Finding:
  """One finding of a case.

  `sites` are the patient's sides ("right"/"left") for pleural_effusion, pneumothorax and
  atelectasis, lobes (LOBES) for consolidation, devices (DEVICES) for support_devices, () otherwise.
  `sizes` are the drawn amounts, one per site (or one for cardiomegaly/edema): cardiothoracic ratio,
  fluid height, lesion radius, pneumothorax rim width, haze strength, band length, ET tube tip height
  above the carina (other devices 0); body units unless a ratio.
  """
  name: str
  severity: int  # 0 mild/small, 1 moderate, 2 severe/large; 0 for devices
  sites: tuple[str, ...] = ()
  sizes: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Case:
  """A patient and their findings: everything the image and the report are rendered from."""
  entropy: tuple[int, ...]
  patient: Mapping[str, float]
  findings: tuple[Finding, ...]

  def finding(self, name: str) -> Optional[Finding]:
    return next((f for f in self.findings if f.name == name), None)

  @property
  def labels(self) -> np.ndarray:
    labels = np.zeros(len(LABEL_NAMES), np.float32)
    for f in self.findings:
      labels[LABEL_NAMES.index(f.name)] = 1.0
    labels[0] = float(not self.findings)
    return labels


def finding_sides(finding: Finding) -> tuple[str, ...]:
  """The patient's sides a one-sided or two-sided finding is drawn on; () for the others."""
  if finding.name in ("pleural_effusion", "pneumothorax", "atelectasis"):
    return finding.sites
  if finding.name == "consolidation":
    return tuple(s for s in SIDES if any(_lobe_side(lobe) == s for lobe in finding.sites))
  return ()


# ------------------------------------------------------------------------------------------------
# Sampling cases.


def _validate(seed: int, split: str, index: int) -> None:
  if split not in _SPLIT_IDS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}")
  for key, value in (("seed", seed), ("index", index)):
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{key}={value!r} must be a non-negative integer")


def sample_case(seed: int, split: str, index: int, category: Optional[str] = None) -> Case:
  """Samples the patient and findings of a study; `category` forces exactly that one label."""
  _validate(seed, split, index)
  if category is not None and category not in LABEL_NAMES:
    raise ValueError(f"category={category!r} is not one of {LABEL_NAMES}")
  kind = 0 if category is None else 1 + LABEL_NAMES.index(category)
  entropy = (int(seed), _SPLIT_IDS[split], int(index), kind)
  rng = np.random.default_rng([*entropy, _CASE_STREAM])
  patient = _sample_patient(rng)
  if category is None:
    names = _sample_finding_names(rng)
  else:
    names = () if category == "no_finding" else (category,)
  findings = tuple(_FINDING_SAMPLERS[name](rng) for name in names)
  return Case(entropy=entropy, patient=patient, findings=findings)


def _sample_patient(rng: np.random.Generator) -> dict[str, float]:
  """Anatomy, positioning and exposure: the nuisance variation findings have to be seen through."""
  u = rng.uniform
  p = dict(
      scale=u(0.86, 1.0), shift_x=rng.normal(0, 0.025), shift_y=u(-0.03, 0.06),
      rotation=float(np.clip(rng.normal(0, 2.0), -6, 6)),
      lung_width=u(0.58, 0.70), mediastinum=u(0.08, 0.11), apex=u(-0.80, -0.70),
      base_right=u(0.40, 0.56), dome=u(0.12, 0.19), heart_ctr=u(0.38, 0.48),
      heart_height=u(0.33, 0.40), heart_angle=u(20, 34), heart_right_fraction=u(0.28, 0.38),
      tissue=u(0.85, 1.15), chest_wall=u(0.09, 0.16), rib_spacing=u(0.125, 0.145),
      rib_phase=u(0, 0.4), vessels=u(0.55, 0.8), gamma=u(0.8, 1.25), contrast=u(0.85, 1.15),
      brightness=rng.normal(0, 0.04), noise=u(0.008, 0.03), blur=u(0.003, 0.008))
  p["base_left"] = p["base_right"] + u(0.02, 0.07)
  p["breast"] = u(0.05, 0.13) if rng.random() < 0.4 else 0.0
  p["gastric_bubble"] = u(0.4, 0.9) if rng.random() < 0.6 else 0.0
  p["arms"] = u(0.5, 0.8) if rng.random() < 0.5 else 0.0
  return {k: float(v) for k, v in p.items()}


def _sample_finding_names(rng: np.random.Generator) -> tuple[str, ...]:
  # Edema comes with cardiomegaly and effusions more often than not (heart failure).
  edema = rng.random() < 0.15
  present = {
      "cardiomegaly": rng.random() < (0.45 if edema else 0.18),
      "pleural_effusion": rng.random() < (0.5 if edema else 0.22),
      "consolidation": rng.random() < 0.15,
      "pneumothorax": rng.random() < 0.10,
      "edema": edema,
      "atelectasis": rng.random() < 0.22,
      "support_devices": rng.random() < 0.28,
  }
  return tuple(name for name in _FINDINGS if present[name])


def _severity(rng, probs=(0.5, 0.33, 0.17)) -> int:
  return int(rng.choice(3, p=probs))


def _uniform(rng, low: float, high: float, count: int) -> tuple[float, ...]:
  return tuple(float(v) for v in rng.uniform(low, high, count))


def _sides(rng, p_right: float, p_left: float) -> tuple[str, ...]:
  r = rng.random()
  return ("right",) if r < p_right else ("left",) if r < p_right + p_left else SIDES


def _sample_cardiomegaly(rng) -> Finding:
  sev = _severity(rng)
  lo, hi = ((0.55, 0.59), (0.59, 0.64), (0.64, 0.70))[sev]
  return Finding("cardiomegaly", sev, (), _uniform(rng, lo, hi, 1))


def _sample_effusion(rng) -> Finding:
  sev, sides = _severity(rng), _sides(rng, 0.4, 0.3)
  lo, hi = ((0.13, 0.19), (0.22, 0.3), (0.32, 0.42))[sev]
  return Finding("pleural_effusion", sev, sides, _uniform(rng, lo, hi, len(sides)))


def _sample_consolidation(rng) -> Finding:
  sev = _severity(rng)
  weights = np.array([0.15, 0.15, 0.25, 0.15, 0.1, 0.2])
  count = 2 if rng.random() < 0.15 else 1
  lobes = rng.choice(len(LOBES), size=count, replace=False, p=weights)
  lo, hi = ((0.16, 0.2), (0.2, 0.25), (0.25, 0.3))[sev]
  return Finding("consolidation", sev, tuple(LOBES[i] for i in sorted(lobes)),
                 _uniform(rng, lo, hi, count))


def _sample_pneumothorax(rng) -> Finding:
  sev = _severity(rng)
  lo, hi = ((0.08, 0.11), (0.12, 0.16), (0.17, 0.23))[sev]
  return Finding("pneumothorax", sev, _sides(rng, 0.5, 0.5), _uniform(rng, lo, hi, 1))


def _sample_edema(rng) -> Finding:
  sev = _severity(rng, (0.45, 0.35, 0.2))
  lo, hi = ((0.25, 0.32), (0.33, 0.42), (0.43, 0.55))[sev]
  return Finding("edema", sev, (), _uniform(rng, lo, hi, 1))


def _sample_atelectasis(rng) -> Finding:
  sev, sides = _severity(rng), _sides(rng, 0.35, 0.35)
  lo, hi = ((0.14, 0.2), (0.2, 0.27), (0.27, 0.34))[sev]
  return Finding("atelectasis", sev, sides, _uniform(rng, lo, hi, len(sides)))


def _sample_devices(rng) -> Finding:
  weights = np.array([0.3, 0.25, 0.2, 0.07, 0.08, 0.1])
  count = int(rng.choice(3, p=(0.55, 0.35, 0.10))) + 1
  chosen = sorted(int(i) for i in rng.choice(len(DEVICES), size=count, replace=False, p=weights))
  if 3 in chosen and 4 in chosen:  # one PICC at a time
    chosen.remove(4)
  devices = tuple(DEVICES[i] for i in chosen)
  tip = float(rng.uniform(0.12, 0.3))  # ET tube tip above the carina
  sizes = tuple(tip if d == "endotracheal tube" else 0.0 for d in devices)
  return Finding("support_devices", 0, devices, sizes)


_FINDING_SAMPLERS = {
    "cardiomegaly": _sample_cardiomegaly, "pleural_effusion": _sample_effusion,
    "consolidation": _sample_consolidation, "pneumothorax": _sample_pneumothorax,
    "edema": _sample_edema, "atelectasis": _sample_atelectasis,
    "support_devices": _sample_devices}


# ------------------------------------------------------------------------------------------------
# Rendering.


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


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
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


def render_image(case: Case, image_size: int = 128) -> np.ndarray:
  """The radiograph of a case: uint8 [image_size, image_size] grayscale."""
  if not isinstance(image_size, (int, np.integer)) or image_size < 32:
    raise ValueError(f"image_size={image_size!r} must be an integer >= 32")
  p = case.patient
  cardiomegaly = case.finding("cardiomegaly")
  g = _Geometry(p, int(image_size), cardiomegaly.sizes[0] if cardiomegaly else p["heart_ctr"])
  texture_rng = np.random.default_rng([*case.entropy, _TEXTURE_STREAM])
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
          [*case.entropy, _FINDING_STREAM, LABEL_NAMES.index(finding.name)])
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
  image = 0.5 + p["contrast"] * (image - 0.5) + p["brightness"]
  image = _gaussian_blur(image, p["blur"] / g.pixel)
  noise_rng = np.random.default_rng([*case.entropy, _NOISE_STREAM])
  image = image + p["noise"] * noise_rng.standard_normal(image.shape, dtype=np.float32)
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


def _lobe_side(lobe: str) -> str:
  return "left" if lobe == "lingula" else lobe.split()[0]


def _draw_consolidation(g, finding, layers, rng):
  density = (0.8, 0.9, 1.0)[finding.severity]
  for lobe, radius in zip(finding.sites, finding.sizes):
    side = _lobe_side(lobe)
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


# ------------------------------------------------------------------------------------------------
# Reports.

_SEVERITY_WORDS = {
    "cardiomegaly": (("mild",), ("moderate",), ("marked", "severe")),
    "cardiomegaly_adverb": (("mildly",), ("moderately",), ("markedly", "severely")),
    "pleural_effusion": (("small",), ("moderate", "moderate-sized"), ("large",)),
    "consolidation": (("subtle", "faint", "mild"), ("patchy", "focal"), ("dense", "extensive")),
    "pneumothorax": (("small",), ("moderate", "moderate-sized"), ("large",)),
    "edema": (("mild",), ("moderate",), ("severe",)),
    "atelectasis": (("minimal", "subsegmental"), ("mild", "plate-like"),
                    ("moderate", "substantial")),
}

_FINDING_TEMPLATES = {
    "cardiomegaly": [
        "{sev} cardiomegaly.", "the heart is {sevly} enlarged.",
        "{sev} enlargement of the cardiac silhouette.", "the cardiac silhouette is {sevly} enlarged.",
        "heart size is {sevly} enlarged."],
    "effusion_one": [
        "{sev} {side} pleural effusion.", "there is a {sev} {side} pleural effusion.",
        "{sev} {side} pleural effusion is present.",
        "opacity at the {side} base with a meniscus, consistent with a {sev} pleural effusion.",
        "{side} pleural effusion, {sev} in size."],
    "effusion_both": [
        "{sev} bilateral pleural effusions.", "bilateral {sev} pleural effusions.",
        "{sev} right and left pleural effusions.",
        "blunting of both costophrenic angles, compatible with {sev} bilateral effusions."],
    "effusion_small": ["blunting of the {side} costophrenic angle, compatible with a small effusion."],
    "consolidation": [
        "{sev} opacity in the {lobe}, concerning for pneumonia.",
        "{sev} airspace consolidation in the {lobe}.",
        "{sev} airspace opacity in the {lobe}, which may represent pneumonia.",
        "{sev} consolidation is seen in the {lobe}, likely pneumonia.",
        "there is {sev} consolidation of the {lobe}."],
    "consolidation_two": [
        "{sev} consolidation in the {lobe} and {lobe2}.",
        "multifocal {sev} airspace opacities in the {lobe} and {lobe2}, likely pneumonia."],
    "pneumothorax": [
        "{sev} {side} pneumothorax.", "there is a {sev} {side} pneumothorax.",
        "{side} pneumothorax measuring approximately {cm} cm.",
        "a visible pleural line with absent peripheral lung markings indicates a {sev} {side} "
        "pneumothorax.",
        "{sev} {side} pneumothorax, with the pleural edge about {cm} cm from the chest wall."],
    "pneumothorax_small": ["small {side} apical pneumothorax."],
    "edema": [
        "{sev} pulmonary edema.", "perihilar haziness and interstitial markings consistent with {sev} "
        "pulmonary edema.", "{sev} bilateral perihilar opacities, compatible with pulmonary edema.",
        "there is {sev} pulmonary edema.", "{sev} interstitial pulmonary edema."],
    "atelectasis_one": [
        "{sev} {side} basilar atelectasis.", "{sev} atelectasis at the {side} lung base.",
        "linear opacity at the {side} base, likely {sev} atelectasis.",
        "streaky {side} basal opacity, most likely atelectasis."],
    "atelectasis_both": [
        "bibasilar atelectasis.", "{sev} bibasilar atelectasis.",
        "linear opacities at both lung bases, likely atelectasis."],
    "endotracheal tube": [
        "endotracheal tube terminates approximately {cm} cm above the carina.",
        "ET tube tip is {cm} cm above the carina.",
        "the endotracheal tube is in standard position, {cm} cm above the carina."],
    "enteric tube": [
        "enteric tube courses below the diaphragm with tip in the stomach.",
        "nasogastric tube tip is in the stomach.", "an orogastric tube extends into the stomach."],
    "right internal jugular line": [
        "right internal jugular central venous catheter tip in the SVC.",
        "right IJ line terminates in the mid SVC.",
        "a right internal jugular catheter ends in the superior vena cava."],
    "picc": ["{side} PICC line tip in the lower SVC.",
             "{side} upper extremity PICC terminates in the SVC."],
    "pacemaker": [
        "left chest wall pacemaker with leads in the right atrium and right ventricle.",
        "dual-chamber pacemaker with leads terminating in the right atrium and right ventricle.",
        "a left-sided pacemaker is in place with two leads."],
}

_IMPRESSION_TEMPLATES = {
    "cardiomegaly": ["{sev} cardiomegaly.", "cardiomegaly.", "enlarged cardiac silhouette."],
    "effusion_one": ["{sev} {side} pleural effusion.", "{side} pleural effusion."],
    "effusion_both": ["bilateral pleural effusions.", "{sev} bilateral pleural effusions."],
    "consolidation": ["{lobe} pneumonia.", "findings concerning for pneumonia in the {lobe}.",
                      "{lobe} consolidation, likely pneumonia."],
    "consolidation_two": ["multifocal pneumonia.", "pneumonia in the {lobe} and {lobe2}."],
    "pneumothorax": ["{sev} {side} pneumothorax.", "{side} pneumothorax."],
    "edema": ["{sev} pulmonary edema.", "findings consistent with {sev} pulmonary edema.",
              "pulmonary edema."],
    "atelectasis_one": ["{side} basilar atelectasis.", "{sev} atelectasis at the {side} base."],
    "atelectasis_both": ["bibasilar atelectasis."],
    "support_devices": ["support devices as above.", "lines and tubes in appropriate position.",
                        "tubes and lines as described."],
}

_NORMAL_HEART = [
    "heart size is normal.", "the heart is normal in size.",
    "cardiac silhouette is within normal limits.", "normal heart size.", "the heart is not enlarged.",
    "the cardiomediastinal silhouette is normal.", "heart size and mediastinal contours are normal."]
_MEDIASTINUM = ["mediastinal and hilar contours are unremarkable.", "the mediastinum is normal.",
                "hilar contours are normal."]
_CLEAR_LUNGS = ["the lungs are clear.", "lungs are well expanded and clear.", "clear lungs."]
_NEGATIONS = {
    ("pleural_effusion", "pneumothorax"): [
        "no pleural effusion or pneumothorax.", "there is no pleural effusion or pneumothorax.",
        "no effusion or pneumothorax is seen."],
    ("consolidation", "pleural_effusion", "pneumothorax"): [
        "no focal consolidation, pleural effusion, or pneumothorax."],
    ("pleural_effusion",): ["no pleural effusion.", "no pleural effusions."],
    ("pneumothorax",): ["no pneumothorax.", "there is no pneumothorax."],
    ("consolidation",): ["no focal consolidation.",
                         "no focal airspace consolidation to suggest pneumonia."],
    ("edema",): ["no pulmonary edema.", "no evidence of pulmonary edema.",
                 "there is no pulmonary vascular congestion or edema."],
}
_INCIDENTAL = [
    "degenerative changes of the thoracic spine.", "surgical clips in the upper abdomen.",
    "old healed rib fractures.", "calcification of the aortic knob.",
    "the thoracic aorta is mildly tortuous.", "mild degenerative changes of both shoulders.",
    "cholecystectomy clips are seen.", "diffuse osteopenia.",
    "multilevel degenerative changes of the spine."]
_NORMAL_BONES = ["no acute osseous abnormality.", "visualized osseous structures are unremarkable."]
_NORMAL_IMPRESSION = [
    "no acute cardiopulmonary process.", "no acute intrathoracic abnormality.",
    "normal chest radiograph.", "no acute cardiopulmonary abnormality.",
    "no radiographic evidence of acute disease."]
_SYMPTOMS = ["cough", "shortness of breath", "fever", "chest pain", "dyspnea", "hypoxia",
             "evaluate for pneumonia", "line placement", "preoperative evaluation", "weakness"]


def _sentence(text: str) -> str:
  return text[0].upper() + text[1:]


def _finding_sentence(rng, finding: Finding, impression: bool) -> list[str]:
  """Sentences that describe a positive finding, with its side, lobe, severity and size."""
  templates = _IMPRESSION_TEMPLATES if impression else _FINDING_TEMPLATES
  pick = lambda options: options[rng.integers(len(options))]
  name, sev = finding.name, finding.severity
  words = _SEVERITY_WORDS.get(name, ((),) * 3)
  fields = dict(sev=pick(words[sev]) if words[sev] else "")
  if name == "cardiomegaly":
    fields["sevly"] = pick(_SEVERITY_WORDS["cardiomegaly_adverb"][sev])
    return [pick(templates[name]).format(**fields)]
  if name in ("pleural_effusion", "atelectasis"):
    key = "effusion" if name == "pleural_effusion" else "atelectasis"
    if len(finding.sites) == 2:
      return [pick(templates[key + "_both"]).format(**fields)]
    options = list(templates[key + "_one"])
    if name == "pleural_effusion" and sev == 0 and not impression:
      options += _FINDING_TEMPLATES["effusion_small"]
    return [pick(options).format(side=finding.sites[0], **fields)]
  if name == "consolidation":
    if len(finding.sites) == 2:
      return [pick(templates["consolidation_two"]).format(
          lobe=finding.sites[0], lobe2=finding.sites[1], **fields)]
    return [pick(templates[name]).format(lobe=finding.sites[0], **fields)]
  if name == "pneumothorax":
    options = list(templates[name])
    if sev == 0 and not impression:
      options += _FINDING_TEMPLATES["pneumothorax_small"]
    cm = max(1, round(finding.sizes[0] * _CM_PER_UNIT))
    return [pick(options).format(side=finding.sites[0], cm=cm, **fields)]
  if name == "edema":
    return [pick(templates[name]).format(**fields)]
  if name == "support_devices":
    if impression:
      return [pick(templates[name])]
    sentences = []
    for device, size in zip(finding.sites, finding.sizes):
      key = "picc" if device.endswith("picc") else device
      cm = max(1, round(size * _CM_PER_UNIT))
      sentences.append(pick(_FINDING_TEMPLATES[key]).format(side=device.split()[0], cm=cm))
    return sentences
  raise ValueError(f"unknown finding {name!r}")


def _negations(rng, absent: set[str]) -> list[str]:
  sentences = []
  groups = list(_NEGATIONS)
  rng.shuffle(groups)
  covered: set[str] = set()
  for group in sorted(groups, key=len, reverse=True):
    if set(group) <= absent and not covered & set(group) and rng.random() < 0.6:
      options = _NEGATIONS[group]
      sentences.append(options[rng.integers(len(options))])
      covered |= set(group)
  return sentences


def write_report(case: Case) -> str:
  """A free-text radiology report that describes every drawn finding and nothing else that is drawn."""
  rng = np.random.default_rng([*case.entropy, _REPORT_STREAM])
  pick = lambda options: options[rng.integers(len(options))]
  present = {f.name: f for f in case.findings}
  absent = set(_FINDINGS) - set(present)

  devices, lungs, pleura, heart, other = [], [], [], [], []
  if "support_devices" in present:
    devices += _finding_sentence(rng, present["support_devices"], impression=False)
  for name in ("consolidation", "edema", "atelectasis"):
    if name in present:
      lungs += _finding_sentence(rng, present[name], impression=False)
  if not {"consolidation", "edema", "atelectasis", "pneumothorax"} & set(present):
    if rng.random() < 0.7:
      lungs.append(pick(_CLEAR_LUNGS))
  for name in ("pleural_effusion", "pneumothorax"):
    if name in present:
      pleura += _finding_sentence(rng, present[name], impression=False)
  pleura += _negations(rng, absent)
  if "cardiomegaly" in present:
    heart += _finding_sentence(rng, present["cardiomegaly"], impression=False)
  elif rng.random() < 0.85:
    heart.append(pick(_NORMAL_HEART))
  if rng.random() < 0.4:
    heart.append(pick(_MEDIASTINUM))
  incidental = int(rng.choice(3, p=(0.6, 0.3, 0.1)))
  other += [_INCIDENTAL[i] for i in rng.choice(len(_INCIDENTAL), incidental, replace=False)]
  if not incidental and rng.random() < 0.3:
    other.append(pick(_NORMAL_BONES))
  blocks = [devices, lungs, pleura, heart] if rng.random() < 0.7 else [heart, devices, lungs, pleura]
  findings = [s for block in blocks + [other] for s in block] or [pick(_NORMAL_HEART)]

  impression = []
  order = ("pneumothorax", "consolidation", "edema", "pleural_effusion", "cardiomegaly",
           "atelectasis", "support_devices")
  for name in order:
    if name in present and (name not in ("atelectasis", "support_devices") or rng.random() < 0.6):
      impression += _finding_sentence(rng, present[name], impression=True)
  if not present:
    impression.append(pick(_NORMAL_IMPRESSION))
  elif not impression:
    impression += _finding_sentence(rng, case.findings[0], impression=True)
  numbered = len(impression) > 1 and rng.random() < 0.2

  findings = [_sentence(s) for s in findings]
  impression = [_sentence(s) for s in impression]
  if numbered:
    impression = [f"{i + 1}. {s}" for i, s in enumerate(impression)]
  return _format_report(rng, _preamble(rng), findings, impression)


def _preamble(rng) -> list[tuple[str, str]]:
  pick = lambda options: options[rng.integers(len(options))]
  sections = []
  if rng.random() < 0.5:
    sections.append(("EXAMINATION", pick(["CHEST (PA AND LAT)", "Chest radiograph, frontal view.",
                                          "CHEST PORTABLE AP"])))
  if rng.random() < 0.6:
    sex = pick(["M", "F", "man", "woman"])
    key = pick(["INDICATION", "HISTORY", "CLINICAL HISTORY"])
    sections.append((key, f"___ year old {sex} with {pick(_SYMPTOMS)}."))
  if rng.random() < 0.3:
    sections.append(("TECHNIQUE", pick(["PA and lateral views of the chest.",
                                        "Single frontal view of the chest."])))
  if rng.random() < 0.5:
    sections.append(("COMPARISON", pick(["None.", "___.", "Chest radiograph from ___."])))
  return sections


def _format_report(rng, preamble, findings: list[str], impression: list[str]) -> str:
  sep = "  " if rng.random() < 0.4 else " "
  wrap = int(rng.integers(60, 80)) if rng.random() < 0.5 else 0
  inline = rng.random() < 0.3

  def body(sentences: list[str]) -> str:
    text = sep.join(sentences)
    if not wrap:
      return text
    lines, line = [], ""
    for word in text.split(" "):
      if line and len(line) + 1 + len(word) > wrap:
        lines.append(line)
        line = word
      else:
        line = f"{line} {word}" if line else word
    return "\n ".join(lines + [line])

  parts = ["FINAL REPORT"] if rng.random() < 0.4 else []
  parts += [f"{key}:  {value}" for key, value in preamble]
  for header, sentences in (("FINDINGS", findings), ("IMPRESSION", impression)):
    parts.append(f"{header}: {body(sentences)}" if inline else f"{header}:\n \n {body(sentences)}")
  report = "\n \n".join(parts) if rng.random() < 0.5 else "\n\n".join(parts)
  if rng.random() < 0.05:
    report = report.upper()
  return " " + report + "\n" if rng.random() < 0.3 else report


# ------------------------------------------------------------------------------------------------
# Public entry points.


def generate_study(seed: int, split: str, index: int, image_size: int = 128) -> dict:
  """One study: {"image": uint8 [S, S], "report": str, "labels": float32 [8] (0/1)}."""
  return _study(sample_case(seed, split, index), image_size)


def generate_category_study(seed: int, split: str, index: int, category: str,
                            image_size: int = 128) -> dict:
  """A study whose only positive label is `category` ("no_finding": a normal study)."""
  return _study(sample_case(seed, split, index, category=category), image_size)


def _study(case: Case, image_size: int) -> dict:
  return {"image": render_image(case, image_size), "report": write_report(case),
          "labels": case.labels}


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 [H, W] or [H, W, 1] grayscale image (how the data set stores images)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] == 1):
    raise ValueError(f"expected a uint8 [H, W] image, got {image.dtype} {image.shape}")
  buffer = io.BytesIO()
  Image.fromarray(image.reshape(image.shape[:2])).save(buffer, format="PNG")
  return buffer.getvalue()
