"""Transfer to RSNA Pneumonia Detection (ConVIRT, arXiv 2010.00747, §4 and Table 1): pneumonia vs. not, AUC.

  python -m convirt_jax.transfer --config=configs/transfer/rsna.py --workdir=runs/transfer_rsna \
      --config.data.dir=DOWNLOAD_DIR

DOWNLOAD_DIR: Kaggle's stage 2 download as unpacked (stage_2_train_labels.csv, stage_2_train_images/*.dcm;
a Kaggle account that accepted the competition's rules; see convirt_jax/data/builders/rsna.py). Splits
25,184 / 1,500 / 3,000 images, drawn by patient from stage_2_train (a complete download gets the paper's
proportions, about 22,639 / 1,348 / 2,697, with a warning: the builder's docstring says why).

Encoders: the ConVIRT run of configs/mimic.py (runs/mimic, its best checkpoint), ImageNet (torchvision's
weights, downloaded; --config.imagenet_weights=FILE offline) and random initialisation, all with the ConVIRT
run's architecture (ResNet50, 224 px). As the paper (§4): the linear and fine-tuning protocols at 1% / 10% /
100% of the training labels, 5 runs per fraction (seeds 0-4: one training subset each) reported as mean ±
std, AUC on the test split. Zero-shot (not in the paper) needs --config.zeroshot.prompts for "Pneumonia".

Hyperparameters are transfer_config's; where the paper's appendix could not be checked offline they are
marked "assumed" there and here. The linear protocol fits the same linear model as the paper's (a logistic
layer on frozen pooled features) to its optimum by L-BFGS, the L2 strength picked on validation
(`transfer_job._Job.linear` says why), rather than by Adam for a number of epochs.
"""
from convirt_jax.transfer_config import transfer_config


def get_config():
  c = transfer_config()
  c.encoders = ("runs/mimic", "imagenet", "random")
  c.protocols = ("linear", "finetune")
  c.fractions = (0.01, 0.1, 1.0)     # the paper's 1% / 10% / 100% (§4, Table 1)
  c.seeds = (0, 1, 2, 3, 4)          # the paper averages 5 runs
  c.data.name = "rsna"
  c.data.dir = ""                    # required: --config.data.dir=DOWNLOAD_DIR
  c.data.task = "binary"             # one label, AUC (the paper's metric for RSNA)
  c.data.image_size = 224            # the paper's input size (a ConVIRT workdir's own size wins)
  c.data.stored_size = 256

  # Linear protocol: L-BFGS logistic regression, C picked on the validation split (transfer_config).
  c.linear.c_grid = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
  c.linear.max_iter = 1000
  # Fine-tuning: Adam (PyTorch semantics), early stopping on the validation AUC (transfer_config).
  c.finetune.lr = 1e-4               # assumed: the paper's Adam learning rate (pretraining's, 1e-4)
  c.finetune.weight_decay = 1e-6     # assumed: the paper's Adam weight decay (pretraining's, 1e-6)
  c.finetune.batch_size = 64         # assumed
  c.finetune.epochs = 50.0           # assumed: an upper bound; early stopping ends runs
  c.finetune.eval_every_steps = 100  # assumed
  c.finetune.patience = 10           # assumed
  return c
