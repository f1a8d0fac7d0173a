"""The CheXpert 8x200 retrieval protocol (paper's Table 2) end to end through the transfer job, on a tiny
CheXpert-v1.0-small tree and the three CSVs in the layout of https://github.com/yuhaozhang/convirt
(8 categories x 3 candidates, 2 image and 2 text queries per category), with a tiny ConVIRT workdir
(test_transfer's, written directly) and "random"; Prec@k is checked against a numpy hand computation
on the embeddings the job scored.
"""
import csv
import importlib
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image
import pytest

from convirt_jax.jobs import transfer as transfer_job
from convirt_jax.errors import ConfigError, DataError
from convirt_jax.evaluate import chexpert_retrieval
from convirt_jax.evaluate import retrieval
from test_transfer import write_convirt_workdir  # a tiny ConVIRT workdir, written without training

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
          "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
          "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
CATEGORIES = ["Atelectasis", "Cardiomegaly", "Edema", "Fracture", "No Finding", "Pleural Effusion",
              "Pneumonia", "Pneumothorax"]
PER_CATEGORY, QUERIES, TEXTS = 3, 2, 2
KS = (5, 10)


def _write_csv(path, header, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _save_jpeg(path, rng):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  height, width = int(rng.integers(44, 60)), int(rng.integers(40, 50))
  Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(path, quality=95)


def write_retrieval_tree(root):
  """(chexpert dir, retrieval dir, positive bool [24, 8] by hand). Candidate 2 (Atelectasis) is also
  positive for Edema; candidate 4 (Cardiomegaly) has Edema -1 (uncertain: not correct); candidate 7
  (Edema) has empty columns; query image 0 is a copy of candidate 5's file."""
  rng = np.random.default_rng(0)
  chexpert_dir, sets = os.path.join(root, "chexpert"), os.path.join(root, "sets")
  small = os.path.join(chexpert_dir, "CheXpert-v1.0-small")
  rows, positive = [], np.zeros((len(CATEGORIES) * PER_CATEGORY, len(CATEGORIES)), bool)
  for c, category in enumerate(CATEGORIES):
    for i in range(PER_CATEGORY):
      n = len(rows)
      path = f"CheXpert-v1.0-small/train/patient{n + 1:05d}/study1/view1_frontal.jpg"
      _save_jpeg(os.path.join(small, path.split("/", 1)[1]), rng)
      values = {name: "0.0" for name in CATEGORIES}
      values[category] = "1.0"
      positive[n, c] = True
      if n == 2:
        values["Edema"] = "1.0"
        positive[n, CATEGORIES.index("Edema")] = True
      if n == 4:
        values["Edema"] = "-1.0"
      if n == 7:
        values = {name: ("1.0" if name == category else "") for name in CATEGORIES}
      values.update({"Path": path, "Sex": "Male", "Age": "60", "Frontal/Lateral": "Frontal", "AP/PA": "AP"})
      rows.append([values.get(column, "0.0") for column in HEADER])
  _write_csv(os.path.join(sets, "image-retrieval", "candidate.csv"), HEADER, rows)
  queries = []
  for category in CATEGORIES:
    for _ in range(QUERIES):
      path = f"CheXpert-v1.0-small/train/patient{100 + len(queries):05d}/study2/view1_frontal.jpg"
      _save_jpeg(os.path.join(small, path.split("/", 1)[1]), rng)
      queries.append([category, path])
  with open(os.path.join(small, rows[5][0].split("/", 1)[1]), "rb") as f:
    copy = f.read()
  with open(os.path.join(small, queries[0][1].split("/", 1)[1]), "wb") as f:
    f.write(copy)
  _write_csv(os.path.join(sets, "image-retrieval", "query.csv"), ["Variable", "Path"], queries)
  texts = [[category, f"{category} is present, sentence {i}."] for category in CATEGORIES[::-1]
           for i in range(TEXTS)]
  _write_csv(os.path.join(sets, "text-retrieval", "query.csv"), ["Variable", "Text"], texts)
  return chexpert_dir, sets, positive


def config_8x200(chexpert_dir, sets, encoders, tmp_path):
  c = importlib.import_module("configs.transfer.chexpert_8x200").get_config()
  c.encoders = tuple(encoders)
  c.data.dir, c.retrieval.dir = str(chexpert_dir), str(sets)
  c.retrieval.k = KS
  c.model.image.depth, c.model.image.width = 18, 0.25   # the architecture when no ConVIRT run is given
  c.data.image_size, c.data.stored_size = 32, 40       # the tiny ConVIRT run's
  c.data.build_threads = 2
  c.data.num_threads = 1
  c.eval.batch_size = 16
  return c


def _hand_precision(query, query_category, candidates, positive, k):
  """Mean over queries of the share of the k most cosine-similar candidates (ties: lower row) that are
  positive for the query's category."""
  query, candidates = np.asarray(query, np.float64), np.asarray(candidates, np.float64)
  q = query / np.linalg.norm(query, axis=1, keepdims=True)
  c = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
  similarity = q @ c.T
  shares = []
  for i in range(len(q)):
    order = sorted(range(len(c)), key=lambda j: (-similarity[i, j], j))[:k]
    shares.append(np.mean([positive[j, query_category[i]] for j in order]))
  return float(np.mean(shares))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  return write_retrieval_tree(str(tmp_path_factory.mktemp("retrieval_tree")))


def test_8x200_through_the_transfer_job_equals_the_hand_computation(tree, tmp_path, monkeypatch):
  chexpert_dir, sets, positive = tree
  convirt_dir = str(tmp_path / "pretrained")
  write_convirt_workdir(convirt_dir, {2: 1.0})
  scored = []
  real_score = chexpert_retrieval.score

  def spy(retrieval_set, ks, *args, **kwargs):
    scored.append((args, kwargs))
    return real_score(retrieval_set, ks, *args, **kwargs)

  monkeypatch.setattr(chexpert_retrieval, "score", spy)
  workdir = str(tmp_path / "job")
  results = transfer_job.run(config_8x200(chexpert_dir, sets, (convirt_dir, "random"), tmp_path), workdir)

  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert saved["methods"] == json.loads(json.dumps(results["methods"]))
  assert set(saved["methods"]["ConVIRT"]["retrieval"]) == {"image_to_image", "text_to_image"}
  assert set(saved["methods"]["Random Init."]["retrieval"]) == {"image_to_image"}  # text: ConVIRT only
  assert not os.path.exists(os.path.join(workdir, "tfds"))  # no classification set was built
  query_category = np.repeat(np.arange(len(CATEGORIES)), QUERIES)
  text_category = np.repeat(np.arange(len(CATEGORIES))[::-1], TEXTS)
  assert len(scored) == 2
  for method, (args, kwargs) in zip(("ConVIRT", "Random Init."), scored):
    candidate_features, query_features = args
    assert candidate_features.shape[0] == positive.shape[0] and query_features.shape[0] == len(query_category)
    # Query 0 is candidate 5's file: the same pixels, so the same features and its own best match.
    np.testing.assert_allclose(query_features[0], candidate_features[5], rtol=1e-5, atol=1e-6)
    scores = saved["methods"][method]["retrieval"]
    for k in KS:
      want = _hand_precision(query_features, query_category, candidate_features, positive, k)
      assert scores["image_to_image"][f"prec@{k}"] == pytest.approx(want, abs=1e-12), (method, k)
    chance = np.mean([positive[:, c].mean() for c in query_category])
    assert scores["image_to_image"]["chance"] == pytest.approx(chance)
    assert scores["image_to_image"]["n_candidates"] == 24 and scores["image_to_image"]["n_queries"] == 16
    if method == "ConVIRT":
      text_emb, candidate_emb = kwargs["text_emb"], kwargs["candidate_emb"]
      assert text_emb.shape[0] == len(text_category)
      for k in KS:
        want = _hand_precision(text_emb, text_category, candidate_emb, positive, k)
        assert scores["text_to_image"][f"prec@{k}"] == pytest.approx(want, abs=1e-12), k
    else:
      assert kwargs == {}
  markdown = open(os.path.join(workdir, "results.md")).read()
  assert "## Retrieval: CheXpert 8×200, the paper's Table 2" in markdown
  assert ("| Method | Image→image Prec@5 | Image→image Prec@10 | Text→image Prec@5 | Text→image Prec@10 |"
          in markdown)
  assert "| Random Init. |" in markdown and "| Chance |" in markdown
  # A rerun reads the cached results back.
  again = transfer_job.run(config_8x200(chexpert_dir, sets, (convirt_dir, "random"), tmp_path), workdir)
  assert json.dumps(again["methods"], sort_keys=True) == json.dumps(results["methods"], sort_keys=True)
  assert len(scored) == 2


def test_pure_candidates_give_the_same_scores_as_the_category_precision():
  rng = np.random.default_rng(3)
  category = np.repeat(np.arange(4), 5)
  positive = np.eye(4, dtype=bool)[category]
  queries, query_category = rng.normal(size=(7, 6)), rng.integers(0, 4, 7)
  candidates = rng.normal(size=(20, 6))
  ours = retrieval.precision_of_positives(queries, query_category, candidates, positive, (1, 5, 10),
                                          category_names=list("abcd"))
  reference = retrieval.precision_at_k(queries, query_category, candidates, category, (1, 5, 10),
                                       category_names=list("abcd"))
  assert ours == reference


@pytest.mark.parametrize("damage, error, parts", [
    ("remove text-retrieval/query.csv", DataError,
     ["missing text-retrieval/query.csv", "image-retrieval/candidate.csv", "(Variable,Text)",
      "https://github.com/yuhaozhang/convirt", "does not ship them"]),
    ("remove image", DataError,
     ["1 of the 40 images the retrieval CSVs list are not under config.data.dir",
      "patient00003/study1/view1_frontal.jpg", "stanfordmlgroup.github.io/competitions/chexpert"]),
    ("bad category", DataError,
     ["query.csv line 3: Variable='Lung Lesion' is not one of the 8 categories"]),
    ("drop column", DataError, ["candidate.csv: missing required column 'Fracture'"]),
    ("k too large", ConfigError, ["config.retrieval.k=(5, 30): Prec@30 needs at least 30 candidates"]),
])
def test_missing_or_bad_retrieval_files_stop_the_job_before_anything_runs(tree, tmp_path, damage, error,
                                                                         parts):
  chexpert_dir, sets, _ = tree
  copy = tmp_path / "copy"
  shutil.copytree(sets, copy / "sets")
  shutil.copytree(chexpert_dir, copy / "chexpert")
  config = config_8x200(copy / "chexpert", copy / "sets", ("random",), tmp_path)
  if damage == "remove text-retrieval/query.csv":
    os.remove(copy / "sets" / "text-retrieval" / "query.csv")
  elif damage == "remove image":
    os.remove(copy / "chexpert" / "CheXpert-v1.0-small" / "train" / "patient00003" / "study1" /
              "view1_frontal.jpg")
  elif damage == "bad category":
    path = copy / "sets" / "image-retrieval" / "query.csv"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace("Atelectasis", "Lung Lesion")
    path.write_text("\n".join(lines) + "\n")
  elif damage == "drop column":
    path = copy / "sets" / "image-retrieval" / "candidate.csv"
    path.write_text(path.read_text().replace("Fracture", "Fractures", 1))
  else:
    config.retrieval.k = (5, 30)
  workdir = tmp_path / "job"
  with pytest.raises(error) as raised:
    transfer_job.run(config, str(workdir))
  for part in parts:
    assert part in str(raised.value), str(raised.value)
  assert not workdir.exists()  # stopped before the workdir (and anything compiled)
