"""What model.text.max_length="auto" chooses for a config's training texts, and what bucketing would add.

  python benchmarks/text_lengths.py                               # configs/synthetic.py's corpus
  python benchmarks/text_lengths.py --config=configs/mimic.py --config_args=data.dir=/data/mimic-cxr-jpg
  python benchmarks/text_lengths.py --flops                       # + the paper's text tower per length

For sentences and for whole reports: the length "auto" gives (capped by the config's BERT, and uncapped),
the share it truncates, and for random training batches padded each to its own longest text (rounded up to
8, at most that length; "bucketing") the mean padded length. --flops adds XLA's FLOP count of the text
tower of configs/mimic.py (BERT-base, 6 frozen layers, batch 32) at several lengths
(text_length.text_tower_flops). The figures are in convirt_jax/text_length.py's docstring.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/synthetic.py")
  parser.add_argument("--config_args", action="append", default=[], help="KEY=VALUE, e.g. data.dir=...")
  parser.add_argument("--tfds_dir", default="/tmp/convirt_text_lengths_tfds")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=20000, help="random batches for the bucketing figure")
  parser.add_argument("--flops", action="store_true")
  args = parser.parse_args()

  import ast
  import importlib.util
  import numpy as np
  from convirt_jax import storage
  from convirt_jax import text_length
  from convirt_jax.data import datasets, pipeline
  from convirt_jax.hub import resolve_hf_dir
  from convirt_jax.tokenizer import Tokenizer

  spec = importlib.util.spec_from_file_location("config_module", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.tfds_dir = config.data.tfds_dir or args.tfds_dir
  for item in args.config_args:
    key, value = item.split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (SyntaxError, ValueError):
      pass
    config.update_from_flattened_dict({key: value})
  dataset = datasets.load_dataset(config, config.data.tfds_dir)
  study_sizes = datasets.study_sizes(dataset, "train") if config.data.unit == "study" else None
  text = config.model.text
  source = datasets.text_source(dataset, "train")
  if text.tokenizer == "corpus":
    tokenizer = Tokenizer.from_corpus([pipeline.whole_text(source[i]) for i in range(len(source))],
                                      text.vocab_size)
  else:
    tokenizer = Tokenizer.from_pretrained(resolve_hf_dir(text.tokenizer or text.init_from))
  if text.init_from:
    cap = storage.read_json(os.path.join(resolve_hf_dir(text.init_from), "config.json"))[
        "max_position_embeddings"]
  else:
    cap = text.config.get("max_position_embeddings", 512)
  rng = np.random.default_rng(0)
  for whole_report in (False, True):
    counts = text_length.measure(source, tokenizer, whole_report=whole_report, study_sizes=study_sizes)
    lengths = np.array(sorted(counts))
    p = np.array([counts[n] for n in lengths])
    p /= p.sum()
    for limit in (cap, None):
      length = text_length.choose_length(counts, limit or 10**9)
      print(f"{'whole reports' if whole_report else 'sentences'}, cap {limit or 'none'}: "
            f"auto = {length}, truncates {text_length.truncated_share(counts, length):.3%}; longest "
            f"{lengths.max()}, mean {np.sum(lengths * p):.1f} tokens")
    draws = rng.choice(lengths, size=(args.batches, args.batch_size), p=p)
    padded = np.minimum(-(-draws.max(axis=1) // 8) * 8, length)
    print(f"  bucketing, batches of {args.batch_size}: {padded.mean():.1f} positions on average vs {length} "
          f"({1 - padded.mean() / length:.1%} fewer), buckets {sorted(set(padded.tolist()))}")

  if args.flops:
    from configs import mimic  # pylint: disable=g-import-not-at-top
    from convirt_jax.models import convirt
    from convirt_jax.models.bert import BertConfig
    from convirt_jax.training import optimizer as optimizer_lib
    from convirt_jax.training import state as state_lib
    paper = mimic.get_config()
    paper.train.precision = "bfloat16"
    bert = BertConfig.from_dict({**paper.model.text.config.to_dict(), "vocab_size": 28996})
    model = convirt.build_model(paper, bert)
    shapes = state_lib.param_shapes(model, 64, 8)
    frozen = optimizer_lib.frozen_mask(shapes, paper.model.text.frozen_layers)
    for n in (128, 64, 48, 40, 32, 24):
      flops = text_length.text_tower_flops(model, shapes, frozen, paper.train.batch_size, n)
      print(f"text tower of configs/mimic.py, batch {paper.train.batch_size}, {n} tokens: "
            f"{flops / 1e9:,.0f} GFLOP per step")


if __name__ == "__main__":
  main()
