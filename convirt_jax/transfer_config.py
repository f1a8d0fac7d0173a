"""The transfer job's configuration (`transfer_config()`) and its checks (`validate_transfer`).

  python -m convirt_jax.transfer --config=configs/transfer/<task>.py --workdir=runs/<name>

configs/transfer/*.py call `transfer_config()` and change what their task needs. The data, augmentation
and image-model keys are those of the pretraining config (`config.base_config()`), so a data set is
described the same way in both jobs; everything else is the transfer job's own. As in `config.py`, every
key is declared here, so a typo in `--config.x.y=z` is an error rather than a silent no-op.
"""
from __future__ import annotations

import ml_collections

from convirt_jax import config as config_lib
from convirt_jax.data.augment import TrainAugment
from convirt_jax.errors import ConfigError
from convirt_jax.evaluate import protocols as protocols_lib

ENCODER_KINDS = ("imagenet", "random")  # besides a ConVIRT workdir (PATH, PATH@best|latest|STEP)


def transfer_config() -> ml_collections.ConfigDict:
  base = config_lib.base_config()
  c = ml_collections.ConfigDict()
  # Each: a ConVIRT pretraining workdir (its best checkpoint by validation loss; PATH@latest or
  # PATH@STEP picks another), "imagenet" (torchvision weights, see imagenet_weights) or "random".
  c.encoders = ("random",)
  c.imagenet_weights = "torchvision"  # a local .pth/.pt/.safetensors file, or "torchvision" (download)
  c.random_init_seed = 1              # the "Random Init." encoder's weights
  c.protocols = ("linear", "finetune", "zeroshot")  # see evaluate/protocols.py ("retrieval": 8x200 only)
  c.fractions = (0.01, 0.1, 1.0)      # fractions of the training labels (Table 1's 1% / 10% / 100%)
  c.seeds = (0, 1, 2)                 # one training subset per (fraction, seed), shared by the protocols
  c.min_train = 10                    # smallest training subset, whatever the fraction

  # Architecture of the "imagenet" / "random" encoders when no ConVIRT workdir is given (a ConVIRT
  # workdir's own config wins: every encoder must have the same architecture). batch_norm is how the
  # encoder's BatchNorm trains when fine-tuning ("batch": synced batch statistics, torch's train mode).
  c.model = ml_collections.ConfigDict()
  c.model.image = ml_collections.ConfigDict()
  c.model.image.name = base.model.image.name
  c.model.image.depth = base.model.image.depth
  c.model.image.width = base.model.image.width
  c.model.image.small_stem = base.model.image.small_stem
  c.model.image.batch_norm = base.model.image.batch_norm
  c.data = base.data                  # the labelled downstream set (data.task sets or infers the task)
  c.augment = base.augment            # fine-tuning's training augmentations (the paper's)

  # Linear protocol: frozen encoder, L-BFGS logistic regression on the pooled features
  # (evaluate/linear_probe.py, the same implementation as pretraining's evaluation).
  c.linear = ml_collections.ConfigDict()
  c.linear.c_grid = base.evals.linear_probe.c_grid  # inverse L2 strengths tried on validation
  c.linear.default_c = base.evals.linear_probe.default_c  # used when there is no validation split
  c.linear.max_iter = base.evals.linear_probe.max_iter

  # Fine-tuning protocol: every encoder weight + a new linear head, Adam (PyTorch semantics), the
  # training augmentations above, model selection on the validation metric. Sources: the ConVIRT paper
  # (Zhang et al., arXiv 2010.00747) states Adam with learning rate 1e-4 and weight decay 1e-6 for its
  # pretraining (base_config's values); its appendix's fine-tuning values could not be checked offline
  # when this was written, so every value below is marked "assumed" unless it restates one of those.
  c.finetune = ml_collections.ConfigDict()
  c.finetune.lr = 1e-4                # assumed: the paper's Adam learning rate (pretraining's, 1e-4)
  c.finetune.weight_decay = 1e-6      # assumed: the paper's Adam weight decay (pretraining's, 1e-6); L2
  c.finetune.batch_size = 64          # assumed (global batch, over every device)
  c.finetune.epochs = 50.0            # assumed: an upper bound; early stopping on validation ends runs
  c.finetune.min_steps = 100          # floor on the steps of a run (1% subsets are a few batches)
  c.finetune.max_steps = 0            # cap on the steps of a run; 0 = none
  c.finetune.eval_every_steps = 100   # assumed: validation metric (AUC / accuracy) every N steps, and last
  c.finetune.patience = 10            # assumed: stop after N evaluations without improvement; 0 = never
  c.finetune.keep = 1                 # checkpoints kept besides the best one
  c.finetune.precision = "auto"       # activations: "auto" (bf16 on GPU/TPU, f32 on CPU) | float32 | bfloat16
  c.finetune.log_every_steps = 10
  # Options for encoders usually fine-tuned otherwise (ViTs: AdamW, warm-up, layer-wise decay, cosine);
  # the defaults are the paper's recipe above.
  c.finetune.optimizer = "adam"       # "adam": torch.optim.Adam, L2 decay | "adamw": decoupled decay
  c.finetune.warmup_steps = 0         # linear warm-up of the learning rate from 0 over N steps
  c.finetune.schedule = "constant"    # after warm-up: "constant" | "cosine" (to 0 at a run's last step)
  c.finetune.layer_decay = 1.0        # encoder layer i of n learns at lr * layer_decay ** (n - i); 1 = off

  # Zero-shot protocol (not in the paper; ConVIRT encoders only): label -> tuple of prompt sentences.
  # Empty: CheXpert's five competition labels' defaults (evaluate/zeroshot.CHEXPERT_PROMPTS).
  c.zeroshot = ml_collections.ConfigDict()
  c.zeroshot.prompts = ml_collections.ConfigDict()

  # Retrieval protocol (the paper's Table 2; data.name "chexpert"; evaluate/chexpert_retrieval.py): the
  # folder holding image-retrieval/ and text-retrieval/ of https://github.com/yuhaozhang/convirt.
  c.retrieval = ml_collections.ConfigDict()
  c.retrieval.dir = ""
  c.retrieval.k = (5, 10, 50)         # Prec@k cut-offs (Table 2's)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128             # inference batch (features, validation, test), over every device
  c.log = base.log
  c.distributed = base.distributed
  return c


