"""The CheXpert 8x200 retrieval protocol of the paper (ConVIRT, arXiv 2010.00747, Table 2): the transfer
job's "retrieval" protocol (configs/transfer/chexpert_8x200.py).

The evaluation sets are CSV files the paper's authors publish in https://github.com/yuhaozhang/convirt
(this project does not ship them), read from config.retrieval.dir:
  image-retrieval/candidate.csv   the 8 x 200 candidate images, with CheXpert's train.csv header
                                  (Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,...,Support Devices); Path is
                                  relative to CheXpert's parent folder ("CheXpert-v1.0-small/train/...")
  image-retrieval/query.csv       Variable,Path: expert-picked query images (10 per category)
  text-retrieval/query.csv        Variable,Text: expert-written query sentences per category
The images are CheXpert's own, under config.data.dir: the folder holding CheXpert-v1.0-small/ (or the
full-resolution CheXpert-v1.0/, whose relative paths are the same), or that folder itself.

Categories: Atelectasis, Cardiomegaly, Edema, Fracture, No Finding, Pleural Effusion, Pneumonia,
Pneumothorax. As the authors' README defines it, a retrieved candidate is correct when its CSV column for
the query's category is 1 (0, -1 and empty are not); a candidate may so be correct for several categories.
A query image that is also a candidate is not excluded (the authors do not say to).

Every image is decoded as the dataset builders decode them (`common.load_gray`, shorter side
config.data.stored_size) and gets the evaluation transform at the encoder's input size. Embeddings:
  image -> image   the encoder's pooled features (h_v), for every encoder
  text -> image    the projections of both towers (v and u), ConVIRT encoders only
Cosine similarity ranks the candidates (ties to the lower row: `retrieval.rank_candidates`); Prec@k is the
share of the top k that are correct, averaged over the queries; chance is, averaged over the queries, the
share of all candidates that are correct for the query's category (1/8 for 8 x 200 pure candidates).
`open_retrieval_set` reads and checks everything (CSVs, columns, categories, every image) before the job
compiles anything.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from convirt_jax.data.builders import common
from convirt_jax.errors import ConfigError, DataError
from convirt_jax.evaluate import features as features_lib
from convirt_jax.evaluate import retrieval
from convirt_jax.training import metric_logging

TITLE = "CheXpert 8×200 retrieval"
SOURCE_URL = "https://github.com/yuhaozhang/convirt"
CHEXPERT_URL = ("https://stanfordmlgroup.github.io/competitions/chexpert/ (Stanford AIMI; free, needs "
                "registration)")
CATEGORIES = ("Atelectasis", "Cardiomegaly", "Edema", "Fracture", "No Finding", "Pleural Effusion",
              "Pneumonia", "Pneumothorax")
CANDIDATES_CSV = "image-retrieval/candidate.csv"
IMAGE_QUERIES_CSV = "image-retrieval/query.csv"
TEXT_QUERIES_CSV = "text-retrieval/query.csv"
CHEXPERT_FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
EXPECTED = (f"{CANDIDATES_CSV}  (CheXpert's train.csv header: Path,Sex,Age,...,Support Devices; 8 x 200 "
            "rows)",
            f"{IMAGE_QUERIES_CSV}  (Variable,Path)",
            f"{TEXT_QUERIES_CSV}  (Variable,Text)")


def _missing_sets(problem: str, folder: str) -> DataError:
  return DataError(
      f"{problem}. The CheXpert 8x200 retrieval sets are expected in config.retrieval.dir={folder}:\n  "
      + "\n  ".join(EXPECTED) + f"\nThe paper's authors publish them at {SOURCE_URL} (this project does not "
      "ship them): --config.retrieval.dir=<a clone of that repository>.")


@dataclasses.dataclass(frozen=True, eq=False)
class RetrievalSet:
  """The candidates and queries, read and decoded (`open_retrieval_set`)."""
  candidate_ids: tuple[str, ...]        # Path as the CSV lists it
  candidate_images: tuple[np.ndarray, ...]  # uint8 [H, W, 1]
  candidate_positive: np.ndarray        # bool [M, len(CATEGORIES)]: the candidate's column == 1
  query_ids: tuple[str, ...]
  query_images: tuple[np.ndarray, ...]
  query_category: np.ndarray            # int64 [Q]: index in CATEGORIES
  texts: tuple[str, ...]
  text_category: np.ndarray             # int64 [T]
  identity: dict[str, Any]              # what the scores depend on besides the encoder (cache key)

  def records(self, which: str) -> list[dict[str, Any]]:
    """"candidates" or "queries" as records of the data contract (for `pipeline.eval_batches`)."""
    if which == "candidates":
      ids, images, labels = self.candidate_ids, self.candidate_images, self.candidate_positive
    else:
      ids, images = self.query_ids, self.query_images
      labels = np.eye(len(CATEGORIES), dtype=bool)[self.query_category]
    return [{"id": i, "image": image, "report": "", "text": "", "labels": row.astype(np.float32)}
            for i, image, row in zip(ids, images, labels)]

  def describe(self) -> dict[str, int]:
    return {"candidates": len(self.candidate_ids), "image_queries": len(self.query_ids),
            "text_queries": len(self.texts)}


def _rows(path: str, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
  """(line number, row) of a CSV with the required `columns`."""
  f, reader = common.open_csv(path)
  with f:
    common.require_columns(reader, columns, path)
    rows = []
    for row in reader:
      if any(row.get(c) is None for c in columns):
        raise DataError(f"{path} line {reader.first_line}: fewer fields than the {len(reader.fieldnames)} "
                        "columns of the header")
      rows.append((reader.first_line, {c: row[c].strip() for c in columns}))
  if not rows:
    raise DataError(f"{path}: no rows under the header")
  return rows


def _category(value: str, path: str, line: int) -> int:
  if value not in CATEGORIES:
    raise DataError(f"{path} line {line}: Variable={value!r} is not one of the 8 categories "
                    f"({', '.join(CATEGORIES)})")
  return CATEGORIES.index(value)


def _label(value: str, path: str, line: int, column: str) -> float:
  if not value:
    return float("nan")
  try:
    return float(value)
  except ValueError:
    raise DataError(f"{path} line {line}: {column}={value!r} is not a number (1.0, 0.0, -1.0 or "
                    "empty)") from None


def image_path(data_dir: str, listed: str) -> str | None:
  """Where a CSV's Path ("CheXpert-v1.0-small/train/patient.../view1_frontal.jpg") is under data_dir, or
  None: data_dir/Path (data_dir holds the download), data_dir/<Path without its first folder> (data_dir is
  the download), or the same under the other download's folder (small vs. full resolution)."""
  parts = [p for p in listed.replace("\\", "/").split("/") if p]
  rest = parts[1:] if parts and parts[0] in CHEXPERT_FOLDERS else parts
  for path in ([os.path.join(data_dir, *parts), os.path.join(data_dir, *rest)] +
               [os.path.join(data_dir, folder, *rest) for folder in CHEXPERT_FOLDERS]):
    if os.path.isfile(path):
      return path
  return None


