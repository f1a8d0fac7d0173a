"""Sampling the cases of the synthetic corpus: the label set, the patient (anatomy, position, exposure) and
its findings (`Finding`, `Case`, `sample_case`).

A case is a pure function of (seed, split, index[, category]); `entropy` keeps that key so the renderer
and the report writer draw from their own seed-sequence streams (`*_STREAM`), independent of each other.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import numpy as np

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
FINDING_NAMES = LABEL_NAMES[1:]  # the labels a case can have

_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
# Independent seed-sequence streams per study.
CASE_STREAM, TEXTURE_STREAM, NOISE_STREAM, REPORT_STREAM, FINDING_STREAM = range(5)


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
    return tuple(s for s in SIDES if any(lobe_side(lobe) == s for lobe in finding.sites))
  return ()


def lobe_side(lobe: str) -> str:
  """The patient's side of a lobe (LOBES)."""
  return "left" if lobe == "lingula" else lobe.split()[0]


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
  rng = np.random.default_rng([*entropy, CASE_STREAM])
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
  return tuple(name for name in FINDING_NAMES if present[name])


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
