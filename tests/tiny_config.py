"""A configs/synthetic.py shrunk so that a whole run (build, train, evaluate) takes seconds.

Run as a config file too: python -m convirt_jax.main --config=tests/tiny_config.py --workdir=...
A quarter-width ResNet18; tests of the PyTorch export set model.image.width = 1 (a real resnet18).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  c = synthetic.get_config()
  c.data.stored_size = 40
  c.data.image_size = 32
  c.data.synthetic.num_train = 64
  c.data.synthetic.num_validation = 32
  c.data.synthetic.num_test = 48
  c.data.synthetic.retrieval_per_category = 4
  c.data.synthetic.retrieval_queries_per_category = 2
  c.data.num_threads = 1
  c.model.image.depth = 18
  c.model.image.width = 0.25
  c.model.text.vocab_size = 300
  c.model.text.max_length = 16
  c.model.text.config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=32,
                             hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  c.model.projection_dim = 16
  c.model.projection_hidden = 32
  c.train.batch_size = 16
  c.train.steps = 6
  c.train.log_every_steps = 2
  c.optimizer.lr = 1e-3
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.checkpoint.every_steps = 2
  c.checkpoint.keep = 2
  c.eval.every_steps = 3
  c.eval.batch_size = 32
  c.evals.linear_probe.seeds = (0,)
  c.evals.linear_probe.c_grid = (1.0,)
  c.evals.retrieval.k = (5, 10)
  return c


def tiny(tfds_dir, **overrides):
  """get_config() with data.tfds_dir and overrides given as section__key=value (for
  --config.section.key=value)."""
  config = get_config()
  config.data.tfds_dir = tfds_dir
  config.update_from_flattened_dict({key.replace("__", "."): value for key, value in overrides.items()})
  return config


def cosine(tfds_dir, **overrides):
  """The embedded default's schedule (linear warm-up, then cosine decay), shrunk to the tiny run: the
  config of the shared finished run (conftest.py's tiny_run)."""
  return tiny(tfds_dir, optimizer__schedule="cosine", optimizer__warmup_steps=2, **overrides)


def transfer(root: str, encoders):
  """The transfer config on tiny encoders and a tiny synthetic labelled set (built under root/tfds):
  linear, fine-tuning and zero-shot at 10% and 100% of the labels, one seed."""
  from convirt_jax.transfer_config import transfer_config  # pylint: disable=g-import-not-at-top
  c = transfer_config()
  c.encoders = tuple(encoders)
  c.fractions = (0.1, 1.0)
  c.seeds = (0,)
  c.min_train = 10
  c.model.image.depth, c.model.image.width = 18, 0.25
  c.data.image_size = 32
  c.data.stored_size = 40
  c.data.tfds_dir = os.path.join(root, "tfds")
  c.data.num_threads = 1
  s = c.data.synthetic
  s.num_train, s.num_validation, s.num_test = 64, 32, 48
  s.retrieval_per_category = s.retrieval_queries_per_category = 0
  s.seed, s.noise_scale, s.contrast_scale = 1, 1.5, 0.85
  c.finetune.lr = 1e-3
  c.finetune.batch_size = 16
  c.finetune.epochs = 1.0
  c.finetune.min_steps = 4
  c.finetune.eval_every_steps = 2
  c.finetune.log_every_steps = 2
  c.finetune.patience = 0
  c.linear.c_grid = (1.0,)
  c.linear.max_iter = 200
  c.eval.batch_size = 32
  from convirt_jax.data import synthetic_cxr  # pylint: disable=g-import-not-at-top
  c.zeroshot.prompts = {k: tuple(v[:2]) for k, v in synthetic_cxr.RETRIEVAL_TEXT_QUERIES.items()}
  return c
