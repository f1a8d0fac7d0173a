"""Per-device memory of one train step, from XLA's compiled memory analysis: plain, remat, micro-batched.

  python benchmarks/memory.py                      # the paper's model, global batches 32 .. 4096, 8 devices
  python benchmarks/memory.py --devices=1 --batches=256,1024,4096 --depth=18 --image_size=64 \
      --text_layers=2 --modes=plain,micro          # a reduced size that compiles in minutes on a CPU

Nothing runs and no accelerator is needed: the real `steps_lib.make_train_step` is lowered on
ShapeDtypeStructs (state and batch) and compiled for the mesh, and
`compiled.memory_analysis()` gives the buffers of one device's program: temp (activations, gradients
in flight, workspace), arguments (state + batch shard), outputs. On a CPU the mesh is N simulated host
devices (set before jax starts); the numbers are XLA's buffer assignment for the CPU backend, which
fuses a little differently from GPU/TPU, so read ratios rather than absolute sizes (run it on the
accelerator for its own figures: `benchmarks/accelerator_check.sh`).

The contrastive loss scores every local row against the global batch: its logits are b x B float32
per direction (b = per-device batch, B = global batch). The "logits" column prints one such matrix,
and "loss temp" the temp memory of the loss's forward + backward alone on [b, projection_dim]
embeddings (same mesh), i.e. the part of the step that grows with the batch whatever the micro-batch.

Defaults are the paper's model: ResNet50 at 224 px, BERT-base (12 layers, 6 frozen + embeddings),
sequences of 128 tokens, projection 512; "auto" precision (bfloat16 on GPU/TPU, float32 on CPU).
"""
import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("plain", "remat", "micro", "micro+remat")
MIB = 2.0**20


def set_cpu_device_count(devices: int) -> None:
  """Simulated host devices for the CPU backend; must run before jax is imported."""
  if "jax" in sys.modules:
    raise RuntimeError("set_cpu_device_count must run before jax is imported")
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])


def add_model_flags(parser: argparse.ArgumentParser) -> None:
  """The model-size flags shared by memory.py, throughput.py and torch_peer.py (paper defaults)."""
  parser.add_argument("--depth", type=int, default=50, help="ResNet depth (18, 34, 50, 101)")
  parser.add_argument("--width", type=float, default=1.0, help="ResNet width multiplier")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--text_layers", type=int, default=12, help="BERT layers (hidden 768, 12 heads)")
  parser.add_argument("--text_hidden", type=int, default=768, help="BERT hidden size (heads: /64)")
  parser.add_argument("--frozen_layers", type=int, default=6, help="frozen BERT layers (+ embeddings)")
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--vocab_size", type=int, default=30522)


