"""The transfer job (`convirt_jax.transfer.run`): encoders x protocols x label fractions x seeds.

Order: every check that needs no compiled code (config, encoders, data set, task, labels, prompts,
batch divisibility), then the cheap protocols of every encoder (linear: frozen pooled features and
`linear_probe.linear_probe`; zero-shot for ConVIRT encoders; CheXpert 8x200 retrieval, `chexpert_retrieval`,
whose CSVs and images are read before anything compiles), then fine-tuning under one progress bar
over all of its runs. Results are rewritten after each protocol of each encoder; each protocol's result
per encoder is also kept in a small JSON (<workdir>/linear/<encoder>.json, zeroshot/..., and each
fine-tuning run's result.json), so a rerun skips what is finished.

The retrieval protocol alone (configs/transfer/chexpert_8x200.py) builds no classification set.

Every protocol trains on the same subsets: `transfer_finetune.training_subsets` is the linear probe's own
`linear_probe.sample_training_subset` on the training labels, per (fraction, seed).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from convirt_jax import parallel
from convirt_jax import storage
from convirt_jax import transfer_config
from convirt_jax.jobs import transfer_encoders, transfer_finetune
from convirt_jax.api import ConVIRT
from convirt_jax.data import datasets, registry
from convirt_jax.errors import ConfigError, DataError
from convirt_jax.evaluate import chexpert_retrieval
from convirt_jax.evaluate import linear_probe, plots, zeroshot
from convirt_jax.evaluate import protocols as protocols_lib
from convirt_jax.evaluate import results as results_lib
from convirt_jax.models import registry as image_registry
from convirt_jax.models.classifier import ImageClassifier
from convirt_jax.models.convirt import compute_dtype
from convirt_jax.training import metric_logging
from convirt_jax.training import workdir_lock

CURVES_PNG = "transfer_curves.png"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Transfers every encoder with every protocol; writes and returns the results ({} when preempted)."""
  start = time.monotonic()
  transfer_config.validate_transfer(config)
  workdir = storage.check(workdir, "--workdir")
  storage.check(config.data.tfds_dir, "--config.data.tfds_dir")
  parallel.initialize(config.distributed)  # done already by the command line (cli.run_job)
  protocols = tuple(config.protocols)
  encoders = transfer_encoders.parse_encoders(config)
  if "zeroshot" in protocols and not any(e.is_convirt for e in encoders):
    raise ConfigError(f"config.protocols has 'zeroshot', which needs a ConVIRT encoder (its text tower); "
                      f"config.encoders={tuple(config.encoders)} has none")
  arch = transfer_encoders.resolve_architecture(encoders, config)
  config = _with_architecture(config, arch)
  _check_declared_labels(config, protocols)
  mesh = parallel.make_mesh()
  if "finetune" in protocols:
    try:
      parallel.local_batch_size(int(config.finetune.batch_size), mesh)
    except ConfigError as e:
      raise ConfigError(f"config.finetune.batch_size: {e}") from None
  # CheXpert 8x200 retrieval: its CSVs and every image they list are read (and checked) before any compile.
  retrieval_set = chexpert_retrieval.open_retrieval_set(config) if "retrieval" in protocols else None
  storage.makedirs(workdir)
  # One job per workdir: a second one would interleave checkpoints and results with this one's.
  with workdir_lock.WorkdirLock(workdir, enabled=parallel.is_main_process()):
    if not set(protocols) - {"retrieval"}:  # retrieval alone: no classification set to build
      return _retrieval_only(config, workdir, mesh, encoders, arch, retrieval_set, start)
    return _transfer(config, workdir, mesh, protocols, encoders, arch, start, retrieval_set)


