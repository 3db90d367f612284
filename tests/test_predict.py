"""The take-home path through the jobs: the NMTune and transfer jobs save each fitted head in the
workdir, the predict job applies a saved head to a features file or to a task's images through
the encoder, and its accuracy is the fitting job's; re-runs replace rows; bad input is one line."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nmjax import features as features_lib
from nmjax import heads, jobs
from nmjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import nmtune as nmtune_config  # pylint: disable=wrong-import-position
from configs import predict as predict_config  # pylint: disable=wrong-import-position
from configs import transfer as transfer_config  # pylint: disable=wrong-import-position


def _config(module, arg="", **fields):
  config = module.get_config(arg)
  for key, value in fields.items():
    config[key] = value
  return config


def _rows(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


def _blobs(num_examples, dim, seed, num_classes=4):
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(99).normal(size=(num_classes, dim)) * 1.2
  labels = rng.integers(0, num_classes, num_examples)
  return (centers[labels] + rng.normal(size=(num_examples, dim))).astype(np.float32), labels


@pytest.fixture(name="files")
def _files(tmp_path):
  train, test = tmp_path / "train.npz", tmp_path / "test.npz"
  features_lib.save(train, *_blobs(256, 8, 0))
  features_lib.save(test, *_blobs(128, 8, 1))
  return str(train), str(test)


def _tune(files, workdir, methods="lp,nmtune"):
  return jobs.run(_config(nmtune_config, "smoke", train_features=files[0],
                          test_features=files[1], methods=methods, epochs=3, batch_size=32),
                  str(workdir))


def test_a_tuned_head_predicts_the_reported_accuracy_and_reruns_replace_rows(files, tmp_path):
  out = tmp_path / "tune"
  first = _tune(files, out)
  for row in first["rows"]:
    folder = out / "heads" / row["method"]
    assert (folder / "head.json").is_file() and (folder / "variables.npz").is_file()
    done = jobs.run(_config(predict_config, head=str(folder), features=files[1]),
                    str(tmp_path / f"predict_{row['method']}"))
    assert done["accuracy"] == row["accuracy"], row["method"]
    with open(tmp_path / f"predict_{row['method']}" / "predictions.jsonl") as f:
      lines = [json.loads(line) for line in f]
    assert [line["id"] for line in lines] == list(range(128))
    assert np.array_equal([line["predicted"] for line in lines], done["predicted"])
  # The same job on the same workdir: one set of rows, and another method's row kept.
  _tune(files, out, methods="lp")
  rows = _rows(out)
  assert sorted(r["method"] for r in rows) == ["lp", "nmtune"]
  # Features without labels (npz output): predictions, no accuracy.
  unlabeled = tmp_path / "unlabeled.npz"
  np.savez(unlabeled, features=np.load(files[1])["features"])
  done = jobs.run(_config(predict_config, "output=npz", head=str(out / "heads" / "lp"),
                          features=str(unlabeled)), str(tmp_path / "predict_npz"))
  assert done["accuracy"] is None
  with np.load(tmp_path / "predict_npz" / "predictions.npz") as saved:
    assert np.array_equal(saved["ids"], np.arange(128)) and "labels" not in saved.files
    head = heads.load(out / "heads" / "lp")
    assert np.array_equal(saved["predicted"], heads.predicted_labels(head, _test_features(files)))


def _test_features(files):
  with np.load(files[1]) as data:
    return data["features"]


def test_a_transfer_head_predicts_embedded_images_through_the_encoder(checkpoint, tmp_path):
  own = tmp_path / "pretrain"
  shutil.copytree(checkpoint, own, ignore=shutil.ignore_patterns("features", ".lock*"))
  out = tmp_path / "transfer"
  result = jobs.run(_config(transfer_config, "smoke", checkpoint=str(own), methods="ridge",
                            tasks="digits"), str(out))
  (row,) = result["rows"]
  folder = out / "heads" / "digits" / "ridge"
  assert (folder / "head.json").is_file()
  done = jobs.run(_config(predict_config, "smoke", head=str(folder), checkpoint=str(own),
                          task="digits"), str(tmp_path / "predict"))
  assert done["accuracy"] == row["accuracy"] and done["num_examples"] == row["num_test"]


def test_bad_input_is_one_line(files, tmp_path):
  out = tmp_path / "tune"
  _tune(files, out, methods="lp")
  head = str(out / "heads" / "lp")
  wide = tmp_path / "wide.npz"
  features_lib.save(wide, *_blobs(16, 5, 2))
  cases = [
      ({"head": str(tmp_path / "nowhere"), "features": files[1]}, "does not exist"),
      ({"head": str(tmp_path), "features": files[1]}, "has no head.json"),
      ({"head": "", "features": files[1]}, "config.head is empty"),
      ({"head": head}, "nothing to predict"),
      ({"head": head, "features": str(tmp_path / "missing.npz")}, "no such file"),
      ({"head": head, "features": files[1], "checkpoint": str(tmp_path)}, "not both"),
      ({"head": head, "checkpoint": str(tmp_path)}, "config.task is empty"),
      ({"head": head, "features": files[1], "output": "csv"}, "config.output"),
      ({"head": head, "features": str(wide)}, "fitted on 8-dimensional features"),
  ]
  for fields, words in cases:
    with pytest.raises(ConfigError, match=words) as caught:
      jobs.run(_config(predict_config, **fields), str(tmp_path / "predict"))
    assert "\n" not in str(caught.value)
  # Through main.py: one line on stderr and exit code 2.
  done = subprocess.run(
      [sys.executable, "main.py", "--config=configs/predict.py", f"--config.head={head}",
       f"--config.features={wide}", f"--workdir={tmp_path / 'main'}"],
      capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
