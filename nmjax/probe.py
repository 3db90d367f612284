"""Linear probes on frozen features: the reference AdamW protocol and a closed-form ridge.

Both probes take the train and test features as a features file path, a FeatureSet or a
(features, labels) pair of arrays (nmjax.features.as_feature_set validates them), and return a
result dict with at least

    accuracy       test top-1 in [0, 1]
    correct        (N_test,) bool: which test examples the head gets right
    seconds        wall time of the probe (validation, compilation and fitting included)
    num_train, num_test, feature_dim, num_classes, method ("lp" | "ridge"), train_accuracy

linear_probe adds test_accuracy_per_epoch; ridge_probe adds lambda (the chosen one),
holdout_accuracy (one per config.ridge_lambdas entry), num_holdout and solver ("primal" |
"dual").

ridge_probe: least squares on standardized features against +-1 one-hot targets, unpenalized
bias; one eigendecomposition (of X^T X, "primal", or X X^T, "dual", the smaller) serves every
lambda of the grid. Lambda (per example: the penalty on ||W||^2 is lambda * n) is chosen on a
stratified, seeded held-out part of the train split (ties to the larger), never on test; the
probe is then refit on the whole train split.

Examples:
    >>> import numpy as np
    >>> from nmjax import probe
    >>> x, y = np.eye(3, dtype=np.float32).repeat(4, axis=0), np.arange(12) // 4
    >>> probe.ridge_probe((x, y), (x, y))["accuracy"]
    1.0
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nmjax.config import check_range, overlay, probe_fields
from nmjax.errors import ConfigError, DataError
from nmjax.features import (MAX_CLASSES, FeatureSet, FeaturesLike, as_feature_set,
                            inferred_classes_note, warn_if_huge)

__all__ = ["linear_probe", "ridge_probe"]

# How many times each jitted program was traced; tests read it to catch silent recompilation.
TRACES: collections.Counter[str] = collections.Counter()


def default_config() -> ml_collections.ConfigDict:
  """The reference linear-probe defaults plus the ridge probe's grid (a locked ConfigDict)."""
  return probe_fields()


def resolve_config(config: Any) -> ml_collections.ConfigDict:
  """Defaults overlaid with the caller's fields (a ConfigDict or a dict); unknown fields and bad
  values fail here."""
  resolved = overlay(default_config(), config, what="probe", tuple_fields=("ridge_lambdas",))
  for field in ("learning_rate", "eps"):
    check_range(resolved, field, low=0.0, low_inclusive=False)
  check_range(resolved, "weight_decay", low=0.0)
  for field in ("b1", "b2"):
    check_range(resolved, field, low=0.0, high=1.0, high_inclusive=False)
  check_range(resolved, "batch_size", low=1, integer=True)
  check_range(resolved, "num_epochs", low=1, integer=True)
  check_range(resolved, "seed", low=0, integer=True)
  if resolved.num_classes is not None:
    check_range(resolved, "num_classes", low=2, high=MAX_CLASSES, integer=True)
  check_range(resolved, "ridge_holdout_fraction", low=0.0, high=1.0, low_inclusive=False,
              high_inclusive=False)
  lambdas = resolved.ridge_lambdas
  if (not isinstance(lambdas, (tuple, list)) or not lambdas
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                 for v in lambdas)):
    raise ConfigError(f"config.ridge_lambdas={lambdas!r} is not allowed; allowed: a non-empty"
                      " tuple of positive numbers")
  return resolved


def _load_splits(train: FeaturesLike, test: FeaturesLike, num_classes: int | None
                 ) -> tuple[FeatureSet, FeatureSet, int]:
  """Validated train/test features with the same dimension, and the number of classes (None:
  max train label + 1; a test label past it is refused, as no head could predict it)."""
  train_set = as_feature_set(train, name="probe train features", num_classes=num_classes)
  given = num_classes is not None
  if not given:
    num_classes = int(train_set.labels.max()) + 1
    if num_classes < 2:
      raise DataError("probe train features: every train label is 0; a probe needs at least 2"
                      " classes")
  test_set = as_feature_set(
      test, name="probe test features", num_classes=num_classes, feature_dim=train_set.feature_dim,
      note="" if given else inferred_classes_note(num_classes))
  warn_if_huge(train_set.where("probe train features"), train_set.features)
  warn_if_huge(test_set.where("probe test features"), test_set.features)
  return train_set, test_set, num_classes


