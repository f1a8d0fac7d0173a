"""Exports a trained ConVIRT to PyTorch: a torchvision ResNet, a Hugging Face BertModel and the heads.

  python -m convirt_jax.export --workdir=runs/synthetic --output=exported [--checkpoint=best]

Writes into --output:
  image_encoder.safetensors, image_encoder.pt  torchvision state dict (load into resnetNN() with
                                               fc = torch.nn.Identity(), strict=True)
  text_encoder/                                Hugging Face BertModel directory with its tokenizer
  projection_heads.safetensors                 image_head.{0,2}.{weight,bias}, text_head.{0,2}.{...}:
                                               nn.Sequential(Linear, ReLU, Linear) state dicts
  README.md                                    the PyTorch lines that load them and reproduce the embeddings
"""
from __future__ import annotations

import os
import textwrap

from absl import app
from absl import flags
import numpy as np

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the PyTorch files into.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", '"latest", "best" or a step number.')


def projection_heads_state_dict(params) -> dict[str, np.ndarray]:
  """Flax heads -> torch nn.Sequential(Linear, ReLU, Linear) keys; kernels [in, out] -> weights [out, in]."""
  out = {}
  for head in ("image_head", "text_head"):
    for flax_name, torch_index in (("dense1", 0), ("dense2", 2)):
      dense = params[head][flax_name]
      out[f"{head}.{torch_index}.weight"] = np.ascontiguousarray(np.asarray(dense["kernel"]).T)
      out[f"{head}.{torch_index}.bias"] = np.asarray(dense["bias"])
  return out


def export(model, output_dir: str) -> None:
  """Writes the files listed in this module's docstring for a loaded `convirt_jax.ConVIRT`."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from convirt_jax.interop import hf_bert, torchvision_resnet  # pylint: disable=g-import-not-at-top

  image_cfg = model.config.model.image
  if image_cfg.width != 1.0 or image_cfg.small_stem:
    # Still exported (the weights are valid), but only convirt_jax's ResNet can load them.
    print(f"note: model.image.width={image_cfg.width}, small_stem={image_cfg.small_stem} is not a "
          "torchvision architecture; image_encoder.* will not load into torchvision.models.resnetNN()")
  os.makedirs(output_dir, exist_ok=True)
  variables = {"params": model.variables["params"]["image"],
               "batch_stats": model.variables["batch_stats"]["image"]}
  torchvision_resnet.save_torchvision_resnet(variables, os.path.join(output_dir, "image_encoder.safetensors"))
  torchvision_resnet.save_torchvision_resnet(variables, os.path.join(output_dir, "image_encoder.pt"))
  hf_bert.save_hf_bert(model.text_config, model.variables["params"]["text"],
                       os.path.join(output_dir, "text_encoder"), tokenizer_from=model.tokenizer)
  safetensors.numpy.save_file(projection_heads_state_dict(model.variables["params"]),
                              os.path.join(output_dir, "projection_heads.safetensors"))
  with open(os.path.join(output_dir, "README.md"), "w") as f:
    f.write(readme(model))


def readme(model) -> str:
  c = model.config
  depth = c.model.image.depth
  return textwrap.dedent(f"""\
    # ConVIRT encoders exported from convirt_jax (step {model.step})

    ResNet{depth} image encoder (torchvision), BERT text encoder (Hugging Face) and the two projection
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
    resnet = torchvision.models.resnet{depth}()
    resnet.fc = torch.nn.Identity()
    resnet.load_state_dict(load_file(f"{{d}}/image_encoder.safetensors"), strict=True)
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
    resnet.eval(), bert.eval(), image_head.eval(), text_head.eval()

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
      v = image_head(resnet(torch.stack([preprocess(im) for im in images])))
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from convirt_jax.api import ConVIRT  # pylint: disable=g-import-not-at-top
  from convirt_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise SystemExit("error: export writes image_encoder.pt with PyTorch: pip install torch") from None
  checkpoint = _CHECKPOINT.value
  try:
    model = ConVIRT.load(_WORKDIR.value, int(checkpoint) if checkpoint.isdigit() else checkpoint)
    export(model, _OUTPUT.value)
  except UserError as e:
    raise SystemExit(f"error: {e}") from None
  print(f"exported step {model.step} of {_WORKDIR.value} to {_OUTPUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "output"])
  app.run(main)
