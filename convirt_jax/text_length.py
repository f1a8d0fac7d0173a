"""model.text.max_length="auto": the text length that the training texts need, measured once per tokenizer.

One training text is one report sentence (the paper's text augmentation), usually far shorter than the 128
tokens this project used to fix, and the text tower's work grows with the length (linearly in its dense
layers, quadratically in attention): at a fixed 128 most of it runs on padding. With "auto" the pretraining
job, on a fresh run:

1. counts the tokens ([CLS] and [SEP] included, nothing cut) of every text the training pipeline draws
   from, with the run's own tokenizer: the lines of each train record's "text" (`pipeline.record_sentences`),
   or with data.whole_report their join (`pipeline.whole_text`). Each text is weighted by how often the
   pipeline draws it: every unit of an epoch (a record; with data.unit="study" a study, whose records share
   its report) is drawn once, and one of its k sentences with probability 1/k each. The counts are cached
   beside the dataset, in <dataset dir>/text_lengths/<texts>-<unit>-<tokenizer fingerprint>.json, so the
   next run on the same data with the same tokenizer reads them instead of the records;
2. takes the smallest multiple of 8 that holds `COVERAGE` (99.9%) of those draws whole, capped by the
   BERT's max_position_embeddings;
3. prints that length, the share of draws it truncates, and the text tower's FLOPs per step at that length
   and at the old fixed 128 (`REFERENCE_LENGTH`): XLA's cost analysis of the lowered (not compiled) forward
   and backward of the text encoder and its projection head over one global batch, frozen layers not
   differentiated, as the train step does (`text_tower_flops`).

The chosen length is then an ordinary integer in the run's config (config.json and the checkpoints'
metadata), which is what a resumed run keeps (pretrain._resume_step), and what the transfer job,
`ConVIRT.load` and the export read. Evaluation texts (whole reports, retrieval queries) are tokenized to the
same length, as they always were to the fixed one.

What it saves, counted by `text_tower_flops` for the paper's text tower (BERT-base, embeddings and 6
layers frozen, bfloat16, one global batch of 32): 1,437 GFLOP per step at 128 tokens, 708 at 64, 529 at 48,
440 at 40, 351 at 32, 263 at 24 (about 2/3 of the whole step is the text tower at 128). On the synthetic
corpus (configs/synthetic.py's 2,000 training reports and its corpus vocabulary) "auto" gives 24 for
sentences (the longest has 20 tokens) and 104 for whole reports (uncapped; 0.1% truncated, longest 111).

Bucketing (a batch padded to its own longest text, one compiled program per bucket) was measured for
whole-report runs (data.whole_report) and not built: on that corpus, random batches of 32 whole reports
padded to their longest (rounded up to 8, at most 104) average 84.4 positions, 19% fewer than 104, which is
about 12% of a paper-size step, for 7 compiled programs instead of 1 (each paper-size compile took minutes)
and a length every process must agree on at every step. Sentences gave the same 20% (buckets 16 and 24).
"""
import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from convirt_jax import storage
from convirt_jax.data import pipeline

COVERAGE = 0.999          # share of the training draws whose text fits whole
MULTIPLE = 8              # the chosen length is a multiple of this (tiles of the accelerators' matmuls)
REFERENCE_LENGTH = 128    # the fixed length configs/mimic.py and configs/csv.py used before "auto"
CACHE_DIR = "text_lengths"

Counts = dict[int, float]  # tokens of a text -> how many draws of an epoch have that length


@dataclasses.dataclass(frozen=True)
class Choice:
  """The length "auto" resolved to and what it is based on."""
  length: int
  truncated: float          # share of the training draws longer than `length`
  units: int                # records or studies of the train split
  texts: str                # "sentences" | "whole reports"
  longest: int              # tokens of the longest training text
  cap: int                  # the BERT's max_position_embeddings
  cache: str                # the cache file the counts were read from or written to ("" if none)
  cached: bool              # read from the cache (else measured now)