def test_logit_bias(logit_subset: Any, test_set: FeatureSet, num_classes: int) -> np.ndarray:
  """(C,) float32 added to test logits: 0 for the classes of logit_subset (None: every class),
  -inf for the others."""
  bias = np.zeros(num_classes, np.float32)
  if logit_subset is None:
    return bias
  subset = np.asarray(logit_subset)
  if (subset.ndim != 1 or not len(subset) or not np.issubdtype(subset.dtype, np.integer)
      or subset.min() < 0 or subset.max() >= num_classes or len(np.unique(subset)) != len(subset)):
    raise ConfigError(f"config.logit_subset={logit_subset!r} is not allowed; allowed:"
                      f" distinct class indices in [0, {num_classes})")
  outside = np.setdiff1d(np.unique(test_set.labels), subset)
  if len(outside):
    raise DataError(f"probe test features: labels {outside[:5].tolist()} are outside"
                    " config.logit_subset, so they could never be predicted")
  bias[:] = -np.inf
  bias[subset] = 0.0
  return bias


def _summary(method: str, train_set: FeatureSet, test_set: FeatureSet,
             num_classes: int) -> dict[str, Any]:
  return {"method": method, "num_train": train_set.num_examples,
          "num_test": test_set.num_examples, "feature_dim": train_set.feature_dim,
          "num_classes": num_classes}


# ----------------------------------------------------------------------------- linear probe


def init_head(seed: int, feature_dim: int, num_classes: int) -> dict[str, jax.Array]:
  """Dense(C) parameters: He-uniform kernel U(+-sqrt(6 / D)) (D, C) and a zero bias (C,), drawn
  by numpy (random numbers inside the jitted program would cost more compilation than a probe)."""
  limit = np.sqrt(6.0 / feature_dim)
  kernel = np.random.default_rng([seed, 0]).uniform(-limit, limit, (feature_dim, num_classes))
  return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.zeros((num_classes,))}


def epoch_orders(seed: int, num_examples: int, num_epochs: int) -> np.ndarray:
  """One seeded permutation of the train examples per epoch: (E, N) int32."""
  rng = np.random.default_rng([seed, 1])
  return np.stack([rng.permutation(num_examples) for _ in range(num_epochs)]).astype(np.int32)


