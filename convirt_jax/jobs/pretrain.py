"""The pretraining job: data, model, resume, the training loop, checkpoints, then the evaluations.

  python -m convirt_jax.main --config=configs/synthetic.py --workdir=runs/synthetic

`main.py` calls `run`. Everything reusable (state, optimizer, steps, checkpoints, logging) is in
`convirt_jax.training`; the evaluations are the evaluators named in `config.evals`.
"""
import copy
import functools
import os
from typing import Any

import flax
import jax
import ml_collections
import numpy as np

from convirt_jax import config as config_lib
from convirt_jax import parallel
from convirt_jax import storage
from convirt_jax import text_length as text_length_lib
from convirt_jax.data import datasets, pipeline
from convirt_jax.errors import ConfigError, DataError, UserError
from convirt_jax.evaluate import downstream, plots, results as results_lib
from convirt_jax.evaluate import features as features_lib
from convirt_jax.hub import resolve_hf_dir
from convirt_jax.interop.hf_bert import load_hf_bert
from convirt_jax.models import convirt, registry
from convirt_jax.models.bert import BertConfig
from convirt_jax.tokenizer import Tokenizer
from convirt_jax.training import checkpoints, engine, metric_logging, workdir_lock
from convirt_jax.training import optimizer as optimizer_lib
from convirt_jax.training import preemption
from convirt_jax.training import state as state_lib
from convirt_jax.training import steps as steps_lib

LOSS_CURVE_PNG = "loss_curve.png"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pretrains (or resumes), evaluates and writes everything into `workdir`; returns the results."""
  config_lib.validate(config)
  config = copy.deepcopy(config)  # model.text.max_length="auto" is resolved in the job's own copy
  workdir = storage.check(workdir, "--workdir")
  storage.check(config.data.tfds_dir, "--config.data.tfds_dir")
  parallel.initialize(config.distributed)
  mesh = parallel.make_mesh()
  local_batch = parallel.local_batch_size(config.train.batch_size, mesh)  # ConfigError if indivisible
  resume_step = _resume_step(config, workdir)
  data_dir = config.data.tfds_dir or os.path.join(workdir, "tfds")
  if parallel.is_main_process():
    datasets.check_raw_data(config, data_dir)  # names missing files before any weights are fetched
  # The weights the config names are found (or fetched) before the long data build, not after it.
  text_dir = resolve_hf_dir(config.model.text.init_from) if config.model.text.init_from else ""
  pretrained_image = _pretrained_image(config)
  created = not storage.exists(workdir)
  storage.makedirs(workdir)
  # One job per workdir: WorkdirBusy names the job holding it; the OS drops the lock when a job ends,
  # kill -9 included. Process 0 holds it for all the processes of a job.
  with workdir_lock.WorkdirLock(workdir, enabled=parallel.is_main_process()):
    return _run_locked(config, workdir, created, data_dir, mesh, local_batch, resume_step, text_dir,
                       pretrained_image)


def _run_locked(config, workdir, created, data_dir, mesh, local_batch, resume_step, text_dir,
                pretrained_image) -> dict[str, Any]:
  try:
    dataset = datasets.load_dataset(config, data_dir, is_builder_process=parallel.is_main_process())
    if len(dataset.sources.get("train", ())) == 0:
      raise DataError(f"the {config.data.name} data set has no train split")
    if "linear_probe" in config.evals and dataset.label_names:
      # Known now, not after hours of training: the evaluation will skip these (and say so again).
      for label, reason in datasets.unscorable_labels(dataset).items():
        metric_logging.announce(f"note: the linear probe cannot score {label!r}: {reason}")
  except UserError:
    if created and parallel.is_main_process():
      storage.rmtree(workdir)  # a failed first command leaves no empty workdir
    raise
  # Opened once the config and data are known good: its background threads must not outlive an error.
  manager = checkpoints.make_manager(workdir, keep=config.checkpoint.keep,
                                     best_metric=config.checkpoint.keep_best_metric)
  try:
    return _train_and_evaluate(config, workdir, mesh, local_batch, manager, dataset, resume_step,
                               text_dir, pretrained_image)
  finally:
    manager.close()  # waits for a save in flight, whatever stopped the run


def _resume_step(config: ml_collections.ConfigDict, workdir: str) -> int:
  """The step a run in `workdir` resumes from (0: a fresh run), after checking the configs agree."""
  # Process 0's answer for all: the others may look only after process 0 has created the directory.
  if not parallel.from_process_0(storage.path(checkpoints.checkpoint_dir(workdir)).is_dir()):
    return 0
  reader = checkpoints.make_manager(workdir, read_only=True)
  try:
    step, meta = checkpoints.newest_meta(reader)  # CheckpointError if there are steps but none reads
  finally:
    reader.close()
  if step:
    saved_length = meta["config"].get("model", {}).get("text", {}).get("max_length")
    if config.model.text.max_length == config_lib.AUTO and isinstance(saved_length, int):
      # "auto" was resolved when the run started and recorded with its config: a resumed run keeps it.
      _set_text_length(config, saved_length)
      metric_logging.announce(f"Text length {saved_length} tokens (model.text.max_length=\"auto\"): as "
                              f"chosen when the run in {workdir} started")
    _check_resumable(meta["config"], config, workdir)
  return step or 0


def _set_text_length(config: ml_collections.ConfigDict, length: int) -> None:
  """Records the length "auto" resolved to in the job's config (so in config.json and the checkpoints)."""
  with config.model.text.ignore_type():
    config.model.text.max_length = int(length)


