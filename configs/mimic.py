"""The paper's settings: ConVIRT pretraining on MIMIC-CXR-JPG (frontal views, official splits).

  python -m convirt_jax.main --config=configs/mimic.py --workdir=gs://BUCKET/convirt/mimic \
      --config.data.dir=/data/mimic-cxr-jpg --config.model.image.init_from=/data/resnet50-0676ba61.pth

ResNet50 from torchvision's ImageNet weights (a file, or "torchvision" to download them), ClinicalBERT with
its embeddings and first 6 layers frozen, heads to 512, tau 0.1, lambda 0.75, global batch 32, Adam 1e-4
with weight decay 1e-6, 224 px, learning rate halved when the validation loss plateaus, best checkpoint
kept. The data directory is PhysioNet's MIMIC-CXR-JPG layout plus the MIMIC-CXR reports (see README).
"""
from convirt_jax.config import base_config


def get_config():
  c = base_config()
  c.data.name = "mimic_cxr"
  c.data.dir = ""                     # required: --config.data.dir=...
  c.data.image_size = 224
  c.data.stored_size = 256
  c.model.image.depth = 50
  c.model.image.init_from = "torchvision"
  c.model.text.init_from = "emilyalsentzer/Bio_ClinicalBERT"
  c.model.text.frozen_layers = 6
  c.model.text.max_length = 128
  c.train.batch_size = 32
  c.train.epochs = 100
  c.optimizer.schedule = "plateau"
  c.checkpoint.every_steps = 2000
  c.eval.every_steps = 2000
  return c
