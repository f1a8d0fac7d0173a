"""The synthetic chest X-ray corpus (`convirt_jax.data.synthetic_cxr`) as a TFDS dataset.

Splits: train / validation / test from `generate_study`, and for retrieval "retrieval_candidates" and
"retrieval_queries": category-pure studies from `generate_category_study` (exactly one positive among the
8 categories, CheXpert 8x200-shaped), `retrieval_per_category` candidates and
`retrieval_queries_per_category` queries per category, categories in `synthetic_cxr.LABEL_NAMES` order.

The BuilderConfig is named by a hash of the parameters and of the generator's (every module of the
package) and the report parser's source, so a cached build is never reused after either changes.
"""
import dataclasses
import hashlib
import importlib
import inspect
import pkgutil
from typing import Iterator

import ml_collections
import tensorflow_datasets as tfds

from convirt_jax.data import radiology_reports
from convirt_jax.data import synthetic_cxr
from convirt_jax.data.builders import common

RETRIEVAL_SPLITS = ("retrieval_candidates", "retrieval_queries")


# The corpus's own text queries for text->image retrieval (`datasets.load_dataset` reads them here).
RETRIEVAL_TEXT_QUERIES = synthetic_cxr.RETRIEVAL_TEXT_QUERIES


def _code_version() -> str:
  names = sorted(m.name for m in pkgutil.iter_modules(synthetic_cxr.__path__))
  modules = [synthetic_cxr] + [importlib.import_module(f"{synthetic_cxr.__name__}.{n}") for n in names]
  source = "".join(inspect.getsource(m) for m in modules) + inspect.getsource(radiology_reports)
  return hashlib.sha256(source.encode()).hexdigest()[:10]


# Read once, at import: the code this process runs, even if the files change on disk later.
CODE_VERSION = _code_version()


@dataclasses.dataclass(frozen=True)
class SyntheticParams:
  """Everything that changes the built dataset (its BuilderConfig name is a hash of these)."""
  num_train: int = 2000
  num_validation: int = 200
  num_test: int = 400
  retrieval_per_category: int = 40
  retrieval_queries_per_category: int = 5
  seed: int = 0
  image_size: int = 128
  min_sentence_tokens: int = 3
  noise_scale: float = 1.0      # render_image's domain shift (1.0 = none)
  contrast_scale: float = 1.0
  code_version: str = CODE_VERSION

  @property
  def config_name(self) -> str:
    return f"s{self.image_size}_{common.params_hash(self)}"

  def split_sizes(self) -> dict[str, int]:
    categories = len(synthetic_cxr.LABEL_NAMES)
    return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test,
            "retrieval_candidates": categories * self.retrieval_per_category,
            "retrieval_queries": categories * self.retrieval_queries_per_category}


def params_from_config(config: ml_collections.ConfigDict) -> SyntheticParams:
  s = config.data.synthetic
  return SyntheticParams(num_train=int(s.num_train), num_validation=int(s.num_validation),
                         num_test=int(s.num_test), retrieval_per_category=int(s.retrieval_per_category),
                         retrieval_queries_per_category=int(s.retrieval_queries_per_category),
                         seed=int(s.seed), image_size=int(config.data.stored_size),
                         min_sentence_tokens=int(config.data.min_sentence_tokens),
                         noise_scale=float(s.get("noise_scale", 1.0)),
                         contrast_scale=float(s.get("contrast_scale", 1.0)))


class SyntheticCxr(common.LocalBuilder):
  """Generated chest X-ray-like images with templated reports and 8 binary labels."""

  name = "convirt_synthetic"
  VERSION = common.VERSION

  def _info(self) -> tfds.core.DatasetInfo:
    return common.dataset_info(self, label_names=synthetic_cxr.LABEL_NAMES, task=common.MULTILABEL,
                               description="Synthetic chest X-ray-like images with templated reports.",
                               retrieval_categories=list(synthetic_cxr.LABEL_NAMES), skipped={})

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # everything is generated
    return {name: self._generate_examples(name, size)
            for name, size in self._params.split_sizes().items() if size > 0}

  def _study(self, split: str, index: int) -> dict:
    p = self._params
    shift = {"noise_scale": p.noise_scale, "contrast_scale": p.contrast_scale}
    if split not in RETRIEVAL_SPLITS:
      return synthetic_cxr.generate_study(p.seed, split, index, p.image_size, **shift)
    per_category = (p.retrieval_per_category if split == "retrieval_candidates"
                    else p.retrieval_queries_per_category)
    category = synthetic_cxr.LABEL_NAMES[index // per_category]  # category-major: 8 blocks of per_category
    return synthetic_cxr.generate_category_study(p.seed, split, index, category, p.image_size, **shift)

  def _generate_examples(self, split: str, size: int) -> Iterator[tuple[int, dict]]:
    bad = common.BadRecords(self.name, split, self._strict)
    written = 0
    # One thread: the generator is NumPy-bound and holds the GIL, so a thread pool would not help.
    for index in range(size):
      study = self._study(split, index)
      record_id = f"synthetic/{split}/{index}"
      text, reason = common.report_text(study["report"], self._params.min_sentence_tokens)
      if reason is not None:
        bad.reject(reason, record_id)
        continue
      yield written, {"id": record_id, "image": common.encode(study["image"], "PNG"),
                      "report": study["report"], "text": text, "labels": study["labels"]}
      written += 1
    self.info.metadata["skipped"][split] = bad.finish(written)
