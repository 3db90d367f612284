"""The closed-form ridge probe's algebra: sufficient statistics, the primal and dual solutions
for a grid of lambdas from one eigendecomposition, their top-1 hits, and the seeded held-out split
that chooses lambda (nmjax.probe.ridge_probe runs them; its docstring states the protocol).

Examples:
    >>> import numpy as np
    >>> from nmjax import ridge
    >>> x = np.random.default_rng(0).normal(size=(20, 3))
    >>> t = 2.0 * np.eye(2)[np.arange(20) % 2] - 1.0
    >>> weights, biases = ridge.dual_solutions(x, t, np.array([0.1, 1.0]))
    >>> weights.shape, biases.shape
    ((2, 3, 2), (2, 2))
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Moments", "dual_solutions", "holdout_split", "mean_std", "primal_solution",
           "primal_solutions", "ridge_accuracies", "ridge_hits", "unstandardize"]

@jax.jit
def _moments(x: jax.Array, targets: jax.Array) -> tuple[jax.Array, ...]:
  """(sum X, sum T, X^T X, X^T T) in float32: X^T X is the only part that costs N * D^2."""
  return x.sum(axis=0), targets.sum(axis=0), x.T @ x, x.T @ targets


def mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean and std (float64); a constant feature gets std 1, so it stays 0, not NaN."""
  mean = x.mean(axis=0, dtype=np.float64)
  deviations = x - mean.astype(np.float32)
  std = np.sqrt(np.square(deviations).mean(axis=0, dtype=np.float64))
  return mean, np.where(std > 1e-6 * np.abs(mean), std, 1.0)


@dataclasses.dataclass(frozen=True)
class Moments:
  """Sufficient statistics of a least-squares fit, float64; additive over disjoint row sets."""
  count: int
  sum_x: np.ndarray   # (D,)
  sum_t: np.ndarray   # (C,)
  xx: np.ndarray      # (D, D) X^T X
  xt: np.ndarray      # (D, C) X^T T

  @classmethod
  def from_sums(cls, count: int, sums: tuple[jax.Array, ...]) -> Moments:
    return cls(count, *(np.asarray(a, np.float64) for a in sums))

  @classmethod
  def of(cls, x: np.ndarray, targets: np.ndarray) -> Moments:
    return cls.from_sums(len(x), _moments(jnp.asarray(x, jnp.float32),
                                          jnp.asarray(targets, jnp.float32)))

  def __add__(self, other: Moments) -> Moments:
    return Moments(self.count + other.count, self.sum_x + other.sum_x, self.sum_t + other.sum_t,
                   self.xx + other.xx, self.xt + other.xt)


def _shrink(eigenvalues: np.ndarray, projected: np.ndarray, penalties: np.ndarray) -> np.ndarray:
  """projected / (eigenvalue + penalty) for every penalty: (L, K, C), the per-lambda rescale."""
  return projected[None] / (np.maximum(eigenvalues, 0.0)[None, :, None]
                            + penalties[:, None, None])


def _centered(moments: Moments) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(scatter (D, D), cross (D, C), mean_x, mean_t): the moments about the means."""
  n = moments.count
  mean_x, mean_t = moments.sum_x / n, moments.sum_t / n
  # Centering as a rank-one correction keeps the pass over the rows a plain matmul.
  return (moments.xx - n * np.outer(mean_x, mean_x), moments.xt - n * np.outer(mean_x, mean_t),
          mean_x, mean_t)


def primal_solutions(moments: Moments, lambdas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ridge weights (L, D, C) and biases (L, C) from one eigendecomposition of the D x D scatter,
  minimizing ||X W + 1 b^T - T||^2 + lambda * n * ||W||^2 (b unpenalized) for every lambda."""
  scatter, cross, mean_x, mean_t = _centered(moments)
  eigenvalues, eigenvectors = np.linalg.eigh(scatter)
  penalties = np.asarray(lambdas, np.float64) * moments.count
  weights = eigenvectors @ _shrink(eigenvalues, eigenvectors.T @ cross, penalties)
  return weights, mean_t[None] - np.einsum("d,ldc->lc", mean_x, weights)


def primal_solution(moments: Moments, lam: float) -> tuple[np.ndarray, np.ndarray]:
  """The primal_solutions entry for one lambda, (1, D, C) and (1, C), by a linear solve (the
  refit's one lambda: an LU solve costs a fraction of an eigendecomposition)."""
  scatter, cross, mean_x, mean_t = _centered(moments)
  scatter[np.diag_indices_from(scatter)] += lam * moments.count
  weights = np.linalg.solve(scatter, cross)[None]
  return weights, mean_t[None] - np.einsum("d,ldc->lc", mean_x, weights)


def dual_solutions(x: np.ndarray, targets: np.ndarray, lambdas: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The same solutions as primal_solutions from one eigendecomposition of the n x n Gram."""
  n = len(x)
  mean_x = x.mean(axis=0, dtype=np.float64)
  mean_t = targets.mean(axis=0, dtype=np.float64)
  centered = np.asarray(x, np.float64) - mean_x
  eigenvalues, eigenvectors = np.linalg.eigh(centered @ centered.T)
  penalties = np.asarray(lambdas, np.float64) * n
  coefficients = eigenvectors @ _shrink(eigenvalues, eigenvectors.T @ (targets - mean_t),
                                        penalties)                      # (L, n, C)
  weights = centered.T @ coefficients                                    # (L, D, C)
  return weights, mean_t[None] - np.einsum("d,ldc->lc", mean_x, weights)


def ridge_hits(x: np.ndarray, labels: np.ndarray, weights: np.ndarray, biases: np.ndarray,
                logit_bias: np.ndarray | float = 0.0) -> np.ndarray:
  """(rows, L) top-1 hits of every (weights[l], biases[l]) on (x, labels), one matmul for all."""
  num_lambdas, dim, num_classes = weights.shape
  stacked = weights.transpose(1, 0, 2).reshape(dim, num_lambdas * num_classes)
  scores = (x @ stacked.astype(np.float32)).reshape(len(x), num_lambdas, num_classes)
  scores += biases[None].astype(np.float32) + logit_bias
  return scores.argmax(axis=-1) == labels[:, None]


def ridge_accuracies(x: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                      biases: np.ndarray, logit_bias: np.ndarray | float = 0.0) -> np.ndarray:
  """Top-1 accuracy of every (weights[l], biases[l]) on (x, labels)."""
  return ridge_hits(x, labels, weights, biases, logit_bias).mean(axis=0)


def unstandardize(weights: np.ndarray, biases: np.ndarray, mean: np.ndarray, std: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The same predictors on raw features: (x - mean) / std @ W + b = x @ W' + b'."""
  raw_weights = weights / std[None, :, None]
  return raw_weights, biases - np.einsum("d,ldc->lc", mean, raw_weights)


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit indices, held-out indices): round(fraction * n_c) of each class c held out, seeded."""
  rng = np.random.default_rng(seed)
  held_out = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    held_out.append(rng.permutation(members)[:int(round(fraction * len(members)))])
  held = np.zeros(len(labels), bool)
  held[np.concatenate(held_out)] = True
  return np.flatnonzero(~held), np.flatnonzero(held)
