"""The embedded default: ConVIRT on the synthetic chest X-ray corpus, pretrain + evaluation in minutes on CPU.

  python -m convirt_jax.main --config=configs/synthetic.py --workdir=runs/synthetic

No download: the corpus (frontal radiograph-like images with findings, and reports written from
templates) is generated from a seed, a WordPiece vocabulary is learned from its reports, and a narrow
ResNet18 and a 2-layer BERT are trained from scratch. The evaluation compares the pretrained image encoder
with the same encoder randomly initialised ("Random Init."), as the paper's tables do.

Departures from the paper's recipe, so that it learns within 2,000 CPU steps: each image is
paired with its whole report (data.whole_report) rather than one random sentence, the augmentations are
milder and never flip (the reports state laterality), and the learning rate is 1e-3 with a cosine
schedule. configs/mimic.py keeps the paper's settings.
"""
from convirt_jax.config import base_config


def get_config():
  c = base_config()
  c.data.name = "synthetic"
  c.data.stored_size = 96
  c.data.image_size = 80
  c.data.synthetic.num_train = 2000
  c.data.synthetic.num_validation = 200
  c.data.synthetic.num_test = 500
  c.data.synthetic.retrieval_per_category = 40

  c.data.whole_report = True         # see the module docstring
  # The paper's augmentations scaled to an 80 px image, and no flip: the reports state laterality.
  c.augment.crop_scale = (0.8, 1.0)
  c.augment.flip_prob = 0.0
  c.augment.rotation = 5.0
  c.augment.translation = 0.05
  c.augment.brightness = (0.8, 1.2)
  c.augment.contrast = (0.8, 1.2)
  c.augment.blur_sigma = (0.1, 0.5)

  c.model.image.depth = 18
  c.model.image.width = 0.25
  c.model.image.init_from = ""
  c.model.text.init_from = ""
  c.model.text.tokenizer = "corpus"
  c.model.text.vocab_size = 1000
  c.model.text.max_length = 32
  c.model.text.frozen_layers = -1    # a randomly initialised BERT has nothing worth freezing
  c.model.text.config = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=256, max_position_embeddings=64,
                             hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  c.model.projection_dim = 128
  c.model.projection_hidden = 256

  c.train.batch_size = 32
  c.train.steps = 2000
  c.train.log_every_steps = 20
  c.optimizer.lr = 1e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 100
  c.checkpoint.every_steps = 500
  c.eval.every_steps = 500
  c.eval.batch_size = 128
  c.evals.linear_probe.seeds = (0, 1, 2)
  return c
