"""Transfer to COVIDx (ConVIRT, arXiv 2010.00747, §4 and Table 1): COVID-19 / pneumonia / normal, accuracy.

  python -m convirt_jax.transfer --config=configs/transfer/covidx.py --workdir=runs/transfer_covidx \
      --config.data.dir=DOWNLOAD_DIR

DOWNLOAD_DIR: a 3-class COVIDx release as COVID-Net's instructions build it (train.txt / test.txt or
train_COVIDx*.txt / test_COVIDx*.txt, train/, test/; https://github.com/lindawangg/COVID-Net, its RSNA
part needs a Kaggle account; see convirt_jax/data/builders/covidx.py). Splits 13,598 / 300 / 300: the
official test list is the test split, 300 training images held out by patient are validation.

Label fractions 10% and 100% only: as in the paper, 1% of COVIDx has too few COVID-19 images to train on.

Encoders: the ConVIRT run of configs/mimic.py (runs/mimic, its best checkpoint), ImageNet (torchvision's
weights, downloaded; --config.imagenet_weights=FILE offline) and random initialisation, all with the ConVIRT
run's architecture (ResNet50, 224 px). As the paper (§4): the linear and fine-tuning protocols, 5 runs per
fraction (seeds 0-4: one training subset each) reported as mean ± std, accuracy on the test split.
Zero-shot (not in the paper) needs --config.zeroshot.prompts for all three classes.

Hyperparameters are transfer_config's; where the paper's appendix could not be checked offline they are
marked "assumed" there and here. The linear protocol fits the same linear model as the paper's (a softmax
layer on frozen pooled features) to its optimum by L-BFGS, the L2 strength picked on validation
(`jobs.transfer._Job.linear` says why), rather than by Adam for a number of epochs.
"""
from convirt_jax.transfer_config import paper_protocol


def get_config():
  c = paper_protocol("covidx", task="multiclass")  # three classes, accuracy (the paper's metric)
  c.fractions = (0.1, 1.0)  # the paper's 10% / 100% (§4, Table 1; no 1%: too few COVID-19 images)
  return c