def measure(source: Sequence[Mapping[str, Any]], tokenizer, *, whole_report: bool,
            study_sizes: np.ndarray | None = None, chunk: int = 4096) -> Counts:
  """{tokens: draws} of the texts `pipeline.train_loader` draws from `source` in one epoch.

  A unit (a record, or with `study_sizes` a study: its first record, as the study's records share its
  report) is drawn once per epoch; of its k sentences each is drawn with probability 1/k. With
  `whole_report` a unit's one text is the join of its sentences.
  """
  if study_sizes is None:
    indices = np.arange(len(source))
  else:
    indices = np.concatenate([[0], np.cumsum(study_sizes)[:-1]]).astype(np.int64)
  counts: Counts = {}
  for start in range(0, len(indices), chunk):
    texts, weights = [], []
    for index in indices[start:start + chunk]:
      sentences = pipeline.record_sentences(source[int(index)])
      if whole_report:
        texts.append(" ".join(sentences))
        weights.append(1.0)
      else:
        texts.extend(sentences)
        weights.extend([1.0 / len(sentences)] * len(sentences))
    for length, weight in zip(tokenizer.token_counts(texts).tolist(), weights):
      counts[length] = counts.get(length, 0.0) + weight
  # Sorted as the cache is, so that every process sums the same floats in the same order, whether it
  # measured or read the cache, and chooses the same length.
  return {n: counts[n] for n in sorted(counts)}


