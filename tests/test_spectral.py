"""nmjax.spectral against an independent float64 computation, and its refusals of bad input."""

import numpy as np
import pytest

from nmjax import spectral
from nmjax.errors import ConfigError, DataError


def _features(rows: int, dim: int, seed: int = 0) -> np.ndarray:
  """Low-rank structure plus noise and a common offset, so every centering changes the answer."""
  rng = np.random.default_rng(seed)
  low_rank = rng.standard_normal((rows, 4)) @ rng.standard_normal((4, dim)) * 3.0
  return (low_rank + rng.standard_normal((rows, dim)) + 2.0).astype(np.float32)


def _reference(features: np.ndarray, center, normalize: bool) -> tuple[float, float]:
  """SVE and LSVR in float64 through the eigenvalues of the Gram matrix (no SVD)."""
  x = features.astype(np.float64)
  if normalize:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
  if center == "row":
    x = x - x.mean(axis=1, keepdims=True)
  elif center == "feature":
    x = x - x.mean(axis=0, keepdims=True)
  gram = x @ x.T if x.shape[0] < x.shape[1] else x.T @ x
  sigma = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))[::-1]
  p = sigma / sigma.sum()
  p = p[p > 1e-12]
  return float(-(p * np.log(p)).sum()), float(sigma[0] / sigma.sum())


@pytest.mark.parametrize("shape", [(300, 40), (25, 60)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("center", ["row", "feature", None])
def test_sve_lsvr_match_float64_reference(center, normalize, shape):
  features = _features(*shape)
  expected_sve, expected_lsvr = _reference(features, center, normalize)
  assert spectral.sve(features, center=center, normalize=normalize) == pytest.approx(
      expected_sve, rel=1e-4)
  assert spectral.lsvr(features, center=center, normalize=normalize) == pytest.approx(
      expected_lsvr, rel=1e-4)


def test_centerings_differ_and_row_is_default():
  features = _features(200, 30)
  values = {c: spectral.sve(features, center=c) for c in ("row", "feature", None)}
  assert len({round(v, 4) for v in values.values()}) == 3
  assert spectral.sve(features) == values["row"]
  assert spectral.lsvr(features) == spectral.lsvr(features, center="row")


def test_singular_values_and_spectrum():
  features = _features(100, 20)
  sigma = spectral.singular_values(features, center="feature")
  assert sigma.shape == (20,) and sigma.dtype == np.float32
  assert np.all(np.diff(sigma) <= 0)
  p = spectral.spectrum(features, center="feature")
  np.testing.assert_allclose(p, sigma / sigma.sum(), rtol=1e-6)
  assert p.sum() == pytest.approx(1.0)
  np.testing.assert_array_equal(spectral.spectrum(features, center="feature", top_k=5), p[:5])
  assert spectral.lsvr(features, center="feature") == pytest.approx(p[0])


def test_input_is_not_modified():
  features = _features(50, 10)
  copy = features.copy()
  spectral.sve(features, center="feature")
  np.testing.assert_array_equal(features, copy)


@pytest.mark.parametrize("features,match", [
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "non-finite"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), "non-finite"),
    (np.zeros((0, 4)), "empty"),
    (np.ones(5), "2-D"),
    (np.ones((3, 4)), "every singular value is 0"),
])
def test_bad_features_give_one_line(features, match):
  with pytest.raises(DataError, match=match) as error:
    spectral.sve(features, center="row")
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("kwargs,match", [
    ({"center": "rows"}, "center='rows' is unknown; allowed: 'row'"),
    ({"normalize": "yes"}, "normalize='yes'"),
])
def test_bad_options_give_one_line(kwargs, match):
  with pytest.raises(ConfigError, match=match) as error:
    spectral.singular_values(_features(10, 4), **kwargs)
  assert "\n" not in str(error.value)


def test_bad_top_k():
  with pytest.raises(ConfigError, match="top_k=0"):
    spectral.spectrum(_features(10, 4), top_k=0)


def test_metrics_gives_sve_lsvr_and_spectrum_from_one_svd():
  features = _features(60, 12)
  for center in ("row", "feature", None):
    got = spectral.metrics(features, center=center, top_k=5)
    assert got["sve"] == pytest.approx(spectral.sve(features, center=center), rel=1e-12)
    assert got["lsvr"] == pytest.approx(spectral.lsvr(features, center=center), rel=1e-12)
    np.testing.assert_allclose(got["spectrum"], spectral.spectrum(features, center=center,
                                                                  top_k=5))
