"""Spectral metrics of a feature matrix: singular values, SVE, LSVR and the spectrum for plots.

F is an (M, D) matrix of features (rows are examples), typically a task's test split. After
preprocessing (below), sigma are its singular values in descending order from an exact SVD in
float32 (LAPACK gesdd through numpy, no truncation), and p = sigma / sum(sigma):

    SVE  (singular value entropy)          = -sum_i p_i log p_i   (natural log; 0 log 0 = 0)
    LSVR (largest singular value ratio)    = sigma_1 / sum(sigma) = p_1

Preprocessing (as the reference implementation's; see docs/method.md), chosen by `center`, with
`normalize` (default True) first L2-normalizing every row:
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
  """Singular values of the preprocessed features, from an exact SVD.

  Args:
    features: an (M, D) array of real, finite numbers (rows are examples).
    center: "row" (the reference's, default), "feature" (PCA-style) or None; see the module
      docstring.
    normalize: whether to L2-normalize every row first (default True).

  Returns:
    float32 array of the min(M, D) singular values, descending.

  Raises:
    ConfigError: an unknown `center` or a `normalize` that is not a bool.
    DataError: features that are not a non-empty 2-D array of finite real numbers.

  Examples:
    >>> import numpy as np
    >>> from nmjax import spectral
    >>> spectral.singular_values(np.eye(3), center=None)
    array([1., 1., 1.], dtype=float32)
  """
  return np.linalg.svd(_preprocess(features, center, normalize), compute_uv=False)


def spectrum(features: Any, *, center: str | None = DEFAULT_CENTER, normalize: bool = True,
             top_k: int | None = None) -> np.ndarray:
  """The normalized spectrum p = sigma / sum(sigma) of the preprocessed features, for plots.

  Args:
    features: an (M, D) array of real, finite numbers (rows are examples).
    center: "row" (the reference's, default), "feature" (PCA-style) or None; see the module
      docstring.
    normalize: whether to L2-normalize every row first (default True).
    top_k: None for every entry, or an integer >= 1: the first top_k entries only.

  Returns:
    float64 array p, descending, summing to 1 (before any top_k cut).

  Raises:
    ConfigError: an unknown `center`, a `normalize` that is not a bool, or a bad top_k.
    DataError: features that are not a non-empty 2-D array of finite real numbers, or that are
      constant (every singular value 0 after preprocessing).

  Examples:
    >>> import numpy as np
    >>> from nmjax import spectral
    >>> spectral.spectrum(np.eye(4), center=None)
    array([0.25, 0.25, 0.25, 0.25])
  """
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
  """Singular value entropy (SVE), -sum p log p (natural log), of the preprocessed features.

  Args:
    features: an (M, D) array of real, finite numbers (rows are examples).
    center: "row" (the reference's, default), "feature" (PCA-style) or None; see the module
      docstring.
    normalize: whether to L2-normalize every row first (default True).

  Returns:
    The SVE, a float in [0, log min(M, D)]: higher is a flatter spectrum.

  Raises:
    ConfigError: an unknown `center`, a `normalize` that is not a bool.
    DataError: features that are not a non-empty 2-D array of finite real numbers, or that are
      constant (every singular value 0 after preprocessing).

  Examples:
    >>> import numpy as np
    >>> from nmjax import spectral
    >>> round(spectral.sve(np.eye(4), center=None), 4)  # A flat spectrum: log 4.
    1.3863
  """
  return _entropy(spectrum(features, center=center, normalize=normalize))


def lsvr(features: Any, *, center: str | None = DEFAULT_CENTER, normalize: bool = True) -> float:
  """Largest singular value ratio (LSVR), sigma_1 / sum(sigma), of the preprocessed features.

  Args:
    features: an (M, D) array of real, finite numbers (rows are examples).
    center: "row" (the reference's, default), "feature" (PCA-style) or None; see the module
      docstring.
    normalize: whether to L2-normalize every row first (default True).

  Returns:
    The LSVR, a float in (0, 1]: higher is a spectrum more dominated by its top direction.

  Raises:
    ConfigError: an unknown `center`, a `normalize` that is not a bool.
    DataError: features that are not a non-empty 2-D array of finite real numbers, or that are
      constant (every singular value 0 after preprocessing).

  Examples:
    >>> import numpy as np
    >>> from nmjax import spectral
    >>> spectral.lsvr(np.eye(4), center=None)
    0.25
  """
  return float(spectrum(features, center=center, normalize=normalize)[0])


def metrics(features: Any, *, center: str | None = DEFAULT_CENTER, normalize: bool = True,
            top_k: int | None = None) -> dict[str, Any]:
  """SVE, LSVR and the spectrum from one SVD: what sve, lsvr and spectrum give one by one.

  Args:
    features: an (M, D) array of real, finite numbers (rows are examples).
    center: "row" (the reference's, default), "feature" (PCA-style) or None; see the module
      docstring.
    normalize: whether to L2-normalize every row first (default True).
    top_k: None for the whole spectrum, or an integer >= 1: its first top_k entries.

  Returns:
    {"sve": float, "lsvr": float, "spectrum": float64 array p (its first top_k entries)}.

  Raises:
    ConfigError: an unknown `center`, a `normalize` that is not a bool, or a bad top_k.
    DataError: features that are not a non-empty 2-D array of finite real numbers, or that are
      constant (every singular value 0 after preprocessing).

  Examples:
    >>> import numpy as np
    >>> from nmjax import spectral
    >>> features = np.random.default_rng(0).normal(size=(32, 8))
    >>> result = spectral.metrics(features, top_k=3)
    >>> sorted(result), result["spectrum"].shape
    (['lsvr', 'spectrum', 'sve'], (3,))
  """
  p = spectrum(features, center=center, normalize=normalize)
  return {"sve": _entropy(p), "lsvr": float(p[0]), "spectrum": p if top_k is None else p[:top_k]}
