"""model.text.max_length="auto": the length from hand-counted corpora, the cache, the config check, and a
tiny run that prints the length, records it and keeps it on resume."""
import json
import os

import pytest

from convirt_jax import config as config_lib
from convirt_jax.jobs import pretrain
from convirt_jax import text_length
from convirt_jax.errors import ConfigError
from convirt_jax.tokenizer import Tokenizer
import tiny_config

WORDS = [f"w{i}" for i in range(30)]


def _record(*sentences: str) -> dict:
  return {"id": b"r", "text": "\n".join(sentences).encode()}


@pytest.fixture(scope="module")
def tokenizer():
  # Every word of WORDS is one token: a text of n words has n + 2 tokens with [CLS] and [SEP].
  return Tokenizer.from_corpus([" ".join(WORDS)], vocab_size=200, max_length=8)


def _words(n: int) -> str:
  return " ".join(WORDS[:n])


def test_the_length_is_a_hand_count_of_the_draws(tokenizer):
  # 999 one-sentence records of 3 tokens, 1 of 22 tokens: 99.9% of the draws fit in 3 -> 8.
  source = [_record(_words(1))] * 999 + [_record(_words(20))]
  counts = text_length.measure(source, tokenizer, whole_report=False)
  assert counts == {3: 999.0, 22: 1.0}
  assert text_length.choose_length(counts, cap=512) == 8
  assert text_length.truncated_share(counts, 8) == pytest.approx(0.001)
  # One more long record: 99.8% fit in 3 tokens, so the length must hold 22 -> 24, nothing cut.
  counts = text_length.measure(source[1:] + [_record(_words(20))] * 2, tokenizer, whole_report=False)
  assert text_length.choose_length(counts, cap=512) == 24
  assert text_length.truncated_share(counts, 24) == 0.0
  assert text_length.choose_length(counts, cap=20) == 20, "capped by max_position_embeddings"

  # A record's k sentences are each drawn with probability 1/k; whole reports are one text.
  source = [_record(_words(4), _words(10)), _record(_words(30))]
  assert text_length.measure(source, tokenizer, whole_report=False) == {6: 0.5, 12: 0.5, 32: 1.0}
  assert text_length.measure(source, tokenizer, whole_report=True) == {16: 1.0, 32: 1.0}
  # By study (MIMIC-CXR's unit): each study is one draw, read from its first record.
  studies = [_record(_words(4)), _record(_words(4)), _record(_words(10))]
  assert text_length.measure(studies, tokenizer, whole_report=False, study_sizes=[2, 1]) == {6: 1.0, 12: 1.0}


def test_the_counts_are_cached_beside_the_dataset_by_tokenizer(tmp_path, tokenizer, monkeypatch):
  source = [_record(_words(1))] * 9 + [_record(_words(12))]
  first = text_length.choose(source, tokenizer, cap=64, whole_report=False, dataset_dir=str(tmp_path))
  assert (first.length, first.truncated, first.longest, first.cached) == (16, 0.0, 14, False)
  assert first.cache.startswith(str(tmp_path / "text_lengths"))
  assert json.load(open(first.cache))["counts"] == {"3": 9.0, "14": 1.0}

  def not_again(*args, **kwargs):
    raise AssertionError("measured again despite the cache")
  monkeypatch.setattr(text_length, "measure", not_again)
  again = text_length.choose(source, tokenizer.with_max_length(99), cap=64, whole_report=False,
                             dataset_dir=str(tmp_path))
  assert again.cached and again.length == 16, "the padded length is no part of the key"
  monkeypatch.undo()
  other = Tokenizer.from_corpus([" ".join(WORDS[:12])], vocab_size=40, max_length=8)  # splits w12..w29
  assert other.fingerprint() != tokenizer.fingerprint()
  assert not text_length.choose(source, other, cap=64, whole_report=False,
                                dataset_dir=str(tmp_path)).cached
  assert len(os.listdir(tmp_path / "text_lengths")) == 2


@pytest.mark.parametrize("value, ok", [("auto", True), (16, True), ("16", False), ("Auto", False),
                                       (0, False), (1, False), (16.0, False), (True, False)])
def test_the_config_takes_auto_or_an_integer(value, ok):
  config = tiny_config.get_config()
  config.model.text.max_length = value
  if ok:
    config_lib.validate(config)
  else:
    with pytest.raises(ConfigError, match=r"^config\.model\.text\.max_length=.*\"auto\".*integer >= 2"):
      config_lib.validate(config)


def test_a_run_prints_records_and_keeps_the_chosen_length(tmp_path, tiny_tfds_dir, tiny_run, capsys,
                                                          monkeypatch):
  # Sentences of the tiny synthetic corpus have 6 to 19 tokens (corpus vocabulary); 97.8% of the draws
  # have at most 16. Asking for 95% gives 16, the length of the session's shared run (tiny_run), whose
  # config this is otherwise, as far as the compiled programs go: they come from the compilation cache.
  monkeypatch.setattr(text_length, "COVERAGE", 0.95)
  config = tiny_config.cosine(tiny_tfds_dir, data__whole_report=False, eval__random_init_baseline=False,
                              evals={})
  config.model.text.max_length = "auto"
  workdir = str(tmp_path / "run")
  pretrain.run(config, workdir)
  out = capsys.readouterr().out
  assert "Text length 16 tokens (model.text.max_length=\"auto\"): the smallest multiple of 8 that holds " \
         "95.0% of the training sentences whole; it truncates 2.189% of them (the longest has 19 " \
         "tokens; 64 training units" in out
  assert "GFLOP at 16 tokens vs" in out and "at the fixed 32" in out, "cap 32 < 128"
  assert config.model.text.max_length == "auto", "the caller's config is left as it was"
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["text"]["max_length"] == 16
  cache = os.path.join(text_length.CACHE_DIR, "sentences-record-")
  assert cache in out
  from convirt_jax.api import ConVIRT  # pylint: disable=g-import-not-at-top
  assert ConVIRT.load(workdir).tokenizer.max_length == 16

  # Resuming with "auto" keeps the recorded length (whatever a new count would say); another is refused.
  assert pretrain._resume_step(config, workdir) == 6  # pylint: disable=protected-access
  assert config.model.text.max_length == 16
  assert "Text length 16 tokens (model.text.max_length=\"auto\"): as chosen when the run" in (
      capsys.readouterr().out)
  config.model.text.max_length = 24
  with pytest.raises(ConfigError, match="model.text.max_length=16"):
    pretrain._resume_step(config, workdir)  # pylint: disable=protected-access
