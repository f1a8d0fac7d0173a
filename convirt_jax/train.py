"""Train state, optimizer, the data-parallel train/eval steps of ConVIRT, and the training job `run`.

The state is a plain pytree:
  {"step", "params": {"image", "text", "image_head", "text_head"}, "batch_stats", "opt_state", "rng"}.

A step runs the forward pass and the loss per device under `jax.shard_map` over the mesh axis "data":
BatchNorm statistics are averaged over the axis (SyncBatchNorm) and the loss scores every row against
the embeddings of the whole global batch. Under shard_map's `check_vma`, the gradient of a replicated
parameter leaves the map already summed over the axis, so there is no explicit gradient psum here.

`run` is the job around them: data, resume, the loop with logging, validation, checkpoints and the
SIGTERM/NaN stops, then the downstream evaluation.
"""
import functools
import json
import os
import re
import signal
import threading
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from convirt_jax import checkpoints, losses, metric_logging, parallel
from convirt_jax import config as config_lib
from convirt_jax.data import datasets, pipeline
from convirt_jax.errors import ConfigError, DataError, TrainingDiverged
from convirt_jax.evaluate import downstream, report
from convirt_jax.evaluate import features as features_lib
from convirt_jax.interop.hf_bert import load_hf_bert, resolve_hf_dir
from convirt_jax.interop.torchvision_resnet import load_imagenet_resnet
from convirt_jax.models import convirt
from convirt_jax.models.bert import BertConfig
from convirt_jax.models.convirt import ConVIRTModel
from convirt_jax.tokenizer import Tokenizer

PARAM_GROUPS = ("image", "text", "image_head", "text_head")
BATCH_KEYS = ("image", "input_ids", "attention_mask")

State = dict[str, Any]
Metrics = dict[str, jax.Array]

# PyTorch Adam's defaults.
_ADAM_B1, _ADAM_B2, _ADAM_EPS = 0.9, 0.999, 1e-8
# PyTorch ReduceLROnPlateau's default relative threshold for "an improvement".
_PLATEAU_RTOL = 1e-4

# "text/embeddings/..." and "text/encoder/layer_<i>/..." are the freezable parts of the text encoder.
_TEXT_FREEZABLE = re.compile(r"^text/(?:embeddings/|encoder/layer_(\d+)/)")


# ----------------------------------------------------------------------------------------------------
# Freezing.


def _path_str(path: tuple[str, ...]) -> str:
  return "/".join(path)


def frozen_mask(params: Any, frozen_layers: int) -> Any:
  """A bool pytree like `params`: True for the text embeddings and text layers 0..frozen_layers-1.

  `frozen_layers` = -1 freezes nothing, 0 only the embeddings (model.text.frozen_layers).
  """
  if frozen_layers < -1:
    raise ValueError(f"model.text.frozen_layers={frozen_layers}: must be -1 (none) or >= 0")
  paths = [_path_str(p) for p in flax.traverse_util.flatten_dict(params)]
  layers = {int(m.group(1)) for p in paths if (m := _TEXT_FREEZABLE.match(p)) and m.group(1)}
  if frozen_layers > len(layers):
    raise ValueError(f"model.text.frozen_layers={frozen_layers} exceeds the {len(layers)} layers of "
                     "the text encoder")

  def is_frozen(path: tuple[str, ...], _) -> bool:
    match = _TEXT_FREEZABLE.match(_path_str(path))
    if frozen_layers < 0 or match is None:
      return False
    return match.group(1) is None or int(match.group(1)) < frozen_layers

  return flax.traverse_util.path_aware_map(is_frozen, params)


def parameter_counts(params: Any, frozen: Any) -> dict[str, int]:
  """Number of frozen and trainable scalars."""
  sizes = jax.tree.leaves(jax.tree.map(lambda p, f: (int(np.size(p)), f), params, frozen),
                          is_leaf=lambda x: isinstance(x, tuple))
  frozen_count = sum(size for size, f in sizes if f)
  return {"frozen": frozen_count, "trainable": sum(size for size, _ in sizes) - frozen_count}


