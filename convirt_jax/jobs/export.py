"""The export job: a trained ConVIRT to PyTorch (torchvision image encoder, Hugging Face BertModel, heads).

  python -m convirt_jax.export --workdir=runs/synthetic --output=exported [--checkpoint=best] [--overwrite]

--workdir may be a gs:// run; --output is a local directory.

Writes into --output (all at once: the files are written into a temporary directory beside it, which
is renamed into place, so an interrupted export leaves no half-written output; an existing --output is
only replaced with --overwrite):
  image_encoder.safetensors, image_encoder.pt  torchvision state dict (load into resnetNN() with
                                               fc = torch.nn.Identity(), strict=True; a narrow or
                                               small-stem ResNet into the torchvision ResNet that the
                                               README's `convirt_resnet` builds)
  text_encoder/                                Hugging Face BertModel directory with its tokenizer
  projection_heads.safetensors                 image_head.{0,2}.{weight,bias}, text_head.{0,2}.{...}:
                                               nn.Sequential(Linear, ReLU, Linear) state dicts
  README.md                                    the PyTorch lines that load them and reproduce the embeddings
"""
from __future__ import annotations

import os
import shutil
import tempfile
import textwrap

import importlib.util

import numpy as np
import safetensors.numpy

from convirt_jax import storage
from convirt_jax.api import ConVIRT
from convirt_jax.errors import ConfigError
from convirt_jax.interop import hf_bert
from convirt_jax.models import registry
from convirt_jax.models.convirt import image_variables


def projection_heads_state_dict(params) -> dict[str, np.ndarray]:
  """Flax heads -> torch nn.Sequential(Linear, ReLU, Linear) keys; kernels [in, out] -> weights [out, in]."""
  out = {}
  for head in ("image_head", "text_head"):
    for flax_name, torch_index in (("dense1", 0), ("dense2", 2)):
      dense = params[head][flax_name]
      out[f"{head}.{torch_index}.weight"] = np.ascontiguousarray(np.asarray(dense["kernel"]).T)
      out[f"{head}.{torch_index}.bias"] = np.asarray(dense["bias"])
  return out


