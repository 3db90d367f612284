"""Spectral metrics of a feature matrix: singular values, SVE, LSVR and the spectrum for plots.

F is an (M, D) matrix of features (rows are examples), typically a task's test split. After
preprocessing (below), sigma are its singular values in descending order from an exact SVD in
float32 (LAPACK gesdd through numpy, no truncation), and p = sigma / sum(sigma):

    SVE  (singular value entropy)          = -sum_i p_i log p_i   (natural log; 0 log 0 = 0)
    LSVR (largest singular value ratio)    = sigma_1 / sum(sigma) = p_1

Preprocessing (REFERENCE.md s.5), chosen by `center`, with `normalize` (default True) first
L2-normalizing every row:
    "row"      the reference code's: subtract each row's mean over its D entries. This is the
               DEFAULT, so that nmjax's numbers are comparable with the paper's.
    "feature"  the standard PCA-style centering: subtract each feature's mean over the M rows.
    None       no centering.
A zero row stays zero under normalization (its norm is clamped to 1e-12, as the reference's
normalization does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nmjax.errors import ConfigError, DataError
from nmjax.features import check_matrix

__all__ = ["singular_values", "sve", "lsvr", "spectrum", "metrics"]

CENTERINGS = ("row", "feature", None)
DEFAULT_CENTER = "row"


def _preprocess(features: Any, center: str | None, normalize: bool) -> np.ndarray:
  if center not in CENTERINGS:
    raise ConfigError(f"center={center!r} is unknown; allowed: 'row' (reference, default),"
                      " 'feature', None")
  if not isinstance(normalize, (bool, np.bool_)):
    raise ConfigError(f"normalize={normalize!r} is not allowed; allowed: True, False")
  # A copy: the caller's array is never modified by the in-place steps below.
  matrix = np.array(check_matrix("spectral metrics", features), dtype=np.float32, copy=True)
  if normalize:
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
  if center == "row":
    matrix -= matrix.mean(axis=1, keepdims=True)
  elif center == "feature":
    matrix -= matrix.mean(axis=0, keepdims=True)
  return matrix


def singular_values(features: Any, *, center: str | None = DEFAULT_CENTER,
                    normalize: bool = True) -> np.ndarray:
  """Singular values (descending, float32, min(M, D) of them) of the preprocessed features."""
  return np.linalg.svd(_preprocess(features, center, normalize), compute_uv=False)


def spectrum(features: Any, *, center: str | None = DEFAULT_CENTER, normalize: bool = True,
             top_k: int | None = None) -> np.ndarray:
  """p = sigma / sum(sigma) (descending; float64), the first top_k entries if given: for plots."""
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                            or top_k < 1):
    raise ConfigError(f"top_k={top_k!r} is not allowed; allowed: None or an integer >= 1")
  sigma = singular_values(features, center=center, normalize=normalize).astype(np.float64)
  total = sigma.sum()
  if not total > 0:
    raise DataError("spectral metrics: every singular value is 0 after preprocessing (the"
                    " features are constant); SVE and LSVR are undefined")
  p = sigma / total
  return p if top_k is None else p[:top_k]


def _entropy(p: np.ndarray) -> float:
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def sve(features: Any, *, center: str | None = DEFAULT_CENTER, normalize: bool = True) -> float:
  """Singular value entropy -sum p log p (natural log) of the preprocessed features."""
  return _entropy(spectrum(features, center=center, normalize=normalize))


def lsvr(features: Any, *, center: str | None = DEFAULT_CENTER, normalize: bool = True) -> float:
  """Largest singular value ratio sigma_1 / sum(sigma) of the preprocessed features."""
  return float(spectrum(features, center=center, normalize=normalize)[0])


def metrics(features: Any, *, center: str | None = DEFAULT_CENTER, normalize: bool = True,
            top_k: int | None = None) -> dict[str, Any]:
  """{"sve", "lsvr", "spectrum" (p, first top_k)} from one SVD: what sve, lsvr and spectrum
  give one by one."""
  p = spectrum(features, center=center, normalize=normalize)
  return {"sve": _entropy(p), "lsvr": float(p[0]), "spectrum": p if top_k is None else p[:top_k]}
