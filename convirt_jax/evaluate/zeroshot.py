"""Zero-shot classification with a ConVIRT model's two towers (not a protocol of the paper).

Each class is described by a few prompt sentences. The text tower and its projection head embed them;
a class's embedding is the L2-normalised mean of its prompts' (L2-normalised) embeddings, and an image's
score for the class is the cosine similarity of its projected (L2-normalised) image embedding to it.
  multilabel / binary   AUC per label of the scores (a label without prompts, or with a single class in
                        the test set, is excluded with its reason); "main" is the mean AUC
  multiclass            accuracy of the argmax over the classes (every class needs prompts)
Positives are `linear_probe.binarize_labels` (label == 1), as in the other protocols.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from convirt_jax.errors import ConfigError
from convirt_jax.evaluate import features as features_lib
from convirt_jax.evaluate import linear_probe
from convirt_jax.losses import l2_normalize
from convirt_jax.training import metric_logging

# CheXpert's five competition labels (the chexpert builder's label names), phrased like report sentences.
CHEXPERT_PROMPTS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("Bibasilar atelectasis.", "Plate-like atelectasis at the lung base.",
                    "Subsegmental atelectasis.", "Linear opacity at the base, likely atelectasis."),
    "Cardiomegaly": ("The heart is enlarged.", "Moderate cardiomegaly.", "Enlarged cardiac silhouette.",
                     "Mild cardiomegaly."),
    "Consolidation": ("Focal consolidation.", "Right lower lobe consolidation.",
                      "Patchy airspace opacity concerning for pneumonia.", "Dense lobar consolidation."),
    "Edema": ("Moderate pulmonary edema.", "Mild interstitial edema.",
              "Perihilar haziness consistent with pulmonary edema.", "Vascular congestion and edema."),
    "Pleural Effusion": ("Small right pleural effusion.", "Moderate left pleural effusion.",
                         "Bilateral pleural effusions.", "Blunting of the costophrenic angle."),
}


def check_prompt_labels(configured: Mapping[str, Sequence[str]], label_names: Sequence[str]) -> None:
  """Raises ConfigError when config.zeroshot.prompts names a label that `label_names` lacks (the
  transfer job checks the labels a builder declares before the build, then the built set's)."""
  unknown = sorted(set(map(str, configured or {})) - set(label_names))
  if unknown:
    raise ConfigError(f"config.zeroshot.prompts has labels {unknown} that the data set does not have "
                      f"(its labels: {list(label_names)})")


def resolve_prompts(configured: Mapping[str, Sequence[str]], label_names: Sequence[str],
                    task: str) -> tuple[dict[str, list[str]], dict[str, str]]:
  """({label: prompts} for the labels that have them, {label: reason} for those that do not).

  `configured` is config.zeroshot.prompts; empty means CHEXPERT_PROMPTS. Raises ConfigError when no
  label has a prompt, or (multiclass) when a class has none: argmax needs every class.
  """
  source = {str(k): [str(p) for p in v] for k, v in (configured or CHEXPERT_PROMPTS).items()}
  where = "config.zeroshot.prompts" if configured else "the default CheXpert prompts"
  check_prompt_labels(configured, label_names)
  prompts = {name: source[name] for name in label_names if name in source}
  excluded = {name: f"no prompt in {where}" for name in label_names if name not in source}
  if not prompts:
    raise ConfigError(f"zero-shot: none of the labels {list(label_names)} has a prompt in {where}; set "
                      "config.zeroshot.prompts (label -> tuple of sentences)")
  if task == "multiclass" and excluded:
    raise ConfigError(f"zero-shot multiclass needs a prompt for every class; {sorted(excluded)} have "
                      "none in config.zeroshot.prompts")
  return prompts, excluded


def class_embeddings(prompts: Mapping[str, Sequence[str]],
                     encode_texts: Callable[[list[str]], np.ndarray]) -> dict[str, np.ndarray]:
  """{label: unit vector}: the normalised mean of the normalised prompt embeddings of each label.

  `encode_texts(list of str) -> [n, d]` projections (e.g. `api.ConVIRT.encode_texts`).
  """
  texts = [t for sentences in prompts.values() for t in sentences]
  embedded = l2_normalize(np.asarray(encode_texts(texts), np.float64))
  out, start = {}, 0
  for name, sentences in prompts.items():
    mean = embedded[start:start + len(sentences)].mean(axis=0)
    out[name] = l2_normalize(mean)
    start += len(sentences)
  return out


def zeroshot_scores(image_emb: np.ndarray, class_emb: Mapping[str, np.ndarray]) -> np.ndarray:
  """[N, C] cosine similarities of the images to the classes (in `class_emb` order)."""
  images = l2_normalize(np.asarray(image_emb, np.float64))
  classes = np.stack([np.asarray(v, np.float64) for v in class_emb.values()])
  return images @ l2_normalize(classes).T


def evaluate_zeroshot(image_emb: np.ndarray, labels: np.ndarray, label_names: Sequence[str], task: str,
                      class_emb: Mapping[str, np.ndarray],
                      excluded: Mapping[str, str] | None = None) -> dict[str, Any]:
  """The zero-shot result of one encoder on the test split (JSON-ready).

  {task, metric ("auc" | "accuracy"), label_names, n_test, main, per_label {name: AUC or None},
   excluded_labels {name: reason}}.
  """
  label_names = [str(n) for n in label_names]
  positive = linear_probe.binarize_labels(labels, label_names, "test labels")
  scores = zeroshot_scores(image_emb, class_emb)
  excluded = dict(excluded or {})
  per_label = {name: None for name in label_names}
  columns = [label_names.index(name) for name in class_emb]
  for k, j in enumerate(columns):
    column = positive[:, j]
    if column.all() or not column.any():
      excluded[label_names[j]] = "single class in the test set"
    else:
      auc = linear_probe._auc_or_none  # pylint: disable=protected-access
      per_label[label_names[j]] = auc(column, scores[:, k])
  result = {"task": task, "label_names": label_names, "n_test": int(positive.shape[0]),
            "per_label": per_label, "excluded_labels": excluded}
  if task == "multiclass":
    truth = positive.argmax(axis=1)
    predicted = np.asarray(columns)[scores.argmax(axis=1)]
    return {**result, "metric": "accuracy", "main": float(np.mean(predicted == truth))}
  valid = [v for v in per_label.values() if v is not None]
  return {**result, "metric": "auc", "main": float(np.mean(valid)) if valid else None}


def run(job, encoder) -> dict[str, Any] | None:
  """The transfer job's protocol (`protocols.py`: "zeroshot"): the test split's image projections
  scored against the prompts' text embeddings; None for an encoder without a text tower (not ConVIRT)."""
  if not encoder.is_convirt:
    return None
  prompts, unprompted = resolve_prompts(job.config.zeroshot.prompts.to_dict(), job.label_names, job.task)

  def compute():
    metric_logging.announce(f"Zero-shot protocol: {encoder.name}...")
    convirt = job.convirt(encoder)
    embedder = features_lib.Embedder(convirt.model, convirt.variables, job.mesh,
                                     features_lib.Reading.of(job.config))
    test = embedder.split(job.dataset.sources["test"], None, with_text=False)
    class_emb = class_embeddings(prompts, convirt.encode_texts)
    result = evaluate_zeroshot(test["image_emb"], test["labels"], job.label_names, job.task, class_emb,
                               excluded=unprompted)
    return dict(result, prompts=prompts)
  return job.cached("zeroshot", encoder, {**job.identity(encoder), "prompts": prompts}, compute)
