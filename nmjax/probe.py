"""Linear probes on frozen features: the reference AdamW protocol and a closed-form ridge.

Both probes take the train and test features as a features file path, a FeatureSet or a
(features, labels) pair of arrays (nmjax.features.as_feature_set validates them), and return a
result dict with at least

    accuracy       test top-1 in [0, 1]
    correct        (N_test,) bool: which test examples the head gets right
    seconds        wall time of the probe (validation, compilation and fitting included)
    num_train, num_test, feature_dim, num_classes, method ("lp" | "ridge"), train_accuracy
    head           the fitted nmjax.heads.Head (kind "linear"): argmax of head.predict(test
                   features), over config.logit_subset's classes, scores as accuracy

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
                            inferred_classes_note, warn_if_degenerate)
from nmjax.heads import Head, make_head
# The closed-form algebra lives in nmjax.ridge; its names stay importable from here.
from nmjax.ridge import (Moments, dual_solutions, holdout_split, mean_std, primal_solution,
                         primal_solutions, ridge_accuracies, ridge_hits, unstandardize)

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
  warn_if_degenerate(train_set.where("probe train features"), train_set.features)
  warn_if_degenerate(test_set.where("probe test features"), test_set.features)
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


def _fitted_head(method: str, kernel: Any, bias: Any, config: ml_collections.ConfigDict,
                 train_set: FeatureSet, num_classes: int) -> Head:
  """A probe's fitted nmjax.heads.Head (kind linear): the kernel and bias as float32."""
  return make_head(method, {"kernel": np.asarray(kernel, np.float32),
                            "bias": np.asarray(bias, np.float32)},
                   {"feature_dim": train_set.feature_dim, "logit_subset": config.logit_subset},
                   num_classes)


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
  head = _fitted_head("lp", params["kernel"], params["bias"], config, train_set, num_classes)
  return {**_summary("lp", train_set, test_set, num_classes), "accuracy": per_epoch[-1],
          "head": head,
          "train_accuracy": float(train_accuracy), "test_accuracy_per_epoch": per_epoch,
          "correct": np.asarray(_predictions(params, test_x, bias)) == test_set.labels,
          "seconds": time.perf_counter() - start}


@jax.jit
def _predictions(params: dict[str, jax.Array], features: jax.Array, logit_bias: jax.Array
                 ) -> jax.Array:
  """The head's top-1 class of each row (with the logit bias of a class subset)."""
  return jnp.argmax(head_logits(params, features) + logit_bias, axis=-1)


# ------------------------------------------------------------------------------ ridge probe


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
  mean, std = mean_std(train_x)
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
  holdout_accuracy = ridge_accuracies(train_x[holdout_idx], labels[holdout_idx],
                                       *unstandardize(weights, biases, mean, std))
  # Ties go to the larger lambda: the smoother of equally good solutions.
  best = max(range(len(lambdas)), key=lambda i: (holdout_accuracy[i], lambdas[i]))
  if primal:
    weights, biases = primal_solution(all_moments, float(lambdas[best]))
  else:
    weights, biases = dual_solutions(standardized, targets, lambdas[best:best + 1])
  weights, biases = unstandardize(weights, biases, mean, std)
  head = _fitted_head("ridge", weights[0], biases[0], config, train_set, num_classes)
  # Scored by the head itself: its predictions reproduce the reported accuracy exactly.
  correct = np.argmax(head.predict(test_set.features) + logit_bias, -1) == test_set.labels
  train_accuracy = ridge_accuracies(train_x, labels, weights, biases)[0]
  return {**_summary("ridge", train_set, test_set, num_classes),
          "accuracy": float(correct.mean()), "train_accuracy": float(train_accuracy),
          "lambda": float(lambdas[best]), "num_holdout": int(len(holdout_idx)),
          "holdout_accuracy": [float(a) for a in holdout_accuracy], "correct": correct,
          "solver": "primal" if primal else "dual", "head": head,
          "seconds": time.perf_counter() - start}