def describe_parameters(params: Any, frozen_layers: int) -> str:
  """One line for the log, e.g. 'parameters: 133.3M (trainable 90.7M, frozen 42.6M), per group ...'."""
  frozen = frozen_mask(params, frozen_layers)
  fmt = lambda n: f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"
  total = parameter_counts(params, frozen)
  groups = ", ".join(f"{g} {fmt(sum(parameter_counts(params[g], frozen[g]).values()))}"
                     for g in params)
  return (f"parameters: {fmt(total['frozen'] + total['trainable'])} (trainable "
          f"{fmt(total['trainable'])}, frozen {fmt(total['frozen'])}); {groups}")


# ----------------------------------------------------------------------------------------------------
# Optimizer and learning rate.


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_total: int) -> optax.ScalarOrSchedule:
  """optimizer.schedule: "constant" and "plateau" give a number (kept in opt_state, so the loop can
  lower it), "cosine" a linear warm-up to optimizer.lr then a cosine decay to 0 at `steps_total`."""
  opt = config.optimizer
  if opt.schedule in ("constant", "plateau"):
    return float(opt.lr)
  if opt.schedule == "cosine":
    if not 0 <= opt.warmup_steps < steps_total:
      raise ConfigError(f"optimizer.warmup_steps={opt.warmup_steps} must be in [0, {steps_total}), "
                       "the total number of steps")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=opt.warmup_steps, decay_steps=steps_total,
        end_value=0.0)
  raise ConfigError(f"optimizer.schedule={opt.schedule!r}: choose 'constant', 'cosine' or 'plateau'")


def make_optimizer(config: ml_collections.ConfigDict, params: Any,
                   steps_total: int) -> optax.GradientTransformation:
  """torch.optim.Adam(lr, weight_decay) on the trainable parameters; frozen ones get nothing.

  `params` (or `param_shapes(...)`) only gives the tree whose paths decide what is frozen.

  PyTorch's weight decay is L2 regularisation: weight_decay * param is added to the gradient before
  the Adam moments (not AdamW's decoupled decay). Optional clipping by global norm comes first, as
  torch.nn.utils.clip_grad_norm_ does before optimizer.step(). Frozen parameters are routed to
  `set_to_zero`, which keeps no state, so they carry no Adam moments.
  """
  opt = config.optimizer
  if opt.weight_decay < 0 or opt.grad_clip_norm < 0:
    raise ConfigError(f"optimizer.weight_decay={opt.weight_decay} and optimizer.grad_clip_norm="
                     f"{opt.grad_clip_norm} must be >= 0")
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.weight_decay > 0:
    parts.append(optax.add_decayed_weights(opt.weight_decay))
  parts.append(optax.scale_by_adam(b1=_ADAM_B1, b2=_ADAM_B2, eps=_ADAM_EPS))
  # inject_hyperparams keeps the learning rate in the state: read back for logging, set by the loop.
  parts.append(optax.inject_hyperparams(optax.scale_by_learning_rate)(
      learning_rate=learning_rate_schedule(config, steps_total)))
  labels = jax.tree.map(lambda frozen: "frozen" if frozen else "trainable",
                        frozen_mask(params, config.model.text.frozen_layers))
  return optax.multi_transform({"trainable": optax.chain(*parts), "frozen": optax.set_to_zero()},
                               labels)


def _is_value(_, value: Any) -> bool:
  # With a schedule, inject_hyperparams also keeps a "learning_rate" schedule state: skip it.
  return not isinstance(value, tuple)


def get_learning_rate(opt_state: Any) -> jax.Array:
  """The learning rate of the last update (or the first one, before any update)."""
  return optax.tree_utils.tree_get(opt_state, "learning_rate", filtering=_is_value)


