"""nmjax.heads: every method's fitted head reproduces its reported accuracy by hand, transforms
keep the input's shape, save -> load predicts bitwise, and the exported program runs in a process
that does not import nmjax."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from nmjax import heads, nmtune, probe
from nmjax.errors import ConfigError, DataError

_DIM, _CLASSES = 16, 4
_NMTUNE = {"epochs": 2, "batch_size": 32}


def _features(seed: int, n: int, classes: int = _CLASSES) -> tuple[np.ndarray, np.ndarray]:
  """Gaussian clusters close enough to overlap: accuracies well inside (0, 1)."""
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(99).normal(size=(_CLASSES, _DIM))
  labels = rng.integers(0, classes, n)
  return (centers[labels] + 1.5 * rng.normal(size=(n, _DIM))).astype(np.float32), labels


_TRAIN, _TEST = _features(0, 256), _features(1, 120)
_SUBSET_TEST = _features(2, 60, classes=3)  # Scored over classes 0..2 only.


@pytest.fixture(scope="module")
def fitted():
  """{name: (result, test features, test labels)} for every method, one with a logit subset."""
  out = {
      "lp": probe.linear_probe(_TRAIN, _TEST, {"num_epochs": 5}),
      "lp_subset": probe.linear_probe(_TRAIN, _SUBSET_TEST,
                                      {"num_epochs": 5, "logit_subset": (0, 1, 2)}),
      "ridge": probe.ridge_probe(_TRAIN, _TEST),
      "ridge_subset": probe.ridge_probe(_TRAIN, _SUBSET_TEST, {"logit_subset": (0, 1, 2)}),
  }
  for method in ("nmtune", "mlp", "lp_aug"):
    out[method] = nmtune.fit(_TRAIN, _TEST, {**_NMTUNE, "method": method})
  out["nmtune_subset"] = nmtune.fit(_TRAIN, _SUBSET_TEST, {**_NMTUNE, "logit_subset": (0, 1, 2)})
  return {name: (r, *(_SUBSET_TEST if name.endswith("_subset") else _TEST))
          for name, r in out.items()}


def test_predictions_reproduce_the_reported_accuracy(fitted):
  kinds = {"lp": "linear", "ridge": "linear", "lp_aug": "linear", "mlp": "nmtune",
           "nmtune": "nmtune"}
  for name, (result, x, y) in fitted.items():
    head = result["head"]
    assert head.kind == kinds[name.split("_subset")[0]], name
    assert head.labels == tuple(range(_CLASSES))
    logits = head.predict(x)
    assert logits.shape == (len(x), _CLASSES) and logits.dtype == np.float32
    by_hand = heads.predicted_labels(head, x) == y
    assert by_hand.mean() == pytest.approx(result["accuracy"], abs=1e-6), name
    np.testing.assert_array_equal(by_hand, result["correct"], err_msg=name)
    if name.endswith("_subset"):  # Masked to the subset, as scored.
      masked = np.argmax(logits + np.where(np.arange(_CLASSES) < 3, 0.0, -np.inf), axis=-1)
      np.testing.assert_array_equal(masked == y, by_hand)
      assert 0.0 < result["accuracy"] < 1.0


def test_transform_keeps_the_shape_and_linear_heads_refuse_it(fitted):
  for name in ("nmtune", "mlp"):
    z = fitted[name][0]["head"].transform(_TEST[0])
    assert z.shape == _TEST[0].shape and z.dtype == np.float32
    assert not np.array_equal(z, _TEST[0])  # The MLP changed the features.
  for name in ("lp", "ridge", "lp_aug"):
    with pytest.raises(ConfigError, match="no feature transform"):
      fitted[name][0]["head"].transform(_TEST[0])
  with pytest.raises(DataError, match=r"\(N, 16\)"):
    fitted["lp"][0]["head"].predict(_TEST[0][:, :3])


def test_save_load_predicts_bitwise(fitted, tmp_path):
  for name, (result, x, _) in fitted.items():
    head = result["head"]
    head.save(tmp_path / name)
    with open(tmp_path / name / "head.json") as f:
      header = json.load(f)
    assert header["method"] == head.method and header["format_version"] == 1
    loaded = heads.load(tmp_path / name)
    assert (loaded.kind, loaded.method, loaded.labels) == (head.kind, head.method, head.labels)
    np.testing.assert_array_equal(loaded.predict(x), head.predict(x), err_msg=name)
    np.testing.assert_array_equal(heads.predicted_labels(loaded, x),
                                  heads.predicted_labels(head, x))
    if head.kind == "nmtune":
      np.testing.assert_array_equal(loaded.transform(x), head.transform(x))
  with pytest.raises(DataError, match="cannot read"):
    heads.load(tmp_path / "missing")


_FRESH = """
import sys, jax, numpy as np
d = sys.argv[1]
for name in sys.argv[2:]:
  exported = jax.export.deserialize(open(f"{d}/{name}.jax", "rb").read())
  x = np.load(f"{d}/{name}.in.npy")
  np.save(f"{d}/{name}.out.npy", np.asarray(exported.call(x)))
assert not any(m.startswith("nmjax") for m in sys.modules), "nmjax was imported"
"""


def test_export_runs_without_nmjax(fitted, tmp_path):
  names = ["lp", "ridge", "nmtune", "mlp", "lp_aug"]
  for name in names:
    heads.export(fitted[name][0]["head"], tmp_path / f"{name}.jax")
    np.save(tmp_path / f"{name}.in.npy", _TEST[0][:7])  # A batch size never seen in training.
  # An encoder + head classifier: a fixed ReLU layer over 4x4x1 "images".
  weight = np.random.default_rng(5).normal(size=(16, _DIM)).astype(np.float32)
  encoder = heads.Encoding(lambda w, images: images.reshape(images.shape[0], -1) @ w, weight,
                           (4, 4, 1))
  images = np.random.default_rng(6).normal(size=(5, 4, 4, 1)).astype(np.float32)
  heads.export(fitted["nmtune"][0]["head"], tmp_path / "classifier.jax", encoder=encoder)
  np.save(tmp_path / "classifier.in.npy", images)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", _FRESH, str(tmp_path), *names, "classifier"],
                 check=True, env=env, cwd=tmp_path, timeout=120)
  for name in names:
    expected = fitted[name][0]["head"].predict(_TEST[0][:7])
    np.testing.assert_allclose(np.load(tmp_path / f"{name}.out.npy"), expected, atol=1e-6,
                               rtol=0, err_msg=name)
  # The same classifier in memory: the encoder's apply (jitted) then the head's predict.
  features = jax.jit(encoder.apply)(weight, images)
  expected = fitted["nmtune"][0]["head"].predict(features)
  np.testing.assert_allclose(np.load(tmp_path / "classifier.out.npy"), expected, atol=1e-6,
                             rtol=0)
