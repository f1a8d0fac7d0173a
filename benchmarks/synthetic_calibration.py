"""How hard is the synthetic corpus? Cheap proxies for what pretraining can gain, printed as tables.

Linear probes (logistic regression per label, test AUC, mean over seeds) at 1% / 10% / 100% of the
training labels on
  raw:         the downsampled pixels;
  random:      global-average-pooled features of a randomly initialised small conv net with batch norm
               (what the random-init baseline gives a probe);
  contrastive: the same net after ConVIRT training (the project's loss, tau 0.1, lambda 0.75) against a
               bag-of-words text encoder fed one random report sentence per step: a weak stand-in for
               the real pretraining (no BERT, a few CPU minutes), learning from the reports alone;
  supervised:  the same net trained on every training label: a ceiling.
Plus text->image retrieval Prec@10 on the category-pure retrieval split (chance 1/8) for the
contrastive model, with the RETRIEVAL_TEXT_QUERIES as queries. The corpus is calibrated when `random`
at 1% stays well below 0.75 mean AUC while `contrastive` at 1% is clearly above it. Also times generation.
About 14 minutes on 2 CPU cores with the defaults.

  python -m benchmarks.synthetic_calibration --num_train=2000 --num_test=1000 --image_size=64
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from PIL import Image
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from convirt_jax import losses
from convirt_jax.data import radiology_reports
from convirt_jax.data import synthetic_cxr

WIDTHS = (16, 32, 64, 128)
EMBED = 128


def generate(split: str, count: int, seed: int, image_size: int, stored_size: int, category=None):
  """Images rendered at `stored_size` and resized to `image_size` (as the data pipeline does)."""
  images, labels, texts = [], [], []
  for index in range(count):
    if category is None:
      study = synthetic_cxr.generate_study(seed, split, index, stored_size)
    else:
      study = synthetic_cxr.generate_category_study(seed, split, index, category(index), stored_size)
    image = Image.fromarray(study["image"]).resize((image_size, image_size), Image.BILINEAR)
    images.append(np.asarray(image))
    labels.append(study["labels"])
    texts.append(radiology_reports.report_sentences(study["report"]))
  return np.stack(images).astype(np.float32) / 255.0, np.stack(labels), texts


def time_generation(sizes=(64, 128, 256), count: int = 50) -> dict[int, float]:
  out = {}
  for size in sizes:
    synthetic_cxr.generate_study(0, "train", 0, size)
    start = time.perf_counter()
    for index in range(count):
      synthetic_cxr.generate_study(1, "train", index, size)
    out[size] = (time.perf_counter() - start) / count * 1e3
  return out


class ConvNet(nn.Module):
  """A narrow all-conv net with batch norm, global-average-pooled: a small-ResNet stand-in."""

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = (images[..., None] - 0.5) / 0.25
    for i, width in enumerate(WIDTHS):
      for stride in ((1, 2) if i else (1,)):
        x = nn.Conv(width, (3, 3), strides=stride, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
    return x.mean(axis=(1, 2))


class Head(nn.Module):
  """Linear, or two layers with a ReLU (the ConVIRT projection)."""
  features: int
  hidden: int = 0

  @nn.compact
  def __call__(self, x):
    if self.hidden:
      x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.features)(x)


def embed(net, variables, images: np.ndarray, batch: int = 250) -> np.ndarray:
  fn = jax.jit(lambda v, x: net.apply(v, x))
  return np.concatenate([np.asarray(fn(variables, images[i:i + batch]))
                         for i in range(0, len(images), batch)])


def train(net, variables, heads: dict, head_loss, images, targets, epochs: int, seed: int,
          batch: int = 64, lr: float = 3e-3):
  """AdamW with cosine decay on net + heads, minimising head_loss(heads, features, targets(idx, rng)).

  Random horizontal flips, as the pretraining augmentations do. Returns the net's variables and the
  head parameters.
  """
  params = {"net": variables["params"], "heads": heads}
  batch_stats = variables["batch_stats"]
  steps = epochs * (len(images) // batch)
  optimizer = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
  opt_state = optimizer.init(params)

  def loss_fn(p, stats, x, y):
    feats, updates = net.apply({"params": p["net"], "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"])
    return head_loss(p["heads"], feats, y), updates["batch_stats"]

  @jax.jit
  def step(p, stats, s, x, y):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, stats, x, y)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), stats, s, loss

  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    order = rng.permutation(len(images))
    epoch_losses = []
    for i in range(0, len(order) - batch + 1, batch):
      idx = order[i:i + batch]
      flip = rng.random(len(idx)) < 0.5
      x = np.where(flip[:, None, None], images[idx][:, :, ::-1], images[idx])
      params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x,
                                                  targets(idx, rng))
      epoch_losses.append(float(loss))
    if epoch in (0, epochs - 1) or (epoch + 1) % 5 == 0:
      print(f"  epoch {epoch + 1}/{epochs}: loss {np.mean(epoch_losses):.4f}", flush=True)
  return {"params": params["net"], "batch_stats": batch_stats}, params["heads"]


def train_supervised(net, variables, images, labels, epochs, seed):
  head = Head(labels.shape[1])
  heads = head.init(jax.random.PRNGKey(seed), jnp.zeros((1, WIDTHS[-1])))["params"]

  def head_loss(p, feats, y):
    return optax.sigmoid_binary_cross_entropy(head.apply({"params": p}, feats), y).mean()

  variables, _ = train(net, variables, heads, head_loss, images, lambda idx, rng: labels[idx],
                       epochs, seed)
  return variables


def train_contrastive(net, variables, images, sentences, vectorizer, epochs, seed):
  """ConVIRT between the image net and a bag-of-words text MLP, one random sentence per study."""
  vocabulary = sorted({s for study in sentences for s in study})
  row = {s: i for i, s in enumerate(vocabulary)}
  bags = vectorizer.transform(vocabulary).toarray().astype(np.float32)
  study_rows = [np.array([row[s] for s in study]) for study in sentences]
  image_head, text_head = Head(EMBED, EMBED), Head(EMBED, 2 * EMBED)
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  heads = {"image": image_head.init(k1, jnp.zeros((1, WIDTHS[-1])))["params"],
           "text": text_head.init(k2, jnp.zeros((1, bags.shape[1])))["params"]}

  def head_loss(p, feats, text_bags):
    image_emb = image_head.apply({"params": p["image"]}, feats)
    text_emb = text_head.apply({"params": p["text"]}, text_bags)
    return losses.convirt_loss_terms(image_emb, text_emb, temperature=0.1,
                                     image_weight=0.75)["loss"]

  def targets(idx, rng):
    return bags[[study_rows[i][rng.integers(len(study_rows[i]))] for i in idx]]

  variables, heads = train(net, variables, heads, head_loss, images, targets, epochs, seed)
  encode_images = lambda x: image_head.apply({"params": heads["image"]}, embed(net, variables, x))
  encode_texts = lambda texts: text_head.apply(
      {"params": heads["text"]}, vectorizer.transform(texts).toarray().astype(np.float32))
  return variables, encode_images, encode_texts


def text_to_image_precision(encode_images, encode_texts, images, categories,
                            k: int = 10) -> dict[str, float]:
  """Prec@k per category of its RETRIEVAL_TEXT_QUERIES against category-pure candidates."""
  image_emb = np.array(encode_images(images))
  image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
  precision = {}
  for category, queries in synthetic_cxr.RETRIEVAL_TEXT_QUERIES.items():
    text_emb = np.array(encode_texts(queries))
    text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
    top = np.argsort(-text_emb @ image_emb.T, axis=1)[:, :k]
    precision[category] = float((categories[top] == category).mean())
  return precision


def probe_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
  """A random `fraction` of the training set, topped up so every label has both classes."""
  n = len(labels)
  chosen = set(rng.choice(n, size=max(2, int(round(fraction * n))), replace=False).tolist())
  for j in range(labels.shape[1]):
    for value in (0.0, 1.0):
      if not any(labels[i, j] == value for i in chosen):
        candidates = np.flatnonzero(labels[:, j] == value)
        if len(candidates):
          chosen.add(int(rng.choice(candidates)))
  return np.array(sorted(chosen))


def linear_probe(train_x, train_y, test_x, test_y, fraction, seeds) -> np.ndarray:
  """Test AUC per label, averaged over seeds."""
  scaler = StandardScaler().fit(train_x)
  train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
  aucs = np.zeros((len(seeds), train_y.shape[1]))
  for s, seed in enumerate(seeds):
    subset = probe_subset(train_y, fraction, np.random.default_rng(seed))
    for j in range(train_y.shape[1]):
      model = LogisticRegression(C=0.1, max_iter=2000)
      model.fit(train_x[subset], train_y[subset, j])
      aucs[s, j] = roc_auc_score(test_y[:, j], model.decision_function(test_x))
  return aucs.mean(0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_train", type=int, default=2000)
  parser.add_argument("--num_test", type=int, default=1000)
  parser.add_argument("--retrieval_per_category", type=int, default=40)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--stored_size", type=int, default=128)
  parser.add_argument("--raw_size", type=int, default=32)
  parser.add_argument("--epochs", type=int, default=15)
  parser.add_argument("--fractions", type=float, nargs="+", default=(0.01, 0.1, 1.0))
  parser.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  times = time_generation()
  print("generation ms/study: " + ", ".join(f"{s} px {t:.1f}" for s, t in times.items()))
  start = time.perf_counter()
  sizes = (args.image_size, args.stored_size)
  train_x, train_y, train_text = generate("train", args.num_train, args.seed, *sizes)
  test_x, test_y, _ = generate("test", args.num_test, args.seed, *sizes)
  per = args.retrieval_per_category
  candidates_x, _, _ = generate("retrieval_candidates", 8 * per, args.seed, *sizes,
                                category=lambda i: synthetic_cxr.LABEL_NAMES[i // per])
  categories = np.array([synthetic_cxr.LABEL_NAMES[i // per] for i in range(8 * per)])
  print(f"generated {len(train_x)} + {len(test_x)} + {len(candidates_x)} studies in "
        f"{time.perf_counter() - start:.1f} s")
  print("label rates (train): " + ", ".join(
      f"{name} {rate:.2f}" for name, rate in zip(synthetic_cxr.LABEL_NAMES, train_y.mean(0))))

  def raw(images):
    small = [np.asarray(Image.fromarray(im).resize((args.raw_size,) * 2, Image.BILINEAR))
             for im in images]
    return np.stack(small).reshape(len(images), -1)

  net = ConvNet()
  random_variables = net.init(jax.random.PRNGKey(args.seed), train_x[:1])
  vectorizer = CountVectorizer(ngram_range=(1, 2), binary=True, min_df=2).fit(
      [s for study in train_text for s in study])
  start = time.perf_counter()
  print(f"contrastive training ({len(vectorizer.vocabulary_)} text n-grams):")
  contrastive_variables, encode_images, encode_texts = train_contrastive(
      net, random_variables, train_x, train_text, vectorizer, args.epochs, args.seed)
  print(f"  {time.perf_counter() - start:.1f} s")
  start = time.perf_counter()
  print("supervised training:")
  supervised_variables = train_supervised(net, random_variables, train_x, train_y, args.epochs,
                                          args.seed)
  print(f"  {time.perf_counter() - start:.1f} s")
  precision = text_to_image_precision(encode_images, encode_texts, candidates_x, categories)
  print(f"\ntext->image Prec@10, contrastive: {np.mean(list(precision.values())):.3f} (chance 0.125); "
        + ", ".join(f"{name} {value:.2f}" for name, value in precision.items()))

  feature_sets = {"raw": (raw(train_x), raw(test_x))}
  for name, variables in (("random", random_variables), ("contrastive", contrastive_variables),
                          ("supervised", supervised_variables)):
    feature_sets[name] = (embed(net, variables, train_x), embed(net, variables, test_x))
  names = [n[:10] for n in synthetic_cxr.LABEL_NAMES]
  print(f"\n{'features':11s} {'frac':>5s} " + " ".join(f"{n:>10s}" for n in names) + "   mean")
  for feature_name, (tr, te) in feature_sets.items():
    for fraction in args.fractions:
      aucs = linear_probe(tr, train_y, te, test_y, fraction, args.seeds)
      print(f"{feature_name:11s} {fraction:5.2f} " + " ".join(f"{a:10.3f}" for a in aucs) +
            f"  {aucs.mean():.3f}", flush=True)


if __name__ == "__main__":
  main()
