"""The evaluation protocols the jobs can name: one registration line each, read without importing the
modules that compute them (so configs and results are checked at once).

A protocol is named by a job's config (pretraining: the keys of `config.evals`, run on the best
checkpoint by `evaluate/downstream.py`; the transfer job: `config.protocols`), and its result is kept in
results.json under that name, per method. Its registration declares the job, its title in results.md,
the shape of its result (which `results.py` validates and renders as the protocol's block of
results.md) and the module that computes it, with one entry function:

  pretraining  evaluate(embedder, dataset, tokenizer, settings, *, seed, plot_dir) -> result, or None
               when the data set cannot support it (`settings`: its config.evals entry; the seed of
               anything it samples: train.seed)
  transfer     run(job, encoder) -> result, or None when it does not apply to that encoder; a protocol
               that trains may instead have run_all(job) -> bool (False: preempted), which sets
               job.results[...] itself. `job` is the transfer job's state (`jobs/transfer.py`: config,
               dataset, labels, subsets, the classifier model, encoder weights, results, cache).

Result shapes (`result=`):
  probe      pretraining's linear probe: {data set title: {"metric", "fractions": [rows]}}
  fractions  the paper's Table 1 over label fractions: {"fractions": [{"fraction", "mean", "std",
             "per_label", "n_train"}, ...], "excluded_labels": {label: reason}}
  scores     one score per method: {"main", "per_label": {label: score}}
  retrieval  Prec@k per direction (Table 2): {"image_to_image" | "text_to_image": {"ks", "prec@k",
             "chance", ...}}

A new protocol is its module plus one `register` line below (a new result shape is also a renderer in
`results.py`); `tests/test_registry.py` registers one at run time and runs it through the transfer job.
"""
import dataclasses
import importlib
from types import ModuleType

JOBS = ("pretrain", "transfer")
RESULTS = ("probe", "fractions", "scores", "retrieval")


@dataclasses.dataclass(frozen=True)
class Protocol:
  name: str     # the config's name for it and its key in results.json
  job: str      # "pretrain" | "transfer"
  title: str    # its heading in results.md
  result: str   # the shape of its result (RESULTS)
  module: str   # the module that computes it, imported on use
  table: str = ""  # what its table is called in results.md, where not the data set's name

  def load(self) -> ModuleType:
    return importlib.import_module(self.module)


_ENTRIES: dict[tuple[str, str], Protocol] = {}


def register(name: str, job: str, title: str, result: str, module: str, table: str = "") -> Protocol:
  """Adds a protocol of a job; the (job, name) pair must be new."""
  if job not in JOBS or result not in RESULTS:
    raise ValueError(f"protocol {name!r}: job must be one of {JOBS} and result one of {RESULTS}")
  if (job, name) in _ENTRIES:
    raise ValueError(f"a {job} protocol named {name!r} is registered already ({_ENTRIES[job, name]})")
  _ENTRIES[job, name] = Protocol(name, job, title, result, module, table)
  return _ENTRIES[job, name]


def unregister(job: str, name: str) -> None:
  """Removes a protocol (a test's temporary one)."""
  del _ENTRIES[job, name]


def of(job: str) -> tuple[Protocol, ...]:
  """The protocols of a job, in registration order (the order of results.md)."""
  return tuple(p for p in _ENTRIES.values() if p.job == job)


def names(job: str) -> tuple[str, ...]:
  return tuple(p.name for p in of(job))


def get(job: str, name: str) -> Protocol:
  if (job, name) not in _ENTRIES:
    raise ValueError(f"no {job} protocol named {name!r} (there are {names(job)})")
  return _ENTRIES[job, name]


# Pretraining's evaluations of the best checkpoint (config.evals).
register("linear_probe", "pretrain", "Linear classification", "probe", "convirt_jax.evaluate.linear_probe")
register("retrieval", "pretrain", "Retrieval", "retrieval", "convirt_jax.evaluate.retrieval")
# The transfer job's protocols (config.protocols), in the order they run and are shown.
register("linear", "transfer", "Linear classification (frozen encoder)", "fractions",
         "convirt_jax.evaluate.linear_probe")
register("finetune", "transfer", "Fine-tuning", "fractions", "convirt_jax.jobs.transfer_finetune")
register("zeroshot", "transfer", "Zero-shot (prompt embeddings; not a protocol of the paper)", "scores",
         "convirt_jax.evaluate.zeroshot")
register("retrieval", "transfer", "Retrieval", "retrieval", "convirt_jax.evaluate.chexpert_retrieval",
         table="CheXpert 8×200, the paper's Table 2")
