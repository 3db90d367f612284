"""The NMTune job end to end: features files through main.py, a real smoke checkpoint with the
three kinds of train views, the results files, and bad input."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nmjax import features as features_lib
from nmjax import heads, jobs
from nmjax.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import nmtune as nmtune_config  # pylint: disable=wrong-import-position


def _config(arg="smoke", **fields):
  config = nmtune_config.get_config(arg)
  for key, value in fields.items():
    config[key] = value
  return config


def _rows(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


def _own(checkpoint, tmp_path):
  """A private copy of the shared pre-training workdir (the `checkpoint` fixture's), with an
  empty feature cache."""
  workdir = tmp_path / "pretrain"
  shutil.copytree(checkpoint, workdir, ignore=shutil.ignore_patterns("features", ".lock*"))
  return str(workdir)


def _blobs(num_examples, dim, seed, num_classes=4):
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(99).normal(size=(num_classes, dim)) * 2.0
  labels = rng.integers(0, num_classes, num_examples)
  return (centers[labels] + rng.normal(size=(num_examples, dim))).astype(np.float32), labels


def test_features_files_through_main_write_one_line_per_method(tmp_path):
  train, test = tmp_path / "train.npz", tmp_path / "test.npz"
  features_lib.save(train, *_blobs(512, 16, 0))
  features_lib.save(test, *_blobs(256, 16, 1))
  command = [sys.executable, os.path.join(ROOT, "main.py"), "--config",
             os.path.join(ROOT, "configs", "nmtune.py"), f"--config.train_features={train}",
             f"--config.test_features={test}", "--config.method=nmtune", "--config.epochs=10",
             "--config.batch_size=32",
             f"--workdir={tmp_path / 'out'}"]
  done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "accuracy" in done.stdout
  # --config.method, the older name of --config.methods: read, with a one-line note.
  assert ("note: config.method is deprecated; read as config.methods=nmtune (use methods)\n"
          in done.stderr)
  first = _rows(tmp_path / "out")
  # The same run again, in-process (a second interpreter start costs seconds).
  jobs.run(_config("", train_features=str(train), test_features=str(test), methods="nmtune",
                   epochs=10, batch_size=32), str(tmp_path / "out"))
  rows = _rows(tmp_path / "out")
  assert len(rows) == 1  # The same method on the same files: its row replaced, not duplicated.
  for row in rows:
    assert row["method"] == "nmtune" and row["epochs"] == 10
    assert (row["mse_weight"], row["cov_weight"], row["svd_weight"]) == (1.0, 0.04, 0.001)
    assert row["accuracy"] > 0.9  # Four well-separated blobs; chance is 0.25.
    assert row["seconds"] > 0 and row["train_features"] == str(train)
  assert rows[0]["accuracy"] == first[0]["accuracy"]  # Seeded: the same run twice.


def test_a_grid_reports_every_configuration_and_the_one_chosen(tmp_path, capsys):
  train, test = tmp_path / "train.npz", tmp_path / "test.npz"
  features_lib.save(train, *_blobs(512, 16, 0))
  features_lib.save(test, *_blobs(256, 16, 1))
  files = {"train_features": str(train), "test_features": str(test)}
  config = _config("", methods="mlp,nmtune", epochs=3, batch_size=32, val_fraction=0.2,
                   grid="svd_weight=0.001,0.1;cov_weight=0.04,0.4", **files)
  jobs.run(config, str(tmp_path / "out"))
  mlp, tuned = _rows(tmp_path / "out")
  assert len(tuned["grid_results"]) == 4 and 0 <= tuned["grid_chosen"] < 4
  chosen = tuned["grid_results"][tuned["grid_chosen"]]
  assert tuned["grid_val_accuracy"] == chosen["val_accuracy"] == max(
      m["val_accuracy"] for m in tuned["grid_results"])
  assert (tuned["svd_weight"], tuned["cov_weight"]) == (chosen["values"]["svd_weight"],
                                                       chosen["values"]["cov_weight"])
  # Chosen on a stratified fifth held out of train, then fit again on all 512 train rows; the
  # saved head is that refit winner.
  assert tuned["grid_refit"] and tuned["num_train"] == 512 and "val_accuracy" not in tuned
  head = heads.load(str(tmp_path / "out" / "heads" / "nmtune"))
  test_set = features_lib.load(str(test))
  predicted = heads.predicted_labels(head, test_set.features)
  assert np.mean(predicted == test_set.labels) == tuned["accuracy"]
  assert len(mlp["grid_results"]) == 1  # mlp zeroes the weights: the grid is one fit.
  out = capsys.readouterr().out
  assert out.count("[nmtune] nmtune grid ") == 4 and "<- chosen on validation" in out
  with pytest.raises(ConfigError, match="config.grid needs a validation split"):
    jobs.run(_config("", grid="lr=0.001,0.01", **files), str(tmp_path / "bad"))


def test_checkpoint_mode_writes_results_and_reuses_features(checkpoint, tmp_path):
  checkpoint = _own(checkpoint, tmp_path)
  first = jobs.run(_config(checkpoint=checkpoint), str(tmp_path))
  rows = _rows(tmp_path)
  assert [(r["task"], r["method"]) for r in rows] == [
      (t, m) for t in ("digits", "mnist_to_digits") for m in ("lp", "mlp", "nmtune")]
  for row in rows:
    assert 0.0 <= row["accuracy"] <= 1.0 and math.isfinite(row["sve"])
    assert row["kind"] == ("id" if row["task"] == "digits" else "far")
    assert row["noise_ratio"] == 0.1 and row["views"] == "features"
  nmtune_rows = [r for r in rows if r["method"] == "nmtune"]
  assert all(math.isfinite(r["z_sve"]) and math.isfinite(r["loss_means"]["svd"])
             for r in nmtune_rows)
  assert [r["mse_weight"] for r in rows if r["method"] == "mlp"] == [0.0, 0.0]
  table = (tmp_path / "results.md").read_text()
  assert "| method | ID avg | Far avg |" in table and "| nmtune |" in table
  assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
  assert all(len(r["test_accuracy_per_epoch"]) == 2 for r in rows)  # lp's too (smoke: 2).
  assert first["features_extracted"] == 3  # digits train and test (shared), mnist train.
  # Per-example hits of every fit on its task's test set (a study's correct.npz).
  assert sorted(first["correct"]) == sorted(f"{r['task']}|{r['method']}" for r in rows)
  for row in rows:
    hits = first["correct"][f"{row['task']}|{row['method']}"]
    assert hits.dtype == bool and hits.shape == (row["num_test"],)
    assert hits.mean() == pytest.approx(row["accuracy"])
  second = jobs.run(_config(checkpoint=checkpoint), str(tmp_path))
  assert second["features_extracted"] == 0
  assert [r["accuracy"] for r in _rows(tmp_path)] == [r["accuracy"] for r in rows]


@pytest.mark.parametrize("views", ["cached", "online"])
def test_augmented_views(checkpoint, tmp_path, views):
  checkpoint = _own(checkpoint, tmp_path)
  config = _config(checkpoint=checkpoint, tasks="digits", views=views, methods="lp_aug,nmtune",
                   max_examples=200, batch_size=64, cached_views=2)
  result = jobs.run(config, str(tmp_path))
  rows = _rows(tmp_path)
  assert [r["method"] for r in rows] == ["lp_aug", "nmtune"]
  assert all(r["views"] == views and math.isfinite(r["accuracy"]) for r in rows)
  assert rows[0]["lr"] == config.lp.learning_rate  # The control takes the probe's lr.
  if views == "cached":
    assert result["features_extracted"] == 3  # Two plain views and one augmented pool.
    again = jobs.run(config, str(tmp_path))
    assert again["features_extracted"] == 0
    assert [r["accuracy"] for r in _rows(tmp_path)] == [r["accuracy"] for r in rows]


def test_bad_input_fails_with_one_line(checkpoint, tmp_path):
  train, test = tmp_path / "train.npz", tmp_path / "test.npz"
  features_lib.save(train, *_blobs(300, 16, 0))
  features_lib.save(test, *_blobs(100, 8, 1))
  files = {"train_features": str(train), "test_features": str(test)}
  with pytest.raises(DataError, match="differs from the train features"):
    jobs.run(_config("", methods="nmtune", **files), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match="cov_weight=-1.0 is out of range"):
    jobs.run(_config("", cov_weight=-1.0, **files), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="entry 'svm' is unknown"):
    jobs.run(_config("", methods="nmtune,svm", **files), str(tmp_path / "c"))
  with pytest.raises(ConfigError, match="go together"):
    jobs.run(_config("", train_features=str(train)), str(tmp_path / "d"))
  with pytest.raises(ConfigError, match="nothing to tune"):
    jobs.run(_config(""), str(tmp_path / "e"))
  with pytest.raises(ConfigError, match="config.views='two' is unknown"):
    jobs.run(_config(checkpoint=checkpoint, views="two"), str(tmp_path / "f"))
  features_lib.save(test, *_blobs(100, 16, 1))
  with pytest.raises(DataError, match="needs 512 train examples per step"):
    jobs.run(_config("", methods="mlp", batch_size=512, **files), str(tmp_path / "g"))
  features_lib.save(test, *_blobs(100, 16, 1, num_classes=6))
  with pytest.raises(DataError, match="outside the 4 classes inferred"):
    jobs.run(_config("", methods="mlp", **files), str(tmp_path / "h"))
