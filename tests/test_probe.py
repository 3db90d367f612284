"""nmjax.probe: accuracy against scikit-learn, the reference loop semantics, the ridge algebra,
compilation counts and refusals of bad input."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import threadpoolctl
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from nmjax import features as features_lib
from nmjax import probe
from nmjax.data.sources import get_source
from nmjax.errors import ConfigError, DataError


def _mnist_random_features(split: str, dim: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """Embedded MNIST through a fixed random ReLU layer (a randomly initialized one-layer encoder)
  over 2x2-pooled pixels: real data, features that are not linearly trivial, cheap to make."""
  images, labels, _ = get_source("mnist").load_arrays(split)
  pixels = images.astype(np.float32).reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)) / 255.0
  pixels = pixels.reshape(len(pixels), -1)
  rng = np.random.default_rng(0)
  weight = rng.standard_normal((pixels.shape[1], dim)).astype(np.float32) * 2.0 / 14.0
  bias = rng.uniform(-1.0, 1.0, dim).astype(np.float32)
  return np.maximum(pixels @ weight + bias, 0.0), labels


def test_probes_match_sklearn_logistic_regression():
  train, test = _mnist_random_features("train"), _mnist_random_features("test")
  scaler = StandardScaler().fit(train[0])
  # One BLAS thread: on a shared 2-core machine OpenBLAS threads spin against each other.
  with threadpoolctl.threadpool_limits(1):
    logistic = LogisticRegression(max_iter=1000).fit(scaler.transform(train[0]), train[1])
  reference = logistic.score(scaler.transform(test[0]), test[1])
  assert reference > 0.9  # The features carry real signal, so a tie is not a trivial one.

  lp = probe.linear_probe(train, test)
  ridge = probe.ridge_probe(train, test)
  assert abs(lp["accuracy"] - reference) <= 0.015, (lp["accuracy"], reference)
  assert abs(ridge["accuracy"] - reference) <= 0.015, (ridge["accuracy"], reference)
  assert lp["accuracy"] == lp["test_accuracy_per_epoch"][-1]
  assert len(lp["test_accuracy_per_epoch"]) == 30
  for result in (lp, ridge):
    assert (result["num_train"], result["num_test"]) == (8004, 1996)
    assert (result["feature_dim"], result["num_classes"]) == (512, 10)
    assert result["seconds"] > 0 and 0.0 <= result["train_accuracy"] <= 1.0
  assert ridge["solver"] == "primal" and ridge["lambda"] in probe.default_config().ridge_lambdas


def test_epoch_batches_cover_every_example_once():
  orders = probe.epoch_orders(3, 130, 2)
  assert orders.shape == (2, 130) and not np.array_equal(orders[0], orders[1])
  np.testing.assert_array_equal(orders, probe.epoch_orders(3, 130, 2))  # Seeded.
  indices, mask = probe.epoch_batches(jnp.asarray(orders[0]), 64)
  assert indices.shape == mask.shape == (3, 64)
  assert np.sort(np.asarray(indices)[np.asarray(mask)]).tolist() == list(range(130))
  assert np.asarray(mask).sum(axis=1).tolist() == [64, 64, 2]


# A tiny problem whose train size is not a multiple of the batch: 70 = 64 + 6.
_N, _DIM, _CLASSES, _EPOCHS = 70, 6, 3, 2
_HPARAMS = dict(learning_rate=1e-2, weight_decay=1e-4, b1=0.9, b2=0.999, eps=1e-8)


def _tiny(seed: int = 0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((_N, _DIM)).astype(np.float32),
          rng.integers(0, _CLASSES, _N).astype(np.int32))


def _fit_tiny(x, y, orders, seed=0):
  hparams = {k: jnp.float32(v) for k, v in _HPARAMS.items()}
  params, _, _ = probe.train_linear_head(
      jnp.asarray(x), jnp.asarray(y), jnp.asarray(x[:5]), jnp.asarray(y[:5]),
      probe.init_head(seed, _DIM, _CLASSES), jnp.asarray(orders), hparams,
      jnp.zeros(_CLASSES), batch_size=64)
  return params


def test_scanned_training_equals_a_plain_loop_over_real_rows():
  """The jitted scan with padded, masked batches does what a Python loop over the real rows
  of each batch (the last one holding 6) does, step for step."""
  x, y = _tiny()
  orders = probe.epoch_orders(7, _N, _EPOCHS)
  params = _fit_tiny(x, y, orders)

  expected = probe.init_head(0, _DIM, _CLASSES)
  assert float(jnp.abs(expected["kernel"]).max()) <= np.sqrt(6.0 / _DIM)  # He-uniform.
  assert not jnp.any(expected["bias"])
  tx = optax.adamw(optax.cosine_decay_schedule(_HPARAMS["learning_rate"], 2 * _EPOCHS),
                   b1=_HPARAMS["b1"], b2=_HPARAMS["b2"], eps=_HPARAMS["eps"],
                   weight_decay=_HPARAMS["weight_decay"])
  opt_state = tx.init(expected)

  def loss_fn(params, features, labels):
    logits = features @ params["kernel"] + params["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, opt_state, features, labels):
    updates, opt_state = tx.update(jax.grad(loss_fn)(params, features, labels), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  batch_sizes = []
  for order in orders:
    for start in range(0, _N, 64):
      real = order[start:start + 64]
      batch_sizes.append(len(real))
      expected, opt_state = step(expected, opt_state, x[real], y[real])
  assert batch_sizes == [64, 6] * _EPOCHS
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(params[name], expected[name], atol=2e-6)


def test_an_example_only_in_the_last_batch_moves_the_head():
  """One epoch of 70 = 64 + 6: an example of the 6-row last batch is seen nowhere else, so its
  label would not matter if that batch were dropped."""
  x, y = _tiny()
  orders = probe.epoch_orders(7, _N, 1)
  example = int(orders[0, -1])
  changed = y.copy()
  changed[example] = (changed[example] + 1) % _CLASSES
  before = _fit_tiny(x, y, orders)["kernel"]
  after = _fit_tiny(x, changed, orders)["kernel"]
  assert not np.allclose(before, after, atol=1e-7)
  first = int(orders[0, 0])  # And a first-batch example, for contrast, moves it too.
  changed = y.copy()
  changed[first] = (changed[first] + 1) % _CLASSES
  assert not np.allclose(before, _fit_tiny(x, changed, orders)["kernel"], atol=1e-7)


def test_linear_probe_compiles_once_per_shape():
  config = probe.default_config()
  config.num_epochs = 3
  first = probe.linear_probe(_tiny(0), _tiny(1), config)
  traced = probe.TRACES["train_linear_head"]
  config.seed = 5
  config.learning_rate = 0.05
  second = probe.linear_probe(_tiny(2), _tiny(3), config)
  assert probe.TRACES["train_linear_head"] == traced  # New data, seed and lr: no new trace.
  assert len(first["test_accuracy_per_epoch"]) == len(second["test_accuracy_per_epoch"]) == 3


@pytest.mark.parametrize("rows", [50, 12])
def test_ridge_solutions_match_a_direct_solve(rows):
  rng = np.random.default_rng(rows)
  x = rng.standard_normal((rows, 20)) + 1.5
  targets = rng.standard_normal((rows, 4))
  lambdas = np.array([1e-3, 0.1, 3.0])
  # Direct: [X 1] [W; b] = T with the penalty lambda * n on W only, in float64.
  augmented = np.hstack([x, np.ones((rows, 1))])
  for i, lam in enumerate(lambdas):
    penalty = np.diag(np.r_[np.full(20, lam * rows), 0.0])
    direct = np.linalg.solve(augmented.T @ augmented + penalty, augmented.T @ targets)
    dual_w, dual_b = probe.dual_solutions(x, targets, lambdas)
    np.testing.assert_allclose(dual_w[i], direct[:20], atol=1e-8)
    np.testing.assert_allclose(dual_b[i], direct[20], atol=1e-8)
    if rows >= 20:  # The primal form accumulates X^T X in float32.
      primal_w, primal_b = probe.primal_solutions(
          probe.Moments.of(x.astype(np.float32), targets.astype(np.float32)), lambdas)
      np.testing.assert_allclose(primal_w[i], direct[:20], atol=1e-4)
      np.testing.assert_allclose(primal_b[i], direct[20], atol=1e-4)
      one_w, one_b = probe.primal_solution(
          probe.Moments.of(x.astype(np.float32), targets.astype(np.float32)), lam)
      np.testing.assert_allclose(one_w[0], direct[:20], atol=1e-4)
      np.testing.assert_allclose(one_b[0], direct[20], atol=1e-4)


def test_ridge_lambda_is_chosen_without_the_test_labels():
  rng = np.random.default_rng(0)
  means = rng.standard_normal((4, 16)) * 1.5
  labels = rng.integers(0, 4, 400)
  x = (means[labels] + rng.standard_normal((400, 16))).astype(np.float32)
  train, test = (x[:300], labels[:300]), (x[300:], labels[300:])
  shuffled = (x[300:], rng.permutation(labels[300:]))
  result = probe.ridge_probe(train, test)
  blind = probe.ridge_probe(train, shuffled)
  assert result["lambda"] == blind["lambda"]
  assert result["holdout_accuracy"] == blind["holdout_accuracy"]
  assert result["num_holdout"] == 60 and result["accuracy"] > 0.6


def test_small_train_split_uses_the_dual_form():
  rng = np.random.default_rng(1)
  labels = np.arange(40) % 2
  x = (rng.standard_normal((40, 64)) + labels[:, None]).astype(np.float32)
  result = probe.ridge_probe((x[:30], labels[:30]), (x[30:], labels[30:]))
  assert result["solver"] == "dual" and 0.0 <= result["accuracy"] <= 1.0


def _one_line(error: pytest.ExceptionInfo) -> None:
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("fn", [probe.linear_probe, probe.ridge_probe])
def test_bad_features_are_refused_before_any_work(fn, tmp_path):
  good = _tiny()
  nan = good[0].copy()
  nan[3, 2] = np.nan
  with pytest.raises(DataError, match="probe train features: features hold 1 non-finite") as e:
    fn((nan, good[1]), good)
  _one_line(e)
  config = probe.default_config()
  config.num_classes = 2
  with pytest.raises(DataError, match=r"labels outside \[0, 2\)") as e:
    fn(good, good, config)
  _one_line(e)
  with pytest.raises(DataError, match="feature dimension 5 != expected 6") as e:
    fn(good, (good[0][:, :5], good[1]), None)
  _one_line(e)
  path = str(tmp_path / "bad.npz")
  np.savez(path, features=nan, labels=good[1])
  with pytest.raises(DataError, match=f"features file {path}: .*non-finite") as e:
    fn(path, good)
  _one_line(e)


@pytest.mark.parametrize("field,value,match", [
    ("batch_size", 0, "config.batch_size=0 is out of range"),
    ("learning_rate", -1.0, "config.learning_rate=-1.0 is out of range"),
    ("ridge_holdout_fraction", 1.0, "config.ridge_holdout_fraction=1.0 is out of range"),
    ("ridge_lambdas", (), "config.ridge_lambdas=.* a non-empty tuple of positive numbers"),
    ("num_classes", 1, "config.num_classes=1 is out of range"),
])
def test_bad_config_values_give_one_line(field, value, match):
  config = probe.default_config()
  config[field] = value
  with pytest.raises(ConfigError, match=match) as e:
    probe.ridge_probe(_tiny(), _tiny(), config)
  _one_line(e)


def test_unknown_config_field_lists_the_known_ones():
  with pytest.raises(ConfigError, match="'epochs' is unknown; known: .*num_epochs") as e:
    probe.linear_probe(_tiny(), _tiny(), ml_collections.ConfigDict({"epochs": 3}))
  _one_line(e)


def test_features_files_are_accepted(tmp_path):
  x, y = _tiny()
  train = features_lib.save(str(tmp_path / "train.npz"), x, y)
  test = features_lib.save(str(tmp_path / "test.npz"), x, y)
  from_files = probe.ridge_probe(train, test)
  from_arrays = probe.ridge_probe((x, y), (x, y))
  assert from_files["accuracy"] == from_arrays["accuracy"]


def test_wrong_config_type_gives_one_line():
  with pytest.raises(ConfigError, match="config.batch_size='64' has the wrong type") as e:
    probe.ridge_probe(_tiny(), _tiny(), ml_collections.ConfigDict({"batch_size": "64"}))
  _one_line(e)


@pytest.mark.parametrize("fn", [probe.linear_probe, probe.ridge_probe])
def test_logit_subset_restricts_test_predictions_to_those_classes(fn):
  """A test set whose classes are a subset (ImageNet-R style): only those logits compete."""
  rng = np.random.default_rng(0)
  means = rng.standard_normal((4, 8)) * 3
  train_y = np.arange(400) % 4
  train_x = means[train_y] + rng.standard_normal((400, 8))
  # Test examples of classes 1 and 3 drawn halfway towards class 0's mean: the full argmax
  # often says 0, the argmax over {1, 3} cannot.
  test_y = np.array([1, 3] * 50)
  test_x = 0.5 * (means[test_y] + means[0]) + 0.3 * rng.standard_normal((100, 8))
  config = probe.default_config()
  with config.unlocked():
    config.num_epochs = 5
  full = fn((train_x, train_y), (test_x, test_y), config)
  with config.unlocked():
    config.logit_subset = (1, 3)
  subset = fn((train_x, train_y), (test_x, test_y), config)
  assert subset["accuracy"] > full["accuracy"] + 0.1, (full["accuracy"], subset["accuracy"])
  with config.unlocked():
    config.logit_subset = (1, 2)
  with pytest.raises(DataError, match="outside config.logit_subset"):
    fn((train_x, train_y), (test_x, test_y), config)
  with config.unlocked():
    config.logit_subset = (1, 9)
  with pytest.raises(ConfigError, match="logit_subset"):
    fn((train_x, train_y), (test_x, test_y), config)
