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
(`jobs.transfer._Job.linear` says why), rather than by Adam for a number of epochs.
"""
from convirt_jax.transfer_config import paper_protocol


def get_config():
  return paper_protocol("rsna", task="binary")  # one label, AUC (the paper's metric for RSNA)
