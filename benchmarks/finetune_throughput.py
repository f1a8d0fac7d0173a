"""Fine-tuning images/s next to the pretraining train step's images/s, same image encoder, one run.

  python benchmarks/finetune_throughput.py [--depth=18 --width=0.25 --image_size=80 --batch=32]
  python benchmarks/finetune_throughput.py --depth=50 --width=1 --image_size=224 --batch=64  # the paper's

Both steps are the real ones, jitted over a mesh of every device: the transfer job's
`classifier_steps.make_finetune_step` (ResNet + linear head, BCE over --labels labels, Adam) and the
pretraining job's `steps.make_train_step` (the same ResNet + a BERT, both projection heads, the ConVIRT
loss). Batches are random and already on the devices, so the numbers are the steps' own (no input
pipeline). The ratio says how much cheaper an epoch of fine-tuning is than an epoch of pretraining at the
same model size: the text tower and the loss over the global batch are what fine-tuning does not pay.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timed(fn) -> float:
  import jax
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _interleaved_medians(fns, repeats: int) -> list[tuple[float, float]]:
  """[(compile + first run, median of `repeats` later runs)] in seconds, one per function. The functions'
  steps alternate, so a machine whose load changes during the run slows them alike (the ratio holds)."""
  first = [_timed(fn) for fn in fns]
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      times[i].append(_timed(fn))
  return [(f, statistics.median(t)) for f, t in zip(first, times)]


def _finetune_step(args, mesh):
  import jax
  import numpy as np
  from convirt_jax import parallel
  from convirt_jax.jobs import transfer_finetune as finetune
  from convirt_jax.models import classifier as classifier_lib
  from convirt_jax.models import registry
  from convirt_jax.models.classifier import ImageClassifier
  from convirt_jax.models.convirt import compute_dtype
  from convirt_jax.training import state as state_lib

  arch = registry.ImageArch("resnet", (("depth", args.depth), ("width", args.width),
                                       ("small_stem", args.small_stem)))
  encoder, features_dim = registry.build_image_encoder(arch, axis_name=parallel.DATA_AXIS,
                                                       dtype=compute_dtype(args.precision))
  model = ImageClassifier(encoder=encoder, features_dim=features_dim, num_outputs=args.labels)
  optimizer, train_step, _ = finetune.compiled_steps(model, "multilabel", mesh, 1e-4, 1e-6)
  encoder_variables = registry.random_variables(arch, args.image_size, 0)
  variables = classifier_lib.classifier_variables(model, encoder_variables, seed=0)
  state = parallel.replicate(state_lib.new_state(variables, optimizer, jax.random.PRNGKey(0)), mesh)
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch({
      "image": rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8),
      "labels": rng.integers(0, 2, (args.batch, args.labels)).astype(np.float32)}, mesh)

  def run():
    nonlocal state
    state, metrics = train_step(state, batch)
    return metrics
  return run


def _pretrain_step(args, mesh):
  import jax
  import numpy as np
  from convirt_jax import parallel
  from convirt_jax.config import base_config
  from convirt_jax.models.bert import BertConfig
  from convirt_jax.models.convirt import build_model
  from convirt_jax.training import optimizer as opt_lib
  from convirt_jax.training import state as state_lib
  from convirt_jax.training import steps as steps_lib

  config = base_config()
  config.model.image.depth, config.model.image.width = args.depth, args.width
  config.model.image.small_stem = args.small_stem
  config.model.text.frozen_layers = min(args.bert_frozen, args.bert_layers)
  config.model.text.max_length = args.text_length
  config.train.batch_size = args.batch
  config.train.precision = args.precision
  config.data.augment_on = "host"  # the model's step alone, fed augmented images
  text_config = BertConfig(vocab_size=args.vocab, hidden_size=args.bert_hidden,
                           num_hidden_layers=args.bert_layers,
                           num_attention_heads=max(1, args.bert_hidden // 64),
                           intermediate_size=4 * args.bert_hidden, max_position_embeddings=args.text_length)
  model = build_model(config, text_config, axis_name=parallel.DATA_AXIS)
  optimizer = opt_lib.make_optimizer(
      config, state_lib.param_shapes(model, args.image_size, args.text_length), 1000)
  state = state_lib.init_train_state(model, optimizer, jax.random.PRNGKey(0), args.image_size,
                                     args.text_length)
  state = parallel.replicate(state, mesh)
  train_step = steps_lib.make_train_step(model, optimizer, config, mesh)
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch({
      "image": rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8),
      "input_ids": rng.integers(1, args.vocab, (args.batch, args.text_length), dtype=np.int32),
      "attention_mask": np.ones((args.batch, args.text_length), np.int32)}, mesh)

  def run():
    nonlocal state
    state, metrics = train_step(state, batch)
    return metrics
  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--depth", type=int, default=18)
  parser.add_argument("--width", type=float, default=0.25)
  parser.add_argument("--small_stem", action="store_true")
  parser.add_argument("--image_size", type=int, default=80)
  parser.add_argument("--batch", type=int, default=32, help="global batch of both steps")
  parser.add_argument("--labels", type=int, default=8, help="labels of the fine-tuning head")
  parser.add_argument("--text_length", type=int, default=32)
  parser.add_argument("--bert_hidden", type=int, default=128)
  parser.add_argument("--bert_layers", type=int, default=2)
  parser.add_argument("--bert_frozen", type=int, default=0, help="frozen BERT layers when pretraining")
  parser.add_argument("--vocab", type=int, default=1000)
  parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--devices", type=int, default=0,
                      help="simulated CPU devices (0: the machine's devices)")
  args = parser.parse_args()
  if args.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
  import jax  # pylint: disable=g-import-not-at-top
  from convirt_jax import parallel  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh()
  (ft_compile, ft), (pt_compile, pt) = _interleaved_medians(
      [_finetune_step(args, mesh), _pretrain_step(args, mesh)], args.repeats)
  model = (f"ResNet{args.depth} (width {args.width:g}) at {args.image_size} px; BERT {args.bert_layers}x"
           f"{args.bert_hidden}, {args.text_length} tokens; global batch {args.batch}")
  header = f"{'':28s}{'step':>10s}{'images/s':>11s}{'compile+1st':>13s}"
  print(model)
  print(header)
  print("-" * len(header))
  for name, seconds, compile_s in (("fine-tuning (transfer)", ft, ft_compile),
                                   ("pretraining (ConVIRT)", pt, pt_compile)):
    print(f"{name:28s}{seconds * 1e3:8.1f}ms{args.batch / seconds:11.1f}{compile_s:12.1f}s")
  print(f"{'fine-tuning / pretraining':28s}{'':10s}{pt / ft:10.2f}x")
  print(f"(medians of {args.repeats} steps on {jax.device_count()} {jax.default_backend()} device(s); "
        f"{os.cpu_count()} CPU cores)")


if __name__ == "__main__":
  main()
