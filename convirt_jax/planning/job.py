"""The plan job (`python -m convirt_jax.plan`): a job's train step compiled for accelerators it does not
run on, and what their compilers say about it.

For every target: the job's own step (`planning.programs`) on the target's compile-only devices
(`planning.devices`), compiled by the target's compiler (libtpu, or XLA's CUDA compiler with the GPU's
target config), then per chip: memory against the chip's, FLOPs and bytes, the roofline bound of the
step time (a lower bound from the chip's public peak and bandwidth, not a measurement), the
collectives, and the host cores the input pipeline needs to feed the chip. With `max_batch`, the
largest power-of-two batch per chip that fits, found by compiling, per step setting.
Nothing runs on an accelerator and nothing connects to a network.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping

import ml_collections

from convirt_jax import config as config_lib
from convirt_jax import parallel, storage, transfer_config
from convirt_jax.errors import ConfigError
from convirt_jax.models import registry
from convirt_jax.planning import analysis, devices, input_rate, programs, targets
from convirt_jax.planning.targets import GIB, Target

MAX_ROWS_PER_CHIP = 2**16
BUSY_SHARE = 0.4  # the input side is also sized for a step at 40% of the bound


def validate(config: ml_collections.ConfigDict, job: str) -> None:
  """The job's own config checks, less those of the data's location (the plan reads no data)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key in ("dir", "csv"):
    config.data[key] = config.data[key] or "<not read by the plan>"
  if job == "transfer" and config.data.name == "csv" and not config.data.label_columns:
    config.data.label_columns = ("<not read by the plan>",)
  if job == "pretrain":
    config_lib.validate(config)
    programs.text_length(config)
  else:
    transfer_config.validate_transfer(config)


def _setting(config: ml_collections.ConfigDict, job: str) -> str:
  if job == "transfer":
    return "plain"
  if config.train.microbatch_size:
    return f"micro {config.train.microbatch_size}" + (" + remat" if config.train.remat else "")
  return "remat" if config.train.remat else "plain"


