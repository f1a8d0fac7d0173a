"""What the target's compiler says about a program: per-chip memory, FLOPs and bytes, collectives.

Memory is XLA's buffer assignment of one device's program (`compiled.memory_analysis()`): arguments
(state + batch shard), outputs, the outputs aliased to donated arguments (counted once), temporaries,
and the program's code. FLOPs and bytes accessed per chip:
  TPU  `compiled.cost_analysis()`, the TPU compiler's count of the optimised program;
  GPU  the compiled executable reports none, so XLA's HloCostAnalysis is run on the GPU compiler's
       optimised module (fusions, cuBLAS / cuDNN calls) by the CPU client.
`lowered_cost` counts the program before optimisation (what `lowered.cost_analysis()` gives on a
backend that implements it), for comparison.

The roofline bound is max(FLOPs / peak, bytes / bandwidth): a lower bound on the step time, not a
measurement.

The TPU compiler refuses a program that does not fit the chip (RESOURCE_EXHAUSTED at buffer
assignment) instead of compiling it: such a step is an Analysis with `refused` set, whose memory is a
lower bound (the state, the batch shard and the temporaries the compiler said it needed) and which has no
FLOPs. The GPU compiler compiles such a step and reports its size.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Any

import jax
from jax._src.lib import _jax  # HloCostAnalysis on any module (no public API for a GPU module on a CPU)
import numpy as np

from convirt_jax.errors import CompileFailed
from convirt_jax.planning import programs

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
_OP = re.compile(r" = (?P<shape>.*?) (?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64|"
                    r"c64|c128)\[([0-9,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "f8e4m3fn": 8, "f8e5m2": 8, "s16": 16,
         "u16": 16, "bf16": 16, "f16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64,
         "f64": 64, "c64": 64, "c128": 128}


def _arrays(shape: str) -> list[tuple[str, int]]:
  """(dtype, bytes) of every array in an HLO shape string (a tuple has several)."""
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    elements = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    out.append((dtype, elements * _BITS[dtype] // 8))
  return out


def collectives(hlo_text: str) -> dict[str, dict[str, Any]]:
  """{kind: {"count", "bytes", "dtypes"}} of the collectives in an optimised HLO module's text.

  Each op is counted where it stands in the program: an op inside a loop body (a scan) counts once,
  however many iterations run it. Bytes are the op's result: for all-reduce the reduced arrays (a
  combined all-reduce of many arrays is one op with their sum), for all-gather the gathered array.
  Async pairs count once (the -start; its -done is not a second op).
  """
  found: dict[str, dict[str, Any]] = collections.defaultdict(
      lambda: {"count": 0, "bytes": 0, "dtypes": collections.Counter()})
  for line in hlo_text.splitlines():
    match = _OP.search(line)
    if not match:
      continue
    arrays = _arrays(match["shape"])
    if match["start"] and match["op"] in ("all-gather", "collective-permute") and arrays:
      # Their -start returns (operand, result, ...): the result is the largest array.
      arrays = [max(arrays, key=lambda a: a[1])]
    entry = found[match["op"]]
    entry["count"] += 1
    entry["bytes"] += sum(b for _, b in arrays)
    entry["dtypes"].update(d for d, _ in arrays)
  return {k: {"count": v["count"], "bytes": v["bytes"], "dtypes": dict(v["dtypes"])}
          for k, v in sorted(found.items())}


def _cpu_cost(hlo_module) -> dict[str, float]:
  return dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, hlo_module))


def lowered_cost(lowered) -> dict[str, float]:
  """XLA's cost analysis of the program before optimisation (flops, bytes accessed, ...)."""
  return _cpu_cost(lowered.compiler_ir("hlo").as_hlo_module())


@dataclasses.dataclass
class Analysis:
  memory: dict[str, int]
  flops: float
  bytes_accessed: float
  cost_source: str
  collectives: dict[str, dict[str, Any]]
  compile_s: float
  lowered_flops: float | None = None
  hlo_text: str = dataclasses.field(default="", repr=False)
  # When the compiler refused the step: {"reason": its message, "available_bytes": what it could use};
  # the memory is then a lower bound.
  refused: dict[str, Any] | None = None

  @property
  def total_bytes(self) -> int:
    return self.memory["total"]

  def fits(self, chip_memory: int) -> bool:
    return not self.refused and self.total_bytes <= chip_memory


def memory_breakdown(memory, state_bytes: int, batch_bytes_per_chip: int) -> dict[str, int]:
  """Per-chip bytes: state, batch shard, temporaries, outputs not aliased to donated arguments, code,
  total. `state_bytes` and `batch_bytes_per_chip` split XLA's argument size into its two parts."""
  arguments = int(memory.argument_size_in_bytes)
  outputs = int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes)
  temp = int(memory.temp_size_in_bytes)
  code = int(memory.generated_code_size_in_bytes)
  other_arguments = max(0, arguments - state_bytes - batch_bytes_per_chip)
  return {"state": state_bytes + other_arguments, "batch": batch_bytes_per_chip, "temp": temp,
          "outputs": outputs, "code": code, "arguments": arguments,
          "total": arguments + outputs + temp + code}


