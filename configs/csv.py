"""ConVIRT on any CSV of image-report pairs (e.g. your hospital's studies), with the paper's settings.

  python -m convirt_jax.main --config=configs/csv.py --workdir=runs/my_pairs \
      --config.data.csv=/data/pairs.csv --config.data.label_columns="('effusion','pneumonia')"

The CSV has columns `image` (a path relative to the CSV's folder), `text` (the report), optionally `split`
(train/validation/test), `group` (e.g. patient id; used to split when `split` is absent) and the label
columns named in data.label_columns (binary 0/1, or a single categorical column). Labels drive the linear
probe; without them only the contrastive validation loss is reported.
"""
from convirt_jax.config import base_config


def get_config():
  c = base_config()
  c.data.name = "csv"
  c.data.csv = ""                     # required: --config.data.csv=...
  c.model.image.depth = 50
  c.model.image.init_from = "torchvision"
  c.model.text.init_from = "emilyalsentzer/Bio_ClinicalBERT"
  c.model.text.max_length = "auto"    # 99.9% of the training sentences whole (README: text length)
  c.optimizer.schedule = "plateau"
  c.checkpoint.every_steps = 1000
  c.eval.every_steps = 1000
  return c
