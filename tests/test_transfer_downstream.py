"""configs/transfer/{rsna,chexpert,covidx,mura}.py run end to end through the transfer job's linear protocol,
each on a tiny fake download in the data set's official layout (test_downstream_builders' trees).

Each config is used as shipped, with only what shrinks it overridden: image size, model size, the "random"
encoder (no ConVIRT run, no torchvision download), one label fraction and one seed.
"""
import importlib
import json
import os
import sys

import pytest

from convirt_jax.jobs import transfer as transfer_job
import test_downstream_builders as trees  # fake downloads in the official layouts

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

# pylint: disable-next=protected-access
FAKE_DOWNLOADS = {"rsna": trees._fake_rsna, "chexpert": trees._fake_chexpert,
                  "covidx": trees._fake_covidx, "mura": trees._fake_mura}


def shrunk(name: str, root, tmp_path):
  config = importlib.import_module(f"configs.transfer.{name}").get_config()
  config.encoders = ("random",)
  config.protocols = ("linear",)
  config.fractions = (1.0,)
  config.seeds = (0,)
  config.data.dir = str(root)
  config.data.tfds_dir = str(tmp_path / "tfds")
  config.data.image_size = 32
  config.data.stored_size = 32
  config.data.build_threads = 2
  config.data.num_threads = 1
  config.model.image.depth = 18
  config.model.image.width = 0.25
  config.linear.c_grid = (1.0,)
  config.linear.max_iter = 100
  config.eval.batch_size = 16
  return config


@pytest.mark.parametrize("name", sorted(FAKE_DOWNLOADS))
def test_paper_config_runs_the_linear_protocol_on_a_fake_download(name, tmp_path):
  root = FAKE_DOWNLOADS[name](tmp_path / name)
  workdir = tmp_path / "job"
  results = transfer_job.run(shrunk(name, root, tmp_path), str(workdir))
  saved = json.load(open(workdir / "results.json"))
  assert saved["methods"] == json.loads(json.dumps(results["methods"]))
  assert saved["metric"] == ("accuracy" if name == "covidx" else "auc")
  assert saved["task"] == {"rsna": "binary", "chexpert": "multilabel", "covidx": "multiclass",
                           "mura": "binary"}[name]
  (row,) = saved["methods"]["Random Init."]["linear"]["fractions"]
  assert row["fraction"] == 1.0 and 0.0 <= row["mean"] <= 1.0
  assert saved["run"]["splits"]["train"] == row["n_train"][0] > 0
  if name == "chexpert":  # all views (the config's data.frontal_only=False): 3 test patients x 2 views
    assert saved["run"]["splits"]["test"] == 6
  assert "## Linear classification (frozen encoder)" in (workdir / "results.md").read_text()
