"""Time the ConVIRT loss (forward + backward) and a whole train step: 1 device vs N (simulated) devices.

  python benchmarks/loss_and_step.py [--devices=8] [--batch_sizes=32,128,512,1024,2048,4096]

Each device count runs in its own subprocess, because XLA reads the simulated CPU device count
(--xla_force_host_platform_device_count) once, at start-up. On a CPU the simulated devices share the
same cores, so the ratio measures the cost of the sharded program (all-gathers, per-device logits,
psums) rather than a speed-up; on a TPU/GPU mesh the same script shows the scaling.

The loss runs on random [B, 512] embeddings: one device scores the B x B logits directly, N devices run
it under shard_map, each scoring its B/N rows against the gathered B columns. The train step is the
real `steps_lib.make_train_step` on a small model (ResNet18 at width 1/4 on 64 px, a 2-layer BERT of
width 64, sequences of 32 tokens) at the global batch --step_batch.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
  """(compile + first run, median of `repeats` later runs) in seconds."""
  import jax
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def _loss_times(batch_sizes: list[int], dim: int, repeats: int) -> dict[int, float]:
  import jax
  import numpy as np
  from jax.sharding import PartitionSpec as P
  from convirt_jax import losses, parallel

  mesh = parallel.make_mesh()
  if mesh.size == 1:
    loss = lambda v, u: losses.convirt_loss(v, u)
  else:
    loss = jax.shard_map(lambda v, u: losses.convirt_loss(v, u, axis_name=parallel.DATA_AXIS),
                         mesh=mesh, in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
                         out_specs=P())
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  rng = np.random.default_rng(0)
  out = {}
  for batch in batch_sizes:
    embeddings = [rng.normal(size=(batch, dim)).astype(np.float32) for _ in range(2)]
    v, u = (jax.device_put(x, parallel.data_sharding(mesh)) for x in embeddings)
    _, out[batch] = _median_seconds(lambda: step(v, u), repeats)
  return out


def _step_time(batch: int, repeats: int) -> tuple[float, float]:
  import jax
  import numpy as np
  from convirt_jax import parallel
  from convirt_jax.training import optimizer as opt_lib
  from convirt_jax.training import state as state_lib
  from convirt_jax.training import steps as steps_lib
  from convirt_jax.config import base_config
  from convirt_jax.models.bert import BertConfig
  from convirt_jax.models.convirt import build_model

  image_size, text_length = 64, 32
  config = base_config()
  config.model.image.depth, config.model.image.width = 18, 0.25
  config.model.text.frozen_layers = 0
  config.train.batch_size = batch
  config.data.augment_on = "host"  # the model's step alone, fed augmented images
  text_config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128, max_position_embeddings=text_length)
  mesh = parallel.make_mesh()
  model = build_model(config, text_config, axis_name=parallel.DATA_AXIS)
  optimizer = opt_lib.make_optimizer(config, state_lib.param_shapes(model, image_size, text_length), 1000)
  state = state_lib.init_train_state(model, optimizer, jax.random.PRNGKey(0), image_size, text_length)
  state = parallel.replicate(state, mesh)
  train_step = steps_lib.make_train_step(model, optimizer, config, mesh)
  rng = np.random.default_rng(0)
  batch_arrays = parallel.shard_batch({
      "image": rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8),
      "input_ids": rng.integers(1, 1000, (batch, text_length), dtype=np.int32),
      "attention_mask": np.ones((batch, text_length), np.int32),
  }, mesh)

  def run():
    nonlocal state
    state, metrics = train_step(state, batch_arrays)
    return metrics
  return _median_seconds(run, repeats)


def _child(args) -> None:
  import jax
  assert jax.device_count() == args.child_devices, jax.devices()
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  compile_s, step_s = _step_time(args.step_batch, args.repeats)
  result = {"loss": _loss_times(batch_sizes, args.dim, args.repeats), "step": step_s,
            "step_compile": compile_s}
  print("RESULT " + json.dumps(result))


def _run_child(devices: int, args) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  command = [sys.executable, os.path.abspath(__file__), f"--child_devices={devices}",
             f"--batch_sizes={args.batch_sizes}", f"--dim={args.dim}", f"--repeats={args.repeats}",
             f"--step_batch={args.step_batch}"]
  proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"the {devices}-device run failed:\n{proc.stderr[-4000:]}")
  result = json.loads(lines[-1][len("RESULT "):])
  result["loss"] = {int(k): v for k, v in result["loss"].items()}
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", type=int, default=8, help="simulated devices to compare with 1")
  parser.add_argument("--batch_sizes", default="32,128,512,1024,2048,4096", help="global batches")
  parser.add_argument("--dim", type=int, default=512, help="embedding size")
  parser.add_argument("--step_batch", type=int, default=32, help="global batch of the train step")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--child_devices", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child_devices:
    _child(args)
    return

  single, multi = _run_child(1, args), _run_child(args.devices, args)
  n = args.devices
  header = f"{'':34s}{'1 device':>12s}{f'{n} devices':>12s}{f'{n}/1':>8s}"
  print(header)
  print("-" * len(header))
  for batch in sorted(single["loss"]):
    a, b = single["loss"][batch], multi["loss"][batch]
    print(f"{f'loss fwd+bwd, batch {batch}, d={args.dim}':34s}{a * 1e3:10.2f}ms{b * 1e3:10.2f}ms"
          f"{b / a:8.2f}")
  a, b = single["step"], multi["step"]
  print(f"{f'train step, batch {args.step_batch}':34s}{a * 1e3:10.1f}ms{b * 1e3:10.1f}ms{b / a:8.2f}")
  a, b = single["step_compile"], multi["step_compile"]
  print(f"{'train step compile + first run':34s}{a:11.1f}s{b:11.1f}s{b / a:8.2f}")
  print(f"(medians of {args.repeats} runs; {os.cpu_count()} CPU cores shared by all simulated devices)")


if __name__ == "__main__":
  main()