# XLA's GPU compiler, compiling without a GPU, can find no Triton tiling for a matmul whose row count is
# not a multiple of 16 (a ViT-B/16's 32 x 197 tokens): cuBLAS GEMMs instead compile (and the memory
# and FLOPs are those of the same arithmetic).
_TRITON_TILING = "Couldn't find output tile sizes"
_TRITON_HINT = ("; run the plan with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false, which plans the step "
                "with cuBLAS matrix multiplications instead of Triton's")


# libtpu's refusal: "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO
# temporaries (32.50G) exceeds available HBM (15.75G)." Its units are binary (a v5e chip's 16 GiB, less
# what the runtime reserves, reads 15.75G). Another RESOURCE_EXHAUSTED is a refusal with no figures.
_REFUSED = re.compile(r"HLO temporaries \((?P<temp>[0-9.]+)(?P<u1>[KMGT]?)\) exceeds available HBM "
                      r"\((?P<have>[0-9.]+)(?P<u2>[KMGT]?)\)")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class Refused(Exception):
  """The compiler would not compile the program for lack of memory: `temp` / `available` are its
  figures in bytes (0 where its message gives none)."""

  def __init__(self, message: str, temp: int, available: int):
    super().__init__(message)
    self.message, self.temp, self.available = message, temp, available


def refusal(message: str) -> Refused | None:
  """The compiler's out-of-memory refusal in `message` (the first line of its error), or None."""
  if not message.startswith("RESOURCE_EXHAUSTED"):
    return None
  match = _REFUSED.search(message)
  if not match:
    return Refused(message, 0, 0)
  return Refused(message, int(float(match["temp"]) * _UNIT[match["u1"]]),
                 int(float(match["have"]) * _UNIT[match["u2"]]))


def _compile(lowered, platform: str):
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    first = (str(e).splitlines() or [""])[0]
    refused = refusal(first)
    if refused:
      raise refused from None
    hint = _TRITON_HINT if platform != "tpu" and _TRITON_TILING in first else ""
    raise CompileFailed(f"the {platform} compiler failed on this step: {first[:240]}{hint}") from None


def compile_and_analyse(program, platform: str, *, keep_hlo: bool = False,
                        with_lowered: bool = False) -> Analysis:
  """Lowers and compiles `program` (planning.programs.Program) for its mesh's devices and reads what the
  compiler reports."""
  start = time.perf_counter()
  lowered = program.lower()
  mesh_size = program.global_batch // program.rows_per_chip
  state_bytes, batch_bytes = (programs.tree_bytes(program.state),
                              programs.tree_bytes(program.batch) // mesh_size)
  try:
    compiled = _compile(lowered, platform)
  except Refused as refused:
    # What it needs at least: its arguments and the temporaries the compiler counted.
    memory = {"state": state_bytes, "batch": batch_bytes, "temp": refused.temp, "outputs": 0,
              "code": 0, "arguments": state_bytes + batch_bytes,
              "total": state_bytes + batch_bytes + refused.temp}
    return Analysis(memory=memory, flops=0.0, bytes_accessed=0.0, cost_source="", collectives={},
                    compile_s=time.perf_counter() - start,
                    refused={"reason": refused.message[:300], "available_bytes": refused.available})
  seconds = time.perf_counter() - start
  memory = memory_breakdown(compiled.memory_analysis(), state_bytes, batch_bytes)
  text = compiled.as_text()
  if platform == "tpu":
    cost, source = compiled.cost_analysis(), "TPU compiler"
  else:
    cost, source = _cpu_cost(compiled.runtime_executable().hlo_modules()[0]), "HloCostAnalysis of the optimised GPU module"
  return Analysis(memory=memory, flops=float(cost.get("flops", 0.0)),
                  bytes_accessed=float(cost.get("bytes accessed", 0.0)), cost_source=source,
                  collectives=collectives(text), compile_s=seconds,
                  lowered_flops=lowered_cost(lowered)["flops"] if with_lowered else None,
                  hlo_text=text if keep_hlo else "")


def roofline(flops: float, bytes_accessed: float, peak_flops: float, bandwidth: float) -> dict[str, Any]:
  """The step time's lower bound from the chip's peak and bandwidth, and which of the two binds."""
  compute_s, memory_s = flops / peak_flops, bytes_accessed / bandwidth
  return {"compute_s": compute_s, "memory_s": memory_s, "bound_s": max(compute_s, memory_s),
          "bound_by": "compute" if compute_s >= memory_s else "memory"}