class Planner:
  """Compiles and reports one job's programs for one target."""

  def __init__(self, config, job: str, target: Target, input_rates: Mapping[str, Any] | None,
               log: Callable[[str], None]):
    """`input_rates`: the pipeline measured per data.augment_on (None: not measured); the target's
    own mode is used."""
    self.job, self.target, self.log = job, target, log
    self.config = programs.with_precision_for(config, job, target.platform)
    self.input_rate = (input_rates or {}).get(self.config.data.augment_on)
    self.bert, self.text_source = (programs.text_config(self.config) if job == "pretrain"
                                   else (None, ""))
    self.mesh = devices.mesh_for(target)
    self._cache: dict[tuple[int, str], dict[str, Any]] = {}

  def program(self, config: ml_collections.ConfigDict) -> programs.Program:
    return programs.build(config, self.job, self.mesh, self.bert)

  def row(self, config: ml_collections.ConfigDict, with_lowered: bool = False) -> dict[str, Any]:
    """The plan of `config`'s step on the target (one table row)."""
    target, chip = self.target, self.target.chip
    program = self.program(config)
    self.log(f"  compiling for {target.name}: {program.rows_per_chip} rows per chip, "
             f"{_setting(config, self.job)}...")
    with devices.quiet_native_stderr():
      result = analysis.compile_and_analyse(program, target.platform, with_lowered=with_lowered)
    row = {
        "target": target.name, "chip": chip.kind, "chips": target.chips, "hosts": target.hosts,
        "job": self.job, "precision": config.train.precision if self.job == "pretrain"
        else config.finetune.precision, "augment_on": config.data.augment_on,
        "setting": _setting(config, self.job),
        "global_batch": program.global_batch, "rows_per_chip": program.rows_per_chip,
        "memory_bytes": result.memory, "chip_memory_bytes": chip.memory_bytes,
        "fits": result.fits(chip.memory_bytes), "compile_s": result.compile_s,
    }
    if result.refused:
      # No program, so no FLOPs, bound or collectives: the memory is what it would need at least.
      row["refused"] = result.refused
      self.log(f"    {target.name} {program.rows_per_chip} rows/chip {row['setting']}: does not fit, "
               f"refused by the compiler (at least {result.total_bytes / GIB:.2f} GiB; it can use "
               f"{result.refused['available_bytes'] / GIB:.2f})")
      return row
    row.update(self._performance(config, program, result))
    self.log(f"    {target.name} {program.rows_per_chip} rows/chip {row['setting']}: "
             f"{result.total_bytes / GIB:.2f} of {chip.memory_bytes / GIB:.2f} GiB "
             f"({'fits' if row['fits'] else 'does not fit'}), {result.flops / 1e12:.3f} TFLOP, "
             f"bound {row['roofline_bound']['bound_s'] * 1e3:.2f} ms, compiled in {result.compile_s:.0f} s")
    return row

  def _performance(self, config, program: programs.Program, result: analysis.Analysis) -> dict[str, Any]:
    """A compiled step's FLOPs, bytes, roofline bound, collectives and the input side it needs."""
    target, chip = self.target, self.target.chip
    if target.platform != "tpu":
      # The GPU compiler's module hides its convolutions in cuDNN calls that HloCostAnalysis does not
      # count: the FLOPs are those of the program before optimisation (the same arithmetic).
      lowered_flops = result.lowered_flops
      if lowered_flops is None:
        with devices.quiet_native_stderr():
          lowered_flops = analysis.lowered_cost(program.lower())["flops"]
      result.flops, result.lowered_flops = lowered_flops, lowered_flops
      result.cost_source = "FLOPs: XLA's count of the lowered program; bytes: the optimised GPU module"
    bound = analysis.roofline(result.flops, result.bytes_accessed, chip.peak_bf16_flops,
                              chip.hbm_bytes_per_s)
    images_per_s = program.rows_per_chip / bound["bound_s"] if bound["bound_s"] > 0 else math.inf
    row = {
        "flops_per_chip": result.flops, "bytes_accessed_per_chip": result.bytes_accessed,
        "lowered_flops_per_chip": result.lowered_flops, "cost_source": result.cost_source,
        "roofline_bound": {**bound, "images_per_s_per_chip": images_per_s,
                           "peak_bf16_flops": chip.peak_bf16_flops,
                           "hbm_bytes_per_s": chip.hbm_bytes_per_s, "source": chip.source},
        "collectives": result.collectives,
    }
    if self.job == "pretrain" and config.train.microbatch_size:
      # Its micro-batches run in scans, and XLA's cost analysis counts a loop body once.
      row["cost_note"] = ("FLOPs, bytes and the bound count each micro-batch loop's body once: they are "
                          "not the step's (about 4/3 of the plain step's FLOPs)")
    if self.text_source:
      row["text_encoder"] = self.text_source
    if self.input_rate is not None:
      need = images_per_s / self.input_rate.images_per_s_per_core
      row["input"] = {"images_per_s_per_core": self.input_rate.images_per_s_per_core,
                      "cores_per_chip_at_bound": need, "cores_per_chip_at_40pct": need * BUSY_SHARE,
                      "host_cpus_per_chip": target.cpus_per_chip,
                      "exceeds_host_at_bound": need > target.cpus_per_chip,
                      "exceeds_host_at_40pct": need * BUSY_SHARE > target.cpus_per_chip}
    return row

  def at(self, rows_per_chip: int, mode: str = "") -> dict[str, Any]:
    config = programs.with_batch(self.config, self.job, rows_per_chip, self.target.chips, mode)
    key = (rows_per_chip, _setting(config, self.job))  # the config's own setting is one of the modes
    if key not in self._cache:
      self._cache[key] = self.row(config)
    return self._cache[key]

  def largest_batch(self, mode: str, start: int, capacity: int | None = None) -> dict[str, Any]:
    """The largest power-of-two rows per chip whose step fits in `capacity` bytes (default: the chip's
    memory), and whose double, compiled too, does not.

    From the compile at `start` rows, what grows with the rows (temporaries, the batch) is taken as
    proportional to them to predict the largest fitting power of two; that and its double are then
    compiled, moving one power of two at a time until the first fits and the second does not.
    """
    capacity = capacity or self.target.chip.memory_bytes

    def fits(rows: int) -> bool:  # a step the compiler refused does not fit, whatever its figures
      row = self.at(rows, mode)
      return "refused" not in row and row["memory_bytes"]["total"] <= capacity

    rows = 2 ** int(math.log2(max(1, start)))
    first = self.at(rows, mode)["memory_bytes"]
    fixed = first["state"] + first["outputs"] + first["code"]
    per_row = (first["temp"] + first["batch"]) / rows
    if fits(rows) and per_row > 0:
      predicted = max(1.0, min((capacity - fixed) / per_row, MAX_ROWS_PER_CHIP))
      rows = max(rows, 2 ** int(math.log2(predicted)))
    while rows > 1 and not fits(rows):
      rows //= 2
    if not fits(rows):
      return {"mode": mode, "rows_per_chip": 0, "note": "1 row per chip does not fit"}
    while rows * 2 <= MAX_ROWS_PER_CHIP and fits(rows * 2):
      rows *= 2
    fitting = self.at(rows, mode)
    out = {"mode": mode, "setting": fitting["setting"], "rows_per_chip": rows,
           "total_bytes": fitting["memory_bytes"]["total"],
           "images_per_s_per_chip_bound": fitting["roofline_bound"]["images_per_s_per_chip"]}
    if rows * 2 <= MAX_ROWS_PER_CHIP:
      double = self.at(rows * 2, mode)
      out["double_total_bytes"] = double["memory_bytes"]["total"]
      if "refused" in double:  # its total is then what the compiler said it needs at least
        out["double_refused"] = True
    else:
      out["note"] = f"capped at {MAX_ROWS_PER_CHIP} rows per chip"
    return out


