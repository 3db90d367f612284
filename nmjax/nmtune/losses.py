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


def consistency_loss(z: jax.Array, f: jax.Array) -> jax.Array:
  """Elementwise mean over (n, D) of (normalize(z) - stop_gradient(normalize(f)))^2.

  The mean runs over all n * D entries, so the squared distance of unit rows carries an implicit
  1 / D (the reference's MSE). In two-view training z is the second view's, f the first's.
  """
  z = z.astype(jnp.float32)
  target = jax.lax.stop_gradient(normalize_rows(f.astype(jnp.float32)))
  return jnp.mean(jnp.square(normalize_rows(z) - target))


def covariance_loss(z: jax.Array, *, route: str = "auto") -> jax.Array:
  """Sum of the squared off-diagonal entries of the unbiased (D, D) covariance of z, over D.

  route "covariance" forms C = z_c^T z_c / (n - 1) and zeroes its diagonal; "gram" uses
  ||z_c^T z_c||_F = ||z_c z_c^T||_F (an n x n matrix) and subtracts the diagonal's squares, the
  same value at n^2 D instead of n D^2 cost; "auto" takes the smaller matrix.
  """
  if route not in COVARIANCE_ROUTES:
    raise ConfigError(f"covariance_loss route={route!r} is unknown; allowed:"
                      f" {', '.join(COVARIANCE_ROUTES)}")
  num_rows, dim = z.shape
  if num_rows < 2:
    raise ConfigError(f"covariance_loss needs at least 2 rows, got {num_rows}")
  z = z.astype(jnp.float32)
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
  SVD instead of the slow general one; on CPUs 2.6x faster at 128 x 2048)."""
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


@singular_values.defjvp
def _singular_values_jvp(primals, tangents):
  (z,), (dz,) = primals, tangents
  sigma, u, v = _thin_svd(z)
  return sigma, jnp.einsum("ni,nd,di->i", u, dz, v)


def dominant_singular_value_loss(z: jax.Array, k: int = 5) -> jax.Array:
  """Mean of the top-k entries of sigma / sum(sigma), sigma the singular values of the raw z.

  Positive; the NMTune loss subtracts it (maximizing the dominant directions' share). Singular
  values only (singular_values: stable derivative, QR first). float32.
  """
  num_rows, dim = z.shape
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= min(num_rows,
                                                                                        dim):
    raise ConfigError(f"svd_topk={k!r} is not allowed; allowed: an integer in [1, min(n, D)]"
                      f" = [1, {min(num_rows, dim)}]")
  sigma = singular_values(z.astype(jnp.float32))
  return jnp.mean(sigma[:k] / jnp.sum(sigma))
