"""The configuration every job starts from, and the checks run on it before anything compiles.

`configs/*.py` call `base_config()` and change what their setting needs. Every key a module reads is
declared here, so a typo in `--config.x.y=z` is an error from ml_collections rather than a silent no-op.
"""
import ml_collections

from convirt_jax.data import registry
from convirt_jax.errors import ConfigError
from convirt_jax.models import registry as image_registry

AUGMENT_ON = ("auto", "host", "device")  # config.data.augment_on: augment.resolve_augment_on
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUTO = "auto"  # model.text.max_length chosen from the training texts (text_length.py)


def base_config() -> ml_collections.ConfigDict:
  """Every key of the pretraining job, with its default."""
  c = ml_collections.ConfigDict()
  _model_keys(c)
  _data_keys(c)
  _training_keys(c)
  _evaluation_keys(c)
  return c


def _model_keys(c: ml_collections.ConfigDict) -> None:
  """The encoders, projection heads and loss."""
  c.model = ml_collections.ConfigDict()
  c.model.image = ml_collections.ConfigDict()
  c.model.image.name = "resnet"       # a registered image encoder (convirt_jax/models/registry.py)
  c.model.image.depth = 50            # 18 | 34 | 50 | 101
  c.model.image.width = 1.0           # multiplier on torchvision's 64 base channels
  c.model.image.small_stem = False    # 3x3 stride-1 stem, no max-pool: for tiny images/models only
  # "batch": batch statistics when training (synced over the data axis), running stats updated;
  # "frozen": running statistics only, never updated (tiny/micro-batches, fine-tuning).
  c.model.image.batch_norm = "batch"
  c.model.image.init_from = ""        # torchvision .pth/.pt/.safetensors file, "torchvision" (download), ""
  c.model.text = ml_collections.ConfigDict()
  c.model.text.init_from = "emilyalsentzer/Bio_ClinicalBERT"  # HF directory or Hub name; "" = random init
  # Used when init_from is "" (a randomly initialised BERT): an HF BertConfig, BERT-base's by default;
  # set single keys (--config.model.text.config.num_hidden_layers=2) or the whole dict in a config file.
  # A random text encoder also needs model.text.tokenizer (e.g. "corpus") and frozen_layers=-1.
  c.model.text.config = ml_collections.ConfigDict(dict(
      hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
      max_position_embeddings=512, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
  # Directory (or Hub name) with vocab.txt/tokenizer.json; "" = same as init_from; "corpus" = learn a
  # WordPiece vocabulary from the training reports (for a randomly initialised text encoder).
  c.model.text.tokenizer = ""
  c.model.text.vocab_size = 4000      # size of a vocabulary learned from the corpus
  c.model.text.frozen_layers = 6      # embeddings + this many first layers get no update; -1 = none frozen
  c.model.text.pooling = "max"        # "max" (paper) | "mean" | "cls"
  # Tokens per text, [CLS] and [SEP] included: an integer, or "auto": the pretraining job measures the
  # training texts with its tokenizer and takes the smallest multiple of 8 that holds 99.9% of them whole
  # (capped by the BERT's max_position_embeddings; see text_length.py). The job records the integer it
  # chose (config.json, checkpoints), so a resumed run, ConVIRT.load and export use that one.
  c.model.text.max_length = ml_collections.FieldReference(128, field_type=object)  # int or "auto"
  c.model.projection_dim = 512
  c.model.projection_hidden = 512

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.1
  c.loss.image_weight = 0.75          # lambda: weight of the image->text direction


def _data_keys(c: ml_collections.ConfigDict) -> None:
  """The data set, its pipeline and the training augmentations."""
  c.data = ml_collections.ConfigDict()
  # "synthetic" | "mimic_cxr" | "csv" | the downstream sets "rsna" | "chexpert" | "covidx" | "mura"
  c.data.name = "synthetic"
  c.data.dir = ""                     # root of a manual download: MIMIC-CXR-JPG, or a downstream set's
  c.data.csv = ""                     # CSV of pairs: image,text[,split][,group][,labels...]
  c.data.label_columns = ()           # CSV label columns
  # The labels' task: "auto" (the dataset's own: "multilabel", "multiclass"; one label = "binary"),
  # "binary" | "multilabel" (BCE, AUC per label) | "multiclass" (softmax, accuracy). Read by the transfer job.
  # CSV of pairs: also how its label columns are read ("binary"/"multilabel": 1/0/-1/blank, other values are
  # bad_label records; "multiclass": one categorical column); "auto" infers, and stops when the inference
  # rests on a rare value (builders/csv_pairs.py). Part of the CSV dataset's directory hash.
  c.data.task = "auto"
  c.data.tfds_dir = ""                # where built TFDS datasets live; "" = <workdir>/tfds
  c.data.image_size = 224             # model input size
  c.data.stored_size = 256            # shorter side images are stored at
  # Where the training augmentations run: "auto" (the device on a GPU, the host on TPU and CPU: on a TPU
  # the affine step's gathers cost more than the host's cores, augment.resolve_augment_on) | "host"
  # (grain workers, Pillow) | "device" (inside the jitted step, data/device_augment.py; the host sends the
  # stored images padded to one shape). Same transform and parameter ranges either way.
  c.data.augment_on = "auto"
  c.data.frontal_only = True          # MIMIC: PA/AP views only; CheXpert: "Frontal" rows only
  c.data.uncertainty = "zeros"        # CheXpert -1 labels: "zeros" (U-Zeros) | "ones" (U-Ones) | "ignore"
  c.data.split_seed = 0               # downstream sets: seed of the by-patient validation/test hold-out
  c.data.frontal_views = ("PA", "AP")  # MIMIC ViewPosition values kept when frontal_only
  c.data.strict = False               # stop on the first bad record instead of skipping it
  c.data.whole_report = False         # True: the whole findings+impression instead of one random sentence
  # What an epoch of training draws once: "image" (a record) or "study" (MIMIC-CXR: a report, with one of
  # its study's images drawn each time, the paper's image-text pair).
  c.data.unit = "image"
  c.data.min_sentence_tokens = 3
  c.data.num_threads = 2              # grain read/map threads per process
  c.data.worker_count = 0             # grain worker processes (0 = in-process threads)
  c.data.build_threads = 0            # image decode/resize threads while building a dataset (0 = all CPUs)
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_train = 2000
  c.data.synthetic.num_validation = 200
  c.data.synthetic.num_test = 400
  c.data.synthetic.retrieval_per_category = 40
  c.data.synthetic.retrieval_queries_per_category = 5  # image queries per category
  c.data.synthetic.seed = 0
  # A mild domain shift of the rendered images (1.0 = the calibrated corpus, bit-identical): scales of
  # the detector noise and of the exposure contrast (the transfer config uses another seed and a shift).
  c.data.synthetic.noise_scale = 1.0
  c.data.synthetic.contrast_scale = 1.0

  c.augment = ml_collections.ConfigDict()
  c.augment.crop_scale = (0.6, 1.0)
  c.augment.flip_prob = 0.5
  c.augment.rotation = 20.0           # degrees, +-
  c.augment.translation = 0.1         # fraction of the size, +-
  c.augment.scale = (0.95, 1.05)
  c.augment.brightness = (0.6, 1.4)
  c.augment.contrast = (0.6, 1.4)
  c.augment.blur_sigma = (0.1, 3.0)


def _training_keys(c: ml_collections.ConfigDict) -> None:
  """Training, the optimizer and checkpoints."""
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32             # global, over every device of every process
  c.train.steps = 0                   # 0 = derive from epochs
  c.train.epochs = 100
  c.train.seed = 0
  # Activation dtype: "auto" (bfloat16 on GPU/TPU, float32 on CPU) | "float32" | "bfloat16".
  # Parameters, optimizer state, BatchNorm/LayerNorm statistics, softmaxes and the loss stay float32.
  c.train.precision = "auto"
  # Recompute activations in the backward pass (per ResNet block and BERT layer): less memory, ~1/3
  # more compute, same numbers.
  c.train.remat = False
  # Examples PER DEVICE in one micro-batch (0 = off): the gradient is computed micro-batch by
  # micro-batch (GradCache), so activation memory follows the micro-batch while the loss still scores
  # the whole global batch; ~1/3 more compute. Must divide the per-device batch (train.batch_size /
  # devices). In training mode BatchNorm statistics are then per micro-batch (ghost batch norm, as with
  # gradient accumulation elsewhere); use model.image.batch_norm="frozen" for an exact equivalence.
  c.train.microbatch_size = 0
  c.train.log_every_steps = 10
  # Stop after this many validation evaluations without a new best checkpoint.keep_best_metric (0 = never).
  c.train.stop_patience = 0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-4
  c.optimizer.weight_decay = 1e-6     # PyTorch Adam semantics: L2 added to the gradient
  c.optimizer.schedule = "constant"   # "constant" | "cosine" (warm-up + cosine) | "plateau" (on val loss)
  c.optimizer.warmup_steps = 0
  c.optimizer.plateau_factor = 0.5
  c.optimizer.plateau_patience = 5    # evaluations without improvement
  c.optimizer.grad_clip_norm = 0.0    # 0 = no clipping

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.keep_best_metric = "val/loss"


def _evaluation_keys(c: ml_collections.ConfigDict) -> None:
  """Validation, the evaluations of the best checkpoint, logs and several processes."""
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 1000           # validation loss
  c.eval.batch_size = 64
  c.eval.random_init_baseline = True  # also evaluate a randomly initialised encoder

  # The evaluations at the end of the run, each by the evaluator module of its name (evaluate/*.py).
  c.evals = ml_collections.ConfigDict()
  c.evals.linear_probe = ml_collections.ConfigDict()
  c.evals.linear_probe.fractions = (0.01, 0.1, 1.0)
  c.evals.linear_probe.seeds = (0, 1, 2)
  c.evals.linear_probe.c_grid = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse L2 strengths tried on validation
  c.evals.linear_probe.default_c = 1.0  # used when there is no validation split
  c.evals.linear_probe.max_iter = 1000  # L-BFGS iterations per fit
  c.evals.linear_probe.min_train = 10   # smallest training subset, whatever the fraction
  c.evals.linear_probe.max_train_examples = 0  # 0 = the whole training split
  c.evals.retrieval = ml_collections.ConfigDict()
  c.evals.retrieval.k = (5, 10, 50)

  # Progress when the output is not a terminal (a log file): one line every this many seconds and at
  # every validation, instead of a progress bar. Only process 0 prints progress.
  c.log = ml_collections.ConfigDict()
  c.log.every_seconds = 60.0

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # "" = auto-detect (Cloud TPU, SLURM) or single process
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  # With several processes: how long all may take to join, and how long a process may go silent before
  # the others stop, naming it (convirt_jax/multihost.py).
  c.distributed.initialization_timeout_seconds = 300
  c.distributed.heartbeat_timeout_seconds = 60


_CHOICES = {
    "data.uncertainty": ("zeros", "ones", "ignore"),
    "data.task": ("auto", "binary", "multilabel", "multiclass"),
    "data.unit": ("image", "study"),
    "data.augment_on": AUGMENT_ON,
    "model.image.depth": (18, 34, 50, 101),
    "model.text.pooling": ("max", "mean", "cls"),
    "model.image.batch_norm": ("batch", "frozen"),
    "train.precision": ("auto", "float32", "bfloat16"),
    "train.remat": (False, True),
    "optimizer.schedule": ("constant", "cosine", "plateau"),
}
_POSITIVE = ("model.image.width", "model.projection_dim",
             "model.projection_hidden", "loss.temperature", "data.image_size", "data.stored_size",
             "train.batch_size", "optimizer.lr", "checkpoint.every_steps", "checkpoint.keep",
             "eval.every_steps", "eval.batch_size", "log.every_seconds")


def check_data_dir(config: ml_collections.ConfigDict) -> None:
  """ConfigError when the data set needs config.data.dir (its registration says so) and it is empty."""
  needed = registry.needs_dir(config.data.name)
  if needed and not config.data.dir:
    raise ConfigError(f"config.data.dir is empty: give {needed} (--config.data.dir=/path/to/it)")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key that is unknown, missing or out of range.

  Runs before any data is read or anything compiles; checks needing the devices (batch divisibility) are in
  `parallel.local_batch_size`, and the data checks in `data.datasets`.
  """
  check_keys_and_values(config, base_config(), _CHOICES, _POSITIVE)
  image_registry.check_image_size(image_registry.arch_from_config(config.model.image), config.data.image_size)
  get = lambda key: _get(config, key)
  check_text_length(config.model.text.max_length)
  if not 0.0 <= config.loss.image_weight <= 1.0:
    raise ConfigError(f"config.loss.image_weight={config.loss.image_weight}: must be in [0, 1]")
  if not isinstance(config.train.microbatch_size, int) or config.train.microbatch_size < 0:
    raise ConfigError(f"config.train.microbatch_size={config.train.microbatch_size!r}: must be an "
                      "integer >= 0 (0 = off) dividing the per-device batch")
  if config.train.microbatch_size and config.train.batch_size % config.train.microbatch_size:
    raise ConfigError(f"config.train.microbatch_size={config.train.microbatch_size} must divide the "
                      f"per-device batch, so also config.train.batch_size={config.train.batch_size}")
  if config.data.unit == "study" and config.data.name != "mimic_cxr":
    raise ConfigError(f"config.data.unit='study' needs a data set of studies (mimic_cxr), not "
                      f"config.data.name={config.data.name!r}: use config.data.unit='image'")
  if not isinstance(config.train.stop_patience, int) or config.train.stop_patience < 0:
    raise ConfigError(f"config.train.stop_patience={config.train.stop_patience!r}: must be an integer >= 0 "
                      "(validation evaluations without improvement; 0 = never stop early)")
  if config.train.steps <= 0 and config.train.epochs <= 0:
    raise ConfigError("config.train.steps and config.train.epochs are both 0: set one of them")
  if config.data.name == "csv" and not config.data.csv:
    raise ConfigError("config.data.csv is empty: give the CSV of pairs (--config.data.csv=/path/pairs.csv)")
  check_data_dir(config)
  text = config.model.text
  if not text.init_from:
    bert = text.config.to_dict()
    if "num_hidden_layers" not in bert or "hidden_size" not in bert:
      raise ConfigError("config.model.text.init_from is empty, so config.model.text.config must describe "
                        "the BERT to initialise randomly (hidden_size, num_hidden_layers, ...)")
    if not text.tokenizer:
      raise ConfigError("config.model.text.init_from is empty, so config.model.text.tokenizer must name a "
                        "tokenizer directory, or \"corpus\" to learn one from the training reports")
    if text.frozen_layers > bert["num_hidden_layers"]:
      raise ConfigError(f"config.model.text.frozen_layers={text.frozen_layers} exceeds the "
                        f"{bert['num_hidden_layers']} layers of the randomly initialised BERT "
                        "(model.text.config.num_hidden_layers); a random encoder has nothing worth "
                        "freezing: set --config.model.text.frozen_layers=-1")
    if text.max_length != AUTO and text.max_length > bert.get("max_position_embeddings", 512):
      raise ConfigError(f"config.model.text.max_length={text.max_length} exceeds the BERT's "
                        f"max_position_embeddings={bert.get('max_position_embeddings', 512)}")
  for lo_hi in ("augment.crop_scale", "augment.scale", "augment.brightness", "augment.contrast",
                "augment.blur_sigma"):
    lo, hi = get(lo_hi)
    if not 0 <= lo <= hi:
      raise ConfigError(f"config.{lo_hi}={(lo, hi)}: must be (low, high) with 0 <= low <= high")


def check_text_length(value) -> None:
  """model.text.max_length is "auto" or an integer >= 2, else a one-line ConfigError."""
  if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 2):
    return
  raise ConfigError(f"config.model.text.max_length={value!r}: must be \"auto\" (chosen from the training "
                    "texts) or an integer >= 2 (tokens per text, [CLS] and [SEP] included)")


def check_keys_and_values(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                          choices: dict[str, tuple], positive: tuple[str, ...]) -> None:
  """The checks every job's config gets: keys known to `reference` (its base config), values among
  their `choices` (data.name and model.image.name among the registered data sets and image encoders),
  and the `positive` keys > 0; a
  ConfigError names the first key that fails."""
  _check_known_keys(config.to_dict(), reference.to_dict(), prefix="")
  registered = {"data.name": registry.names(), "model.image.name": image_registry.names()}
  for key, allowed in {**registered, **choices}.items():
    if _get(config, key) not in allowed:
      raise ConfigError(f"config.{key}={_get(config, key)!r}: must be one of {allowed}")
  for key in positive:
    if not _get(config, key) > 0:
      raise ConfigError(f"config.{key}={_get(config, key)!r}: must be > 0")


def _get(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def _check_known_keys(tree: dict, reference: dict, prefix: str) -> None:
  for key, value in tree.items():
    if key not in reference:
      raise ConfigError(f"unknown config key config.{prefix}{key} (known here: "
                        f"{', '.join(sorted(reference))})")
    # Free-form dicts (an HF BertConfig) are not checked below their own level.
    if isinstance(value, dict) and reference[key]:
      _check_known_keys(value, reference[key], prefix=f"{prefix}{key}.")
