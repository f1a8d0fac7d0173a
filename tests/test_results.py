"""Results writers: JSON round trip and schema, the paper-shaped markdown tables, and the PNG plots."""
import json

import numpy as np
import pytest
from PIL import Image

from convirt_jax.evaluate import linear_probe as lp
from convirt_jax.evaluate import plots
from convirt_jax.evaluate import results as results_lib
from convirt_jax.evaluate import retrieval as rt


def _probe(means, stds, per_label_100):
  return {"task": "multilabel", "metric": "auc", "label_names": ["Edema", "Atelectasis"],
          "fractions": [{"fraction": f, "mean": m, "std": s, "n_train": [n] * 3,
                         "per_label": {"Edema": per_label_100 if f == 1.0 else m, "Atelectasis": None}}
                        for f, m, s, n in zip((0.01, 0.1, 1.0), means, stds, (20, 200, 2000))]}


def _retrieval(prec, chance):
  return {"ks": [5, 10, 50], "prec@5": prec[0], "prec@10": prec[1], "prec@50": prec[2],
          "chance": chance, "n_queries": 80, "n_candidates": 1600, "per_category": {}}


@pytest.fixture
def results():
  return {
      "run": {"config": "configs/demo.py", "step": np.int64(500), "ks": (5, 10, 50)},
      "methods": {
          "Random Init.": {"linear_probe": {"CheXpert": _probe((0.5012, 0.51, 0.5), (0.0111, 0.0, 0.0),
                                                               np.float32(0.52))},
                           "retrieval": {"image_to_image": _retrieval((0.126, 0.13, 0.125), 0.125)}},
          "ConVIRT": {"linear_probe": {"CheXpert": _probe((0.8123, 0.85449, np.float64(0.871)),
                                                          (0.0101, 0.004, 0.0), float("nan"))},
                      "retrieval": {"image_to_image": _retrieval((0.5, 0.25, 0.2), 0.125),
                                    "text_to_image": _retrieval((0.6, 0.55, 0.4), 0.125)}},
      }}


def test_json_round_trip_and_schema(tmp_path, results):
  json_path, md_path = results_lib.write_results(tmp_path / "work", results)
  with open(json_path) as f:
    loaded = json.load(f)
  assert loaded == results_lib.to_json_ready(results)
  assert loaded["run"] == {"config": "configs/demo.py", "step": 500, "ks": [5, 10, 50]}
  convirt = loaded["methods"]["ConVIRT"]
  assert list(loaded["methods"]) == ["Random Init.", "ConVIRT"]  # row order is kept
  assert convirt["linear_probe"]["CheXpert"]["fractions"][2]["per_label"]["Edema"] is None  # NaN
  assert convirt["retrieval"]["text_to_image"]["prec@10"] == 0.55
  results_lib.validate_results(loaded)
  assert md_path.endswith("results.md") and not list((tmp_path / "work").glob(".*tmp"))


def test_real_outputs_pass_the_schema(tmp_path):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(300, 4)), (rng.random((300, 2)) < 0.4).astype(np.float32)
  category = np.repeat(np.arange(4), 15)
  results = {"methods": {"ConVIRT": {
      "linear_probe": {"Toy": lp.linear_probe(x, y, x, y, label_names=["p", "q"], task="multilabel")},
      "retrieval": {"image_to_image": rt.image_to_image(rng.normal(size=(60, 4)), category)}}}}
  with open(results_lib.write_results(tmp_path, results)[0]) as f:
    results_lib.validate_results(json.load(f))


def test_markdown_tables(results):
  text = results_lib.results_markdown(results_lib.to_json_ready(results))
  lines = text.splitlines()
  assert "- config: configs/demo.py" in lines and "- step: 500" in lines
  assert "| Method | CheXpert 1% | CheXpert 10% | CheXpert All |" in lines
  assert "| Random Init. | 50.1 ± 1.1 | 51.0 ± 0.0 | 50.0 ± 0.0 |" in lines
  assert "| ConVIRT | 81.2 ± 1.0 | 85.4 ± 0.4 | 87.1 ± 0.0 |" in lines
  assert "| Method | Label fraction | Edema | Atelectasis |" in lines
  assert "| Random Init. | All | 52.0 | – |" in lines and "| ConVIRT | All | – | – |" in lines
  assert ("| Method | Image→image Prec@5 | Image→image Prec@10 | Image→image Prec@50 | "
          "Text→image Prec@5 | Text→image Prec@10 | Text→image Prec@50 |") in lines
  assert "| Chance | 12.5 | 12.5 | 12.5 | 12.5 | 12.5 | 12.5 |" in lines
  assert "| Random Init. | 12.6 | 13.0 | 12.5 | – | – | – |" in lines
  assert "| ConVIRT | 50.0 | 25.0 | 20.0 | 60.0 | 55.0 | 40.0 |" in lines
  assert "| ConVIRT | 4.00× | 2.00× | 1.60× | 4.80× | 4.40× | 3.20× |" in lines  # relative to chance
  assert "training examples 1%: 20, 10%: 200, All: 2000" in text
  # Named by their data set: "Table N" is kept for the paper's own protocols.
  assert lines.index("## Linear classification: CheXpert") < lines.index(
      "## Retrieval: the evaluation set")
  assert "Table" not in text