def export(model, output_dir: str, overwrite: bool = False) -> None:
  """Writes the files listed in this module's docstring for a loaded `convirt_jax.ConVIRT`."""

  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not overwrite:
    raise FileExistsError(f"--output={output_dir} exists: choose another directory or pass --overwrite")
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
  try:
    variables = image_variables(model.variables)
    arch = registry.arch_from_config(model.config.model.image)
    registry.save_torchvision(arch, variables, os.path.join(staging, "image_encoder.safetensors"))
    registry.save_torchvision(arch, variables, os.path.join(staging, "image_encoder.pt"))
    hf_bert.save_hf_bert(model.text_config, model.variables["params"]["text"],
                         os.path.join(staging, "text_encoder"), tokenizer_from=model.tokenizer)
    safetensors.numpy.save_file(projection_heads_state_dict(model.variables["params"]),
                                os.path.join(staging, "projection_heads.safetensors"))
    with open(os.path.join(staging, "README.md"), "w") as f:
      f.write(readme(model))
    _user_file_modes(staging)
    if os.path.exists(output_dir):
      shutil.rmtree(output_dir)
    os.rename(staging, output_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _user_file_modes(directory: str) -> None:
  """The modes the user's umask gives new files (safetensors writes 0600, mkdtemp makes 0700)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(directory, 0o777 & ~umask)
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      os.chmod(os.path.join(root, name), 0o777 & ~umask)
    for name in files:
      os.chmod(os.path.join(root, name), 0o666 & ~umask)


def readme(model) -> str:
  c = model.config
  arch = registry.arch_from_config(c.model.image)
  encoder, build_encoder = registry.torch_builder(arch, c.data.image_size)
  build_encoder = build_encoder.replace("\n", "\n    ")  # the template's indent, which dedent removes
  return textwrap.dedent(f"""\
    # ConVIRT encoders exported from convirt_jax (step {model.step})

    {arch.title()} image encoder (torchvision), BERT text encoder (Hugging Face) and the two projection
    heads to a shared {c.model.projection_dim}-d space. Images are grayscale, resized so the shorter side is
    {c.data.image_size} px (bilinear), centre-cropped to {c.data.image_size}x{c.data.image_size},
    repeated to 3 channels and normalised with the ImageNet mean/std. Text is pooled by
    `{c.model.text.pooling}` over its valid tokens ({c.model.text.max_length} tokens at most).
    Cosine similarity of the L2-normalised projections is what ConVIRT was trained on.

    ```python
    import numpy as np, torch, torchvision, transformers
    from PIL import Image
    from safetensors.torch import load_file

    d = "."  # this directory
    {build_encoder}
    {encoder}.load_state_dict(load_file(f"{{d}}/image_encoder.safetensors"), strict=True)
    bert = transformers.BertModel.from_pretrained(f"{{d}}/text_encoder")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(f"{{d}}/text_encoder")
    heads = load_file(f"{{d}}/projection_heads.safetensors")

    def head(name):
      w1, w2 = heads[f"{{name}}.0.weight"], heads[f"{{name}}.2.weight"]
      seq = torch.nn.Sequential(torch.nn.Linear(w1.shape[1], w1.shape[0]), torch.nn.ReLU(),
                                torch.nn.Linear(w2.shape[1], w2.shape[0]))
      seq.load_state_dict({{k[len(name) + 1:]: v for k, v in heads.items() if k.startswith(name + ".")}})
      return seq

    image_head, text_head = head("image_head"), head("text_head")
    {encoder}.eval(), bert.eval(), image_head.eval(), text_head.eval()

    SIZE = {c.data.image_size}
    MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def preprocess(image):  # uint8 [H, W] grayscale
      h, w = image.shape
      new_h, new_w = (SIZE, int(SIZE * w / h)) if h <= w else (int(SIZE * h / w), SIZE)
      pil = Image.fromarray(image)
      if (new_h, new_w) != (h, w):
        pil = pil.resize((new_w, new_h), Image.BILINEAR)
      top, left = int(round((new_h - SIZE) / 2.0)), int(round((new_w - SIZE) / 2.0))
      x = np.asarray(pil.crop((left, top, left + SIZE, top + SIZE)), np.float32) / 255.0
      x = (np.repeat(x[..., None], 3, axis=-1) - MEAN) / STD
      return torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)

    @torch.no_grad()
    def encode_images(images):  # list of uint8 [H, W]
      v = image_head({encoder}(torch.stack([preprocess(im) for im in images])))
      return torch.nn.functional.normalize(v, dim=-1)

    @torch.no_grad()
    def encode_texts(texts):
      t = tokenizer(texts, padding="max_length", truncation=True, max_length={c.model.text.max_length},
                    return_tensors="pt")
      hidden = bert(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
      valid = t["attention_mask"][..., None].bool()
      {_pooling_line(c.model.text.pooling)}
      return torch.nn.functional.normalize(text_head(pooled), dim=-1)
    ```
    """)


def _pooling_line(kind: str) -> str:
  return {
      "max": "pooled = hidden.masked_fill(~valid, float('-inf')).amax(dim=1)",
      "mean": "pooled = (hidden * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)",
      "cls": "pooled = hidden[:, 0]",
  }[kind]


def run(workdir: str, output: str, checkpoint: str = "best", overwrite: bool = False) -> None:
  """The export job: loads `checkpoint` of the run in `workdir` (local or gs://) and writes `output`
  (a local directory) as `export` does; a bad argument is a UserError before anything is loaded."""
  if importlib.util.find_spec("torch") is None:
    raise ConfigError("export writes image_encoder.pt with PyTorch: pip install torch")
  if storage.is_remote(output):  # the workdir may be gs://; the export is renamed into place
    raise ConfigError(f"--output={output}: give a local directory (copy it to a bucket after)")
  output = os.path.abspath(output)
  if os.path.exists(output) and not overwrite:
    raise ConfigError(f"--output={output} exists: choose another directory or pass --overwrite")
  model = ConVIRT.load(workdir, checkpoint)
  export(model, output, overwrite=overwrite)
  print(f"exported step {model.step} of {workdir} to {output}")