def open_retrieval_set(config: ml_collections.ConfigDict) -> RetrievalSet:
  """Reads the three CSVs of config.retrieval.dir and decodes every image they name (from config.data.dir).

  Raises DataError naming the expected files and where they come from when a CSV or an image is missing,
  and naming the file and line of a malformed row; ConfigError when a k exceeds the candidates.
  """
  folder = os.path.abspath(os.path.expanduser(str(config.retrieval.dir)))
  if not config.retrieval.dir or not os.path.isdir(folder):
    raise _missing_sets(f"the directory {folder} does not exist" if config.retrieval.dir
                        else "config.retrieval.dir is empty", folder)
  paths = {name: os.path.join(folder, name) for name in (CANDIDATES_CSV, IMAGE_QUERIES_CSV, TEXT_QUERIES_CSV)}
  missing = [name for name, path in paths.items() if not os.path.isfile(path)]
  if missing:
    raise _missing_sets(f"missing {', '.join(missing)} in {folder}", folder)

  path = paths[CANDIDATES_CSV]
  candidates = _rows(path, ("Path",) + CATEGORIES)
  candidate_ids = tuple(row["Path"] for _, row in candidates)
  values = np.asarray([[_label(row[c], path, line, c) for c in CATEGORIES] for line, row in candidates])
  path = paths[IMAGE_QUERIES_CSV]
  queries = _rows(path, ("Variable", "Path"))
  query_ids = tuple(row["Path"] for _, row in queries)
  query_category = np.asarray([_category(row["Variable"], path, line) for line, row in queries], np.int64)
  path = paths[TEXT_QUERIES_CSV]
  texts = _rows(path, ("Variable", "Text"))
  for line, row in texts:
    if not row["Text"]:
      raise DataError(f"{path} line {line}: empty Text")
  text_category = np.asarray([_category(row["Variable"], path, line) for line, row in texts], np.int64)

  ks = tuple(config.retrieval.k)
  if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
    raise ConfigError(f"config.retrieval.k={ks!r}: give cut-offs >= 1, e.g. (5, 10, 50)")
  if max(ks) > len(candidate_ids):
    raise ConfigError(f"config.retrieval.k={ks!r}: Prec@{max(ks)} needs at least {max(ks)} candidates; "
                      f"{paths[CANDIDATES_CSV]} lists {len(candidate_ids)}")

  data_dir = os.path.abspath(os.path.expanduser(str(config.data.dir)))
  listed = candidate_ids + query_ids
  found = [image_path(data_dir, p) for p in listed]
  absent = [p for p, f in zip(listed, found) if f is None]
  if absent:
    raise DataError(
        f"{len(absent)} of the {len(listed)} images the retrieval CSVs list are not under config.data.dir="
        f"{data_dir} (e.g. {', '.join(absent[:3])}). Expected the CheXpert v1.0 download there, with the "
        f"paths as listed: {data_dir}/CheXpert-v1.0-small/train/patientNNNNN/studyN/viewN_frontal.jpg (or "
        f"CheXpert-v1.0/...). It is obtained from {CHEXPERT_URL}.")
  size = int(config.data.stored_size)

  def decode(item: tuple[str, str]) -> np.ndarray:
    listed_path, file_path = item
    try:
      return np.asarray(common.load_gray(file_path, size), np.uint8)[..., None]
    except common.BadImage as e:
      raise DataError(f"retrieval image {listed_path}: {e.reason}: {e}") from e

  threads = common.default_threads(int(config.data.build_threads))
  images = [image for _, image in common.ordered_map(decode, list(zip(listed, found)), threads)]
  identity = {"data_dir": data_dir, "stored_size": size,
              **{name: common.file_sha256(path) for name, path in paths.items()}}
  return RetrievalSet(
      candidate_ids=candidate_ids, candidate_images=tuple(images[:len(candidate_ids)]),
      candidate_positive=values == 1.0, query_ids=query_ids,
      query_images=tuple(images[len(candidate_ids):]), query_category=query_category,
      texts=tuple(row["Text"] for _, row in texts), text_category=text_category, identity=identity)