def _train_and_evaluate(config, workdir, mesh, local_batch, manager, dataset, resume_step: int,
                        text_dir: str, pretrained_image) -> dict[str, Any]:
  is_main = parallel.is_main_process()
  study_sizes = datasets.study_sizes(dataset, "train") if config.data.unit == "study" else None
  tokenizer, text_config, text_params, length_choice = setup_text(
      config, dataset, workdir, text_dir, resuming=resume_step > 0, study_sizes=study_sizes)
  pretrained = _pretrained_variables(pretrained_image, text_params)
  model = convirt.build_model(config, text_config, axis_name=parallel.DATA_AXIS)
  steps_total = total_steps(config, len(dataset.sources["train"]) if study_sizes is None else len(study_sizes))
  image_size, text_length = config.data.image_size, config.model.text.max_length
  shapes = state_lib.param_shapes(model, image_size, text_length)
  optimizer = optimizer_lib.make_optimizer(config, shapes, steps_total)
  metric_logging.announce(optimizer_lib.describe_parameters(shapes, config.model.text.frozen_layers))
  if length_choice is not None and is_main:
    metric_logging.announce(text_length_lib.describe(
        length_choice, _text_flops(config, model, shapes, length_choice), config.train.batch_size))

  state = state_lib.init_train_state(model, optimizer, jax.random.key(config.train.seed), image_size,
                                     text_length, params_override=pretrained)
  state = parallel.replicate(state, mesh)
  train_iter = iter(pipeline.train_loader(
      dataset.sources["train"], tokenizer, config, local_batch_size=local_batch, seed=config.train.seed,
      shard_index=jax.process_index(), shard_count=jax.process_count(), study_sizes=study_sizes))
  if resume_step:
    # The newest step that reads back: an unreadable one is named, skipped and set aside.
    resume_step, state, _ = checkpoints.restore_newest(manager, checkpoints.abstract_like(state),
                                                       data_iterator=train_iter, announce=metric_logging.announce)
    metric_logging.announce(f"Resuming from step {resume_step} of {steps_total} in {workdir}")
  elif is_main:
    storage.write_json(os.path.join(workdir, "config.json"), config.to_dict())

  train_step = steps_lib.make_train_step(model, optimizer, config, mesh)
  eval_step = steps_lib.make_eval_step(model, config, mesh)
  logger = metric_logging.MetricLogger(workdir, enabled=is_main, resume_step=resume_step)
  preempted = preemption.SigtermFlag()
  bar = metric_logging.Progress(steps_total, resume_step, is_main, every_seconds=config.log.every_seconds,
                                batch_size=config.train.batch_size)
  stopping = _stopping(manager, config, resume_step)  # a run that stopped early stays stopped when rerun
  if stopping.stopped:
    metric_logging.announce(f"The run in {workdir} stopped early at step {resume_step} (best at step "
                            f"{stopping.best_step}).")

  validate = functools.partial(_validate, eval_step, dataset.sources.get("validation"), tokenizer, config,
                               mesh)
  try:
    state, step, stopped_by_signal = engine.train(
        state, resume_step, train_step, train_iter,
        schedule=engine.Schedule(steps_total, config.train.log_every_steps, config.eval.every_steps,
                                 config.checkpoint.every_steps),
        stopping=stopping, manager=manager, mesh=mesh, inputs=steps_lib.model_inputs, validate=validate,
        best_metric=config.checkpoint.keep_best_metric, host_copies=False,
        checkpoint_meta=lambda step: {"config": config.to_dict(), "step": step}, prefix="train/",
        diverged=_diverged, logger=logger, bar=bar, preempted=preempted)
    if stopping.stopped and step > resume_step:
      metric_logging.announce(f"Stopped early at step {step}: {config.checkpoint.keep_best_metric} has not "
                              f"improved for {config.train.stop_patience} evaluations (best at step "
                              f"{stopping.best_step}).")
    if stopped_by_signal:
      metric_logging.announce(f"Preempted: saved step {step}; run the same command to resume.")
      return {}
  finally:
    bar.close()
    preempted.restore()
    logger.flush()
  if is_main:
    plots.plot_loss_curve(os.path.join(workdir, metric_logging.METRICS_FILE),
                          os.path.join(workdir, LOSS_CURVE_PNG))
  manager.wait_until_finished()
  evaluated_step = checkpoints.resolve_step(manager, "best")
  metric_logging.announce(f"Evaluating the best checkpoint by {config.checkpoint.keep_best_metric} (step "
            f"{evaluated_step}): {', '.join(config.evals)}...")
  results = evaluate_downstream(config, workdir, model, pretrained, evaluated_step, dataset, tokenizer,
                                mesh, steps_total)
  logger.close()
  metric_logging.announce(f"\n{results_lib.results_markdown(results)}\nResults, metrics and plots are in {workdir}")
  return results



