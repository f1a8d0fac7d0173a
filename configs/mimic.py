"""ConVIRT pretraining on MIMIC-CXR-JPG with the paper's data unit, model and optimiser.

  python -m convirt_jax.main --config=configs/mimic.py --workdir=runs/mimic \
      --config.data.dir=/data/mimic-cxr-jpg --config.model.image.init_from=/data/resnet50-0676ba61.pth

As the paper (Zhang et al., sections 2-4): the unit is an image-text pair of a study, its report with one
of the study's images drawn each time (the paper counts about 217k pairs with 1.7 images each, so every
view is kept, laterals included); ResNet50 from torchvision's ImageNet weights (a file, or "torchvision"
to download them); ClinicalBERT with its embeddings and first 6 layers frozen, max-pooled token states;
heads to 512; tau 0.1, lambda 0.75; batch 32; Adam 1e-4 with weight decay 1e-6; 224 px; one random
sentence per pair; the paper's augmentations; and the downstream tasks use the checkpoint with the lowest
validation loss.

Not checked against the paper's appendix (it could not be read where this was written), so this
project's choices, each a config key:
- validation: MIMIC-CXR's official "validate" split, every 2,000 steps (eval.every_steps); its loss
  is over every image of its studies with the whole report, not one drawn image per study;
- learning-rate rule: halved after 5 evaluations without a lower validation loss (optimizer.schedule
  "plateau", plateau_factor, plateau_patience);
- stopping rule: after 15 evaluations without a lower validation loss (three halvings that did not
  help; train.stop_patience), or 100 epochs of pairs (train.epochs), whichever comes first;
- precision: train.precision="auto", bfloat16 activations on GPU/TPU (float32 on CPU).
The data directory is PhysioNet's MIMIC-CXR-JPG layout plus the MIMIC-CXR reports (see README); the build
prints each split's studies and images per study, to compare with the paper's 217k pairs and 1.7.
"""
from convirt_jax.config import base_config


def get_config():
  c = base_config()
  c.data.name = "mimic_cxr"
  c.data.dir = ""                     # required: --config.data.dir=...
  c.data.unit = "study"               # the paper's pair: a report and one of its study's images
  c.data.frontal_only = False         # 1.7 images per pair: every view
  c.data.image_size = 224
  c.data.stored_size = 256
  c.model.image.depth = 50
  c.model.image.init_from = "torchvision"
  c.model.text.init_from = "emilyalsentzer/Bio_ClinicalBERT"
  c.model.text.frozen_layers = 6
  c.model.text.max_length = "auto"    # 99.9% of the training sentences whole (README: text length)
  c.train.batch_size = 32
  c.train.epochs = 100
  c.train.stop_patience = 15
  c.optimizer.schedule = "plateau"
  c.checkpoint.every_steps = 2000
  c.eval.every_steps = 2000
  return c
