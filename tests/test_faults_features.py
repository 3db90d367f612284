"""Features a researcher hands nmjax that are wrong in ways no shape check sees, each answered
with one true line: constant features (a warning), huge features (spectral metrics computed at
unit scale, NMTune's divergence blamed on the scale), an empty grid axis, a class with one train
example under a validation split, an .npz of pickled objects, and a FIFO or a device given as a
features file."""

import importlib
import os
import re
import sys
import threading

import numpy as np
import pytest

from nmjax import errors, features, jobs, nmtune, probe, spectral
from nmjax.errors import ConfigError, DataError, TrainingError
from nmjax.nmtune import runs as nmtune_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import nmtune as nmtune_config  # pylint: disable=wrong-import-position

QUICK = {"epochs": 1, "batch_size": 32}


def _blobs(num_examples=120, dim=8, num_classes=4, seed=0):
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(99).normal(size=(num_classes, dim)) * 3.0
  labels = np.arange(num_examples) % num_classes
  return (centers[labels] + rng.normal(size=(num_examples, dim))).astype(np.float32), labels


def _job_config(tmp_path, train, test, methods="nmtune", **fields):
  """The nmtune job over two features files (train, test: (features, labels) pairs)."""
  paths = []
  for name, (x, y) in (("train", train), ("test", test)):
    paths.append(str(tmp_path / f"{name}.npz"))
    np.savez(paths[-1], features=x, labels=y)
  config = nmtune_config.get_config()
  config.train_features, config.test_features = paths
  config.methods = methods
  for key, value in {**QUICK, **fields}.items():
    config[key] = value
  return config


def _job_fails(config, workdir, capsys):
  """Runs the job as main.py does (one_line_errors): its one error line; nothing written."""
  with pytest.raises(SystemExit) as done:
    with errors.one_line_errors():
      jobs.run(config, str(workdir))
  assert done.value.code == 2
  lines = [l for l in capsys.readouterr().err.splitlines() if not l.startswith("warning: ")]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  left = os.listdir(workdir) if os.path.isdir(workdir) else []
  assert not [n for n in left if n == "results.jsonl" or n == "heads" or "tmp" in n], left
  return lines[0]


