"""The accelerators the plan compiles for: Cloud TPU slices and NVIDIA GPUs, with their public figures.

Every figure is per chip (a TPU chip, one GPU) and comes from the vendor's public specification:
  TPU: Cloud TPU's system architecture pages, cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} (HBM per chip,
       peak bf16 TFLOP/s, HBM bandwidth, chips and vCPUs per host VM).
  GPU: NVIDIA's A100 / H100 / H200 datasheets (dense bf16 Tensor Core TFLOP/s without sparsity, HBM and
       its bandwidth; SXM parts), and Google Cloud's A2 / A3 machine types for the host vCPUs that
       come with 1 and 8 GPUs (a2-highgpu-1g/-8g, a2-ultragpu-1g/-8g, a3-highgpu-1g/-2g/-4g/-8g,
       a3-ultragpu-8g). No 1-GPU H200 machine type is published: h200x1 gets 1/8 of a3-ultragpu-8g.
A GPU's memory is what the driver reports (its target config's device_memory_size), a little less
than the marketed size; a TPU chip's is its HBM.

TPU slices are named as Cloud TPU names them: v5e and v6e count chips (v5e-16 = 16 chips), v4 and v5p
count TensorCores, two per chip (v4-32 = 16 chips, v5p-8 = 4 chips).
"""
from __future__ import annotations

import dataclasses
import os

from convirt_jax.errors import ConfigError

GIB = 2**30
GPU_SPECS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")


@dataclasses.dataclass(frozen=True)
class Chip:
  kind: str                 # as the compiler's device_kind names it
  platform: str             # "tpu" | "cuda"
  memory_bytes: int
  peak_bf16_flops: float    # dense, per second
  hbm_bytes_per_s: float
  source: str


@dataclasses.dataclass(frozen=True)
class Target:
  name: str                 # what --target= takes
  chip: Chip
  chips: int
  hosts: int
  host_cpus: int            # vCPUs of one host VM
  topology: str             # libtpu's "v5e:4x4", or the GPU topology "1x1x8"
  chips_per_host_bounds: tuple[int, int, int] = (1, 1, 1)  # TPU only
  chip_config: str = "default"  # TPU only: "megacore" for v4 / v5p (two TensorCores as one device)
  gpu_spec: str = ""        # GPU only: the target config file in gpu_specs/

  @property
  def platform(self) -> str:
    return self.chip.platform

  @property
  def cpus_per_chip(self) -> float:
    return self.host_cpus * self.hosts / self.chips

  def describe(self) -> str:
    hosts = f"{self.hosts} hosts" if self.hosts > 1 else "1 host"
    return f"{self.name}: {self.chips} x {self.chip.kind}, {hosts}"


_TPU_DOCS = "cloud.google.com/tpu/docs/"
V4 = Chip("TPU v4", "tpu", 32 * GIB, 275e12, 1228e9, _TPU_DOCS + "v4")
V5E = Chip("TPU v5 lite", "tpu", 16 * GIB, 197e12, 819e9, _TPU_DOCS + "v5e")
V5P = Chip("TPU v5", "tpu", 95 * GIB, 459e12, 2765e9, _TPU_DOCS + "v5p")
V6E = Chip("TPU v6 lite", "tpu", 32 * GIB, 918e12, 1640e9, _TPU_DOCS + "v6e")
_NVIDIA = "NVIDIA datasheet: "
A100_40 = Chip("NVIDIA A100-SXM4-40GB", "cuda", 42331013120, 312e12, 1555e9, _NVIDIA + "A100 Tensor Core GPU")
A100_80 = Chip("NVIDIA A100-SXM4-80GB", "cuda", 85100068864, 312e12, 2039e9, _NVIDIA + "A100 Tensor Core GPU")
H100 = Chip("NVIDIA H100 80GB HBM3", "cuda", 84978434048, 989e12, 3350e9, _NVIDIA + "H100 Tensor Core GPU (SXM)")
H200 = Chip("NVIDIA H200", "cuda", 150754820096, 989e12, 4800e9, _NVIDIA + "H200 Tensor Core GPU (SXM)")