def set_learning_rate(opt_state: Any, learning_rate: float) -> Any:
  """opt_state with a new learning rate (for "constant"/"plateau"; a schedule overwrites it).

  The new value keeps the old one's sharding, so a replicated state stays replicated on every host.
  """
  old = get_learning_rate(opt_state)
  if old is None:
    raise ValueError("opt_state has no learning_rate: it was not built by make_optimizer")
  value = np.asarray(learning_rate, dtype=old.dtype)
  if isinstance(old, jax.Array):
    value = jax.make_array_from_process_local_data(old.sharding, value)
  return optax.tree_utils.tree_set(opt_state, _is_value, learning_rate=value)


def _plateau_transform(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  opt = config.optimizer
  if not 0.0 < opt.plateau_factor < 1.0:
    raise ConfigError(f"optimizer.plateau_factor={opt.plateau_factor} must be in (0, 1)")
  if opt.plateau_patience < 1:
    raise ConfigError(f"optimizer.plateau_patience={opt.plateau_patience} must be >= 1")
  return optax.contrib.reduce_on_plateau(factor=opt.plateau_factor, patience=opt.plateau_patience,
                                         rtol=_PLATEAU_RTOL, atol=0.0)


def plateau_init(config: ml_collections.ConfigDict) -> Any:
  """The state of `reduce_on_plateau` before the first evaluation (scale 1, best loss +inf)."""
  return _plateau_transform(config).init(jnp.zeros((), jnp.float32))


def reduce_on_plateau(plateau_state: Any, val_loss: float,
                      config: ml_collections.ConfigDict) -> tuple[Any, float]:
  """Feeds one validation loss; returns the new state and the learning-rate scale to apply.

  The scale is multiplied by optimizer.plateau_factor once the loss has not improved (relative
  threshold 1e-4) for optimizer.plateau_patience evaluations in a row; this is
  torch.optim.lr_scheduler.ReduceLROnPlateau with its patience = plateau_patience - 1.
  """
  _, plateau_state = _plateau_transform(config).update((), plateau_state,
                                                       value=jnp.asarray(val_loss, jnp.float32))
  return plateau_state, float(plateau_state.scale)


# ----------------------------------------------------------------------------------------------------
# Train state.


def _check_override(group: str, collection: str, given: Any, expected: Any) -> Any:
  where = f"{collection}/{group}"
  given_flat = {_path_str(k): v for k, v in flax.traverse_util.flatten_dict(given).items()}
  expected_flat = {_path_str(k): v for k, v in flax.traverse_util.flatten_dict(expected).items()}
  missing, extra = expected_flat.keys() - given_flat.keys(), given_flat.keys() - expected_flat.keys()
  if missing or extra:
    raise ValueError(f"params_override {where}: missing {sorted(missing)[:5]} (of {len(missing)}), "
                     f"unexpected {sorted(extra)[:5]} (of {len(extra)})")
  for path, value in given_flat.items():
    if np.shape(value) != expected_flat[path].shape:
      raise ValueError(f"params_override {where}/{path}: shape {np.shape(value)}, the model has "
                       f"{expected_flat[path].shape}")
  return jax.tree.map(lambda v, e: jnp.asarray(v, e.dtype), given, expected)


def _dummy_inputs(image_size: int, text_length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  tokens = jnp.ones((1, text_length), jnp.int32)
  return jnp.zeros((1, image_size, image_size, 3), jnp.uint8), tokens, tokens


@functools.lru_cache(maxsize=8)
def _jitted_init(model: ConVIRTModel) -> Callable[..., Any]:
  # Modules compare by their fields: re-initialising an equal model (another seed, a random-init
  # baseline) reuses the compiled initialiser, which is slow to compile on CPU.
  return jax.jit(functools.partial(model.init, train=False))


def param_shapes(model: ConVIRTModel, image_size: int, text_length: int) -> Any:
  """The params tree as ShapeDtypeStructs, without computing anything (enough for make_optimizer)."""
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, {"params": jax.random.PRNGKey(0)},
                        *_dummy_inputs(image_size, text_length))["params"]


def init_train_state(model: ConVIRTModel, optimizer: optax.GradientTransformation, rng: jax.Array,
                     image_size: int, text_length: int,
                     params_override: dict[str, Any] | None = None) -> State:
  """A fresh train state (on the default device; `parallel.replicate` it onto the mesh).

  Args:
    model: the ConVIRT model.
    optimizer: from `make_optimizer` for the same parameters.
    rng: a PRNG key; split into the initialisation key and the state's dropout key.
    image_size, text_length: input shapes to trace the initialisation with.
    params_override: {"params": {group: tree}, "batch_stats": {group: tree}} with whole groups
      (e.g. "image", "text") loaded from torchvision / Hugging Face weights; each group must match the
      model's tree exactly in structure and shapes.
  """
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  init_rng, state_rng = jax.random.split(rng)
  variables = flax.core.unfreeze(
      _jitted_init(model)({"params": init_rng}, *_dummy_inputs(image_size, text_length)))
  variables.setdefault("batch_stats", {})
  for collection, groups in (params_override or {}).items():
    if collection not in ("params", "batch_stats"):
      raise ValueError(f"params_override has collection {collection!r}; expected params, batch_stats")
    for group, tree in groups.items():
      if group not in variables[collection]:
        raise ValueError(f"params_override {collection}/{group}: the model has no such group "
                         f"(it has {sorted(variables[collection])})")
      variables[collection][group] = _check_override(group, collection, tree,
                                                     variables[collection][group])
  params = variables["params"]
  if set(params) != set(PARAM_GROUPS):
    raise ValueError(f"the model's parameter groups are {sorted(params)}; expected {PARAM_GROUPS}")
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "batch_stats": variables["batch_stats"],
      "opt_state": jax.jit(optimizer.init)(params),  # one compile, not one per leaf shape
      "rng": state_rng,
  }