def _transfer(config, workdir, mesh, protocols, encoders, arch, start, retrieval_set=None) -> dict[str, Any]:
  dataset = datasets.load_dataset(config, config.data.tfds_dir or os.path.join(workdir, "tfds"),
                                  is_builder_process=parallel.is_main_process())
  for split in ("train", "test"):
    if split not in dataset.sources:
      raise DataError(f"the {config.data.name} data set has no {split} split")
  label_names = list(dataset.label_names)
  train_labels = _split_labels(dataset.sources["train"])
  task = resolve_task(config.data.task, dataset.task, label_names, train_labels)
  if "zeroshot" in protocols:  # checked now; the protocol resolves them again when it runs
    zeroshot.resolve_prompts(config.zeroshot.prompts.to_dict(), label_names, task)
  subsets = transfer_finetune.training_subsets(train_labels, label_names, config.fractions,
                                               config.seeds, config.min_train)
  if "finetune" in protocols:
    transfer_finetune.check_recipe(subsets, config.finetune, arch.image)
  if parallel.is_main_process():
    storage.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  model = classifier_model(config, arch, len(label_names))
  job = _Job(config, workdir, mesh, dataset, task, label_names, train_labels, subsets, model, arch, encoders,
             retrieval_set)
  for encoder in encoders:  # read every encoder now: a bad weights file stops the job before any compile
    job.encoder_variables(encoder)
  title = registry.title(config.data.name)
  job.results = {
      "dataset": title, "task": task, "metric": "accuracy" if task == "multiclass" else "auc",
      "label_names": label_names,
      "run": {"workdir": workdir, "data": dataset.info.full_name, "task": task,
              "splits": {s: len(v) for s, v in dataset.sources.items()},
              "architecture": arch.describe(),
              "encoders": {e.name: transfer_encoders.describe(e, config) for e in encoders},
              "protocols": list(protocols), "fractions": list(config.fractions), "seeds": list(config.seeds),
              "finetune": {**{k: config.finetune[k] for k in ("lr", "weight_decay", "batch_size", "epochs",
                                                              "min_steps", "max_steps", "eval_every_steps",
                                                              "patience")},
                           **transfer_finetune.recipe_options(config.finetune)},
              "devices": jax.device_count(), "processes": jax.process_count()},
      "methods": {e.name: {} for e in encoders}}
  metric_logging.announce(f"Transfer to {title} ({task}, {len(label_names)} labels; train {len(train_labels)} / "
            f"validation {len(dataset.sources.get('validation', ()))} / test {len(dataset.sources['test'])}) "
            f"of {', '.join(e.name for e in encoders)} ({arch.describe()}): {', '.join(protocols)}")
  if not _run_protocols(job, protocols):
    metric_logging.announce("Preempted: fine-tuning stopped at a checkpoint; run the same command to resume.")
    return {}
  job.write(plot=True)
  metric_logging.announce(f"\n{results_lib.transfer_markdown(results_lib.to_json_ready(job.results))}\n"
            f"Results, metrics and {CURVES_PNG} are in {workdir} ({time.monotonic() - start:.0f} s)")
  return job.results


def _retrieval_only(config, workdir, mesh, encoders, arch, retrieval_set, start) -> dict[str, Any]:
  """The retrieval protocol alone (configs/transfer/chexpert_8x200.py): no classification set is built."""
  model = classifier_model(config, arch, 1)  # only its pooled features are used
  job = _Job(config, workdir, mesh, None, None, [], None, {}, model, arch, encoders, retrieval_set)
  for encoder in encoders:  # read every encoder now: a bad weights file stops the job before any compile
    job.encoder_variables(encoder)
  if parallel.is_main_process():
    storage.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  job.results = {
      "dataset": chexpert_retrieval.TITLE,
      "run": {"workdir": workdir, "data": config.data.dir, "retrieval": config.retrieval.dir,
              **retrieval_set.describe(), "architecture": arch.describe(),
              "encoders": {e.name: transfer_encoders.describe(e, config) for e in encoders},
              "protocols": ["retrieval"], "devices": jax.device_count(), "processes": jax.process_count()},
      "methods": {e.name: {} for e in encoders}}
  sizes = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in retrieval_set.describe().items())
  metric_logging.announce(f"{chexpert_retrieval.TITLE} ({sizes}) of {', '.join(e.name for e in encoders)} "
            f"({arch.describe()})")
  _run_protocols(job, ("retrieval",))
  metric_logging.announce(f"\n{results_lib.transfer_markdown(results_lib.to_json_ready(job.results))}\n"
            f"Results are in {workdir} ({time.monotonic() - start:.0f} s)")
  return job.results


def _run_protocols(job: "_Job", names: tuple[str, ...]) -> bool:
  """The protocols named in config.protocols, through their modules (`evaluate/protocols.py`), in
  registration order: for each encoder those with `run(job, encoder)`, the results written after each;
  then those with `run_all(job)` (fine-tuning). False when preempted."""
  chosen = [(p.name, p.load()) for p in protocols_lib.of("transfer") if p.name in names]
  for encoder in job.encoders:
    for name, module in chosen:
      if hasattr(module, "run"):
        result = module.run(job, encoder)
        if result is not None:  # None: the protocol does not apply to this encoder
          job.results["methods"][encoder.name][name] = result
          job.write()
  return all(module.run_all(job) for _, module in chosen if not hasattr(module, "run"))


def _check_declared_labels(config: ml_collections.ConfigDict, protocols: tuple[str, ...]) -> None:
  """The checks of the labels that the builder declares from the config alone (a CSV's label columns,
  a named set's own labels), before anything is built; the built set is checked again (resolve_task,
  zeroshot.resolve_prompts), for labels that come from the data."""
  if not set(protocols) - {"retrieval"}:
    return
  declared = list(datasets.declared_label_names(config))
  if declared or (config.data.name == "csv" and not config.data.label_columns):
    _check_label_count(config.data.task, declared)
  if declared and "zeroshot" in protocols:
    zeroshot.check_prompt_labels(config.zeroshot.prompts.to_dict(), declared)


def _check_label_count(requested: str, label_names: list[str]) -> None:
  if not label_names:
    raise DataError("the data set has no labels to transfer to (a CSV needs config.data.label_columns)")
  if requested == "binary" and len(label_names) != 1:
    raise ConfigError(f"config.data.task='binary' needs exactly one label; the data set has "
                      f"{len(label_names)}: {label_names}")


