"""Transfer to MURA (ConVIRT, arXiv 2010.00747, §4 and Table 1): abnormal vs. normal bone radiographs, AUC.

  python -m convirt_jax.transfer --config=configs/transfer/mura.py --workdir=runs/transfer_mura \
      --config.data.dir=DOWNLOAD_DIR

DOWNLOAD_DIR: the folder holding MURA-v1.1/, or that folder itself (free, registration with Stanford AIMI;
see convirt_jax/data/builders/mura.py). Every image takes its study's label. Splits 33,078 / 3,730 /
3,197: the official validation set is the test split, 3,730 training images held out by patient are
validation.

Encoders: the ConVIRT run of configs/mimic.py (runs/mimic, its best checkpoint), ImageNet (torchvision's
weights, downloaded; --config.imagenet_weights=FILE offline) and random initialisation, all with the ConVIRT
run's architecture (ResNet50, 224 px). As the paper (§4): the linear and fine-tuning protocols at 1% / 10% /
100% of the training labels, 5 runs per fraction (seeds 0-4: one training subset each) reported as mean ±
std, AUC on the test split. Zero-shot (not in the paper) needs --config.zeroshot.prompts for "Abnormal".

Hyperparameters are transfer_config's; where the paper's appendix could not be checked offline they are
marked "assumed" there and here. The linear protocol fits the same linear model as the paper's (a logistic
layer on frozen pooled features) to its optimum by L-BFGS, the L2 strength picked on validation
(`jobs.transfer._Job.linear` says why), rather than by Adam for a number of epochs.
"""
from convirt_jax.transfer_config import paper_protocol


def get_config():
  return paper_protocol("mura", task="binary")  # one label, AUC (the paper's metric for MURA)