# ----------------------------------------------------------------------------------------------------
# Steps.


def _model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch is missing {missing}; it has {sorted(batch)}")
  return {k: batch[k] for k in BATCH_KEYS}


def _loss_config(config: ml_collections.ConfigDict) -> dict[str, float]:
  return {"temperature": config.loss.temperature, "image_weight": config.loss.image_weight}


def make_train_step(model: ConVIRTModel, optimizer: optax.GradientTransformation,
                    config: ml_collections.ConfigDict,
                    mesh: Mesh) -> Callable[[State, dict[str, jax.Array]], tuple[State, Metrics]]:
  """jit(train_step(state, batch) -> (state, metrics)); the state is donated.

  `state` is replicated on `mesh` and `batch` ({"image": uint8 [B,H,W,3], "input_ids",
  "attention_mask": int32 [B,T]}) sharded over "data" with B the global batch. Metrics: loss, both
  directional losses and top-1 accuracies (over the global batch), grad_norm (before clipping) and lr.
  """
  axis = parallel.DATA_AXIS
  if model.image_encoder.axis_name != axis:
    raise ValueError(f"the train step needs the model built with axis_name={axis!r} so that "
                     f"BatchNorm statistics are synchronised; it has {model.image_encoder.axis_name!r}")
  frozen_layers = config.model.text.frozen_layers
  loss_config = _loss_config(config)

  def per_device(params, batch_stats, rng, step, inputs):
    frozen = frozen_mask(params, frozen_layers)
    # One dropout stream per step and device, reproducible from the state alone.
    rng = jax.random.fold_in(jax.random.fold_in(rng, step), jax.lax.axis_index(axis))

    def loss_fn(params):
      # No gradient flows into frozen weights, so XLA skips their backward pass.
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
      out, updated = model.apply(
          {"params": params, "batch_stats": batch_stats}, inputs["image"], inputs["input_ids"],
          inputs["attention_mask"], train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
      terms = losses.convirt_loss_terms(out["image_emb"], out["text_emb"], axis_name=axis,
                                        **loss_config)
      return terms["loss"], (terms, updated["batch_stats"])

    # Already summed over the axis (check_vma): the loss is a psum of per-device sums.
    grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
    return grads, batch_stats, terms

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(), P(axis)),
                          out_specs=(P(), P(), P()))

  def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, Metrics]:
    grads, batch_stats, terms = sharded(state["params"], state["batch_stats"], state["rng"],
                                        state["step"], _model_inputs(batch))
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(state["params"], updates),
        "batch_stats": batch_stats,
        "opt_state": opt_state,
        "rng": state["rng"],
    }
    metrics = dict(terms, grad_norm=optax.global_norm(grads), lr=get_learning_rate(opt_state))
    return new_state, metrics

  replicated, data = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(train_step, in_shardings=(replicated, data), out_shardings=replicated,
                 donate_argnums=0)