def _tpu(name: str, chip: Chip, shape: tuple[int, ...], per_host: tuple[int, int, int], host_cpus: int,
         chip_config: str = "default") -> Target:
  chips = 1
  for n in shape:
    chips *= n
  per_host_chips = per_host[0] * per_host[1] * per_host[2]
  generation = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}[chip.kind]
  return Target(name, chip, chips, max(1, chips // per_host_chips), host_cpus,
                f"{generation}:{'x'.join(map(str, shape))}", per_host, chip_config)


def _gpu(name: str, chip: Chip, count: int, host_cpus: int, spec: str) -> Target:
  return Target(name, chip, count, 1, host_cpus, f"1x1x{count}", gpu_spec=spec)


TARGETS: dict[str, Target] = {t.name: t for t in (
    # v4: 4 chips and 240 vCPUs per host; megacore (both TensorCores of a chip are one device).
    _tpu("v4-8", V4, (2, 2, 1), (2, 2, 1), 240, "megacore"),
    _tpu("v4-16", V4, (2, 2, 2), (2, 2, 1), 240, "megacore"),
    _tpu("v4-32", V4, (2, 2, 4), (2, 2, 1), 240, "megacore"),
    # v5e: one host up to 8 chips (v5e-1: 24 vCPUs, v5e-4: 112, v5e-8: 224); larger slices, 4 per host.
    _tpu("v5e-1", V5E, (1, 1), (1, 1, 1), 24),
    _tpu("v5e-4", V5E, (2, 2), (2, 2, 1), 112),
    _tpu("v5e-8", V5E, (2, 4), (2, 4, 1), 224),
    _tpu("v5e-16", V5E, (4, 4), (2, 2, 1), 112),
    _tpu("v5e-32", V5E, (4, 8), (2, 2, 1), 112),
    # v5p: 4 chips and 208 vCPUs per host; megacore.
    _tpu("v5p-8", V5P, (2, 2, 1), (2, 2, 1), 208, "megacore"),
    _tpu("v5p-16", V5P, (2, 2, 2), (2, 2, 1), 208, "megacore"),
    _tpu("v5p-32", V5P, (2, 2, 4), (2, 2, 1), 208, "megacore"),
    # v6e: one host up to 8 chips (v6e-1: 44 vCPUs, v6e-4 and v6e-8: 180); larger slices, 4 per host.
    _tpu("v6e-1", V6E, (1, 1), (1, 1, 1), 44),
    _tpu("v6e-4", V6E, (2, 2), (2, 2, 1), 180),
    _tpu("v6e-8", V6E, (2, 4), (2, 4, 1), 180),
    _tpu("v6e-16", V6E, (4, 4), (2, 2, 1), 180),
    _gpu("a100-40gbx1", A100_40, 1, 12, "a100_40gb.txtpb"),
    _gpu("a100-40gbx8", A100_40, 8, 96, "a100_40gb.txtpb"),
    _gpu("a100-80gbx1", A100_80, 1, 12, "a100_80gb.txtpb"),
    _gpu("a100-80gbx8", A100_80, 8, 96, "a100_80gb.txtpb"),
    _gpu("h100x1", H100, 1, 26, "h100_80gb.txtpb"),
    _gpu("h100x2", H100, 2, 52, "h100_80gb.txtpb"),
    _gpu("h100x4", H100, 4, 104, "h100_80gb.txtpb"),
    _gpu("h100x8", H100, 8, 208, "h100_80gb.txtpb"),
    _gpu("h200x1", H200, 1, 28, "h200_141gb.txtpb"),
    _gpu("h200x8", H200, 8, 224, "h200_141gb.txtpb"),
)}


def get(name: str) -> Target:
  """The target called `name` (case-insensitive); ConfigError listing the known ones otherwise."""
  target = TARGETS.get(name.strip().lower())
  if target is None:
    raise ConfigError(f"--target={name}: unknown target; known targets: {', '.join(TARGETS)}")
  return target


def gpu_target_config(target: Target) -> str:
  """The text of the target's stream_executor.GpuTargetConfigProto (shipped in gpu_specs/)."""
  with open(os.path.join(GPU_SPECS_DIR, target.gpu_spec)) as f:
    return f.read()
