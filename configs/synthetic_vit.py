"""The embedded default (configs/synthetic.py) with a tiny ViT as the image encoder instead of the ResNet18.

  python -m convirt_jax.main --config=configs/synthetic_vit.py --workdir=runs/synthetic_vit
  python -m convirt_jax.transfer --config=configs/transfer/synthetic.py --workdir=runs/transfer_synthetic_vit \
      --config.encoders="('runs/synthetic_vit','random')"

`vit_tiny` (`convirt_jax.models.vit`): patch 8, width 192, 4 pre-norm blocks of 3 heads; at 80 px that
is 100 patches and a class token. Everything else, data and schedule included, is the embedded
default's, so the two runs compare the encoders alone. The transfer job takes the architecture from the
workdir.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  c = synthetic.get_config()
  c.model.image.name = "vit_tiny"
  return c
