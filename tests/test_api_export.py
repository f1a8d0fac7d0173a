"""ConVIRT.load / encode_* and the PyTorch export: the exported files reproduce the embeddings in torch."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from convirt_jax import ConVIRT
from convirt_jax.jobs import export
from convirt_jax.errors import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["Moderate left pleural effusion.", "No acute cardiopulmonary process.",
         "Enlarged cardiac silhouette with pulmonary edema.", "Endotracheal tube in good position."]


@pytest.fixture(scope="module")
def workdir(tiny_run):
  """The session's shared finished run (conftest.py): the embedded default's model and schedule,
  shrunk: a quarter-width ResNet18 (not a torchvision preset, so the export builds it), a 2-layer BERT,
  warm-up + cosine (the schedule that once broke loading), 6 steps. Read here, never written."""
  return tiny_run[0]


def _best_step(workdir):
  """The step of the lowest validation loss in metrics.jsonl (the run validated at steps 3 and 6)."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if "val/loss" in line]
  assert sorted(r["step"] for r in rows) == [3, 6]
  return min(rows, key=lambda r: r["val/loss"])["step"]


def _images(n=3, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (48 + 7 * i, 40 + 5 * i), np.uint8) for i in range(n)]


def test_load_and_encode(workdir):
  model = ConVIRT.load(workdir)
  best = _best_step(workdir)
  assert model.step == best
  assert ConVIRT.load(workdir, "best").step == best
  for name in ("latest", "last", "LAST", 6, "6"):
    assert ConVIRT.load(workdir, name).step == 6
  assert ConVIRT.load(workdir, 4).step == 4
  v = model.encode_images(_images())
  u = model.encode_texts(TEXTS)
  assert v.shape == (3, 16) and u.shape == (4, 16)
  np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-5)
  assert model.encode_images(_images(), project=False).shape == (3, 128)  # ResNet18 x 0.25
  assert model.encode_texts(TEXTS, project=False).shape == (4, 32)
  # No input: no rows, of the same widths.
  assert model.encode_images([]).shape == (0, 16) and model.encode_texts([]).shape == (0, 16)
  assert model.encode_images([], project=False).shape == (0, 128)
  assert model.encode_texts([], project=False).shape == (0, 32)
  # [H, W], [H, W, 1] and grey [H, W, 3] give the same embedding; batching does not matter.
  grey = _images(1)[0]
  same = model.encode_images([grey, grey[..., None], np.repeat(grey[..., None], 3, -1)])
  np.testing.assert_allclose(same, np.repeat(same[:1], 3, 0), atol=1e-6)
  np.testing.assert_allclose(model.encode_images(_images(), batch_size=2), v, atol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    model.encode_images([grey.astype(np.float32)])
  with pytest.raises(TypeError, match="list of strings"):
    model.encode_texts("one string")


def test_load_errors(workdir, tmp_path):
  with pytest.raises(CheckpointError, match="not a convirt_jax pretraining workdir"):
    ConVIRT.load(str(tmp_path))
  with pytest.raises(CheckpointError, match="step 7"):
    ConVIRT.load(workdir, 7)
  with pytest.raises(CheckpointError, match="'newest'.*'best', 'latest'"):
    ConVIRT.load(workdir, "newest")


def _readme_block(text: str, after: str, language: str) -> str:
  """The first fenced code block of `language` after the line containing `after`."""
  return re.search(rf"```{language}\n(.*?)```", text[text.index(after):], re.S).group(1)


def test_the_readme_python_example_runs(workdir):
  """The README's API snippet, verbatim but for the workdir, on a run with the default's schedule."""
  code = _readme_block(open(os.path.join(REPO, "README.md")).read(), "### Python API", "python")
  assert 'ConVIRT.load("runs/synthetic")' in code
  namespace = {}
  exec(compile(code.replace("runs/synthetic", workdir), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  v, u, features = namespace["v"], namespace["u"], namespace["features"]
  assert v.shape[1] == u.shape[1] == 16 and features.shape == (v.shape[0], 128)
  np.testing.assert_allclose(namespace["similarity"], v @ u.T)
  assert np.abs(namespace["similarity"]).max() <= 1 + 1e-5


def test_the_readme_export_command_reproduces_the_embeddings_in_pytorch(workdir, tmp_path):
  """The README's export command, then the exported README's own PyTorch code, against convirt_jax."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  command = _readme_block(open(os.path.join(REPO, "README.md")).read(), "### Python API", "bash")
  command = command.split("#")[0].strip().replace("runs/synthetic", workdir).replace("=exported", f"={tmp_path}/exported")
  assert command.startswith("python -m convirt_jax.export"), command
  result = subprocess.run([sys.executable, *command.split()[1:]], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = tmp_path / "exported"
  for name in ("image_encoder.safetensors", "image_encoder.pt", "projection_heads.safetensors",
               "README.md", "text_encoder/config.json", "text_encoder/model.safetensors",
               "text_encoder/vocab.txt"):
    assert (out / name).exists(), name
    assert (out / name).stat().st_mode & 0o044 == 0o044, f"{name} is not readable by group and others"
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exported")], "staging left behind"
  _, info = transformers.BertModel.from_pretrained(out / "text_encoder", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]

  # Run the exported README's own code, as a user would, and compare with convirt_jax.
  namespace = {}
  code = _readme_block((out / "README.md").read_text(), "#", "python").replace('d = "."', f'd = "{out}"')
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  # Its ResNet (the quarter-width one) took the .pt file strictly as well.
  namespace["resnet"].load_state_dict(torch.load(out / "image_encoder.pt", weights_only=True), strict=True)
  model = ConVIRT.load(workdir)
  images = _images()
  torch_v = namespace["encode_images"](images).numpy()
  torch_u = namespace["encode_texts"](TEXTS).numpy()
  np.testing.assert_allclose(torch_v, model.encode_images(images), atol=1e-4)
  np.testing.assert_allclose(torch_u, model.encode_texts(TEXTS), atol=1e-4)

  # An existing output is refused without --overwrite, and replaced whole with it.
  again = subprocess.run([sys.executable, "-m", "convirt_jax.export", f"--workdir={workdir}",
                          f"--output={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert again.returncode != 0 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
  (out / "stale.txt").write_text("from an older export")
  again = subprocess.run([sys.executable, "-m", "convirt_jax.export", f"--workdir={workdir}",
                          f"--output={out}", "--overwrite", "--checkpoint=last"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert not (out / "stale.txt").exists() and (out / "README.md").exists()


def test_export_of_a_missing_workdir_is_a_clear_error(tmp_path):
  result = subprocess.run([sys.executable, "-m", "convirt_jax.export", f"--workdir={tmp_path}",
                           f"--output={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0 and "no checkpoints/" in result.stderr
  assert "Traceback" not in result.stderr and "INFO" not in result.stderr
  assert not (tmp_path / "out").exists()


def test_projection_heads_state_dict_layout():
  params = {h: {"dense1": {"kernel": np.ones((4, 3)), "bias": np.zeros(3)},
                "dense2": {"kernel": np.ones((3, 2)), "bias": np.zeros(2)}}
            for h in ("image_head", "text_head")}
  sd = export.projection_heads_state_dict(params)
  assert sd["image_head.0.weight"].shape == (3, 4) and sd["text_head.2.weight"].shape == (2, 3)
  assert set(sd) == {f"{h}.{i}.{p}" for h in ("image_head", "text_head") for i in (0, 2)
                     for p in ("weight", "bias")}