def resolve_task(requested: str, dataset_task: str, label_names: list[str], train_labels: np.ndarray) -> str:
  """config.data.task -> "binary" | "multilabel" | "multiclass"; "auto" is the data set's own (one label:
  binary). Raises ConfigError / DataError when the labels cannot be that task."""
  _check_label_count(requested, label_names)
  if requested == "auto":
    if dataset_task == "multiclass":
      return "multiclass"
    return "binary" if len(label_names) == 1 else "multilabel"
  if requested == "multiclass":
    counts = linear_probe.binarize_labels(train_labels, label_names, "train labels").sum(axis=1)
    if (counts != 1).any():
      row = int(np.argmax(counts != 1))
      raise DataError(f"config.data.task='multiclass' but training row {row} has {counts[row]} positive "
                      "labels (a multiclass row has exactly one)")
  return requested


def classifier_model(config: ml_collections.ConfigDict, arch: transfer_encoders.Architecture,
                     num_outputs: int) -> ImageClassifier:
  """The classifier every protocol runs (its encoder synchronises BatchNorm over the data axis)."""
  encoder, features_dim = image_registry.build_image_encoder(
      arch.image, axis_name=parallel.DATA_AXIS, dtype=compute_dtype(config.finetune.precision),
      batch_norm=config.model.image.batch_norm)
  return ImageClassifier(encoder=encoder, features_dim=features_dim, num_outputs=num_outputs)


def _with_architecture(config: ml_collections.ConfigDict,
                       arch: transfer_encoders.Architecture) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.image.update(arch.image.as_dict())
  config.data.image_size = arch.image_size
  return config


def _split_labels(source) -> np.ndarray:
  return np.stack([np.asarray(source[i]["labels"], np.float32) for i in range(len(source))])


class _Job:
  """The state shared by the protocols of one run of the job: what their `run(job, encoder)` /
  `run_all(job)` read (`evaluate/protocols.py`)."""

  def __init__(self, config, workdir, mesh, dataset, task, label_names, train_labels, subsets, model, arch,
               encoders, retrieval_set=None):
    self.config, self.workdir, self.mesh, self.dataset = config, workdir, mesh, dataset
    self.task, self.label_names, self.train_labels = task, label_names, train_labels
    self.subsets, self.model, self.arch, self.encoders = subsets, model, arch, encoders
    self.retrieval_set = retrieval_set  # the CheXpert 8x200 sets, opened before anything compiled
    self.results: dict[str, Any] = {}
    self._variables: dict[str, dict[str, Any]] = {}
    self._convirt: dict[str, ConVIRT] = {}

  def identity(self, encoder: transfer_encoders.Encoder) -> dict[str, Any]:
    """What an encoder's results on the data set depend on besides the protocol's own settings."""
    return {"data": self.dataset.info.full_name, **self.encoder_identity(encoder),
            "fractions": list(self.config.fractions), "seeds": list(self.config.seeds),
            "min_train": self.config.min_train, "task": self.task}

  def encoder_identity(self, encoder: transfer_encoders.Encoder) -> dict[str, Any]:
    """Which weights and architecture an encoder is (a protocol without the data set, 8x200, keys on it)."""
    return {"encoder": encoder.spec, "encoder_step": encoder.step,
            "imagenet_weights": self.config.imagenet_weights if encoder.kind == "imagenet" else "",
            "random_init_seed": self.config.random_init_seed if encoder.kind == "random" else None,
            "architecture": self.arch.as_dict()}

  def convirt(self, encoder: transfer_encoders.Encoder) -> ConVIRT:
    """The whole pretrained model of a ConVIRT encoder (both towers and heads; loaded once per job)."""
    if encoder.spec not in self._convirt:
      self._convirt[encoder.spec] = ConVIRT.load(encoder.path, encoder.step)
    return self._convirt[encoder.spec]

  def encoder_variables(self, encoder: transfer_encoders.Encoder) -> dict[str, Any]:
    """The image encoder's {"params", "batch_stats"} of an encoder (read once per job)."""
    if encoder.spec not in self._variables:
      self._variables[encoder.spec] = transfer_encoders.load_encoder(encoder, self.arch, self.config)
    return self._variables[encoder.spec]

  def cached(self, protocol: str, encoder, settings: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """A protocol's result for an encoder: read back from <workdir>/<protocol>/<encoder>.json when it was
    computed with these settings, else computed and kept there."""
    path = os.path.join(self.workdir, protocol, f"{encoder.slug}.json")
    settings = metric_logging.jsonable(settings)
    if storage.exists(path):
      saved = storage.read_json(path)
      if saved.get("settings") == settings:
        return saved["result"]
    result = metric_logging.jsonable(results_lib.to_json_ready(compute()))
    if parallel.is_main_process():
      storage.write_json(path, {"settings": settings, "result": result})
    return result

  def write(self, plot: bool = False) -> None:
    if not parallel.is_main_process():
      return
    results_lib.write_transfer_results(self.workdir, self.results)
    methods = self.results["methods"]
    plotted = [p.name for p in protocols_lib.of("transfer") if p.result in ("fractions", "scores")]
    if plot and any(p in e for e in methods.values() for p in plotted):
      plots.plot_transfer_curves(self.results, os.path.join(self.workdir, CURVES_PNG))
