"""A data set, an evaluation protocol and an image encoder added the way the README says (their modules,
written here at run time outside the package, plus one registration line each), run through the
transfer job together."""
import csv
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

import tiny_config
from test_image_registry import TOY_MODULE
from convirt_jax.data import registry as data_registry
from convirt_jax.evaluate import protocols
from convirt_jax.jobs import transfer as transfer_job
from convirt_jax.models import registry as image_registry

# A labelled set read from labels.csv (split, path, patient, label) and PNG images.
DATA_SET_MODULE = '''
import csv
import dataclasses
import os

import numpy as np

from convirt_jax.data.builders import classification, common

DOWNLOAD = classification.Download(dataset="Brightness set", url="(written by the test)",
                                   access="none", expected=("labels.csv (split,path,patient,label)",))


@dataclasses.dataclass(frozen=True)
class BrightnessParams(classification.Params):
  """The shared parameters only."""


def params_from_config(config):
  return BrightnessParams(**classification.shared_params(config, DOWNLOAD))


class Brightness(classification.ClassificationBuilder):
  name = "brightness_set"
  DOWNLOAD = DOWNLOAD
  LABEL_NAMES = ("Bright",)
  TASK = common.MULTILABEL
  DESCRIPTION = "Bright (1) or dark (0) noise images."

  def _open_download(self, params, fail):
    self._download = classification.find_download(params.root, "labels.csv", (), fail)

  def _splits(self):
    splits = {"train": [], "test": []}
    with open(os.path.join(self._download, "labels.csv")) as f:
      for i, row in enumerate(csv.DictReader(f)):
        splits[row["split"]].append(classification.Item(
            f"labels.csv line {i + 2}", row["path"], os.path.join(self._download, row["path"]),
            row["patient"], np.asarray([float(row["label"])], np.float32)))
    return splits
'''

# Nearest centroid on the pooled features: scores the test images by their projection on the difference
# of the positive and negative training centroids (one label), AUC.
PROTOCOL_MODULE = '''
import numpy as np
from sklearn.metrics import roc_auc_score

from convirt_jax.evaluate import features


def run(job, encoder):
  splits = features.pooled_features(job.model, job.encoder_variables(encoder),
                                    {s: job.dataset.sources[s] for s in ("train", "test")},
                                    features.Reading.of(job.config), job.mesh)
  (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
  positive = train_y[:, 0] == 1
  direction = train_x[positive].mean(axis=0) - train_x[~positive].mean(axis=0)
  auc = float(roc_auc_score(test_y[:, 0] == 1, test_x @ direction))
  return {"main": auc, "per_label": {job.label_names[0]: auc}}
'''


@pytest.fixture
def parts(tmp_path, monkeypatch):
  package = tmp_path / "lab_parts"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "brightness_set.py").write_text(DATA_SET_MODULE)
  (package / "toy_encoder.py").write_text(TOY_MODULE)
  (package / "centroid.py").write_text(PROTOCOL_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(data_registry, "_ENTRIES", dict(data_registry._ENTRIES))
  monkeypatch.setattr(image_registry, "_ENTRIES", dict(image_registry._ENTRIES))
  monkeypatch.setattr(protocols, "_ENTRIES", dict(protocols._ENTRIES))
  # The three registration lines.
  data_registry.register("brightness", "lab_parts.brightness_set", "Brightness", "Brightness set")
  image_registry.register("toy", "lab_parts.toy_encoder", "lab_parts.toy_encoder")
  protocols.register("centroid", "transfer", "Nearest centroid (registered at run time)", "scores",
                     "lab_parts.centroid")
  yield
  for name in [m for m in sys.modules if m.startswith("lab_parts")]:
    sys.modules.pop(name)


def _write_download(root: str) -> None:
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "images"))
  with open(os.path.join(root, "labels.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["split", "path", "patient", "label"])
    for i in range(60):
      label = i % 2
      pixels = rng.integers(0, 120, (48, 48)) + (110 if label else 0)
      path = f"images/{i:03d}.png"
      Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(root, path))
      writer.writerow(["train" if i < 40 else "test", path, f"p{i}", label])


def test_a_data_set_a_protocol_and_an_image_encoder_registered_at_run_time_run_in_the_transfer_job(
    parts, tmp_path):
  download = str(tmp_path / "download")
  _write_download(download)
  root = str(tmp_path / "transfer")
  config = tiny_config.transfer(root, ("random",))
  config.data.name, config.data.dir = "brightness", download
  config.model.image.name = "toy"
  config.protocols, config.fractions = ("linear", "centroid"), (1.0,)
  workdir = os.path.join(root, "job")
  results = transfer_job.run(config, workdir)

  assert results["dataset"] == "Brightness set" and results["label_names"] == ["Bright"]
  assert results["run"]["architecture"] == "Toy (width 0.25) at 32 px"
  assert results["run"]["splits"] == {"train": 40, "test": 20}
  entry = results["methods"]["Random Init."]
  # Bright and dark images differ in every pooled feature of a random convolution: both separate them.
  assert entry["centroid"]["main"] > 0.9 and entry["linear"]["fractions"][0]["mean"] > 0.9
  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert saved["methods"]["Random Init."]["centroid"]["main"] == pytest.approx(entry["centroid"]["main"])
  markdown = open(os.path.join(workdir, "results.md")).read()
  block = markdown.split("## Nearest centroid (registered at run time)\n")[1]
  assert f"| Random Init. | {100 * entry['centroid']['main']:.1f} |" in block.split("\n## ")[0]
  assert "### Nearest centroid" in markdown.split("## Per label")[1]
