"""The transfer job end to end: a real (smoke) pre-training checkpoint, embedded and TFDS tasks,
the features cache beside the checkpoint (shared with the NMTune job), the results files, and bad
input."""

import io
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from nmjax import jobs
from nmjax.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import pretrain as pretrain_config  # pylint: disable=wrong-import-position
from configs import nmtune as nmtune_config  # pylint: disable=wrong-import-position
from configs import transfer as transfer_config  # pylint: disable=wrong-import-position

REQUIRED = ("task", "kind", "method", "accuracy", "sve", "lsvr", "num_train", "num_test",
            "feature_dim", "step", "noise_ratio", "seconds")


def _transfer(checkpoint_dir, workdir, arg="smoke", **fields):
  config = transfer_config.get_config(arg)
  config.checkpoint = checkpoint_dir
  for key, value in fields.items():
    config[key] = value
  return jobs.run(config, str(workdir))


def _rows(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


def _own(checkpoint, tmp_path):
  """A private copy of the shared pre-training workdir (the `checkpoint` fixture's), with an
  empty feature cache."""
  workdir = tmp_path / "pretrain"
  shutil.copytree(checkpoint, workdir, ignore=shutil.ignore_patterns("features", ".lock*"))
  return str(workdir)


def _cached(checkpoint):
  """The features files of the checkpoint's cache: {digest/step folder: sorted file names}."""
  root = os.path.join(checkpoint, "features")
  return {f"{d}/{s}": sorted(os.listdir(os.path.join(root, d, s)))
          for d in os.listdir(root) for s in os.listdir(os.path.join(root, d))}


def test_smoke_writes_results_and_a_second_run_reuses_features(checkpoint, tmp_path):
  checkpoint = _own(checkpoint, tmp_path)
  first = _transfer(checkpoint, tmp_path)
  rows = _rows(tmp_path)
  assert [(r["task"], r["method"]) for r in rows] == [("digits", "lp"), ("digits", "ridge"),
                                                      ("mnist_to_digits", "lp"),
                                                      ("mnist_to_digits", "ridge")]
  for row in rows:
    for key in REQUIRED:
      assert key in row, key
    assert 0.0 <= row["accuracy"] <= 1.0
    assert math.isfinite(row["sve"]) and 0.0 < row["lsvr"] <= 1.0
    assert row["feature_dim"] == 64 and row["step"] == 12 and row["noise_ratio"] == 0.1
  digits, transfer = rows[0], rows[2]
  assert digits["kind"] == "id" and transfer["kind"] == "far"
  assert (digits["num_train"], digits["num_test"]) == (400, 355)   # max_examples=400
  assert (transfer["num_train"], transfer["num_test"]) == (400, 355)
  assert first["features_extracted"] == 3  # digits/train, digits/test, mnist/train
  table = open(os.path.join(tmp_path, "results.md")).read()
  assert "| lp |" in table and "ID avg" in table and "mnist_to_digits" in table
  assert os.path.getsize(os.path.join(tmp_path, "spectra.png")) > 1000

  second = _transfer(checkpoint, tmp_path)
  assert second["features_extracted"] == 0
  assert [r["accuracy"] for r in _rows(tmp_path)] == [r["accuracy"] for r in rows]
  # The older task names (A->B, '+'-joined) name the same tasks; rows say the new names.
  third = _transfer(checkpoint, tmp_path, tasks="digits+mnist->digits")
  assert third["features_extracted"] == 0 and _rows(tmp_path) == [
      {**r, "seconds": s["seconds"]} for r, s in zip(rows, _rows(tmp_path))]


def test_transfer_and_nmtune_on_one_encoder_extract_features_once(checkpoint, tmp_path):
  """One feature cache beside the checkpoint, keyed by the encoder's content: the NMTune job
  in another workdir reads what the transfer job extracted."""
  checkpoint = _own(checkpoint, tmp_path)
  transferred = _transfer(checkpoint, tmp_path / "transfer", methods="ridge")
  assert transferred["features_extracted"] == 3  # digits/train, digits/test, mnist/train
  tuning = nmtune_config.get_config("smoke,methods=lp")
  tuning.checkpoint = checkpoint
  tuned = jobs.run(tuning, str(tmp_path / "nmtune"))
  assert tuned["features_extracted"] == 0
  (folder, names), = _cached(checkpoint).items()
  assert folder.endswith("/step_12") and names == [
      "digits-test-max400.npz", "digits-train-max400.npz", "mnist-train-max400.npz"]
  assert not any((tmp_path / d / "features").exists() for d in ("transfer", "nmtune"))


def test_a_checkpoint_folder_that_cannot_be_written_caches_in_the_workdir(checkpoint, tmp_path,
                                                                          monkeypatch, capsys):
  checkpoint = _own(checkpoint, tmp_path)
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and (
      mode != os.W_OK or not str(path).startswith(checkpoint)))
  first = _transfer(checkpoint, tmp_path / "out", methods="ridge", tasks="digits")
  assert first["features_extracted"] == 2
  assert f"[features] {checkpoint} is not writable; caching features under" in (
      capsys.readouterr().out)
  assert len(os.listdir(tmp_path / "out" / "features")) == 1
  assert _transfer(checkpoint, tmp_path / "out", methods="ridge",
                   tasks="digits")["features_extracted"] == 0