def _pretrained_variables(pretrained_image, text_params) -> dict[str, Any]:
  """{"params", "batch_stats"} the run starts from where not random: the torchvision image encoder and
  the Hugging Face BERT (also the evaluation's "ImageNet Init." baseline)."""
  pretrained = {"params": {}, "batch_stats": {}}
  if pretrained_image is not None:
    pretrained["params"]["image"] = pretrained_image["params"]
    if pretrained_image["batch_stats"]:  # an encoder without BatchNorm (a ViT) has none
      pretrained["batch_stats"]["image"] = pretrained_image["batch_stats"]
  if text_params is not None:
    pretrained["params"]["text"] = text_params
  return pretrained


def _validate(eval_step, source, tokenizer, config, mesh, state) -> tuple[Any, engine.Validation]:
  """The engine's validation: the loss terms on the validation split (none without one), and the plateau
  schedule's step on its loss."""
  if source is None:
    return state, engine.Validation({}, None, {})
  metrics = validation_loss(eval_step, state, source, tokenizer, config, mesh)
  if config.optimizer.schedule == "plateau":
    plateau, scale = optimizer_lib.reduce_on_plateau(parallel.fetch(state["plateau"]), metrics["val/loss"],
                                                     config)
    state["plateau"] = parallel.replicate(plateau, mesh)
    state["opt_state"] = optimizer_lib.set_learning_rate(state["opt_state"], config.optimizer.lr * scale)
  return state, engine.Validation(metrics, metrics.get(config.checkpoint.keep_best_metric),
                                  {"val_loss": f"{metrics['val/loss']:.4f}"})


def _stopping(manager, config: ml_collections.ConfigDict, step: int) -> engine.Stopping:
  """The stopping rule's state at `step` from the checkpoints: the best validation metric saved so far
  and the evaluations since it."""
  metric, patience = config.checkpoint.keep_best_metric, int(config.train.stop_patience)
  best_step = checkpoints.best_step(manager, metric)
  if best_step is None:
    return engine.Stopping(patience)
  return engine.Stopping(patience, best=float(manager.metrics(best_step)[metric]), best_step=best_step,
                         bad_evals=(step - best_step) // config.eval.every_steps,
                         stopped=_stop_early(config, step, best_step))