def epoch_batches(order: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """An epoch's order (N,) as batches (indices (S, B) int32, mask (S, B) bool), S = ceil(N / B):
  every example once with mask True, the last batch padded with index 0 and mask False."""
  num_examples = order.shape[0]
  num_steps = -(-num_examples // batch_size)
  padding = num_steps * batch_size - num_examples
  indices = jnp.concatenate([order, jnp.zeros((padding,), order.dtype)])
  mask = jnp.arange(num_steps * batch_size) < num_examples
  return indices.reshape(num_steps, batch_size), mask.reshape(num_steps, batch_size)


def head_logits(params: dict[str, jax.Array], features: jax.Array) -> jax.Array:
  return features @ params["kernel"] + params["bias"]


def _accuracy(params: dict[str, jax.Array], features: jax.Array, labels: jax.Array,
              logit_bias: jax.Array | float = 0.0) -> jax.Array:
  predictions = jnp.argmax(head_logits(params, features) + logit_bias, axis=-1)
  return jnp.mean((predictions == labels).astype(jnp.float32))


def make_optimizer(hparams: dict[str, Any], total_steps: int) -> optax.GradientTransformation:
  """AdamW with a per-step cosine decay from the learning rate to 0, no warm-up."""
  schedule = optax.cosine_decay_schedule(hparams["learning_rate"], decay_steps=total_steps)
  return optax.adamw(schedule, b1=hparams["b1"], b2=hparams["b2"], eps=hparams["eps"],
                     weight_decay=hparams["weight_decay"])


@functools.partial(jax.jit, static_argnames=("batch_size",))
def train_linear_head(train_x: jax.Array, train_y: jax.Array, test_x: jax.Array,
                      test_y: jax.Array, params: dict[str, jax.Array], orders: jax.Array,
                      hparams: dict[str, jax.Array], logit_bias: jax.Array, *,
                      batch_size: int
                      ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """The whole reference protocol as one program: (params, test accuracy per epoch, train acc).

  orders (E, N): each epoch's shuffle (epoch_orders); hparams: learning_rate, weight_decay, b1,
  b2, eps as traced scalars (new values, data or seeds of the same shapes reuse the program);
  logit_bias (C,): added to the test logits (0 or -inf: a logit subset)."""
  TRACES["train_linear_head"] += 1
  num_epochs, num_examples = orders.shape
  tx = make_optimizer(hparams, -(-num_examples // batch_size) * num_epochs)

  def loss_fn(params, features, labels, mask):
    losses = optax.softmax_cross_entropy_with_integer_labels(head_logits(params, features), labels)
    return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.sum(mask)

  def train_step(carry, batch):
    params, opt_state = carry
    indices, mask = batch
    grads = jax.grad(loss_fn)(params, train_x[indices], train_y[indices], mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  def train_epoch(carry, order):
    carry, _ = jax.lax.scan(train_step, carry, epoch_batches(order, batch_size))
    return carry, _accuracy(carry[0], test_x, test_y, logit_bias)

  (params, _), test_accuracy = jax.lax.scan(train_epoch, (params, tx.init(params)), orders)
  return params, test_accuracy, _accuracy(params, train_x, train_y)


def linear_probe(train: FeaturesLike, test: FeaturesLike,
                 config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """The reference implementation's linear probe on frozen features.

  A Dense(C) head on the raw features, trained with AdamW and a per-step cosine decay to 0 by
  cross-entropy over seeded shuffles (the values: default_config(); the protocol: docs/method.md),
  every example of every epoch counted; the last epoch's test top-1 is reported. All epochs run
  as one jitted program, compiled once per shape.

  Args:
    train: a features file path, a FeatureSet or a (features, labels) pair of arrays.
    test: the test features, in any of those forms, as wide as the train features.
    config: default_config() fields to override (a ConfigDict or a dict); None: the defaults.

  Returns:
    The result dict (module docstring), with test_accuracy_per_epoch (one float per epoch; the
    last is "accuracy").

  Raises:
    ConfigError: an unknown config field or a bad value, or a bad logit_subset.
    DataError: bad features (one line naming the file or split and the problem).

  Examples:
    >>> import numpy as np
    >>> from nmjax import probe
    >>> x, y = np.eye(3, dtype=np.float32).repeat(4, axis=0), np.arange(12) // 4
    >>> result = probe.linear_probe((x, y), (x, y), {"learning_rate": 0.5})
    >>> result["accuracy"], len(result["test_accuracy_per_epoch"])
    (1.0, 30)
  """
  start = time.perf_counter()
  config = resolve_config(config)
  train_set, test_set, num_classes = _load_splits(train, test, config.num_classes)
  hparams = {k: jnp.float32(config[k]) for k in ("learning_rate", "weight_decay", "b1", "b2",
                                                  "eps")}
  test_x = jnp.asarray(test_set.features)
  bias = jnp.asarray(test_logit_bias(config.logit_subset, test_set, num_classes))
  params, test_accuracy, train_accuracy = train_linear_head(
      jnp.asarray(train_set.features), jnp.asarray(train_set.labels, jnp.int32),
      test_x, jnp.asarray(test_set.labels, jnp.int32),
      init_head(config.seed, train_set.feature_dim, num_classes),
      jnp.asarray(epoch_orders(config.seed, train_set.num_examples, config.num_epochs)),
      hparams, bias, batch_size=config.batch_size)
  per_epoch = [float(a) for a in np.asarray(test_accuracy)]
  return {**_summary("lp", train_set, test_set, num_classes), "accuracy": per_epoch[-1],
          "train_accuracy": float(train_accuracy), "test_accuracy_per_epoch": per_epoch,
          "correct": np.asarray(_predictions(params, test_x, bias)) == test_set.labels,
          "seconds": time.perf_counter() - start}


@jax.jit
def _predictions(params: dict[str, jax.Array], features: jax.Array, logit_bias: jax.Array
                 ) -> jax.Array:
  """The head's top-1 class of each row (with the logit bias of a class subset)."""
  return jnp.argmax(head_logits(params, features) + logit_bias, axis=-1)


# ------------------------------------------------------------------------------ ridge probe


@jax.jit
def _moments(x: jax.Array, targets: jax.Array) -> tuple[jax.Array, ...]:
  """(sum X, sum T, X^T X, X^T T) in float32: X^T X is the only part that costs N * D^2."""
  return x.sum(axis=0), targets.sum(axis=0), x.T @ x, x.T @ targets


def _mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _ridge_hits(x: np.ndarray, labels: np.ndarray, weights: np.ndarray, biases: np.ndarray,
                logit_bias: np.ndarray | float = 0.0) -> np.ndarray:
  """(rows, L) top-1 hits of every (weights[l], biases[l]) on (x, labels), one matmul for all."""
  num_lambdas, dim, num_classes = weights.shape
  stacked = weights.transpose(1, 0, 2).reshape(dim, num_lambdas * num_classes)
  scores = (x @ stacked.astype(np.float32)).reshape(len(x), num_lambdas, num_classes)
  scores += biases[None].astype(np.float32) + logit_bias
  return scores.argmax(axis=-1) == labels[:, None]


def _ridge_accuracies(x: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                      biases: np.ndarray, logit_bias: np.ndarray | float = 0.0) -> np.ndarray:
  """Top-1 accuracy of every (weights[l], biases[l]) on (x, labels)."""
  return _ridge_hits(x, labels, weights, biases, logit_bias).mean(axis=0)


def _unstandardize(weights: np.ndarray, biases: np.ndarray, mean: np.ndarray, std: np.ndarray
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


def ridge_probe(train: FeaturesLike, test: FeaturesLike,
                config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Returns the closed-form ridge probe's result dict (module docstring, with its example).

  Args:
    train: a features file path, a FeatureSet or a (features, labels) pair of arrays.
    test: the test features, in any of those forms, as wide as the train features.
    config: default_config() fields to override (a ConfigDict or a dict); None: the defaults.

  Raises:
    ConfigError: an unknown config field or a bad value, or a bad logit_subset.
    DataError: bad features, or too few train examples to hold some out.
  """
  start = time.perf_counter()
  config = resolve_config(config)
  train_set, test_set, num_classes = _load_splits(train, test, config.num_classes)
  logit_bias = test_logit_bias(config.logit_subset, test_set, num_classes)
  fit_idx, holdout_idx = holdout_split(train_set.labels, config.ridge_holdout_fraction,
                                       config.seed)
  if len(fit_idx) < 2 or len(holdout_idx) < 1:
    raise DataError(
        f"probe train features: {train_set.num_examples} examples leave {len(fit_idx)} to fit"
        f" and {len(holdout_idx)} to hold out at config.ridge_holdout_fraction="
        f"{config.ridge_holdout_fraction}; ridge_probe needs at least 2 and 1")
  lambdas = np.asarray(config.ridge_lambdas, np.float64)
  train_x, labels = train_set.features, train_set.labels
  mean, std = _mean_std(train_x)
  # In numpy: jitted, each task's new shapes would cost more compilation than they save.
  standardized = (train_x - mean.astype(np.float32)) / std.astype(np.float32)
  targets = 2.0 * np.eye(num_classes, dtype=np.float32)[labels] - 1.0

  primal = train_set.feature_dim <= len(fit_idx)
  if primal:
    fit_moments = Moments.of(standardized[fit_idx], targets[fit_idx])
    # Held-out plus fit moments are the whole split's: the refit makes no second pass.
    all_moments = fit_moments + Moments.of(standardized[holdout_idx], targets[holdout_idx])
    weights, biases = primal_solutions(fit_moments, lambdas)
  else:
    weights, biases = dual_solutions(standardized[fit_idx], targets[fit_idx], lambdas)
  holdout_accuracy = _ridge_accuracies(train_x[holdout_idx], labels[holdout_idx],
                                       *_unstandardize(weights, biases, mean, std))
  # Ties go to the larger lambda: the smoother of equally good solutions.
  best = max(range(len(lambdas)), key=lambda i: (holdout_accuracy[i], lambdas[i]))
  if primal:
    weights, biases = primal_solution(all_moments, float(lambdas[best]))
  else:
    weights, biases = dual_solutions(standardized, targets, lambdas[best:best + 1])
  weights, biases = _unstandardize(weights, biases, mean, std)
  correct = _ridge_hits(test_set.features, test_set.labels, weights, biases, logit_bias)[:, 0]
  test_accuracy = correct.mean()
  train_accuracy = _ridge_accuracies(train_x, labels, weights, biases)[0]
  return {**_summary("ridge", train_set, test_set, num_classes),
          "accuracy": float(test_accuracy), "train_accuracy": float(train_accuracy),
          "lambda": float(lambdas[best]),
          "holdout_accuracy": [float(a) for a in holdout_accuracy],
          "num_holdout": int(len(holdout_idx)),
          "solver": "primal" if primal else "dual", "correct": correct,
          "seconds": time.perf_counter() - start}