def make_eval_step(model: ConVIRTModel, config: ml_collections.ConfigDict,
                   mesh: Mesh) -> Callable[[State, dict[str, jax.Array]], Metrics]:
  """jit(eval_step(state, batch) -> metrics): the train step's loss terms in inference mode.

  An optional bool batch["mask"] marks real rows; padded rows are neither scored nor negatives.
  """
  axis = parallel.DATA_AXIS
  loss_config = _loss_config(config)

  def per_device(params, batch_stats, inputs, mask):
    out = model.apply({"params": params, "batch_stats": batch_stats}, inputs["image"],
                      inputs["input_ids"], inputs["attention_mask"], train=False)
    return losses.convirt_loss_terms(out["image_emb"], out["text_emb"], axis_name=axis, mask=mask,
                                     **loss_config)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axis), P(axis)),
                          out_specs=P())

  def eval_step(state: State, batch: dict[str, jax.Array]) -> Metrics:
    inputs = _model_inputs(batch)
    mask = batch.get("mask")
    if mask is None:
      mask = jnp.ones(inputs["input_ids"].shape[:1], bool)
    return sharded(state["params"], state["batch_stats"], inputs, mask.astype(bool))

  replicated, data = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(eval_step, in_shardings=(replicated, data), out_shardings=replicated)