def _stop_early(config: ml_collections.ConfigDict, step: int, best_step: int | None) -> bool:
  """The stopping rule: train.stop_patience evaluations since the best one. Counted from steps, so a
  resumed run decides exactly as the uninterrupted one."""
  patience = config.train.stop_patience
  return bool(patience and best_step is not None
              and (step - best_step) // config.eval.every_steps >= patience)


def total_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
  if config.train.steps > 0:
    return int(config.train.steps)
  return max(1, int(config.train.epochs * num_train // config.train.batch_size))


def setup_text(config: ml_collections.ConfigDict, dataset, workdir: str, text_dir: str, resuming: bool,
               study_sizes: np.ndarray | None = None):
  """The tokenizer, BertConfig, (when initialised from a checkpoint) BERT params of this run, and the
  `text_length.Choice` that model.text.max_length="auto" resolved to (None for a fixed length).

  The tokenizer and BertConfig are written into the workdir, so the run can be loaded (ConVIRT.load,
  export) without the original checkpoint directory. A resumed run keeps the tokenizer it was trained
  with (and the text length: `_resume_step` has replaced "auto" by it). Every process builds the same
  tokenizer itself (a corpus vocabulary is deterministic) and resolves "auto" itself (from the same
  cached or measured counts; process 0 writes the cache), so no process waits for another.
  """
  text = config.model.text
  auto = text.max_length == config_lib.AUTO
  length = 2 if auto else text.max_length  # "auto": set below, once the training texts are counted
  tokenizer_dir = os.path.join(workdir, checkpoints.TOKENIZER_DIR)
  text_config_path = os.path.join(workdir, checkpoints.TEXT_CONFIG_FILE)
  train_texts = None  # the train split without decoded images, opened if its texts are read
  if resuming:
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir, max_length=length)
  elif text.tokenizer == "corpus":
    train_texts = datasets.text_source(dataset, "train")
    texts = [pipeline.whole_text(train_texts[i]) for i in range(len(train_texts))]
    tokenizer = Tokenizer.from_corpus(texts, text.vocab_size, max_length=length)
  else:
    tokenizer = Tokenizer.from_pretrained(resolve_hf_dir(text.tokenizer) if text.tokenizer else text_dir,
                                          max_length=length)
  text_params = None
  if text_dir:
    text_config, text_params = load_hf_bert(text_dir)
  else:
    text_config = BertConfig.from_dict({**text.config.to_dict(), "vocab_size": tokenizer.vocab_size})
  if text_config.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the BERT's vocab_size is "
                      f"{text_config.vocab_size} (config.model.text.tokenizer / init_from)")
  choice = None
  if auto:
    choice = text_length_lib.choose(
        train_texts if train_texts is not None else datasets.text_source(dataset, "train"), tokenizer,
        cap=text_config.max_position_embeddings, whole_report=bool(config.data.whole_report),
        study_sizes=study_sizes, dataset_dir=dataset.info.data_dir,
        write_cache=parallel.is_main_process())
    _set_text_length(config, choice.length)
    tokenizer = tokenizer.with_max_length(choice.length)
  if text_config.max_position_embeddings < text.max_length:
    raise ConfigError(f"config.model.text.max_length={text.max_length} exceeds the BERT's "
                      f"max_position_embeddings={text_config.max_position_embeddings}")
  if parallel.is_main_process() and not resuming:
    tokenizer.save(tokenizer_dir)
  if parallel.is_main_process():
    storage.write_json(text_config_path, text_config.to_dict())
  return tokenizer, text_config, text_params, choice


def _text_flops(config: ml_collections.ConfigDict, model, shapes, choice) -> tuple[float, float] | None:
  """(FLOPs at the old fixed length, at the chosen one) of a step's text tower, or None."""
  reference = min(text_length_lib.REFERENCE_LENGTH, choice.cap)
  if choice.length >= reference:
    return None
  frozen = optimizer_lib.frozen_mask(shapes, config.model.text.frozen_layers)
  counts = [text_length_lib.text_tower_flops(model, shapes, frozen, config.train.batch_size, n)
            for n in (reference, choice.length)]
  return None if None in counts else (counts[0], counts[1])


def _pretrained_image(config: ml_collections.ConfigDict):
  """{"params", "batch_stats"} of model.image.init_from (torchvision weights), or None."""
  image = config.model.image
  if not image.init_from:
    return None
  return registry.load_torchvision(registry.arch_from_config(image), image.init_from,
                                  int(config.data.image_size))


def validation_loss(eval_step, state, source, tokenizer, config, mesh) -> dict[str, float]:
  """Mean over the validation batches of the contrastive loss terms (whole reports, no augmentation)."""
  totals, batches = {}, 0
  for batch in features_lib.Reading.of(config).batches(source, tokenizer, mesh):
    inputs = dict(steps_lib.model_inputs(batch), mask=batch["mask"])
    metrics = parallel.fetch(eval_step(state, parallel.shard_batch(inputs, mesh)))
    for key, value in metrics.items():
      totals[key] = totals.get(key, 0.0) + float(value)
    batches += 1
  return {f"val/{key}": value / batches for key, value in totals.items()}


def evaluate_downstream(config, workdir, model, pretrained, step, dataset, tokenizer, mesh,
                        steps_total) -> dict[str, Any]:
  """The evaluators of config.evals for ConVIRT (the checkpoint at `step`) and the baselines.

  `model` is the training model: in inference mode its BatchNorm uses running statistics and never
  touches the mesh axis, and reusing it reuses its compiled initialiser. `pretrained` holds the
  torchvision / Hugging Face weights the run started from (the "ImageNet Init." baseline).
  """
  dummy = state_lib.dummy_inputs(config.data.image_size, config.model.text.max_length)
  weights = {"ConVIRT": checkpoints.restore_variables(workdir, step)}
  if config.model.image.init_from:
    weights["ImageNet Init."] = state_lib.init_variables(
        model, state_lib.init_rng(config.train.seed), *dummy, params_override=pretrained)
  if config.eval.random_init_baseline:
    # Another seed than training's, so the baseline is not the trained model's own starting point.
    weights["Random Init."] = state_lib.init_variables(model, state_lib.init_rng(config.train.seed + 1),
                                                      *dummy)
  run_info = {"config": config.data.name, "workdir": workdir, "steps": steps_total,
              "evaluated_step": int(step), "global_batch_size": config.train.batch_size,
              "devices": jax.device_count(), "processes": jax.process_count()}
  return downstream.run_downstream(config, workdir, model, weights, dataset, tokenizer, mesh, run_info)


def _diverged(metrics: dict[str, float]) -> str:
  return (f"the training loss became {float(metrics['loss'])} (grad norm {float(metrics['grad_norm'])}); "
          "stopped without saving it, the last good checkpoint is kept. Lower optimizer.lr or set "
          "optimizer.grad_clip_norm, then run the same command to resume from that checkpoint.")


# What a checkpoint's meaning depends on: resuming with another value would restore nonsense.
_RESUME_KEYS = ("model", "loss", "data.name", "data.dir", "data.csv", "data.unit", "data.frontal_only", "data.image_size",
                "data.stored_size", "data.label_columns", "train.batch_size", "train.seed")


def _check_resumable(saved: dict[str, Any], config: ml_collections.ConfigDict, workdir: str) -> None:
  """Names the first key whose value differs from the run saved in `workdir`."""
  flatten = lambda tree: flax.traverse_util.flatten_dict(tree, sep=".")
  old, new = flatten(saved), flatten(config.to_dict())
  for key in sorted(new):
    if key.startswith(_RESUME_KEYS) and metric_logging.jsonable(old.get(key)) != metric_logging.jsonable(new[key]):
      raise ConfigError(f"{workdir} holds a run with config.{key}={old.get(key)!r}, this config has "
                        f"{new[key]!r}: use another --workdir, or the same config to resume")