def run(config: ml_collections.ConfigDict, job: str, target_names: list[str], *,
        rows_per_chip: list[int] | None = None, max_batch: bool = False, measure_input: bool = True,
        input_seconds: float = 3.0, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The plan of `job` ("pretrain" or "transfer") with `config` on every target; returns the report
  ({"rows": [...], "max_batch": [...], "input": {augment_on: {...}}}) that `format_table` prints."""
  if job not in programs.JOBS:
    raise ConfigError(f"--job={job}: one of {', '.join(programs.JOBS)}")
  if not target_names:
    raise ConfigError(f"give at least one --target; known targets: {', '.join(targets.TARGETS)}")
  chosen = [targets.get(name) for name in target_names]  # every name checked before any compile
  for platform in sorted({t.platform for t in chosen}):
    devices.require_compiler(platform)
  devices.start_jax()
  validate(config, job)
  rates = {}  # the pipeline each target's job runs: data.augment_on resolves by platform
  if measure_input:
    for target in chosen:
      measured = programs.with_precision_for(config, job, target.platform)
      mode = measured.data.augment_on
      if mode not in rates:
        rates[mode] = input_rate.measure(measured, with_text=job == "pretrain", seconds=input_seconds)
        log(f"input pipeline: {rates[mode].images_per_s_per_core:.0f} images/s per CPU core on this "
            f"machine ({rates[mode].stored_size} px stored -> {rates[mode].image_size} px, augmentations "
            f"on the {mode})")
  report: dict[str, Any] = {"job": job, "rows": [], "max_batch": [],
                            "image_encoder": registry.arch_from_config(config.model.image).describe(),
                            "note": "compiled for the target, not run on it; the roofline figure is a "
                                    "lower bound on the step time, not a measurement"}
  if rates:
    report["input"] = {mode: {"images_per_s_per_core": rate.images_per_s_per_core, "seconds": rate.seconds,
                              "image_size": rate.image_size, "stored_size": rate.stored_size}
                       for mode, rate in rates.items()}
  for target in chosen:
    planner = Planner(config, job, target, rates, log)
    if rows_per_chip:
      for rows in rows_per_chip:
        report["rows"].append(planner.at(rows))
    else:
      batch = programs.global_batch(planner.config, job)
      if batch % target.chips:
        parallel.local_batch_size(batch, planner.mesh)  # the job's own message
      report["rows"].append(planner.at(batch // target.chips))
    if max_batch:
      start = report["rows"][-1]["rows_per_chip"]
      for mode in (programs.MODES if job == "pretrain" else ("plain",)):
        found = planner.largest_batch(mode, start)
        report["max_batch"].append({"target": target.name, **found})
  return report


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def _collectives(row: dict[str, Any]) -> str:
  short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
           "collective-permute": "CP", "ragged-all-to-all": "RA2A"}
  parts = [f"{short.get(k, k)} {v['count']} ({v['bytes'] / 2**20:.0f} MiB)"
           for k, v in row["collectives"].items()]
  return ", ".join(parts) or "none"


def format_table(report: dict[str, Any]) -> str:
  """The report as Markdown tables (memory in GiB per chip)."""
  lines = [f"Plan of the {report['job']} step ({report['image_encoder']}): {report['note']}."]
  for mode, rate in report.get("input", {}).items():
    lines.append(f"Input pipeline on this machine, augmentations on the {mode}: "
                 f"{rate['images_per_s_per_core']:.0f} images/s per CPU core.")
  lines += ["", "| target | rows/chip | setting | state | batch | temp | out | total GiB | chip GiB | fits "
            "| TFLOP/chip | GB accessed | bound ms (by) | img/s/chip bound | cores/chip at bound, 40% "
            "(host has) | collectives | compile s |", "|" + "---|" * 17]
  for r in report["rows"]:
    m = r["memory_bytes"]
    head = (f"| {r['target']} | {r['rows_per_chip']} | {r['setting']}, augment on {r['augment_on']} "
            f"| {_gib(m['state'])} | {_gib(m['batch'])} | {_gib(m['temp'])} ")
    if "refused" in r:  # no program: its memory is a lower bound, and it has no FLOPs
      lines.append(head + f"| - | ≥ {_gib(m['total'])} | {_gib(r['chip_memory_bytes'])} | NO: refused by "
                   f"the compiler (it can use {_gib(r['refused']['available_bytes'])}) | - | - | - | - | - "
                   f"| - | {r['compile_s']:.0f} |")
      continue
    b = r["roofline_bound"]
    cores = "-"
    if "input" in r:
      i = r["input"]
      cores = (f"{i['cores_per_chip_at_bound']:.1f}, {i['cores_per_chip_at_40pct']:.1f} "
               f"({i['host_cpus_per_chip']:.0f})" + (" EXCEEDS HOST" if i["exceeds_host_at_40pct"]
                                                    else " exceeds at bound" if i["exceeds_host_at_bound"]
                                                    else ""))
    lines.append(
        head + f"| {_gib(m['outputs'])} | {_gib(m['total'])} | {_gib(r['chip_memory_bytes'])} "
        f"| {'yes' if r['fits'] else 'NO'} | {r['flops_per_chip'] / 1e12:.2f} "
        f"| {r['bytes_accessed_per_chip'] / 1e9:.1f} | {b['bound_s'] * 1e3:.1f} ({b['bound_by']}) "
        f"| {b['images_per_s_per_chip']:.0f}{' *' if 'cost_note' in r else ''} | {cores} | {_collectives(r)} "
        f"| {r['compile_s']:.0f} |")
  if any("cost_note" in r for r in report["rows"]):
    lines.append("\n* micro-batched: " + next(r["cost_note"] for r in report["rows"] if "cost_note" in r))
  if report["max_batch"]:
    lines += ["", "| target | setting | largest rows/chip that fits | its total GiB | double's total GiB "
              "| img/s/chip bound |", "|" + "---|" * 6]
    for r in report["max_batch"]:
      double = r.get("note", "-")
      if "double_total_bytes" in r:
        double = (f"≥ {_gib(r['double_total_bytes'])} (refused by the compiler)" if r.get("double_refused")
                  else _gib(r["double_total_bytes"]))
      lines.append(f"| {r['target']} | {r.get('setting', r['mode'])} | {r['rows_per_chip']} "
                   f"| {_gib(r.get('total_bytes', 0))} | {double} "
                   f"| {r.get('images_per_s_per_chip_bound', 0):.0f} |")
  return "\n".join(lines)


def write_json(report: dict[str, Any], path: str) -> None:
  storage.write_json(path, json.loads(json.dumps(report, default=float)))