def choose_length(counts: Mapping[int, float], cap: int, coverage: float | None = None,
                  multiple: int = MULTIPLE) -> int:
  """The smallest multiple of `multiple` that holds `coverage` (default `COVERAGE`) of the draws whole,
  at most `cap`."""
  coverage = COVERAGE if coverage is None else coverage
  if not counts:
    raise ValueError("no training texts to choose a text length from")
  total = sum(counts.values())
  covered = 0.0
  for length in sorted(counts):
    covered += counts[length]
    if covered >= coverage * total * (1 - 1e-12):  # float sums of 1/k weights
      break
  return min(-(-length // multiple) * multiple, cap)


def truncated_share(counts: Mapping[int, float], length: int) -> float:
  """The share of the draws whose text is longer than `length` tokens (the tokenizer cuts them)."""
  total = sum(counts.values())
  return sum(w for n, w in counts.items() if n > length) / total if total else 0.0


def cache_path(dataset_dir: str, tokenizer, *, whole_report: bool, by_study: bool) -> str:
  texts = "whole_report" if whole_report else "sentences"
  unit = "study" if by_study else "record"
  return os.path.join(dataset_dir, CACHE_DIR, f"{texts}-{unit}-{tokenizer.fingerprint()}.json")


def _read_cache(path: str, tokenizer) -> Counts | None:
  try:
    saved = storage.read_json(path)
    if saved.get("tokenizer") != tokenizer.fingerprint():
      return None
    counts = {int(n): float(w) for n, w in saved["counts"].items()}
    return {n: counts[n] for n in sorted(counts)}
  except (OSError, ValueError, KeyError, AttributeError, TypeError):
    return None  # missing, half-written by another process, or from another version: measured again


def choose(source: Sequence[Mapping[str, Any]], tokenizer, *, cap: int, whole_report: bool,
           study_sizes: np.ndarray | None = None, dataset_dir: str = "",
           write_cache: bool = True) -> Choice:
  """The length "auto" resolves to for these training texts, from the cache beside the dataset when it
  holds this tokenizer's counts (else measured, and cached when `write_cache`)."""
  path = (cache_path(dataset_dir, tokenizer, whole_report=whole_report, by_study=study_sizes is not None)
          if dataset_dir else "")
  counts = _read_cache(path, tokenizer) if path else None
  cached = counts is not None
  if counts is None:
    counts = measure(source, tokenizer, whole_report=whole_report, study_sizes=study_sizes)
    if path and write_cache:
      try:
        storage.write_json(path, {
            "what": "tokens ([CLS] and [SEP] included, untruncated) of the training texts -> draws per "
                    "epoch (a unit is drawn once; one of its k sentences with probability 1/k)",
            "split": "train", "texts": "whole_report" if whole_report else "sentences",
            "unit": "study" if study_sizes is not None else "record",
            "tokenizer": tokenizer.fingerprint(), "units": len(source) if study_sizes is None else
            len(study_sizes), "counts": {str(n): counts[n] for n in sorted(counts)}})
      except OSError as e:  # a read-only data directory: measured again next time
        print(f"note: could not cache the text lengths in {path}: {e}", flush=True)
        path = ""
  length = choose_length(counts, cap)
  return Choice(length=length, truncated=truncated_share(counts, length),
                units=round(sum(counts.values())), texts="whole reports" if whole_report else "sentences",
                longest=max(counts), cap=cap, cache=path, cached=cached)


def text_tower_flops(model, params: Any, frozen: Any, batch_size: int, length: int) -> float | None:
  """FLOPs of one training step's text tower: the encoder and its head, forward and backward, over
  `batch_size` texts of `length` tokens, with the parameters `frozen` marks closed over (the train step
  differentiates only the trainable ones). XLA's cost analysis of the lowered program: nothing compiles.

  `model` is a ConVIRTModel; `params` (ShapeDtypeStructs or arrays) and `frozen` (bools) are its params
  trees, of which "text" and "text_head" are used. None when the backend gives no FLOP count.
  """
  keys = ("text", "text_head")
  leaves, treedef = jax.tree.flatten({k: params[k] for k in keys})
  is_frozen = jax.tree.leaves({k: frozen[k] for k in keys})
  shape = lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
  trainable = [shape(leaf) for leaf, f in zip(leaves, is_frozen) if not f]
  fixed = [shape(leaf) for leaf, f in zip(leaves, is_frozen) if f]

  def loss(trainable, fixed, input_ids, attention_mask, rng):
    trainable, fixed = iter(trainable), iter(fixed)
    tree = treedef.unflatten([next(fixed) if f else next(trainable) for f in is_frozen])
    _, embedding = model.apply({"params": tree}, input_ids, attention_mask, train=True,
                               method=type(model).encode_texts, rngs={"dropout": rng})
    return jnp.sum(embedding.astype(jnp.float32))

  tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
  cost = jax.jit(jax.grad(loss)).lower(trainable, fixed, tokens, tokens, jax.random.key(0)).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def describe(choice: Choice, flops: tuple[float, float] | None, batch_size: int) -> str:
  """The lines the job prints about the chosen length."""
  where = (f"counts read from {choice.cache}" if choice.cached else
           f"counts measured and cached in {choice.cache}" if choice.cache else "counts measured")
  capped = f", capped by max_position_embeddings={choice.cap}" if choice.length == choice.cap else ""
  lines = [f"Text length {choice.length} tokens (model.text.max_length=\"auto\"): the smallest multiple of "
           f"{MULTIPLE} that holds {COVERAGE:.1%} of the training {choice.texts} whole{capped}; it truncates "
           f"{choice.truncated:.3%} of them (the longest has {choice.longest} tokens; {choice.units:,} "
           f"training units; {where})."]
  reference = min(REFERENCE_LENGTH, choice.cap)
  if flops is not None and choice.length < reference:
    at_reference, at_length = flops
    lines.append(f"Text tower per step of {batch_size}: {at_length / 1e9:,.3g} GFLOP at {choice.length} "
                 f"tokens vs {at_reference / 1e9:,.3g} GFLOP at the fixed {reference}, "
                 f"{1 - at_length / at_reference:.0%} saved (XLA's count of the lowered forward and backward).")
  return "\n".join(lines)
