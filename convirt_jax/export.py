"""Exports a trained ConVIRT to PyTorch: a torchvision image encoder, a Hugging Face BertModel, the heads.

  python -m convirt_jax.export --workdir=runs/synthetic --output=exported [--checkpoint=best] [--overwrite]

--workdir may be a gs:// run; --output is a local directory. What it writes, and how, is in the job,
`convirt_jax.jobs.export` (imported on use, so that --help and flag errors are instant).
"""
from absl import app
from absl import flags

from convirt_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the PyTorch files into.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", '"best" (lowest validation loss), "latest" or a '
                                  "step number.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")


def main(argv):
  cli.run_tool(argv, "export", workdir=_WORKDIR.value, output=_OUTPUT.value, checkpoint=_CHECKPOINT.value,
               overwrite=_OVERWRITE.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "output"])
  app.run(main, flags_parser=cli.parse_flags)
