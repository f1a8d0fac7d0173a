"""The ConVIRT train step in PyTorch, as a speed reference for the JAX step (benchmarks/throughput.py --peer).

  python benchmarks/torch_peer.py --batch=32 --precision=bfloat16 [--compile] [model-size flags]

The same step as `steps.make_train_step` on one device: torchvision's resnetNN (fc removed) on uint8
images normalised on the device, a transformers BertModel built from a BertConfig (random weights, no
download) with max pooling over valid tokens, the paper's projection heads (Linear-ReLU-Linear to 512),
the ConVIRT loss (tau 0.1, lambda 0.75), the embeddings and the first --frozen_layers BERT layers
frozen, Adam (lr 1e-4, L2 weight decay 1e-6); BatchNorm in training mode, dropout 0.1 as in BERT.
Speed settings a PyTorch user would pick: channels-last images and ResNet, bf16 autocast for
--precision=bfloat16 (parameters and Adam stay float32), TF32 allowed for float32 matmuls as XLA's
default precision does on GPU, optional torch.compile. Prints one line "RESULT {json}" with images/s
and the step losses.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build(args, device):
  import torch
  import torchvision
  import transformers
  from torch import nn

  class ConVIRT(nn.Module):
    def __init__(self):
      super().__init__()
      self.image = getattr(torchvision.models, f"resnet{args.depth}")(weights=None)
      features = self.image.fc.in_features
      self.image.fc = nn.Identity()
      text_config = transformers.BertConfig(
          vocab_size=args.vocab_size, hidden_size=args.text_hidden,
          num_hidden_layers=args.text_layers, num_attention_heads=max(1, args.text_hidden // 64),
          intermediate_size=4 * args.text_hidden, max_position_embeddings=max(512, args.seq_len))
      self.text = transformers.BertModel(text_config, add_pooling_layer=False)
      self.image_head = nn.Sequential(nn.Linear(features, 512), nn.ReLU(), nn.Linear(512, 512))
      self.text_head = nn.Sequential(nn.Linear(args.text_hidden, 512), nn.ReLU(),
                                     nn.Linear(512, 512))
      self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
      self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

    def forward(self, images, input_ids, attention_mask):
      x = (images.float() - self.mean) / self.std
      image_emb = self.image_head(self.image(x))
      hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
      hidden = hidden.masked_fill(attention_mask[..., None] == 0, float("-inf"))
      text_emb = self.text_head(hidden.max(dim=1).values)
      return image_emb.float(), text_emb.float()

  model = ConVIRT().to(device)
  frozen = min(args.frozen_layers, args.text_layers)
  if frozen >= 0:
    model.text.embeddings.requires_grad_(False)
    for layer in model.text.encoder.layer[:frozen]:
      layer.requires_grad_(False)
  if args.channels_last:
    model.image.to(memory_format=torch.channels_last)
  model.train()
  optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                               weight_decay=1e-6)
  return model, optimizer


def convirt_loss(image_emb, text_emb, temperature=0.1, image_weight=0.75):
  import torch
  import torch.nn.functional as F
  v, u = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
  logits = v @ u.t() / temperature
  labels = torch.arange(v.shape[0], device=v.device)
  return (image_weight * F.cross_entropy(logits, labels)
          + (1 - image_weight) * F.cross_entropy(logits.t(), labels))


def run(args) -> dict:
  import torch
  device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = True  # XLA's default f32 dot precision on GPU is TF32
  torch.backends.cudnn.allow_tf32 = True
  torch.backends.cudnn.benchmark = True
  model, optimizer = build(args, device)
  generator = torch.Generator().manual_seed(0)
  images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                         generator=generator).to(device)
  if args.channels_last:
    images = images.contiguous(memory_format=torch.channels_last)
  input_ids = torch.randint(1, args.vocab_size, (args.batch, args.seq_len), generator=generator).to(device)
  attention_mask = torch.ones_like(input_ids)
  autocast = args.precision == "bfloat16"

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
      image_emb, text_emb = model(images, input_ids, attention_mask)
    loss = convirt_loss(image_emb, text_emb)
    loss.backward()
    optimizer.step()
    return loss.detach()

  if args.compile:
    step = torch.compile(step)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  losses, times = [], []
  start = time.perf_counter()
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    losses.append(float(step()))  # float() waits for the step
    sync()
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
  return {"framework": "torch " + torch.__version__, "device": str(device),
          "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
          "batch": args.batch, "precision": args.precision, "compile": args.compile,
          "step_s": statistics.median(times), "images_per_s": args.batch / statistics.median(times),
          "first_steps_s": time.perf_counter() - start - sum(times), "losses": losses,
          "peak_memory_mib": memory / 2**20}


def add_flags(parser: argparse.ArgumentParser) -> None:
  from memory import add_model_flags  # pylint: disable=import-outside-toplevel
  add_model_flags(parser)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--precision", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--channels_last", type=int, default=1)
  parser.add_argument("--compile", action="store_true", help="torch.compile the step")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--device", default="", help="'cuda', 'cpu' ('' = cuda if available)")
  parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = default)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_flags(parser)
  args = parser.parse_args()
  if args.width != 1.0:
    parser.error("--width: torchvision's ResNets have no width multiplier; only 1.0")
  if args.threads:
    import torch
    torch.set_num_threads(args.threads)
  print("RESULT " + json.dumps(run(args)), flush=True)


if __name__ == "__main__":
  main()
