"""Images/s and MFU of the train step: plain, remat, micro-batched; float32 and bfloat16; optionally
side by side with the same step in PyTorch (benchmarks/torch_peer.py) on the same device.

  python benchmarks/throughput.py --peer                    # the paper's model on the first device
  python benchmarks/throughput.py --depth=18 --image_size=64 --text_layers=2 --text_hidden=128 \
      --seq_len=32 --batches=8,16 --precisions=float32 --steps=3 --peer     # a CPU-sized run
  python benchmarks/throughput.py --config=configs/synthetic.py --batches=32 --modes=plain
  python benchmarks/throughput.py --config=configs/synthetic.py --ab_xla_flags="--xla_cpu_use_onednn=true"

Runs the real `steps_lib.make_train_step` on one device (--batches are per-device batches) from a
fresh state on a fixed random batch. MFU = model FLOPs / step time / peak: model FLOPs are XLA's
`cost_analysis()` of the plain step at the same batch and precision (what remat and micro-batching
recompute is not counted, and XLA counts a scanned micro-batch loop only once), the peak is the
device's dense peak for the precision from its kind (--peak_tflops overrides; on a CPU the measured
float32 matmul rate). --peer runs torch_peer.py first (before JAX takes the accelerator's memory) for
the plain step at every precision and batch, and prints JAX/PyTorch. --ab_xla_flags runs the whole
benchmark twice in fresh processes, without and with the given XLA_FLAGS, and prints both, their ratio
and the largest difference of the step losses (same initial state, data and dropout keys).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import memory  # noqa: E402  pylint: disable=wrong-import-position

# Dense peak TFLOP/s per chip by precision ("float32": what XLA's default f32 dot runs at: TF32 on
# NVIDIA Ampere and later). Matched against jax's device_kind, first match wins.
PEAK_TFLOPS = (
    ("H200", {"bfloat16": 989.0, "float32": 494.0}),
    ("H100", {"bfloat16": 989.0, "float32": 494.0}),
    ("GH200", {"bfloat16": 989.0, "float32": 494.0}),
    ("B200", {"bfloat16": 2250.0, "float32": 1100.0}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("L40S", {"bfloat16": 362.0, "float32": 181.0}),
    ("L4", {"bfloat16": 121.0, "float32": 60.0}),
    ("A10", {"bfloat16": 125.0, "float32": 62.5}),
    ("V100", {"bfloat16": 125.0, "float32": 15.7}),  # no bf16 units: fp16 tensor-core figure
    ("TPU v6", {"bfloat16": 918.0, "float32": 918.0}),
    ("TPU v5p", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
)


def device_peak_tflops(device, precision: str) -> tuple[float, str]:
  """(peak TFLOP/s, where it comes from) for `device` running `precision`."""
  for key, peaks in PEAK_TFLOPS:
    if key.lower() in device.device_kind.lower():
      return peaks[precision], f"{key} {precision} dense"
  if device.platform == "cpu":
    return measured_matmul_tflops(), "measured f32 matmul"
  return float("nan"), f"unknown kind {device.device_kind!r}: pass --peak_tflops"


def measured_matmul_tflops(n: int = 2048) -> float:
  import jax
  import jax.numpy as jnp
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(x))
  times = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - start)
  return 2 * n**3 / min(times) / 1e12


def load_config_file(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def step_config(args, batch: int, mode: str, precision: str):
  """(config, BertConfig) of one benchmark row: --config's model, or the model flags'."""
  if not args.config:
    return memory.paper_config(args, batch, mode, min(args.microbatch, batch), precision)
  from convirt_jax.models.bert import BertConfig
  config = load_config_file(args.config)
  if config.model.text.max_length == "auto":  # the job chooses it from the training texts; time --seq_len
    config.model.text.max_length = args.seq_len
  config.train.batch_size = batch
  config.train.precision = precision
  config.train.remat = mode.endswith("remat")
  config.train.microbatch_size = min(args.microbatch, batch) if mode.startswith("micro") else 0
  config.data.augment_on = "host"  # the model's step alone, fed augmented images
  text = config.model.text
  vocab = text.vocab_size if text.tokenizer == "corpus" else args.vocab_size
  return config, BertConfig.from_dict({**text.config.to_dict(), "vocab_size": vocab})


def random_batch(config, text_config, batch: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  size, length = config.data.image_size, config.model.text.max_length
  lengths = rng.integers(length // 2, length + 1, size=batch)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          "input_ids": (rng.integers(1, text_config.vocab_size, mask.shape) * mask).astype(np.int32),
          "attention_mask": mask}


class JaxBench:
  """Initial state (once per model size), compiled steps and their timings."""

  def __init__(self, args):
    import jax
    from convirt_jax import parallel
    self.args = args
    self.device = jax.devices()[0]
    self.mesh = parallel.make_mesh([self.device])
    self._initial = None
    self._plain_flops = {}

  def _state(self, model, optimizer, config):
    import jax
    from convirt_jax import parallel
    from convirt_jax.training import state as state_lib
    if self._initial is None:
      size, length = config.data.image_size, config.model.text.max_length
      self._initial = state_lib.init_train_state(model, optimizer, jax.random.PRNGKey(0), size, length)
    # A fresh copy per row: the step donates its state.
    return parallel.replicate(jax.tree.map(lambda x: x.copy(), self._initial), self.mesh)

  def _compiled(self, config, text_config):
    from convirt_jax import parallel
    from convirt_jax.models.convirt import build_model
    from convirt_jax.training import optimizer as opt_lib
    from convirt_jax.training import state as state_lib
    from convirt_jax.training import steps as steps_lib
    size, length = config.data.image_size, config.model.text.max_length
    model = build_model(config, text_config, axis_name=parallel.DATA_AXIS)
    optimizer = opt_lib.make_optimizer(config, state_lib.param_shapes(model, size, length), 1000)
    state = self._state(model, optimizer, config)
    batch = parallel.shard_batch(random_batch(config, text_config, config.train.batch_size), self.mesh)
    start = time.perf_counter()
    compiled = steps_lib.make_train_step(model, optimizer, config, self.mesh).lower(state, batch).compile()
    return compiled, state, batch, time.perf_counter() - start

  @staticmethod
  def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))

  def model_flops(self, batch: int, precision: str) -> float:
    """FLOPs of the plain step (what MFU counts), compiled just for that if plain is not run."""
    if (batch, precision) not in self._plain_flops:
      compiled, _, _, _ = self._compiled(*step_config(self.args, batch, "plain", precision))
      self._plain_flops[batch, precision] = self._flops(compiled)
    return self._plain_flops[batch, precision]

  def run(self, batch: int, mode: str, precision: str) -> dict:
    import jax
    config, text_config = step_config(self.args, batch, mode, precision)
    compiled, state, inputs, compile_s = self._compiled(config, text_config)
    if mode == "plain":
      self._plain_flops[batch, precision] = self._flops(compiled)
    losses, times = [], []
    for i in range(self.args.warmup + self.args.steps):
      start = time.perf_counter()
      state, metrics = compiled(state, inputs)
      losses.append(float(jax.block_until_ready(metrics["loss"])))
      if i >= self.args.warmup:
        times.append(time.perf_counter() - start)
    del state
    step_s = statistics.median(times)
    flops = self.model_flops(batch, precision)
    return {"batch": batch, "mode": mode, "precision": precision, "step_s": step_s,
            "images_per_s": batch / step_s, "model_tflops": flops / 1e12,
            "achieved_tflops": flops / step_s / 1e12, "compile_s": compile_s, "losses": losses}


def run_peer(args, batch: int, precision: str) -> dict:
  command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_peer.py"),
             f"--batch={batch}", f"--precision={precision}", f"--steps={args.steps}",
             f"--warmup={args.warmup}", f"--depth={args.depth}", f"--image_size={args.image_size}",
             f"--text_layers={args.text_layers}", f"--text_hidden={args.text_hidden}",
             f"--frozen_layers={args.frozen_layers}", f"--seq_len={args.seq_len}",
             f"--vocab_size={args.vocab_size}"] + (["--compile"] if args.peer_compile else [])
  proc = subprocess.run(command, capture_output=True, text=True, check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    return {"error": (proc.stderr or proc.stdout)[-2000:]}
  return json.loads(lines[-1][len("RESULT "):])


def benchmark(args) -> dict:
  """Every row of the table (PyTorch first, then JAX), as JSON-able dicts."""
  batches = [int(b) for b in args.batches.split(",")]
  precisions, modes = args.precisions.split(","), args.modes.split(",")
  peers = {}
  if args.peer:
    for precision in precisions:
      for batch in batches:
        peers[f"{precision}/{batch}"] = run_peer(args, batch, precision)
  import jax
  bench = JaxBench(args)
  rows = []
  for precision in precisions:
    for batch in batches:
      for mode in modes:
        rows.append(bench.run(batch, mode, precision))
        print("# " + json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}),
              file=sys.stderr, flush=True)
  peaks = {p: (args.peak_tflops, "--peak_tflops") if args.peak_tflops else
           device_peak_tflops(bench.device, p) for p in precisions}
  return {"device": f"{bench.device.device_kind} ({jax.default_backend()})", "rows": rows,
          "peers": peers, "peaks": peaks, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def print_table(result: dict, args) -> None:
  print(f"# {result['device']}; " + ("config " + args.config if args.config else
        f"ResNet{args.depth} {args.image_size} px, BERT {args.text_layers}x{args.text_hidden} "
        f"({args.frozen_layers} frozen), seq {args.seq_len}") + f"; micro-batch {args.microbatch}")
  for precision, (peak, source) in result["peaks"].items():
    print(f"# peak {precision}: {peak:.3g} TFLOP/s ({source})")
  header = (f"{'precision':>9s}{'mode':>8s}{'batch':>6s}{'step ms':>10s}{'img/s':>9s}{'TFLOP/s':>9s}"
            f"{'MFU':>7s}{'compile s':>10s}" + (f"{'torch img/s':>12s}{'jax/torch':>10s}"
                                                 if result["peers"] else ""))
  print(header)
  print("-" * len(header))
  for row in result["rows"]:
    peak = result["peaks"][row["precision"]][0]
    line = (f"{row['precision']:>9s}{row['mode']:>8s}{row['batch']:6d}{row['step_s'] * 1e3:10.1f}"
            f"{row['images_per_s']:9.1f}{row['achieved_tflops']:9.3f}"
            f"{row['achieved_tflops'] / peak:7.1%}{row['compile_s']:10.1f}")
    peer = result["peers"].get(f"{row['precision']}/{row['batch']}")
    if peer is not None and row["mode"] == "plain":
      if "error" in peer:
        line += f"{'failed':>12s}"
      else:
        line += f"{peer['images_per_s']:12.1f}{row['images_per_s'] / peer['images_per_s']:10.2f}"
    print(line)
  for key, peer in result["peers"].items():
    if "error" in peer:
      print(f"# torch_peer {key} failed:\n{peer['error']}")


def _run_child(args, extra_flags: str) -> dict:
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").split() + extra_flags.split()
  env["XLA_FLAGS"] = " ".join(flags)
  argv = [a for a in sys.argv[1:] if not a.startswith(("--ab_xla_flags", "--ab_repeats"))]
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--json"], env=env,
                        capture_output=True, text=True, check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    sys.exit(f"the run with XLA_FLAGS={env['XLA_FLAGS']!r} failed:\n{proc.stderr[-4000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def compare_xla_flags(args) -> None:
  """Runs without (A) and with (B) the flags in fresh processes, alternating --ab_repeats times (the
  median step time of each row over the repeats), and what the flags changed."""
  runs = {"A": [], "B": []}
  for _ in range(args.ab_repeats):
    runs["A"].append(_run_child(args, ""))
    runs["B"].append(_run_child(args, args.ab_xla_flags))
  base, flagged = runs["A"][0], runs["B"][0]
  median = lambda which, i: statistics.median(r["rows"][i]["step_s"] for r in runs[which])
  print(f"# A: XLA_FLAGS={base['xla_flags']!r}\n# B: XLA_FLAGS={flagged['xla_flags']!r}")
  print(f"# {base['device']}; {args.config or 'model flags'}; {args.warmup} warm-up + {args.steps} "
        f"timed steps; median over {args.ab_repeats} alternating runs of each")
  header = (f"{'precision':>9s}{'mode':>8s}{'batch':>6s}{'A ms':>9s}{'B ms':>9s}{'A/B':>7s}"
            f"{'max |loss A - loss B|':>23s}")
  print(header)
  print("-" * len(header))
  for i, row in enumerate(base["rows"]):
    diff = max(abs(x - y) for a in runs["A"] for b in runs["B"]
               for x, y in zip(a["rows"][i]["losses"], b["rows"][i]["losses"]))
    a_s, b_s = median("A", i), median("B", i)
    print(f"{row['precision']:>9s}{row['mode']:>8s}{row['batch']:6d}{a_s * 1e3:9.1f}{b_s * 1e3:9.1f}"
          f"{a_s / b_s:7.2f}{diff:23.2e}")
  for which in ("A", "B"):
    for r in runs[which]:
      print(f"# {which} step ms: " + " ".join(f"{row['step_s'] * 1e3:.1f}" for row in r["rows"]) +
            "; losses: " + "; ".join(" ".join(f"{x:.6f}" for x in row["losses"]) for row in r["rows"]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  memory.add_model_flags(parser)
  parser.add_argument("--config", default="", help="take the model from this config file instead")
  parser.add_argument("--batches", default="32,64,128", help="per-device batches")
  parser.add_argument("--precisions", default="float32,bfloat16")
  parser.add_argument("--modes", default="plain,remat,micro", help="plain, remat, micro, micro+remat")
  parser.add_argument("--microbatch", type=int, default=16, help="train.microbatch_size for micro")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="the device's peak, overrides")
  parser.add_argument("--peer", action="store_true", help="also time torch_peer.py's plain step")
  parser.add_argument("--peer_compile", action="store_true", help="torch.compile the peer's step")
  parser.add_argument("--ab_xla_flags", default="", help="compare runs without and with these flags")
  parser.add_argument("--ab_repeats", type=int, default=2, help="alternating runs of A and B")
  parser.add_argument("--json", action="store_true", help="print one RESULT {json} line instead")
  args = parser.parse_args()
  if not set(args.modes.split(",")) <= set(memory.MODES):
    parser.error(f"--modes={args.modes}: choose from {memory.MODES}")
  if args.peer and (args.config or args.width != 1.0):
    parser.error("--peer needs the model flags at --width=1 (torchvision has no width multiplier)")
  if args.ab_xla_flags:
    compare_xla_flags(args)
    return
  result = benchmark(args)
  if args.json:
    print("RESULT " + json.dumps(result), flush=True)
  else:
    print_table(result, args)


if __name__ == "__main__":
  main()