_CHOICES = {
    "data.task": ("auto", "binary", "multilabel", "multiclass"),
    "data.uncertainty": ("zeros", "ones", "ignore"),
    "data.augment_on": config_lib.AUGMENT_ON,
    "model.image.depth": (18, 34, 50, 101),
    "model.image.batch_norm": ("batch", "frozen"),
    "finetune.precision": ("auto", "float32", "bfloat16"),
    "finetune.optimizer": ("adam", "adamw"),
    "finetune.schedule": ("constant", "cosine"),
}
_POSITIVE = ("model.image.width", "data.image_size", "data.stored_size", "finetune.lr",
             "finetune.batch_size", "finetune.eval_every_steps", "finetune.log_every_steps",
             "finetune.keep", "eval.batch_size", "linear.default_c", "linear.max_iter", "min_train",
             "log.every_seconds")


def validate_transfer(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key that is unknown, missing or out of range.

  Runs before any data is read or anything compiles. The encoders' paths are checked when they are
  parsed (`transfer_encoders.parse_encoders`), the labels when the data set is opened.
  """
  config_lib.check_keys_and_values(config, transfer_config(), _CHOICES, _POSITIVE)
  if not config.encoders:
    raise ConfigError("config.encoders is empty: give ConVIRT workdirs, \"imagenet\" and/or \"random\"")
  if len(set(config.encoders)) != len(config.encoders):
    raise ConfigError(f"config.encoders={tuple(config.encoders)} names an encoder twice")
  known = protocols_lib.names("transfer")
  if not config.protocols:
    raise ConfigError(f"config.protocols is empty: choose from {known}")
  for protocol in config.protocols:
    if protocol not in known:
      raise ConfigError(f"config.protocols has {protocol!r}: each must be one of {known}")
  if "retrieval" in config.protocols:
    if config.data.name != "chexpert":
      raise ConfigError(f"config.protocols has 'retrieval' (CheXpert 8x200, the paper's Table 2), which "
                        f"needs config.data.name='chexpert'; got {config.data.name!r} (see "
                        "configs/transfer/chexpert_8x200.py)")
    if not config.retrieval.dir:
      raise ConfigError("config.retrieval.dir is empty: give the folder holding image-retrieval/ and "
                        "text-retrieval/ of https://github.com/yuhaozhang/convirt "
                        "(--config.retrieval.dir=/path)")
    ks = tuple(config.retrieval.k)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
      raise ConfigError(f"config.retrieval.k={ks!r}: give cut-offs >= 1, e.g. (5, 10, 50)")
  if not config.fractions:
    raise ConfigError("config.fractions is empty: give label fractions in (0, 1], e.g. (0.01, 0.1, 1.0)")
  for fraction in config.fractions:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
      raise ConfigError(f"config.fractions has {fraction!r}: each fraction must be in (0, 1]")
  if len(set(config.fractions)) != len(config.fractions):
    raise ConfigError(f"config.fractions={tuple(config.fractions)} repeats a fraction")
  if not config.seeds:
    raise ConfigError("config.seeds is empty: give at least one seed")
  for seed in config.seeds:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
      raise ConfigError(f"config.seeds has {seed!r}: seeds are non-negative integers")
  if len(set(config.seeds)) != len(config.seeds):
    raise ConfigError(f"config.seeds={tuple(config.seeds)} repeats a seed")
  ft = config.finetune
  if ft.epochs <= 0 and ft.max_steps <= 0 and ft.min_steps <= 0:
    raise ConfigError("config.finetune.epochs, min_steps and max_steps are all 0: set one of them")
  for key in ("weight_decay", "min_steps", "max_steps", "patience", "epochs", "warmup_steps"):
    if ft[key] < 0:
      raise ConfigError(f"config.finetune.{key}={ft[key]!r}: must be >= 0")
  if not 0 < ft.layer_decay <= 1:
    raise ConfigError(f"config.finetune.layer_decay={ft.layer_decay!r}: must be in (0, 1] (1: no decay)")
  if ft.max_steps and ft.min_steps > ft.max_steps:
    raise ConfigError(f"config.finetune.min_steps={ft.min_steps} exceeds finetune.max_steps="
                      f"{ft.max_steps}")
  if not config.linear.c_grid or min(config.linear.c_grid) <= 0:
    raise ConfigError(f"config.linear.c_grid={tuple(config.linear.c_grid)}: give positive C values")
  for label, prompts in config.zeroshot.prompts.items():
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip()
                                                          for p in prompts):
      raise ConfigError(f"config.zeroshot.prompts[{label!r}]={prompts!r}: give a tuple of sentences")
  if config.data.name == "csv":
    if not config.data.csv:
      raise ConfigError("config.data.csv is empty: give the labelled CSV (--config.data.csv=/path.csv)")
    if not config.data.label_columns:
      raise ConfigError("config.data.label_columns is empty: name the CSV's label columns, e.g. "
                        "--config.data.label_columns=\"('effusion','pneumonia')\"")
  config_lib.check_data_dir(config)
  if config.imagenet_weights != "torchvision" and "imagenet" in config.encoders and not (
      config.imagenet_weights):
    raise ConfigError("config.imagenet_weights is empty: give a torchvision weights file or "
                      "\"torchvision\" (download)")
  TrainAugment.from_config(config.augment, config.data.image_size)  # ConfigError naming a bad range


def paper_protocol(data_name: str, task: str) -> ml_collections.ConfigDict:
  """The paper's transfer protocol (ConVIRT, arXiv 2010.00747, §4 and Table 1) on one of its data sets:
  the ConVIRT run of configs/mimic.py against ImageNet and random initialisation, linear classification
  and fine-tuning at 1% / 10% / 100% of the labels, 5 runs each, 224 px. configs/transfer/<set>.py add
  what is their own; values the paper's appendix could not confirm offline are marked "assumed"."""
  c = transfer_config()
  c.encoders = ("runs/mimic", "imagenet", "random")
  c.protocols = ("linear", "finetune")
  c.fractions = (0.01, 0.1, 1.0)     # the paper's 1% / 10% / 100% (§4, Table 1)
  c.seeds = (0, 1, 2, 3, 4)          # the paper averages 5 runs
  c.data.name = data_name
  c.data.dir = ""                    # required: --config.data.dir=DOWNLOAD_DIR
  c.data.task = task                 # the paper's metric follows: AUC, or accuracy for multiclass
  c.data.image_size = 224            # the paper's input size (a ConVIRT workdir's own size wins)
  c.data.stored_size = 256
  # The linear and fine-tuning keys keep transfer_config()'s values, where each says its source.
  return c