def _warnings(capsys):
  return [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: ")]


# ------------------------------------------------------------------------- constant features


@pytest.mark.parametrize("fit", [probe.ridge_probe, probe.linear_probe,
                                 lambda train, test: nmtune.fit(train, test, QUICK)])
def test_constant_features_get_one_warning_line_naming_the_split(fit, capsys):
  x, y = _blobs()
  for constant, words in ((np.zeros_like(x), "all 120 rows are identical, all zero"),
                          (np.full_like(x, 2.5), "all 120 rows are identical")):
    result = fit((constant, y), (x, y))
    assert 0.0 <= result["accuracy"] <= 1.0
    warnings = _warnings(capsys)
    assert len(warnings) == 1, warnings
    assert re.fullmatch(r"warning: (probe|NMTune) train features: features are constant \(zero"
                        rf" variance: {words}\), so no head can tell the classes apart and"
                        r" accuracies will be at chance level; check how they were extracted",
                        warnings[0]), warnings[0]
  fit((x, y), (x, y))
  assert not _warnings(capsys)


def test_all_zero_features_train_lp_aug_without_a_non_finite_loss(capsys):
  """z = f = 0: the dominant share of a zero matrix is 0 (its gradient too), not 0 / 0."""
  x, y = _blobs()
  zero = np.zeros_like(x)
  result = nmtune.fit((zero, y), (zero, y), {**QUICK, "method": "lp_aug"})
  assert result["accuracy"] == 0.25 and result["sve"] is None  # z of zeros: no spectrum.
  assert len(_warnings(capsys)) == 2  # The train split and the test split, once each.


def test_the_nmtune_job_warns_once_per_constant_file_and_writes_its_rows(tmp_path, capsys):
  x, y = _blobs()
  config = _job_config(tmp_path, (np.zeros_like(x), y), (x, y), methods="lp,nmtune")
  out = jobs.run(config, str(tmp_path / "out"))
  assert [r["method"] for r in out["rows"]] == ["lp", "nmtune"]
  warnings = _warnings(capsys)
  assert warnings == [f"warning: features file {tmp_path}/train.npz: features are constant (zero"
                      " variance: all 120 rows are identical, all zero), so no head can tell the"
                      " classes apart and accuracies will be at chance level; check how they were"
                      " extracted"], warnings


# ---------------------------------------------------------------------------- huge features


@pytest.mark.filterwarnings("error::RuntimeWarning")  # No overflow inside the metrics.
def test_spectral_metrics_of_huge_or_tiny_features_are_the_unit_scale_ones():
  x, _ = _blobs(40)
  for center in ("row", "feature", None):
    for normalize in (True, False):
      kwargs = {"center": center, "normalize": normalize}
      unit = spectral.metrics(x, **kwargs)
      for scale in (2.0 ** 70, 2.0 ** 120, 2.0 ** -100):  # Exact multiples: equal bit for bit.
        scaled = spectral.metrics(x * np.float32(scale), **kwargs)
        assert (scaled["sve"], scaled["lsvr"]) == (unit["sve"], unit["lsvr"]), (kwargs, scale)
      assert spectral.sve(x * np.float32(1e19), **kwargs) == pytest.approx(unit["sve"], rel=1e-5)
      assert spectral.lsvr(x * np.float32(1e19), **kwargs) == pytest.approx(unit["lsvr"],
                                                                            rel=1e-5)
  sigma = spectral.singular_values(x, normalize=False)
  # The smallest (row centering leaves rank D - 1) is float32 noise: compared to the largest.
  np.testing.assert_allclose(spectral.singular_values(x * np.float32(1e19), normalize=False),
                             sigma * 1e19, rtol=1e-5, atol=1e-5 * sigma[0] * 1e19)
  with pytest.raises(DataError, match=r"spectral metrics: the features reach 3e\+38 in absolute"
                     r" value, so their largest singular value \(\S+\) is past float32's range;"
                     r" rescale them"):
    spectral.singular_values(np.sign(x) * np.float32(3e38), normalize=False)


def test_spectral_metrics_say_why_every_singular_value_is_zero():
  cases = [(np.zeros((4, 3)), "row", "the features are all zero"),
           (np.ones((4, 3)), "feature", "the features are constant: all 4 rows are identical"),
           (np.arange(4.0)[:, None] * np.ones((4, 3)), "row", "every row's entries are equal")]
  for values, center, why in cases:
    with pytest.raises(DataError, match=re.escape(f"after preprocessing ({why}")):
      spectral.sve(values, center=center)


def test_nmtune_diverging_on_huge_features_names_their_scale_not_the_learning_rate(capsys):
  x, y = _blobs()
  advice = (r"the train features reach \S+e\+19 in absolute value \(over 1e\+08\): that"
            r" scale, not config.lr, makes the float32 loss overflow; standardize the features")
  with pytest.raises(TrainingError, match=r"NMTune: the loss became non-finite at step 1 .*; "
                     + advice) as error:
    nmtune.fit((x * np.float32(1e19), y), (x, y), QUICK)
  assert "lower config.lr" not in str(error.value) and "\n" not in str(error.value)
  grid = {**QUICK, "val_fraction": 0.25, "grid": "svd_weight=0.001,0.01"}
  with pytest.raises(TrainingError, match=r"config.grid: the loss of all 2 configurations became"
                     r" non-finite \(the first at step 1 .*\); " + advice):
    nmtune.fit((x * np.float32(1e19), y), (x, y), grid)
  # A learning rate that is too large fails after the first update: that is config.lr.
  with pytest.raises(TrainingError, match=r"at step [2-9].*; lower config.lr or the regularizer"
                     r" weights$"):
    nmtune.fit((x, y), (x, y), {**QUICK, "lr": 1e12})
  assert nmtune_runs.divergence_advice(None, 1).startswith("it failed before any update")
  capsys.readouterr()


def test_the_nmtune_job_names_the_scale_of_huge_features(tmp_path, capsys):
  x, y = _blobs()
  config = _job_config(tmp_path, (x * np.float32(1e19), y), (x, y))
  line = _job_fails(config, tmp_path / "out", capsys)
  assert (f"; the train features (features file {tmp_path}/train.npz) reach 7.63e+19 in absolute"
          " value (over 1e+08): that scale, not config.lr, makes the float32 loss overflow;"
          " standardize the features") in line, line


# ------------------------------------------------------------------------------ grid and split


@pytest.mark.parametrize("grid, axis", [
    ("svd_weight=", "svd_weight"), ("svd_weight=,", "svd_weight"), ("svd_weight=[]", "svd_weight"),
    ("cov_weight=0.04,0.4;lr=", "lr")])
def test_an_empty_grid_axis_is_named_before_any_fit(grid, axis, tmp_path, capsys, monkeypatch):
  with pytest.raises(ConfigError, match=rf"config.grid: the {axis} axis is empty \('.*' lists no"
                     r" value\), so the grid has no configuration"):
    nmtune.resolve_config({"val_fraction": 0.1, "grid": grid})
  x, y = _blobs()
  config = _job_config(tmp_path, (x, y), (x, y), val_fraction=0.1, grid=grid)
  # Any fit would fail with a TypeError: the axis must be refused before one starts.
  monkeypatch.setattr(importlib.import_module("nmjax.nmtune.fit"), "train_group", None)
  line = _job_fails(config, tmp_path / "out", capsys)
  assert f"the {axis} axis is empty" in line and "diverged" not in line, line
  assert nmtune.resolve_config({"val_fraction": 0.1, "grid": "lr=[0.1,0.2]"}).grid


def test_one_train_example_per_class_names_the_class_under_a_validation_split(tmp_path, capsys):
  x, y = _blobs()
  with pytest.raises(DataError, match=r"^NMTune train features: every class has only 1 training"
                     r" example \(class 0: 1, class 1: 1, class 2: 1, \.\.\.\), so no validation"
                     r" split \(config.val_fraction=0.1\) can hold one: each class keeps its"
                     r" example to train on, at any val_fraction; pass at least 2 train examples"):
    nmtune.fit((x[:4], y[:4]), (x, y), {**QUICK, "batch_size": 2, "val_fraction": 0.1})
  with pytest.raises(DataError, match=r"class 3 has only 1 training example, so no validation"):
    nmtune_runs.validation_split(np.array([3]), 0.5, seed=0)
  # Classes of a few examples: the fraction is what is too small, and the message says how much.
  with pytest.raises(DataError, match=r"val_fraction=0.1 holds out no train example \(N = 6\):"
                     r" round\(0.1 x N_c\) is 0 for every class \(the largest, class 0, has 3"
                     r" examples\); raise it to at least 0.333"):
    nmtune_runs.validation_split(np.array([0, 0, 0, 1, 2, 3]), 0.1, seed=0)
  assert len(nmtune_runs.validation_split(np.array([0, 0, 0, 1, 2, 3]), 0.333, seed=0)[1]) == 1
  config = _job_config(tmp_path, (x[:4], y[:4]), (x, y), batch_size=2, svd_topk=1,
                       val_fraction=0.1)
  line = _job_fails(config, tmp_path / "out", capsys)
  assert f"{tmp_path}/train.npz: every class has only 1 training example" in line, line


# ------------------------------------------------------------------- files that are not features


def test_an_npz_of_object_arrays_is_named_as_pickled_objects(tmp_path, capsys):
  x, y = _blobs()
  path = tmp_path / "objects.npz"
  np.savez(path, features=np.array(list(x), dtype=object), labels=y)
  with pytest.raises(DataError) as error:
    features.load(path)
  assert str(error.value) == (
      f"features file {path} holds object arrays (features: pickled Python objects), which nmjax"
      " does not load; save numeric arrays: np.savez(path, features=np.asarray(features,"
      " np.float32), labels=np.asarray(labels, np.int64))")
  config = _job_config(tmp_path, (x, y), (x, y))
  config.train_features = str(path)
  line = _job_fails(config, tmp_path / "out", capsys)
  assert "holds object arrays" in line and "allow_pickle" not in line and "truncated" not in line


def _load_within(path, seconds=10):
  """features.load(path)'s exception, from a thread: a load that blocks fails the test."""
  caught = []

  def load():
    try:
      features.load(path)
    except Exception as e:  # pylint: disable=broad-except
      caught.append(e)

  thread = threading.Thread(target=load, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"features.load({path}) blocked"
  return caught[0]


def test_a_fifo_or_a_device_is_named_for_what_it_is_without_blocking(tmp_path, capsys):
  fifo = tmp_path / "train.npz"
  os.mkfifo(fifo)
  for path, what in ((fifo, "a FIFO (named pipe)"), ("/dev/null", "a character device")):
    error = _load_within(path)
    assert isinstance(error, DataError) and str(error) == (
        f"features file {path} is {what}, not a features file; pass an .npz file written by"
        " np.savez(path, features=..., labels=...)")
  x, y = _blobs()
  os.makedirs(tmp_path / "files")
  config = _job_config(tmp_path / "files", (x, y), (x, y))
  config.train_features = str(fifo)
  assert "is a FIFO (named pipe)" in _job_fails(config, tmp_path / "out", capsys)
  config.train_features = "/dev/null"
  assert "is a character device" in _job_fails(config, tmp_path / "out2", capsys)
