"""Transfer to CheXpert (ConVIRT, arXiv 2010.00747, §4 and Table 1): five findings, mean AUC.

  python -m convirt_jax.transfer --config=configs/transfer/chexpert.py --workdir=runs/transfer_chexpert \
      --config.data.dir=DOWNLOAD_DIR

DOWNLOAD_DIR: the folder holding CheXpert-v1.0-small/ (or the full-resolution CheXpert-v1.0/), or that
folder itself (free, registration with Stanford AIMI; see convirt_jax/data/builders/chexpert.py). Labels:
Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion; uncertain (-1) as 0 (U-Zeros, the
builder's default: assumed, the paper's policy could not be checked offline). Splits 218,414 / 5,000 / 234:
the official validation set is the test split, 5,000 training images held out by patient are validation.

Views: data.frontal_only=False (the builder's default is frontal only). The paper's sizes, 218,414 + 5,000
= 223,414 = every training image of CheXpert v1.0 and 234 = every image of its validation set, count the
lateral views too, so the paper used all views.

Encoders: the ConVIRT run of configs/mimic.py (runs/mimic, its best checkpoint), ImageNet (torchvision's
weights, downloaded; --config.imagenet_weights=FILE offline) and random initialisation, all with the ConVIRT
run's architecture (ResNet50, 224 px). As the paper (§4): the linear and fine-tuning protocols at 1% / 10% /
100% of the training labels, 5 runs per fraction (seeds 0-4: one training subset each) reported as mean ±
std, AUC on the test split. Add "zeroshot" to config.protocols for the zero-shot protocol (not in the
paper; its default prompts are these five labels'). Table 2's retrieval is configs/transfer/chexpert_8x200.py.

Hyperparameters are transfer_config's; where the paper's appendix could not be checked offline they are
marked "assumed" there and here. The linear protocol fits the same linear model as the paper's (a logistic
layer on frozen pooled features) to its optimum by L-BFGS, the L2 strength picked on validation
(`jobs.transfer._Job.linear` says why), rather than by Adam for a number of epochs.
"""
from convirt_jax.transfer_config import paper_protocol


def get_config():
  c = paper_protocol("chexpert", task="multilabel")  # five binary labels, mean AUC (the paper's metric)
  c.data.frontal_only = False  # all views: the paper's split sizes count the lateral ones (above)
  c.data.uncertainty = "zeros"  # assumed (U-Zeros)
  return c