class _TestBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TFDS dataset the test writes itself: `features()` and `example(i, rng)` per class,
  SPLITS {split: (examples, seed)}."""

  SPLITS = {"train": (60, 0), "test": (30, 1)}

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=self.features(),
                                 supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(n, seed) for split, (n, seed) in self.SPLITS.items()}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      yield i, self.example(i, rng, seed)


class FakeCifar10(_TestBuilder, skip_registration=True):
  """Written by the test under TFDS's own name and feature spec for cifar10 (never downloaded)."""

  name = "cifar10"
  VERSION = tfds.core.Version("3.0.2")

  def features(self):
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)})

  def example(self, i, rng, seed):
    label = i % 10
    image = np.full((32, 32, 3), label * 20, np.uint8) + rng.integers(0, 30, (32, 32, 3),
                                                                     dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")  # Encoded here: TFDS needs no TensorFlow.
    png.seek(0)
    return {"id": f"{seed}_{i}", "image": png, "label": label}


def test_paper_task_reads_a_locally_written_tfds_dataset(checkpoint, tmp_path):
  data_dir = tmp_path / "data"
  FakeCifar10(data_dir=str(data_dir / "tfds")).download_and_prepare(file_format="array_record")
  checkpoint = _own(checkpoint, tmp_path)
  result = _transfer(checkpoint, tmp_path / "out", tasks="cifar10", data_dir=str(data_dir),
                     max_examples=-1)
  rows = result["rows"]
  assert [r["method"] for r in rows] == ["lp", "ridge"]
  assert (rows[0]["num_train"], rows[0]["num_test"], rows[0]["num_classes"]) == (60, 30, 10)
  # 32x32 RGB became the encoder's 28x28 grey input; features are cached under the view's key.
  assert list(_cached(checkpoint).values()) == [["cifar10-test.npz", "cifar10-train.npz"]]


def test_unknown_task_lists_known_tasks(checkpoint, tmp_path):
  with pytest.raises(ConfigError, match="'mnist->svhn' is unknown; known tasks: fashion_mnist"):
    _transfer(checkpoint, tmp_path, tasks="mnist->svhn")


def test_unknown_method(checkpoint, tmp_path):
  with pytest.raises(ConfigError, match="methods entry 'svm' is unknown; allowed: lp, ridge"):
    _transfer(checkpoint, tmp_path, methods="lp,svm")


def test_checkpoint_dir_without_a_checkpoint(tmp_path):
  empty = tmp_path / "pretrain"
  empty.mkdir()
  (empty / "config.json").write_text(json.dumps(pretrain_config.get_config("smoke").to_dict()))
  with pytest.raises(DataError, match="has no checkpoint"):
    _transfer(str(empty), tmp_path / "out")
  with pytest.raises(ConfigError, match="does not exist"):
    _transfer(str(tmp_path / "nowhere"), tmp_path / "out")
  with pytest.raises(ConfigError, match="config.checkpoint is empty"):
    _transfer("", tmp_path / "out")


def test_cli_error_is_one_line_with_exit_code_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/transfer.py:smoke",
       f"--config.checkpoint={tmp_path}", f"--workdir={tmp_path / 'out'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "config.json" in lines[-1], proc.stderr


class NmjaxFourShades(_TestBuilder):
  """28x28 grey images whose grey level is set by the class name: a 40, b 100, c 160, d 220."""

  VERSION = tfds.core.Version("1.0.0")
  CLASSES = ("a", "b", "c", "d")
  SPLITS = {"train": (80, 0), "test": (40, 1)}

  def features(self):
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=list(self.CLASSES))})

  def example(self, i, rng, seed):
    del seed
    label = i % len(self.CLASSES)
    level = 40 + 60 * "abcd".index(self.CLASSES[label])
    image = np.clip(level + rng.normal(0, 4, (28, 28, 1)), 0, 255).astype(np.uint8)
    return {"image": image, "label": label}


class NmjaxTwoShades(NmjaxFourShades):
  """Only classes d and b (in that order), with the same grey levels: a 2-of-4 test set."""

  CLASSES = ("d", "b")


def test_logit_subset_task_maps_test_classes_by_name(checkpoint, tmp_path, monkeypatch):
  """An ImageNet-R-style task end to end: the test set's classes are a named subset."""
  from nmjax import tasks  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / "data"
  for builder in (NmjaxFourShades, NmjaxTwoShades):
    builder(data_dir=str(data_dir / "tfds")).download_and_prepare(file_format="array_record")
  task = tasks.Task("four->two", "ood", tasks.Split("nmjax_four_shades", "train"),
                    (tasks.Split("nmjax_two_shades", "test"),), logit_subset=True)
  monkeypatch.setitem(tasks.TASKS, task.name, task)
  rows = _transfer(checkpoint, tmp_path / "out", tasks="four->two", methods="ridge",
                   data_dir=str(data_dir), max_examples=-1)["rows"]
  assert (rows[0]["num_classes"], rows[0]["num_test"]) == (4, 40)
  # Test labels became train classes d=3 and b=1 and only those two logits compete.
  assert rows[0]["accuracy"] >= 0.9, rows[0]