def test_invalid_results_name_the_key(results):
  results["methods"]["ConVIRT"]["retrieval"]["text_to_image"].pop("prec@50")
  with pytest.raises(ValueError,
                     match=r"\['ConVIRT'\]\['retrieval'\]\['text_to_image'\]: missing key 'prec@50'"):
    results_lib.validate_results(results)
  with pytest.raises(ValueError, match="unknown keys \\['probe'\\]"):
    results_lib.validate_results({"methods": {"X": {"probe": {}}}})
  with pytest.raises(TypeError, match=r"key 1 is not a string"):
    results_lib.to_json_ready({"methods": {1: {}}})


def test_different_chance_levels_are_rejected(results):
  results["methods"]["Random Init."]["retrieval"]["image_to_image"]["chance"] = 0.2
  with pytest.raises(ValueError, match="chance levels differ"):
    results_lib.results_markdown(results)


def _check_png(path, min_size):
  with Image.open(path) as image:
    assert image.format == "PNG"
    assert image.width >= min_size[0] and image.height >= min_size[1]
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
  assert pixels.std() > 20  # not a blank canvas
  return pixels


def test_plot_probe_curves(tmp_path, results):
  plots.plot_probe_curves(results, tmp_path / "probe.png")
  _check_png(tmp_path / "probe.png", (400, 300))
  with pytest.raises(ValueError, match="no linear_probe"):
    plots.plot_probe_curves({"methods": {"X": {}}}, tmp_path / "none.png")


def test_plot_loss_curve(tmp_path):
  records = []
  for step in range(0, 301, 10):
    record = {"step": step, "train/loss": 3.0 * np.exp(-step / 100) + 0.1 * np.sin(step), "lr": 1e-4}
    if step % 100 == 0:
      record["val/loss"] = 3.0 * np.exp(-step / 100) + 0.3
    records.append(json.dumps(record))
  records.append(json.dumps({"step": 310, "train/loss": "nan", "lr": 1e-4}))  # a diverged step
  path = tmp_path / "metrics.jsonl"
  path.write_text("\n".join(records[:5] + [""] + records[5:]) + "\n")
  plots.plot_loss_curve(path, tmp_path / "plots" / "loss.png")
  _check_png(tmp_path / "plots" / "loss.png", (600, 300))
  path.write_text(records[0] + "\n{not json\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
    plots.plot_loss_curve(path, tmp_path / "bad.png")
  path.write_text(json.dumps({"step": 1, "train/loss": "high"}) + "\n")
  with pytest.raises(ValueError, match="step 1: train/loss='high' is not a number"):
    plots.plot_loss_curve(path, tmp_path / "bad.png")
  path.write_text(json.dumps({"step": 1, "lr": 0.1}) + "\n")
  with pytest.raises(ValueError, match="no 'train/loss' or 'val/loss'"):
    plots.plot_loss_curve(path, tmp_path / "bad.png")


def test_ema_is_bias_corrected():
  np.testing.assert_allclose(plots.ema([2.0] * 5, 0.9), [2.0] * 5, rtol=1e-12)
  np.testing.assert_allclose(plots.ema([0.0, 1.0], 0.5), [0.0, 2 / 3], rtol=1e-12)


def test_plot_retrieval_examples(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (20, 32, 32, 1), dtype=np.uint8)
  top = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
  relevant = np.array([[True, True, False, True], [False, False, False, True]])
  texts = ["Moderate cardiomegaly with small bilateral pleural effusions. " * 4, "Edema."]
  plots.plot_retrieval_examples(texts, images, top, relevant, tmp_path / "examples.png")
  pixels = _check_png(tmp_path / "examples.png", (500, 300))
  red, green = np.array(Image.new("RGB", (1, 1), plots.IRRELEVANT_COLOR)).reshape(3), np.array(
      Image.new("RGB", (1, 1), plots.RELEVANT_COLOR)).reshape(3)
  assert (np.abs(pixels - green).sum(-1) < 30).sum() > 500  # frames drawn in both colours
  assert (np.abs(pixels - red).sum(-1) < 30).sum() > 500
  with pytest.raises(ValueError, match="uint8"):
    plots.plot_retrieval_examples(texts, images.astype(np.float32), top, relevant, tmp_path / "x.png")
  with pytest.raises(ValueError, match="index the 20 candidate images"):
    plots.plot_retrieval_examples(texts, images, top + 15, relevant, tmp_path / "x.png")