def score(retrieval_set: RetrievalSet, ks: Sequence[int], candidate_features: np.ndarray,
          query_features: np.ndarray, candidate_emb: np.ndarray | None = None,
          text_emb: np.ndarray | None = None) -> dict[str, Any]:
  """{"image_to_image": ...[, "text_to_image": ...]} from the embeddings (text->image when given)."""
  out = {"image_to_image": retrieval.precision_of_positives(
      query_features, retrieval_set.query_category, candidate_features, retrieval_set.candidate_positive, ks,
      category_names=CATEGORIES)}
  if text_emb is not None:
    out["text_to_image"] = retrieval.precision_of_positives(
        text_emb, retrieval_set.text_category, candidate_emb, retrieval_set.candidate_positive, ks,
        category_names=CATEGORIES)
  return out


def evaluate_encoder(encoder_variables: dict[str, Any], classifier, retrieval_set: RetrievalSet,
                     ks: Sequence[int], reading: features_lib.Reading, mesh, convirt=None) -> dict[str, Any]:
  """The protocol for one encoder: a ConVIRT encoder (`convirt`, its loaded `convirt_jax.ConVIRT`) is
  embedded by its own model (pooled features and projections, and its text tower for the text queries);
  another by the transfer job's `classifier` (an `ImageClassifier` of the same image encoder, with
  `encoder_variables`; its pooled features)."""
  ks = tuple(int(k) for k in ks)
  candidates, queries = retrieval_set.records("candidates"), retrieval_set.records("queries")
  if convirt is not None:
    embedder = features_lib.Embedder(convirt.model, convirt.variables, mesh, reading)
    cand = embedder.split(candidates, None, with_text=False)
    query = embedder.split(queries, None, with_text=False)
    text_emb = convirt.encode_texts(list(retrieval_set.texts))
    return score(retrieval_set, ks, cand["image_features"], query["image_features"],
                 candidate_emb=cand["image_emb"], text_emb=text_emb)
  embedded = features_lib.pooled_features(classifier, encoder_variables,
                                          {"candidates": candidates, "queries": queries}, reading, mesh)
  return score(retrieval_set, ks, embedded["candidates"][0], embedded["queries"][0])


def run(job, encoder) -> dict[str, Any]:
  """The transfer job's protocol (`protocols.py`: "retrieval"): image->image on the pooled features of
  every encoder, text->image on the projections of a ConVIRT encoder; `job.retrieval_set` was opened (its
  images read and checked) before anything compiled."""
  config = job.config
  settings = {**job.encoder_identity(encoder), "retrieval": job.retrieval_set.identity,
              "k": list(config.retrieval.k)}

  def compute():
    metric_logging.announce(f"Retrieval protocol: {encoder.name}...")
    return evaluate_encoder(job.encoder_variables(encoder), job.model, job.retrieval_set, config.retrieval.k,
                            features_lib.Reading.of(config), job.mesh,
                            convirt=job.convirt(encoder) if encoder.is_convirt else None)
  return job.cached("retrieval", encoder, settings, compute)