def paper_config(args: argparse.Namespace, global_batch: int, mode: str = "plain",
                 microbatch_size: int = 0, precision: str = "auto"):
  """base_config() with the model of `args` and the step setting of `mode`."""
  from convirt_jax.config import base_config
  from convirt_jax.models.bert import BertConfig
  if mode not in MODES:
    raise ValueError(f"mode {mode!r}: choose from {MODES}")
  config = base_config()
  config.model.image.depth, config.model.image.width = args.depth, args.width
  config.model.text.init_from = ""
  config.model.text.max_length = args.seq_len
  config.model.text.frozen_layers = min(args.frozen_layers, args.text_layers)
  config.data.image_size = args.image_size
  config.train.batch_size = global_batch
  config.train.precision = precision
  config.train.remat = mode.endswith("remat")
  config.train.microbatch_size = microbatch_size if mode.startswith("micro") else 0
  config.data.augment_on = "host"  # the model's step alone, fed augmented images
  heads = max(1, args.text_hidden // 64)
  text_config = BertConfig(vocab_size=args.vocab_size, hidden_size=args.text_hidden,
                           num_hidden_layers=args.text_layers, num_attention_heads=heads,
                           intermediate_size=4 * args.text_hidden,
                           max_position_embeddings=max(512, args.seq_len))
  return config, text_config


def abstract_step(config, text_config, mesh):
  """(jitted train step, state ShapeDtypeStructs, batch ShapeDtypeStructs) for `config` on `mesh`: the
  pretraining job's step as the plan builds it (`convirt_jax.planning.programs.pretrain_program`)."""
  from convirt_jax.planning import programs
  program = programs.pretrain_program(config, text_config, mesh)
  return program.step, program.state, program.batch


def compile_step(config, text_config, mesh):
  """The compiled train step (and the seconds lowering + compiling took)."""
  step, state, batch = abstract_step(config, text_config, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  return compiled, time.perf_counter() - start


@functools.cache
def loss_temp_bytes(global_batch: int, dim: int, mesh) -> int:
  """Temp bytes of the ConVIRT loss's forward + backward on [b, dim] embeddings per device."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  from convirt_jax import losses, parallel
  loss = jax.shard_map(lambda v, u: losses.convirt_loss(v, u, axis_name=parallel.DATA_AXIS),
                       mesh=mesh, in_specs=(P(parallel.DATA_AXIS),) * 2, out_specs=P())
  shape = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32,
                               sharding=parallel.data_sharding(mesh))
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(shape, shape).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(parser)
  parser.add_argument("--devices", type=int, default=8,
                      help="mesh size; on a CPU that many simulated devices")
  parser.add_argument("--batches", default="32,64,128,256,512,1024,2048,4096", help="global batches")
  parser.add_argument("--modes", default="plain,remat,micro", help=f"some of {','.join(MODES)}")
  parser.add_argument("--microbatch", type=int, default=32,
                      help="train.microbatch_size (per device); capped at the per-device batch")
  parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"))
  parser.add_argument("--json", action="store_true", help="also print one RESULT {json} line")
  args = parser.parse_args()
  modes = args.modes.split(",")
  if not set(modes) <= set(MODES):
    parser.error(f"--modes={args.modes}: choose from {MODES}")
  on_cpu = os.environ.get("JAX_PLATFORMS", "") in ("", "cpu")
  if on_cpu and args.devices > 1:
    set_cpu_device_count(args.devices)  # harmless on an accelerator: it only shapes the CPU backend

  import jax
  from convirt_jax import parallel
  from convirt_jax.models.convirt import resolve_precision
  devices = jax.devices()
  if len(devices) < args.devices:
    sys.exit(f"--devices={args.devices}, but {len(devices)} {devices[0].platform} devices are visible")
  mesh = parallel.make_mesh(devices[:args.devices])
  precision = resolve_precision(args.precision)
  print(f"# {devices[0].device_kind} x{args.devices}; ResNet{args.depth} (width {args.width}) at "
        f"{args.image_size} px, BERT {args.text_layers}x{args.text_hidden} ({args.frozen_layers} "
        f"frozen), seq {args.seq_len}, {precision}; micro-batch {args.microbatch}/device")
  header = (f"{'mode':>12s}{'batch':>7s}{'/dev':>6s}{'micro':>6s}{'temp MiB':>11s}{'args MiB':>10s}"
            f"{'out MiB':>9s}{'logits MiB':>12s}{'loss temp':>11s}{'compile s':>11s}")
  print(header)
  print("-" * len(header))
  table, rows = {}, []
  for mode in modes:
    for batch in (int(b) for b in args.batches.split(",")):
      local = batch // args.devices
      micro = min(args.microbatch, local) if mode.startswith("micro") else 0
      config, text_config = paper_config(args, batch, mode, micro, precision)
      compiled, seconds = compile_step(config, text_config, mesh)
      memory = compiled.memory_analysis()
      logits = local * batch * 4
      loss_temp = loss_temp_bytes(batch, config.model.projection_dim, mesh)
      table[mode, local] = (memory.temp_size_in_bytes, loss_temp)
      rows.append({"mode": mode, "batch": batch, "per_device": local, "micro": micro,
                   "temp_mib": memory.temp_size_in_bytes / MIB,
                   "args_mib": memory.argument_size_in_bytes / MIB,
                   "out_mib": memory.output_size_in_bytes / MIB, "logits_mib": logits / MIB,
                   "loss_temp_mib": loss_temp / MIB, "compile_s": seconds})
      print(f"{mode:>12s}{batch:7d}{local:6d}{micro or '-':>6}{memory.temp_size_in_bytes / MIB:11.1f}"
            f"{memory.argument_size_in_bytes / MIB:10.1f}{memory.output_size_in_bytes / MIB:9.1f}"
            f"{logits / MIB:12.1f}{loss_temp / MIB:11.1f}{seconds:11.1f}", flush=True)

  # The target: with micro-batches, temp memory beyond the loss's own grows <= 1.5x from 256 to 4096
  # rows per device, the loss's own temp (its b x B logits) subtracted. The peak is the larger of the
  # loss's and a micro-batch's backward pass, so the temp itself is printed too.
  for mode in (m for m in modes if m.startswith("micro")):
    # Rows with at least one whole micro-batch per device (below that the step is a plain step).
    sizes = sorted(local for m, local in table if m == mode and local >= args.microbatch)
    if len(sizes) < 2:
      continue
    (t0, l0), (t1, l1) = table[mode, sizes[0]], table[mode, sizes[-1]]
    print(f"{mode}: per-device batch {sizes[0]} -> {sizes[-1]}: temp x{t1 / t0:.2f}; without the "
          f"loss's temp (logits) x{(t1 - l1) / max(t0 - l0, 1):.2f} (target <= 1.5)")
    if "plain" in modes and ("plain", sizes[-1]) in table:
      print(f"  plain at {sizes[-1]}/device: {table['plain', sizes[-1]][0] / MIB:.0f} MiB temp, "
            f"micro {t1 / MIB:.0f} MiB (x{table['plain', sizes[-1]][0] / t1:.1f} less)")
  if args.json:
    print("RESULT " + json.dumps({"device": f"{devices[0].device_kind} x{args.devices}",
                                  "precision": precision, "rows": rows}), flush=True)


if __name__ == "__main__":
  main()