# ----------------------------------------------------------------------------------------------------
# The job: data, model, resume, the loop, checkpoints, evaluation. `main.py` calls `run`.


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pretrains (or resumes), evaluates and writes everything into `workdir`; returns the results."""
  config_lib.validate(config)
  if "://" in workdir:
    raise ConfigError(f"--workdir={workdir}: give a filesystem path; for a bucket shared by several hosts, "
                      "mount it (e.g. gcsfuse) at the same path on every host")
  parallel.initialize(config.distributed)
  mesh = parallel.make_mesh()
  local_batch = parallel.local_batch_size(config.train.batch_size, mesh)  # ConfigError if indivisible
  os.makedirs(workdir, exist_ok=True)
  resume_step = _resume_step(config, workdir)
  dataset = datasets.load_dataset(config, config.data.tfds_dir or os.path.join(workdir, "tfds"),
                                  is_builder_process=parallel.is_main_process())
  if len(dataset.sources.get("train", ())) == 0:
    raise DataError(f"the {config.data.name} data set has no train split")
  # Opened once the config and data are known good: its background threads must not outlive an error.
  manager = checkpoints.make_manager(workdir, keep=config.checkpoint.keep,
                                     best_metric=config.checkpoint.keep_best_metric)
  try:
    return _train_and_evaluate(config, workdir, mesh, local_batch, manager, dataset, resume_step)
  finally:
    manager.close()  # waits for a save in flight, whatever stopped the run


def _resume_step(config: ml_collections.ConfigDict, workdir: str) -> int:
  """The step a run in `workdir` resumes from (0: a fresh run), after checking the configs agree."""
  if not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    return 0
  reader = checkpoints.make_manager(workdir, read_only=True)
  step = reader.latest_step() or 0
  if step:
    _check_resumable(checkpoints.restore_meta(reader, step)["config"], config, workdir)
  reader.close()
  return step


def _train_and_evaluate(config, workdir, mesh, local_batch, manager, dataset,
                        resume_step: int) -> dict[str, Any]:
  is_main = parallel.is_main_process()
  tokenizer, text_config, text_params = setup_text(config, dataset, workdir, resuming=resume_step > 0)
  pretrained = pretrained_params(config, text_params)  # read once: the start, and the evaluation's baseline
  model = convirt.build_model(config, text_config, axis_name=parallel.DATA_AXIS)
  steps_total = total_steps(config, len(dataset.sources["train"]))
  image_size, text_length = config.data.image_size, config.model.text.max_length
  shapes = param_shapes(model, image_size, text_length)
  optimizer = make_optimizer(config, shapes, steps_total)
  _announce(describe_parameters(shapes, config.model.text.frozen_layers))

  state = init_train_state(model, optimizer, jax.random.key(config.train.seed), image_size, text_length,
                           params_override=pretrained)
  state = parallel.replicate(state, mesh)
  train_iter = iter(pipeline.train_loader(
      dataset.sources["train"], tokenizer, config, local_batch_size=local_batch, seed=config.train.seed,
      shard_index=jax.process_index(), shard_count=jax.process_count()))
  plateau = plateau_init(config)
  if resume_step:
    state, meta = checkpoints.restore(manager, resume_step, checkpoints.abstract_like(state),
                                      data_iterator=train_iter)
    plateau = _plateau_from_json(plateau, meta["plateau"])
    _announce(f"Resuming from step {resume_step} of {steps_total} in {workdir}")
  elif is_main:
    _write_json(os.path.join(workdir, "config.json"), config.to_dict())

  train_step = make_train_step(model, optimizer, config, mesh)
  eval_step = make_eval_step(model, config, mesh)
  logger = metric_logging.MetricLogger(workdir, enabled=is_main, resume_step=resume_step)
  preempted = _SigtermFlag()
  bar = metric_logging.progress_bar(steps_total, resume_step, enabled=is_main)
  window = []  # metrics since the last log, still on the devices
  step = resume_step
  try:
    while step < steps_total:
      state, metrics = train_step(state, parallel.shard_batch(next(train_iter), mesh))
      step += 1
      window.append(metrics)
      bar.update(1)
      last, stopping = step == steps_total, preempted.is_set(manager, step)
      save_now = last or stopping or step % config.checkpoint.every_steps == 0
      if window and (save_now or step % config.train.log_every_steps == 0):
        summary = _summarise(window)  # raises TrainingDiverged: nothing after the last good save is saved
        window = []
        logger.write(step, summary)
        bar.set_postfix(loss=f"{summary['train/loss']:.4f}", lr=f"{summary['train/lr']:.2e}")
      val_metrics = {}
      if (last or step % config.eval.every_steps == 0) and "validation" in dataset.sources:
        val_metrics = validation_loss(eval_step, state, dataset.sources["validation"], tokenizer, config,
                                      mesh)
        logger.write(step, val_metrics)
        if config.optimizer.schedule == "plateau":
          plateau, scale = reduce_on_plateau(plateau, val_metrics["val/loss"], config)
          state["opt_state"] = set_learning_rate(state["opt_state"], config.optimizer.lr * scale)
      if save_now or val_metrics:
        best_key = config.checkpoint.keep_best_metric
        checkpoints.save(manager, step, state, data_iterator=train_iter,
                         meta={"config": config.to_dict(), "step": step,
                               "plateau": _plateau_to_json(plateau)},
                         metrics={best_key: val_metrics[best_key]} if best_key in val_metrics else None)
      if stopping and not last:
        _announce(f"Preempted: saved step {step}; run the same command to resume.")
        return {}
  finally:
    bar.close()
    preempted.restore()
  if is_main:
    metrics_png = os.path.join(workdir, LOSS_CURVE_PNG)
    report.plot_loss_curve(os.path.join(workdir, metric_logging.METRICS_FILE), metrics_png)
  _announce("Evaluating (linear probe, retrieval)...")
  results = evaluate_downstream(config, workdir, model, pretrained, state, dataset, tokenizer, mesh,
                                steps_total)
  logger.close()
  _announce(f"\n{report.results_markdown(results)}\nResults, metrics and plots are in {workdir}")
  return results


LOSS_CURVE_PNG = "loss_curve.png"


def total_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
  if config.train.steps > 0:
    return int(config.train.steps)
  return max(1, int(config.train.epochs * num_train // config.train.batch_size))


def setup_text(config: ml_collections.ConfigDict, dataset, workdir: str, resuming: bool):
  """The tokenizer, BertConfig and (when initialised from a checkpoint) BERT params of this run.

  The tokenizer and BertConfig are written into the workdir, so the run can be loaded (ConVIRT.load,
  export) without the original checkpoint directory. A resumed run keeps the tokenizer it was trained
  with. Every process builds the same tokenizer itself (a corpus vocabulary is deterministic), so no
  process waits for another.
  """
  text = config.model.text
  tokenizer_dir = os.path.join(workdir, checkpoints.TOKENIZER_DIR)
  text_config_path = os.path.join(workdir, checkpoints.TEXT_CONFIG_FILE)
  if resuming:
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir, max_length=text.max_length)
  elif text.tokenizer == "corpus":
    train = dataset.sources["train"]
    texts = [pipeline.whole_text(train[i]) for i in range(len(train))]
    tokenizer = Tokenizer.from_corpus(texts, text.vocab_size, max_length=text.max_length)
  else:
    tokenizer = Tokenizer.from_pretrained(resolve_hf_dir(text.tokenizer or text.init_from),
                                          max_length=text.max_length)
  if parallel.is_main_process() and not resuming:
    tokenizer.save(tokenizer_dir)
  text_params = None
  if text.init_from:
    text_config, text_params = load_hf_bert(text.init_from)
  else:
    text_config = BertConfig.from_dict({**text.config.to_dict(), "vocab_size": tokenizer.vocab_size})
  if text_config.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the BERT's vocab_size is "
                      f"{text_config.vocab_size} (config.model.text.tokenizer / init_from)")
  if text_config.max_position_embeddings < text.max_length:
    raise ConfigError(f"config.model.text.max_length={text.max_length} exceeds the BERT's "
                      f"max_position_embeddings={text_config.max_position_embeddings}")
  if parallel.is_main_process():
    _write_json(text_config_path, text_config.to_dict())
  return tokenizer, text_config, text_params


def pretrained_params(config: ml_collections.ConfigDict, text_params) -> dict[str, Any]:
  """{"params": {...}, "batch_stats": {...}} for the groups initialised from torchvision / HF weights."""
  override = {"params": {}, "batch_stats": {}}
  image = config.model.image
  if image.init_from:
    variables = load_imagenet_resnet(image.init_from, image.depth, image.width, image.small_stem)
    override["params"]["image"] = variables["params"]
    override["batch_stats"]["image"] = variables["batch_stats"]
  if text_params is not None:
    override["params"]["text"] = text_params
  return override


def validation_loss(eval_step, state, source, tokenizer, config, mesh) -> dict[str, float]:
  """Mean over the validation batches of the contrastive loss terms (whole reports, no augmentation)."""
  batch_size = features_lib.per_process_batch(config.eval.batch_size, mesh)
  totals, batches = {}, 0
  for batch in pipeline.eval_batches(source, tokenizer, config, batch_size=batch_size,
                                     shard_index=jax.process_index(), shard_count=jax.process_count()):
    inputs = {k: batch[k] for k in ("image", "input_ids", "attention_mask", "mask")}
    metrics = parallel.fetch(eval_step(state, parallel.shard_batch(inputs, mesh)))
    for key, value in metrics.items():
      totals[key] = totals.get(key, 0.0) + float(value)
    batches += 1
  return {f"val/{key}": value / batches for key, value in totals.items()}


def evaluate_downstream(config, workdir, model, pretrained, state, dataset, tokenizer, mesh,
                        steps_total) -> dict[str, Any]:
  """Linear probe and retrieval for ConVIRT and the baselines (random init; ImageNet init if used).

  `model` is the training model: in inference mode its BatchNorm uses running statistics and never
  touches the mesh axis, and reusing it reuses its compiled initialiser. `pretrained` holds the
  torchvision / Hugging Face weights the run started from (the "ImageNet Init." baseline).
  """
  image_size, text_length = config.data.image_size, config.model.text.max_length
  weights = {"ConVIRT": {"params": state["params"], "batch_stats": state["batch_stats"]}}
  if config.model.image.init_from:
    initial = init_train_state(model, optax.identity(), jax.random.key(config.train.seed), image_size,
                               text_length, params_override=pretrained)
    weights["ImageNet Init."] = {"params": initial["params"], "batch_stats": initial["batch_stats"]}
  if config.eval.random_init_baseline:
    # Another seed than training's, so the baseline is not the trained model's own starting point.
    initial = init_train_state(model, optax.identity(), jax.random.key(config.train.seed + 1), image_size,
                               text_length)
    weights["Random Init."] = {"params": initial["params"], "batch_stats": initial["batch_stats"]}
  run_info = {"config": config.data.name, "workdir": workdir, "steps": steps_total,
              "global_batch_size": config.train.batch_size, "devices": jax.device_count(),
              "processes": jax.process_count()}
  return downstream.run_downstream(config, workdir, model, weights, dataset, tokenizer, mesh, run_info)


def _summarise(window: list[Metrics]) -> dict[str, float]:
  """Means over the window's steps, prefixed "train/"; a non-finite loss stops the run."""
  values = parallel.fetch(window)
  summary = {f"train/{key}": float(np.mean([m[key] for m in values])) for key in values[0]}
  for metrics in values:
    if not np.isfinite(metrics["loss"]):
      raise TrainingDiverged(
          f"the training loss became {float(metrics['loss'])} (grad norm {float(metrics['grad_norm'])}); "
          "stopped without saving it, the last good checkpoint is kept. Lower optimizer.lr or set "
          "optimizer.grad_clip_norm, then run the same command to resume from that checkpoint.")
  return summary


