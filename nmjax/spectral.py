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
normalization does). Features far from unit scale (max |x| past HUGE_FEATURE = 1e8, or below
1 / HUGE_FEATURE) are first divided by the power of two nearest their max |x|: exact in floating
point, so SVE, LSVR and the spectrum (all scale-invariant) are what they are at unit scale, where
the float32 squares of the normalization and the SVD would overflow (or vanish).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nmjax.errors import ConfigError, DataError
from nmjax.features import HUGE_FEATURE, check_matrix, peak_value

__all__ = ["singular_values", "sve", "lsvr", "spectrum", "metrics"]

CENTERINGS = ("row", "feature", None)
DEFAULT_CENTER = "row"


def _preprocess(features: Any, center: str | None, normalize: bool
                ) -> tuple[np.ndarray, float, float]:
  """(the preprocessed matrix of features / scale, scale, the features' max |x|): scale is a
  power of two (1 at ordinary scales) that keeps every float32 square finite and normal, and 1
  after normalization (the rows' scale is gone)."""
  if center not in CENTERINGS:
    raise ConfigError(f"center={center!r} is unknown; allowed: 'row' (reference, default),"
                      " 'feature', None")
  if not isinstance(normalize, (bool, np.bool_)):
    raise ConfigError(f"normalize={normalize!r} is not allowed; allowed: True, False")
  # A copy: the caller's array is never modified by the in-place steps below.
  matrix = np.array(check_matrix("spectral metrics", features), dtype=np.float32, copy=True)
  peak, scale = peak_value(matrix), 1.0
  if peak > HUGE_FEATURE or 0 < peak < 1 / HUGE_FEATURE:
    exponent = int(np.frexp(peak)[1])  # peak / 2**exponent lies in [0.5, 1).
    matrix, scale = np.ldexp(matrix, -exponent).astype(np.float32), 2.0 ** exponent  # Exact.
  if normalize:
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
  if center == "row":
    matrix -= matrix.mean(axis=1, keepdims=True)
  elif center == "feature":
    matrix -= matrix.mean(axis=0, keepdims=True)
  return matrix, 1.0 if normalize else scale, peak


def _why_zero(peak: float, center: str | None, num_rows: int) -> str:
  """Why preprocessing left a matrix of zeros (the features' peak |x| and the centering)."""
  if peak == 0:
    return "the features are all zero"
  if center == "feature":
    return (f"the features are constant: all {num_rows} rows are identical, so centering each"
            " feature (center='feature') leaves zeros")
  return ("every row's entries are equal, so centering each row (center='row', the default)"
          " leaves zeros")


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
    DataError: features that are not a non-empty 2-D array of finite real numbers, or
      (normalize=False) so large that their singular values pass float32's range.

  Examples:
    >>> import numpy as np
    >>> from nmjax import spectral
    >>> spectral.singular_values(np.eye(3), center=None)
    array([1., 1., 1.], dtype=float32)
  """
  matrix, scale, peak = _preprocess(features, center, normalize)
  sigma = np.linalg.svd(matrix, compute_uv=False)
  if scale == 1.0:
    return sigma
  unscaled = sigma.astype(np.float64) * scale
  if unscaled[0] > np.finfo(np.float32).max:
    raise DataError(f"spectral metrics: the features reach {peak:.3g} in absolute"
                    f" value, so their largest singular value ({unscaled[0]:.3g}) is past float32's"
                    " range; rescale them (SVE, LSVR and the spectrum do not depend on the scale)")
  return unscaled.astype(np.float32)


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
  # At the preprocessing's scale: p does not depend on it, and no float32 value overflows.
  matrix, _, peak = _preprocess(features, center, normalize)
  sigma = np.linalg.svd(matrix, compute_uv=False).astype(np.float64)
  if not sigma.sum() > 0:
    raise DataError(f"spectral metrics: every singular value is 0 after preprocessing"
                    f" ({_why_zero(peak, center, len(matrix))}); SVE and LSVR are undefined")
  p = sigma / sigma.sum()
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
