"""The CheXpert 8x200 zero-shot retrieval of the paper (ConVIRT, arXiv 2010.00747, Table 2).

  python -m convirt_jax.transfer --config=configs/transfer/chexpert_8x200.py \
      --workdir=runs/transfer_chexpert_8x200 \
      --config.data.dir=CHEXPERT_DIR --config.retrieval.dir=RETRIEVAL_DIR

CHEXPERT_DIR holds CheXpert-v1.0-small/ (or the full-resolution CheXpert-v1.0/): the images the CSVs list.
RETRIEVAL_DIR holds image-retrieval/candidate.csv, image-retrieval/query.csv and text-retrieval/query.csv,
the evaluation sets the paper's authors publish at https://github.com/yuhaozhang/convirt (a clone of that
repository; this project does not ship them): 1,600 candidates (8 categories x 200), 10 expert-picked query
images and expert-written query sentences per category.

Prec@5 / 10 / 50 of image->image retrieval (pooled features) for every encoder and of text->image
retrieval (the projections of both towers) for the ConVIRT encoder; a retrieved image is correct when its
CheXpert label for the query's category is 1 (evaluate/chexpert_retrieval.py). No classification set is
built and nothing is trained: a few minutes on one accelerator. results.md holds the Table 2 block.
"""
from convirt_jax.transfer_config import transfer_config


def get_config():
  c = transfer_config()
  c.encoders = ("runs/mimic", "imagenet", "random")
  c.protocols = ("retrieval",)
  c.data.name = "chexpert"
  c.data.dir = ""                    # required: --config.data.dir=CHEXPERT_DIR
  c.data.image_size = 224            # the paper's input size (a ConVIRT workdir's own size wins)
  c.data.stored_size = 256           # images are decoded as the builders store them, then centre-cropped
  c.retrieval.dir = ""               # required: --config.retrieval.dir=RETRIEVAL_DIR
  c.retrieval.k = (5, 10, 50)        # Table 2's Prec@k
  return c
