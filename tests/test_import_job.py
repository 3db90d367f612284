"""The import job (configs/import.py): a checkpoint file becomes a pre-training workdir that the
encoder restores exactly and the transfer job evaluates; the reference check; bad input."""

import dataclasses
import hashlib
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from nmjax import convert, encoder as encoder_lib, jobs
from nmjax.errors import ConfigError, DataError
from nmjax.jobs import importer
from nmjax.train.steps import normalize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_convert import RESNET18, resnet_state_dict  # pylint: disable=wrong-import-position

import_config = importlib.import_module("configs.import")  # `import` is a keyword.
transfer_config = importlib.import_module("configs.transfer")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A torchvision-named ResNet-18 with a 10-way head, as a .safetensors file."""
  path = tmp_path_factory.mktemp("source") / "resnet18.safetensors"
  save_file(resnet_state_dict(*RESNET18, num_classes=10), str(path))
  return str(path)


def _config(source_path, **fields):
  config = import_config.get_config(f"source={source_path},arch=resnet18")
  config.input.image_size = 32  # Small, so the transfer test stays cheap.
  for key, value in fields.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def imported(source, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("imported"))
  result = jobs.run(_config(source, dataset="imagenet2012", noise_ratio=0.1), workdir)
  return workdir, result


def test_the_workdir_is_a_pretraining_workdir(source, imported):
  workdir, result = imported
  assert result["written"]
  with open(os.path.join(workdir, "config.json")) as f:
    record = json.load(f)
  with open(source, "rb") as f:
    assert record["source_sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert (record["job"], record["model"], record["num_classes"], record["arch"]) == (
      "import", "resnet18", 10, "resnet18")
  assert record["input"] == {"image_size": 32, "crop_pct": 0.95, "interpolation": "bicubic",
                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["0"]

  enc = encoder_lib.load(workdir)
  assert (enc.step, enc.image_shape, enc.feature_dim) == (0, (32, 32, 3), 512)
  assert (enc.transform.crop_pct, enc.transform.interpolation) == (0.95, "bicubic")
  # The restored encoder is the converted model, on uint8 images normalized by the input's
  # mean and std (0..255 units).
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  model, variables = convert.load(source, "resnet18")
  mean = [255 * m for m in record["input"]["mean"]]
  std = [255 * s for s in record["input"]["std"]]
  _, expected = model.apply(variables, normalize(images, mean, std), train=False)
  np.testing.assert_allclose(np.asarray(enc.encode(enc.variables, images)), expected,
                             rtol=1e-5, atol=1e-5)

  again = jobs.run(_config(source, dataset="imagenet2012", noise_ratio=0.1), workdir)
  assert not again["written"]  # The same import: left as it was.
  other = _config(source)
  other.input.image_size = 64
  with pytest.raises(ConfigError, match="already holds checkpoints"):
    jobs.run(other, workdir)


def test_transfer_runs_on_the_imported_checkpoint(imported, tmp_path):
  workdir, _ = imported
  config = transfer_config.get_config("smoke")
  config.checkpoint = workdir
  config.tasks = "digits"
  config.methods = "ridge"
  config.max_examples, config.batch_size = 120, 120
  result = jobs.run(config, str(tmp_path))
  (row,) = result["rows"]
  assert (row["task"], row["feature_dim"], row["num_test"]) == ("digits", 512, 120)
  assert row["noise_ratio"] == 0.1 and 0.0 <= row["accuracy"] <= 1.0
  assert "pre-trained on imagenet2012" in open(os.path.join(tmp_path, "results.md")).read()


def test_validate_gives_a_frozen_plan_and_touches_nothing(source, tmp_path):
  config = _config(source, dataset="imagenet2012", noise_ratio=0.1)
  config.input.mean = (0.5, 0.5, 0.5)
  plan = importer.validate(config)
  assert jobs.JOBS[importer.NAME] is importer and importer.lock_index(plan) == 0
  assert (plan.source, plan.arch, plan.noise_ratio, plan.quick_gelu) == (
      os.path.abspath(source), "resnet18", 0.1, None)
  assert (plan.input.image_size, plan.input.mean, plan.input.crop_pct) == (32, (0.5,) * 3, None)
  with pytest.raises(dataclasses.FrozenInstanceError):
    plan.arch = "resnet50"
  assert importer.validate(config) == plan  # Plain values: the same config, the same plan.

  def refused(match, **fields):
    bad = _config(source, **{k: v for k, v in fields.items() if k != "input"})
    for key, value in fields.get("input", {}).items():
      bad.input[key] = value
    with pytest.raises(ConfigError, match=match):
      importer.validate(bad)

  refused("config.noise_ratio=1.5 is out of range", noise_ratio=1.5)
  refused("config.input.crop_pct=1.5 is out of range", input={"crop_pct": 1.5})
  refused("config.input.interpolation='cubic' is unknown", input={"interpolation": "cubic"})
  refused("config.reference_tolerance=0.0 is out of range", reference_tolerance=0.0)
  refused("config.reference=.* does not exist", reference=str(tmp_path / "none.npz"))
  unknown = _config(source)
  unknown.unlock()
  unknown.input.size = 3
  with pytest.raises(ConfigError, match="config.input field 'size' is unknown"):
    importer.validate(unknown)
  assert not os.listdir(tmp_path)


def test_reference_is_compared_and_a_mismatch_writes_nothing(source, tmp_path, capsys):
  inputs = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
  model, variables = convert.load(source, "resnet18")
  logits, features = model.apply(variables, inputs.transpose(0, 2, 3, 1), train=False)
  good = tmp_path / "acts.npz"
  np.savez(good, inputs=inputs, logits=np.asarray(logits), features=np.asarray(features))
  result = jobs.run(_config(source, reference=str(good)), str(tmp_path / "good"))
  assert set(result["differences"]) == {"logits", "features"}
  assert max(result["differences"].values()) < 1e-6
  assert "features largest relative difference" in capsys.readouterr().out

  bad = tmp_path / "bad.npz"
  np.savez(bad, inputs=inputs, logits=np.asarray(logits) * 1.5)
  with pytest.raises(DataError, match="logits differ from .* nothing was written"):
    jobs.run(_config(source, reference=str(bad)), str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad" / "config.json")


@pytest.mark.slow  # main.py processes: several seconds.
def test_main_imports_and_bad_input_is_one_line(source, tmp_path):
  def main(*flags):
    return subprocess.run([sys.executable, "main.py", "--config", "configs/import.py", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  done = main(f"--config.source={source}", "--config.arch=resnet18",
              "--config.input.crop_pct=0.875", "--config.input.interpolation=bilinear",
              f"--workdir={tmp_path / 'cli'}")
  assert done.returncode == 0, done.stderr[-2000:]
  with open(tmp_path / "cli" / "config.json") as f:
    assert json.load(f)["input"]["crop_pct"] == 0.875
  with open(tmp_path / "cli" / "plan.json") as f:
    assert json.load(f)["input"]["interpolation"] == "bilinear"
  dry = main(f"--config.source={source}", "--config.arch=resnet18", "--dry_run",
             f"--workdir={tmp_path / 'dry'}")
  assert dry.returncode == 0, dry.stderr[-2000:]
  assert json.loads(dry.stdout)["source"] == source and not os.path.exists(tmp_path / "dry")
  refused = main(f"--config.source={source}", "--config.arch=vit_b16",
                 f"--workdir={tmp_path / 'refused'}")
  assert refused.returncode == 2
  line = refused.stderr.strip().splitlines()[-1]
  assert "missing" in line and "unexpected" in line and "layer1.0.conv1.weight" in line
