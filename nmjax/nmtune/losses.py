"""NMTune's three regularizers on a batch of head outputs z (n, D), with the reference's exact
normalization, and the singular values they rest on.

The config fields keep the reference's flag names; each weighs one function here:
mse_weight -> consistency_loss, cov_weight -> covariance_loss, svd_weight ->
dominant_singular_value_loss (subtracted: the loss maximizes the dominant directions' share).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nmjax.errors import ConfigError

COVARIANCE_ROUTES = ("auto", "gram", "covariance")


def normalize_rows(x: jax.Array) -> jax.Array:
  """Each row divided by its L2 norm (clamped at 1e-12, as torch.nn.functional.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _matrix_shape(name: str, x: jax.Array, *, min_rows: int = 1) -> tuple[int, int]:
  """(n, D) of a 2-D x, or a ConfigError naming the argument and its shape (one line)."""
  shape = tuple(jnp.shape(x))
  if len(shape) != 2:
    raise ConfigError(f"{name} must be a 2-D (n, D) array, got shape {shape}")
  if shape[0] < min_rows or shape[1] < 1:
    raise ConfigError(f"{name} needs at least {min_rows} row(s) and 1 column, got shape {shape}")
  return shape


def check_static_k(k: object, num_rows: int, dim: int) -> int:
  """The k of dominant_singular_value_loss, checked: a static Python int in [1, min(n, D)].

  A traced k (an argument of a jitted function that is not static) cannot be checked against
  min(n, D); nmjax's own programs pass a traced svd_topk to dominant_share instead.

  Args:
    k: the value given.
    num_rows: n, the rows of z.
    dim: D, the columns of z.

  Returns:
    k as a Python int.

  Raises:
    ConfigError: k is traced or a JAX array, not an integer (a bool or a float included), or
      outside [1, min(n, D)] (one line).
  """
  allowed = f"allowed: an integer in [1, min(n, D)] = [1, {min(num_rows, dim)}]"
  if isinstance(k, jax.Array):  # Tracers included.
    what = "a traced array" if isinstance(k, jax.core.Tracer) else "a JAX array"
    raise ConfigError(f"dominant_singular_value_loss: k (svd_topk) must be a static Python int,"
                      f" got {what}; {allowed} (under jax.jit: static_argnames='k')")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise ConfigError(f"svd_topk={k!r} is not allowed; {allowed}; k must be a static Python int,"
                      f" got {type(k).__name__}")
  if not 1 <= k <= min(num_rows, dim):
    raise ConfigError(f"svd_topk={k!r} is not allowed; {allowed}")
  return int(k)


def consistency_loss(z: jax.Array, f: jax.Array) -> jax.Array:
  """The consistency term: mean over (n, D) of (normalize(z) - stop_gradient(normalize(f)))^2.

  The mean runs over all n * D entries, so the squared distance of unit rows carries an implicit
  1 / D (the reference's MSE). In two-view training z is the second view's, f the first's.
  The config field mse_weight weighs it.

  Args:
    z: (n, D) head outputs; the gradient flows through them.
    f: (n, D) frozen features, the targets (no gradient flows into them).

  Returns:
    A float32 scalar, 0 when every row of z points the way its row of f does.

  Raises:
    ConfigError: z or f is not 2-D, or their shapes differ.

  Examples:
    >>> import jax.numpy as jnp
    >>> from nmjax import nmtune
    >>> z = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> float(nmtune.consistency_loss(z, 3 * z))  # Only the rows' directions count.
    0.0
  """
  shape = _matrix_shape("consistency_loss z", z)
  if tuple(jnp.shape(f)) != shape:
    raise ConfigError(f"consistency_loss: f must have z's shape {shape}, got"
                      f" {tuple(jnp.shape(f))}")
  z = jnp.asarray(z).astype(jnp.float32)
  target = jax.lax.stop_gradient(normalize_rows(jnp.asarray(f).astype(jnp.float32)))
  return jnp.mean(jnp.square(normalize_rows(z) - target))


def covariance_loss(z: jax.Array, *, route: str = "auto") -> jax.Array:
  """The covariance term: squared off-diagonal entries of z's (D, D) covariance, summed, over D.

  The covariance is the unbiased one, z_c^T z_c / (n - 1) of the column-centered z_c. The config
  field cov_weight weighs it.

  Args:
    z: (n, D) head outputs, n >= 2.
    route: how it is computed, the same value either way: "covariance" forms the (D, D) matrix
      and zeroes its diagonal; "gram" uses ||z_c^T z_c||_F = ||z_c z_c^T||_F (an n x n matrix)
      and subtracts the diagonal's squares, at n^2 D instead of n D^2 cost; "auto" (default)
      takes the smaller matrix.

  Returns:
    A float32 scalar >= 0, 0 when z's dimensions are uncorrelated.

  Raises:
    ConfigError: an unknown route, a z that is not 2-D, or fewer than 2 rows.

  Examples:
    >>> import jax.numpy as jnp
    >>> from nmjax import nmtune
    >>> z = jnp.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    >>> float(nmtune.covariance_loss(z))  # Uncorrelated columns.
    0.0
  """
  if route not in COVARIANCE_ROUTES:
    raise ConfigError(f"covariance_loss route={route!r} is unknown; allowed:"
                      f" {', '.join(COVARIANCE_ROUTES)}")
  num_rows, dim = _matrix_shape("covariance_loss z", z)
  if num_rows < 2:
    raise ConfigError(f"covariance_loss needs at least 2 rows, got {num_rows}")
  z = jnp.asarray(z).astype(jnp.float32)
  centered = z - jnp.mean(z, axis=0)
  if route == "auto":
    route = "gram" if num_rows < dim else "covariance"
  if route == "covariance":
    scatter = centered.T @ centered
    off_diagonal = jnp.sum(jnp.square(jnp.where(jnp.eye(dim, dtype=bool), 0.0, scatter)))
  else:
    gram = centered @ centered.T
    variances = jnp.sum(jnp.square(centered), axis=0)  # The scatter's diagonal.
    off_diagonal = jnp.sum(jnp.square(gram)) - jnp.sum(jnp.square(variances))
  return off_diagonal / ((num_rows - 1) ** 2 * dim)


def _thin_svd(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sigma (r,), U (n, r), V (D, r)) with z = U diag(sigma) V^T, r = min(n, D), through a QR
  of the long side first: the SVD then runs on an r x r triangle (on GPUs a small-matrix Jacobi
  SVD instead of the slow general one; on CPUs faster too, at NMTune's shapes)."""
  num_rows, dim = z.shape
  if num_rows == dim:
    u, sigma, vt = jnp.linalg.svd(z)
    return sigma, u, vt.T
  if num_rows < dim:
    q, r = jnp.linalg.qr(z.T)          # z = r^T q^T
    ur, sigma, vrt = jnp.linalg.svd(r)
    return sigma, vrt.T, q @ ur
  q, r = jnp.linalg.qr(z)              # z = q r
  ur, sigma, vrt = jnp.linalg.svd(r)
  return sigma, q @ ur, vrt.T


def _precision() -> jax.lax.Precision | None:
  """Full float32 products: the backend default on CPUs (where asking for HIGHEST takes a much
  slower matmul path), HIGHEST elsewhere (TF32 or bf16 passes, an accelerator's default,
  would leave the Gram matrix 3 digits)."""
  return None if jax.default_backend() == "cpu" else jax.lax.Precision.HIGHEST


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b in full float32 (_precision)."""
  return jnp.matmul(a, b, precision=_precision())


def _jacobi_rotation(inner: jax.Array) -> jax.Array:
  """One parallel Jacobi step for the rows R of inner = R R^T: the orthogonal X that makes the
  rows of X^T R closer to orthogonal. Every pair (i, j) gets the rotation of its own 2 x 2
  problem, tan(0.5 atan(2 H_ij / (H_jj - H_ii))) (clipped to 0.5), all at once: X = I + F
  orthonormalized by two Newton-Schulz steps. Near ties (|H_jj - H_ii| <= 1e-4 of the larger; the
  loss does not depend on how a tie's vectors are chosen) and rows of float32 noise (a
  rank-deficient z) are left alone, so F stays small and the iteration converges."""
  diagonal = jnp.diag(inner)
  gap = diagonal[None, :] - diagonal[:, None]
  real = diagonal > (inner.shape[0] * jnp.finfo(jnp.float32).eps) ** 2 * jnp.max(diagonal)
  resolved = ((jnp.abs(gap) > 1e-4 * jnp.maximum(diagonal[None, :], diagonal[:, None]))
              & real[:, None] & real[None, :] & ~jnp.eye(inner.shape[0], dtype=bool))
  # tan(0.5 atan(t)) = t / (1 + sqrt(1 + t^2)): the half-angle's tangent (|.| < 1), without
  # the transcendental calls (atan2 is costly on CPUs).
  ratio = 2.0 * inner / jnp.where(resolved, gap, 1.0)
  angle = jnp.clip(ratio / (1.0 + jnp.sqrt(1.0 + jnp.square(ratio))), -0.5, 0.5)
  x = jnp.eye(inner.shape[0]) + jnp.where(resolved, angle, 0.0)
  for _ in range(2):
    x = 1.5 * x - 0.5 * _matmul(x, _matmul(x.T, x))
  return x


def _gram_svd(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sigma (r,), U (n, r), V (D, r)) as _thin_svd, from eigh of the r x r Gram matrix of z's
  short side (z z^T or z^T z) and matmuls: no SVD, no QR.

  With W the Gram matrix's eigenvectors, the rows of W^T a (a = z, or z^T when n > D) are
  sigma_i times the other side's singular vectors. A float32 Gram matrix resolves W only to
  eps * sigma_1^2 / (sigma_i^2 - sigma_j^2) (the eigenvalues' square roots would give sigma only
  to sqrt(eps) * sigma_1); two Jacobi steps on W^T a (_jacobi_rotation) bring the vectors to about
  the SVD's own accuracy, eps * sigma_1 / (sigma_i - sigma_j), and sigma_i is the norm of row i.
  So the gradients follow the SVD route's while the condition number sigma_1 / sigma_r stays
  well below 1 / sqrt(eps) (clusters, ties and rank deficiency included); past it the smallest
  directions' part degrades: a float32 Gram matrix holds nothing of directions below
  sqrt(eps) * sigma_1 (tests/test_nmtune.py checks the gram route against the svd route).
  Directions with sigma_i <= r * eps * sigma_1 (a rank-deficient z) get sigma_i = 0 and zero
  vectors: float32 noise in any route, and nothing divides by a vanishing sigma.
  """
  num_rows, dim = z.shape
  wide = num_rows <= dim
  a = z if wide else z.T                                  # (r, L), r <= L
  _, vectors = jnp.linalg.eigh(_matmul(a, a.T))
  rows = _matmul(vectors.T, a)                            # row i: sigma_i (other side)_i^T
  # Two Jacobi steps; the second's inner products rotated (r x r products, not r x r x L).
  inner = _matmul(rows, rows.T)
  first = _jacobi_rotation(inner)
  rotation = _matmul(first, _jacobi_rotation(_matmul(first.T, _matmul(inner, first))))
  vectors, rows = _matmul(vectors, rotation), _matmul(rotation.T, rows)
  norms = jnp.linalg.norm(rows, axis=1)
  order = jnp.argsort(-norms)
  norms, vectors, rows = norms[order], vectors[:, order], rows[order]
  keep = norms > norms.shape[0] * jnp.finfo(jnp.float32).eps * norms[0]
  sigma = jnp.where(keep, norms, 0.0)
  other = jnp.where(keep[:, None], rows / jnp.where(keep, norms, 1.0)[:, None], 0.0).T
  return (sigma, vectors, other) if wide else (sigma, other, vectors)


def _singular_values_jvp(decompose):
  """The JVP rule d sigma_i = u_i^T dz v_i from a (sigma, U, V) decomposition."""

  def jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    sigma, u, v = decompose(z)
    return sigma, jnp.einsum("ni,nd,di->i", u, dz, v, precision=_precision())

  return jvp


@jax.custom_jvp
def singular_values(z: jax.Array) -> jax.Array:
  """Singular values of an (n, D) matrix, descending, with the derivative d sigma_i = u_i^T dz v_i.

  That derivative has none of the 1 / (s_i^2 - s_j^2) terms of a full SVD's, so repeated or zero
  singular values give finite gradients (a rank-deficient z included: QR does not invert R here).
  """
  num_rows, dim = z.shape
  if num_rows == dim:
    return jnp.linalg.svd(z, compute_uv=False)
  r = jnp.linalg.qr(z.T if num_rows < dim else z, mode="r")
  return jnp.linalg.svd(r, compute_uv=False)


singular_values.defjvp(_singular_values_jvp(_thin_svd))


@jax.custom_jvp
def gram_singular_values(z: jax.Array) -> jax.Array:
  """singular_values through the Gram matrix (_gram_svd): eigh of an r x r matrix, r = min(n, D),
  and matmuls; the same derivative rule, so ties and a rank-deficient z give finite gradients
  (the loss needs only sums over the top k and over all, whose gradients do not depend on how
  a tie's vectors are chosen)."""
  return _gram_svd(z)[0]


gram_singular_values.defjvp(_singular_values_jvp(_gram_svd))

# The singular-value routes of dominant_singular_value_loss: "svd" (singular_values: QR, then
# an SVD of the r x r triangle) and "gram" (gram_singular_values); "auto" takes the backend's
# entry of FASTEST_SINGULAR_VALUE_ROUTE.
SINGULAR_VALUE_ROUTES = ("auto", "svd", "gram")
# The faster route per backend, forward + backward at NMTune's shapes (n = 128, D = 64 .. 2048),
# as benchmarks/nmtune.py measures it (its "singular_value_routes" entry; figures in
# docs/performance.md). cpu: gram. Other backends default to gram too: an eigh of a 128 x 128
# matrix and matmuls, where the svd route needs a QR and an SVD.
FASTEST_SINGULAR_VALUE_ROUTE = {"cpu": "gram"}


def singular_value_route(route: str = "auto") -> str:
  """The concrete route ("svd" or "gram") that `route` names on the default backend."""
  if route not in SINGULAR_VALUE_ROUTES:
    raise ConfigError(f"singular-value route={route!r} is unknown; allowed:"
                      f" {', '.join(SINGULAR_VALUE_ROUTES)}")
  if route == "auto":
    return FASTEST_SINGULAR_VALUE_ROUTE.get(jax.default_backend(), "gram")
  return route


def dominant_share(sigma: jax.Array, k: jax.Array | int) -> jax.Array:
  """Mean of the top-k entries of sigma / sum(sigma), sigma descending; k may be traced (one
  compiled program for every k, as a grid over svd_topk needs). 0 (with a zero gradient) when
  every sigma is 0: a z of zeros (lp_aug on all-zero features) has no direction to share."""
  top = jnp.arange(sigma.shape[0]) < k
  total = jnp.sum(sigma)
  some = total > 0
  return jnp.where(some, jnp.sum(jnp.where(top, sigma, 0.0)) / (k * jnp.where(some, total, 1.0)),
                   0.0)


def dominant_singular_value_loss(z: jax.Array, k: int = 5, *, route: str = "auto") -> jax.Array:
  """The dominant-singular-value term: mean of the top-k entries of sigma / sum(sigma).

  sigma are the singular values of the raw z (no centering). The NMTune loss subtracts this term,
  weighed by the config field svd_weight (k is svd_topk), so training raises the dominant
  directions' share. Only singular values are computed, with a derivative that stays finite for
  repeated or zero singular values.

  Args:
    z: (n, D) head outputs.
    k: how many of the largest singular values count, 1 <= k <= min(n, D). Static: a Python
      int, never a traced value (under jax.jit pass it through static_argnames); it is checked
      against min(n, D) before anything is computed.
    route: SINGULAR_VALUE_ROUTES: "svd" (QR, then an SVD of the small triangle), "gram" (an eigh
      of the smaller Gram matrix), or "auto" (default: the backend's faster one).

  Returns:
    A float32 scalar in (0, 1], or 0 for a z of zeros.

  Raises:
    ConfigError: a z that is not 2-D, a k that is not a static Python int (a traced k
      included), a k outside [1, min(n, D)], or an unknown route.

  Examples:
    >>> import jax.numpy as jnp
    >>> from nmjax import nmtune
    >>> float(nmtune.dominant_singular_value_loss(jnp.eye(4), k=1))  # Four equal directions.
    0.25
  """
  num_rows, dim = _matrix_shape("dominant_singular_value_loss z", z)
  k = check_static_k(k, num_rows, dim)
  values = gram_singular_values if singular_value_route(route) == "gram" else singular_values
  return dominant_share(values(jnp.asarray(z).astype(jnp.float32)), k)
