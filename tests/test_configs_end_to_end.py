"""configs/mimic.py and configs/csv.py run end to end through pretrain.run on tiny fake inputs.

Each config is used as shipped, with only what shrinks it overridden (model size, image size, steps) and
no download: a small randomly initialised BERT with a vocabulary learned from the reports instead of
the Hub's ClinicalBERT (starting from a local BERT directory is tested in test_main.py), no torchvision
weights.
"""
import importlib
import sys
import json
import os

import numpy as np
from PIL import Image
import pytest

from convirt_jax import config as config_lib
from convirt_jax.jobs import pretrain
from convirt_jax.training import checkpoints
import test_builders  # its fake MIMIC-CXR-JPG tree in the official layout

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/


def shrunk(config_name: str, tmp_path):
  config = importlib.import_module(f"configs.{config_name}").get_config()
  config.data.tfds_dir = str(tmp_path / "tfds")
  config.data.stored_size = 40
  config.data.image_size = 32
  config.data.num_threads = 1
  config.model.image.depth = 18
  config.model.image.width = 0.25
  config.model.image.init_from = ""
  config.model.text.init_from = ""
  config.model.text.tokenizer = "corpus"
  config.model.text.vocab_size = 300
  config.model.text.frozen_layers = -1
  config.model.text.config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
  config.model.text.max_length = 16
  config.model.projection_dim = 16
  config.model.projection_hidden = 32
  config.train.batch_size = 8
  config.train.steps = 2
  config.train.log_every_steps = 1
  config.checkpoint.every_steps = 2
  config.eval.every_steps = 2
  config.eval.batch_size = 8
  config.eval.random_init_baseline = False
  config.evals.linear_probe.seeds = (0,)
  config.evals.linear_probe.c_grid = (1.0,)
  return config


def _finished(workdir) -> dict:
  assert checkpoints.make_manager(str(workdir), read_only=True).latest_step() == 2
  for name in ("config.json", "metrics.jsonl", "results.json", "results.md", "loss_curve.png"):
    assert (workdir / name).exists(), name
  return json.loads((workdir / "results.json").read_text())


def test_the_mimic_config_end_to_end(tmp_path, monkeypatch, capsys):
  """The paper's config (studies as pairs, every view, plateau schedule, MIMIC-CXR's splits) on a
  MIMIC-CXR-JPG tree with bad records; its test split has too few labels to score a probe, which is
  reported, not a crash."""
  # More training studies of a PA and a lateral image each, so that a batch of 8 studies fits.
  more = [("10000032", f"5100000{i}", f"e{i}-{view.lower()}", view, "train")
          for i in range(8) for view in ("PA", "LATERAL")]
  monkeypatch.setattr(test_builders, "MIMIC_IMAGES", test_builders.MIMIC_IMAGES + more)
  monkeypatch.setattr(test_builders, "MIMIC_REPORTS", {
      **test_builders.MIMIC_REPORTS,
      **{f"5100000{i}": f"FINDINGS: Study {i} shows a small left effusion.\n" for i in range(8)}})
  root = test_builders._fake_mimic(tmp_path / "mimic")  # pylint: disable=protected-access
  config = shrunk("mimic", tmp_path)
  config.data.dir = str(root)
  workdir = tmp_path / "run"
  results = pretrain.run(config, str(workdir))
  saved = _finished(workdir)
  assert saved["run"]["config"] == "mimic_cxr" and results["run"]["evaluated_step"] == 2
  assert "linear_probe" in saved["run"].get("skipped_evaluations", {})
  assert "convirt_mimic_cxr train: 10 studies, 1.90 images per study" in capsys.readouterr().out


def test_the_csv_config_end_to_end(tmp_path):
  """A CSV of pairs with a patient column and one label: split by patient, probe scored."""
  rng = np.random.default_rng(0)
  rows = ["image,text,group,effusion"]
  (tmp_path / "images").mkdir()
  for i in range(60):
    effusion = i % 2
    image = np.clip(rng.normal(100 + 60 * effusion, 20, (48, 40)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")
    text = ("Moderate left pleural effusion." if effusion else "No pleural effusion.") + " Heart normal."
    rows.append(f"images/{i}.png,\"FINDINGS: {text}\",patient{i // 2},{effusion}")
  (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
  config = shrunk("csv", tmp_path)
  config.data.csv = str(tmp_path / "pairs.csv")
  config.data.label_columns = ("effusion",)
  workdir = tmp_path / "run"
  pretrain.run(config, str(workdir))
  saved = _finished(workdir)
  probe = saved["methods"]["ConVIRT"]["linear_probe"]
  assert [f["fraction"] for f in next(iter(probe.values()))["fractions"]] == [0.01, 0.1, 1.0]


@pytest.mark.parametrize("override, message", [
    ({"frozen_layers": 6}, "frozen_layers=-1"),
    ({"max_length": 100, "frozen_layers": -1}, "max_position_embeddings"),
])
def test_a_random_text_encoder_is_checked_before_any_build(tmp_path, override, message):
  from convirt_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  config = shrunk("csv", tmp_path)
  config.data.csv = str(tmp_path / "never-read.csv")
  config.model.text.config = config_lib.base_config().model.text.config  # BERT-base's, as shipped
  config.model.text.config.num_hidden_layers = 2  # single keys can be set, as --config.model.text.config.X
  config.model.text.config.max_position_embeddings = 32
  for key, value in override.items():
    config.model.text[key] = value
  with pytest.raises(ConfigError, match=message):
    pretrain.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists(), "a failed first command leaves no workdir behind"
