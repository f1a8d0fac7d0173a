"""ConVIRT pretraining on MIMIC-CXR-JPG (frontal views, official splits) with the paper's model and optimiser.

  python -m convirt_jax.main --config=configs/mimic.py --workdir=runs/mimic \
      --config.data.dir=/data/mimic-cxr-jpg --config.model.image.init_from=/data/resnet50-0676ba61.pth

As the paper: ResNet50 from torchvision's ImageNet weights (a file, or "torchvision" to download them),
ClinicalBERT with its embeddings and first 6 layers frozen, max-pooled token states, heads to 512,
tau 0.1, lambda 0.75, global batch 32, Adam 1e-4 with weight decay 1e-6, 224 px, one random sentence per
image, the paper's augmentations, learning rate halved when the validation loss plateaus, and the
downstream evaluation of the checkpoint with the lowest validation loss.

Where it departs from (or has not been checked against) the paper's protocol:
- validation: MIMIC-CXR's official "validate" split, every 2,000 steps (checkpoint.every_steps and
  eval.every_steps); the paper's validation set and interval are not reproduced here;
- training length: 100 epochs over frontal images (train.epochs), with no early stopping; the paper's
  unit (a study with one sampled image, about 217k pairs) and stopping rule are not reproduced;
- precision: train.precision="auto", bfloat16 activations on GPU/TPU (float32 on CPU);
- the evaluation at the end is this project's (linear probe and retrieval on MIMIC-CXR's test split),
  not the paper's downstream tables.
The data directory is PhysioNet's MIMIC-CXR-JPG layout plus the MIMIC-CXR reports (see README).
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
