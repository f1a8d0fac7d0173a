"""BERT WordPiece tokenizer giving `transformers.BertTokenizerFast`'s ids, padded to a fixed length.

Built on the `tokenizers` library like transformers' own BERT tokenizer, and built the same way: the
vocabulary comes from the checkpoint's tokenizer.json (else vocab.txt), while lowercasing, accent
stripping and CJK splitting come from tokenizer_config.json with HF's defaults (transformers ignores the
normalizer stored in tokenizer.json). Instances pickle by their settings, for grain worker processes.
"""
import collections
import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tokenizers
from tokenizers import normalizers, pre_tokenizers, processors

from convirt_jax import storage
from convirt_jax.errors import WeightsNotFound
from convirt_jax.hub import resolve_hf_dir

_SPECIAL_TOKENS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                     "cls_token": "[CLS]", "mask_token": "[MASK]"}


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _token_content(token: Any) -> str:
  # tokenizer_config.json stores special tokens as strings or as serialized AddedToken dicts.
  return token["content"] if isinstance(token, dict) else str(token)


class Tokenizer:
  """Texts -> {"input_ids", "attention_mask"}: int32 [N, max_length], "[CLS] ... [SEP]" then padding."""

  def __init__(self, vocab: Mapping[str, int], max_length: int = 128, do_lower_case: bool = True,
               strip_accents: bool | None = None, tokenize_chinese_chars: bool = True,
               **special_tokens: str):
    unknown = set(special_tokens) - set(_SPECIAL_TOKENS)
    if unknown:
      raise TypeError(f"unknown special token argument(s) {sorted(unknown)}; "
                      f"expected {_SPECIAL_TOKENS}.")
    if max_length < 2:
      raise ValueError(f"max_length={max_length} leaves no room for [CLS] and [SEP].")
    self._settings = dict(max_length=max_length, do_lower_case=do_lower_case,
                          strip_accents=strip_accents, tokenize_chinese_chars=tokenize_chinese_chars,
                          **{**_DEFAULT_SPECIALS, **special_tokens})
    self._vocab = dict(vocab)
    for name in _SPECIAL_TOKENS:
      if self._settings[name] not in self._vocab:
        raise ValueError(f"{name}={self._settings[name]!r} is not in the vocabulary.")
    self._backend = self._build_backend()
    self._counter = None  # built on first use by token_counts

  def _build_backend(self) -> tokenizers.Tokenizer:
    s = self._settings
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(self._vocab, unk_token=s["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=s["tokenize_chinese_chars"],
        strip_accents=s["strip_accents"], lowercase=s["do_lower_case"])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    cls, sep = s["cls_token"], s["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, self._vocab[cls]), (sep, self._vocab[sep])])
    # Special tokens written in the text are kept whole, as transformers does.
    tok.add_special_tokens([tokenizers.AddedToken(s[name], special=True, normalized=False)
                            for name in _SPECIAL_TOKENS])
    tok.enable_truncation(max_length=s["max_length"])  # Counts [CLS]/[SEP]: they are always kept.
    tok.enable_padding(length=s["max_length"], pad_id=self._vocab[s["pad_token"]],
                       pad_token=s["pad_token"])
    return tok

  @classmethod
  def from_pretrained(cls, dir_or_hub_name: str | os.PathLike, max_length: int = 128) -> "Tokenizer":
    """From a checkpoint directory (local or gs://, or a Hub name) holding tokenizer.json or vocab.txt."""
    if storage.is_remote(dir_or_hub_name):  # the tokenizers library reads local files only
      with storage.local_copy(dir_or_hub_name) as local:
        return cls.from_pretrained(local, max_length)
    directory = resolve_hf_dir(dir_or_hub_name)
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    specials_map = _read_json(os.path.join(directory, "special_tokens_map.json"))
    specials = {}
    for name in _SPECIAL_TOKENS:
      token = config.get(name, specials_map.get(name))
      if token is not None:
        specials[name] = _token_content(token)
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    vocab_txt = os.path.join(directory, "vocab.txt")
    if os.path.isfile(tokenizer_json):
      model = _read_json(tokenizer_json).get("model", {})
      if model.get("type") != "WordPiece":
        raise ValueError(f"{tokenizer_json}: model type {model.get('type')!r} is not WordPiece.")
      vocab = model["vocab"]
    elif os.path.isfile(vocab_txt):
      vocab = tokenizers.models.WordPiece.read_file(vocab_txt)
    else:
      raise WeightsNotFound(f"{directory!r} has neither tokenizer.json nor vocab.txt.")
    return cls(vocab, max_length=max_length, do_lower_case=config.get("do_lower_case", True),
               strip_accents=config.get("strip_accents"),
               tokenize_chinese_chars=config.get("tokenize_chinese_chars", True), **specials)

  @classmethod
  def from_corpus(cls, texts: Iterable[str], vocab_size: int, max_length: int = 128,
                  do_lower_case: bool = True) -> "Tokenizer":
    """A WordPiece vocabulary learned from texts: specials ([PAD]=0, [UNK], [CLS], [SEP], [MASK]), every
    character alone and as a "##" continuation, then the most frequent words (ties alphabetical).

    Deterministic, unlike the `tokenizers` WordPiece trainer (which breaks ties in hash order): the
    same texts give the same vocabulary in every process and every run, so runs are reproducible. Any
    word made of seen characters encodes without [UNK] (frequent words whole, rare ones spelled out).
    """
    specials = [_DEFAULT_SPECIALS[name] for name in
                ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")]
    # The same normalisation and pre-tokenisation that encoding applies.
    normalizer = normalizers.BertNormalizer(lowercase=do_lower_case)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = collections.Counter()
    for text in texts:
      counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = specials + chars + [f"##{c}" for c in chars]
    if vocab_size < len(vocab):
      raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(vocab)} special and "
                       "character tokens of this corpus")
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[:vocab_size - len(vocab)]
    return cls({token: i for i, token in enumerate(vocab)}, max_length=max_length,
               do_lower_case=do_lower_case)

  @property
  def vocab_size(self) -> int:
    return self._backend.get_vocab_size(with_added_tokens=True)

  @property
  def max_length(self) -> int:
    return self._settings["max_length"]

  @property
  def pad_token_id(self) -> int:
    return self._vocab[self._settings["pad_token"]]

  def with_max_length(self, max_length: int) -> "Tokenizer":
    """The same tokenizer padding and truncating to another length."""
    settings = dict(self._settings, max_length=max_length)
    return Tokenizer(self._vocab, **settings)

  def fingerprint(self) -> str:
    """A short hash of what decides the token ids of a text (vocabulary, normalisation, special
    tokens), not of the padded length: equal fingerprints count the same tokens in every text."""
    settings = {k: v for k, v in self._settings.items() if k != "max_length"}
    content = json.dumps({"vocab": sorted(self._vocab.items(), key=lambda item: item[1]),
                          "settings": settings}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]

  def token_counts(self, texts: Sequence[str]) -> np.ndarray:
    """int64 [N]: the tokens of each text with [CLS] and [SEP], neither truncated nor padded (the
    length a text needs so that `__call__` does not cut it)."""
    if isinstance(texts, str):
      raise TypeError("Tokenizer expects a sequence of texts, not a single string.")
    if self._counter is None:
      self._counter = tokenizers.Tokenizer.from_str(self._backend.to_str())
      self._counter.no_padding()
      self._counter.no_truncation()
    return np.array([len(e.ids) for e in self._counter.encode_batch_fast(list(texts))], np.int64)

  def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    if isinstance(texts, str):
      raise TypeError("Tokenizer expects a sequence of texts, not a single string.")
    encodings = self._backend.encode_batch_fast(list(texts))
    shape = (len(encodings), self.max_length)
    input_ids = np.array([e.ids for e in encodings], np.int32).reshape(shape)
    attention_mask = np.array([e.attention_mask for e in encodings], np.int32).reshape(shape)
    return {"input_ids": input_ids, "attention_mask": attention_mask}

  def save(self, out_dir: str | os.PathLike) -> None:
    """Writes tokenizer.json, vocab.txt and configs that `BertTokenizerFast.from_pretrained` loads, into
    a local or gs:// directory."""
    if storage.is_remote(out_dir):  # the tokenizers library writes local files only
      with storage.local_staging(out_dir) as local:
        self.save(local)
      return
    os.makedirs(out_dir, exist_ok=True)
    s = self._settings
    backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
    backend.no_padding()  # Padding and truncation are per call in transformers.
    backend.no_truncation()
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    by_id = sorted(self._vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
      raise ValueError("vocabulary ids are not contiguous from 0; cannot write vocab.txt.")
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
      f.writelines(token + "\n" for token, _ in by_id)
    specials = {name: s[name] for name in _SPECIAL_TOKENS}
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": s["do_lower_case"],
              "strip_accents": s["strip_accents"], "tokenize_chinese_chars": s["tokenize_chinese_chars"],
              "model_max_length": s["max_length"], **specials}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
      with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)

  def __getstate__(self) -> dict[str, Any]:
    return {"vocab": self._vocab, "settings": self._settings}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self._vocab, self._settings = state["vocab"], state["settings"]
    self._backend = self._build_backend()
    self._counter = None