# What a checkpoint's meaning depends on: resuming with another value would restore nonsense.
_RESUME_KEYS = ("model", "loss", "data.name", "data.dir", "data.csv", "data.image_size",
                "data.stored_size", "data.label_columns", "train.batch_size", "train.seed")


def _check_resumable(saved: dict[str, Any], config: ml_collections.ConfigDict, workdir: str) -> None:
  """Names the first key whose value differs from the run saved in `workdir`."""
  flatten = lambda tree: flax.traverse_util.flatten_dict(tree, sep=".")
  old, new = flatten(saved), flatten(config.to_dict())
  for key in sorted(new):
    if key.startswith(_RESUME_KEYS) and _jsonable(old.get(key)) != _jsonable(new[key]):
      raise ConfigError(f"{workdir} holds a run with config.{key}={old.get(key)!r}, this config has "
                        f"{new[key]!r}: use another --workdir, or the same config to resume")


class _SigtermFlag:
  """Set by SIGTERM (preemption) while training; with several processes orbax agrees on the step to
  stop at. `restore()` gives SIGTERM back its previous handler."""

  def __init__(self):
    self._set = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handler(self, signum, frame):
    del signum, frame
    self._set = True

  def is_set(self, manager, step: int) -> bool:
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return self._set


def _plateau_to_json(plateau) -> dict[str, float]:
  return {k: float(v) for k, v in plateau._asdict().items()}


def _plateau_from_json(template, values: dict[str, float]):
  return type(template)(**{k: jnp.asarray(values[k], jnp.asarray(v).dtype)
                           for k, v in template._asdict().items()})


def _jsonable(value):
  return json.loads(json.dumps(value, default=str))


def _announce(message: str) -> None:
  if parallel.is_main_process():
    print(message, flush=True)


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2, default=str)
