"""nmjax.nmtune: the three regularizers against float64 numpy (values and gradients), the head's
initialization and residual scale, fit over features, cached and online views, the augmentation,
determinism and refusals of bad input."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from nmjax import features as features_lib
from nmjax import nmtune, probe
from nmjax.nmtune import head as nmtune_head, losses as nmtune_losses
from nmjax.nmtune import programs as nmtune_programs, views as nmtune_views
from nmjax.nmtune.fit import loss_weights, probe_config
from nmjax.errors import ConfigError, DataError

# n < D and n > D: the Gram route and the D x D route each win on one of them.
SHAPES = [(16, 48), (64, 12)]


def _inputs(shape: tuple[int, int], seed: int) -> np.ndarray:
  """float32 inputs (what the jax functions see) returned as float64 for the references."""
  rng = np.random.default_rng(seed)
  # A shared offset per column makes the centering and the off-diagonal terms matter.
  values = rng.standard_normal(shape) + rng.standard_normal(shape[1])
  return values.astype(np.float32).astype(np.float64)


def _assert_close(actual, expected, rtol: float) -> None:
  """Elementwise agreement to rtol of the reference's largest entry: gradient entries near zero
  carry float32 cancellation, not a relative error of their own."""
  expected = np.asarray(expected, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol,
                             atol=rtol * np.abs(expected).max())


def _value_and_grad(fn, x: np.ndarray) -> tuple[float, np.ndarray]:
  """fn's float32 value and gradient at x, from one compiled program (cheaper than op by op)."""
  value, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(x, jnp.float32))
  return float(value), np.asarray(grad, np.float64)


# ----------------------------------------------------------------- float64 numpy references


def _np_consistency(z: np.ndarray, f: np.ndarray) -> tuple[float, np.ndarray]:
  num_rows, dim = z.shape
  z_norm = np.linalg.norm(z, axis=1, keepdims=True)
  a = z / z_norm
  b = f / np.linalg.norm(f, axis=1, keepdims=True)
  g = 2.0 * (a - b) / (num_rows * dim)
  return float(np.mean((a - b) ** 2)), (g - a * np.sum(a * g, axis=1, keepdims=True)) / z_norm


def _np_covariance(z: np.ndarray) -> tuple[float, np.ndarray]:
  num_rows, dim = z.shape
  centered = z - z.mean(axis=0)
  covariance = centered.T @ centered / (num_rows - 1)
  off_diagonal = covariance - np.diag(np.diag(covariance))
  d_centered = 2.0 * centered @ (2.0 * off_diagonal / dim) / (num_rows - 1)
  return float(np.sum(off_diagonal ** 2) / dim), d_centered - d_centered.mean(axis=0)


def _np_dominant(z: np.ndarray, k: int) -> tuple[float, np.ndarray]:
  u, s, vt = np.linalg.svd(z, full_matrices=False)
  total, top = s.sum(), s[:k].sum()
  d_s = ((np.arange(len(s)) < k) / total - top / total ** 2) / k
  return float(top / (k * total)), u @ np.diag(d_s) @ vt


# ------------------------------------------------------------------------------ regularizers


@pytest.mark.parametrize("shape", SHAPES)
def test_consistency_loss_matches_float64_numpy(shape):
  z, f = _inputs(shape, 0), _inputs(shape, 1)
  value, grad = _np_consistency(z, f)
  zj, fj = jnp.asarray(z, jnp.float32), jnp.asarray(f, jnp.float32)
  got_value, got_grad = _value_and_grad(lambda x: nmtune.consistency_loss(x, fj), z)
  np.testing.assert_allclose(got_value, value, rtol=1e-5)
  _assert_close(got_grad, grad, 1e-4)
  # The target is stop_gradient(normalize(f)): f receives exactly nothing.
  assert not np.any(_value_and_grad(lambda x: nmtune.consistency_loss(zj, x), f)[1])


@pytest.mark.parametrize("shape", SHAPES)
def test_covariance_routes_match_float64_numpy_and_each_other(shape):
  z = _inputs(shape, 2)
  value, grad = _np_covariance(z)
  routes = {route: _value_and_grad(functools.partial(nmtune.covariance_loss, route=route), z)
            for route in nmtune_losses.COVARIANCE_ROUTES}
  for got_value, got_grad in routes.values():
    np.testing.assert_allclose(got_value, value, rtol=1e-5)
    _assert_close(got_grad, grad, 1e-4)
  # The n x n Gram route and the D x D route: one value and gradient on either shape.
  np.testing.assert_allclose(routes["gram"][0], routes["covariance"][0], rtol=1e-5)
  _assert_close(routes["gram"][1], routes["covariance"][1], 1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 5])
def test_dominant_singular_value_loss_matches_float64_numpy(shape, k):
  z = _inputs(shape, 4)
  value, grad = _np_dominant(z, k)
  got_value, got_grad = _value_and_grad(
      functools.partial(nmtune.dominant_singular_value_loss, k=k), z)
  np.testing.assert_allclose(got_value, value, rtol=1e-5)
  _assert_close(got_grad, grad, 1e-4)


def test_repeated_singular_values_give_finite_gradients():
  rng = np.random.default_rng(5)
  rows, _ = np.linalg.qr(rng.standard_normal((16, 16)))
  equal_rows = 2.0 * rows[:8]  # Orthogonal rows of equal norm: eight equal singular values.
  loss = functools.partial(nmtune.dominant_singular_value_loss, k=3)
  value, grad = _value_and_grad(loss, equal_rows)
  np.testing.assert_allclose(value, 1.0 / 8.0, rtol=1e-5)
  assert np.isfinite(grad).all() and np.any(grad)
  # A tie inside the top k has a unique gradient: compare it with the reference.
  u, _ = np.linalg.qr(rng.standard_normal((8, 8)))
  v, _ = np.linalg.qr(rng.standard_normal((16, 8)))
  z = u @ np.diag([5.0, 3.0, 3.0, 1.0, 0.8, 0.5, 0.3, 0.1]) @ v.T
  z = z.astype(np.float32).astype(np.float64)
  _assert_close(_value_and_grad(loss, z)[1], _np_dominant(z, 3)[1], 1e-3)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (24, 24)])
def test_singular_values_through_qr_match_numpy_and_survive_rank_deficiency(shape):
  z = _inputs(shape, 6)
  np.testing.assert_allclose(nmtune_losses.singular_values(jnp.asarray(z, jnp.float32)),
                             np.linalg.svd(z, compute_uv=False), rtol=1e-5, atol=1e-5)
  # Rank 3: zero singular values, whose directions (and so the gradient's part outside z's
  # row and column spaces) are arbitrary. The gradient stays finite, and its part inside those
  # spaces is unique and equals the reference's.
  low_rank = (z[:, :3] @ _inputs((3, shape[1]), 7)).astype(np.float32).astype(np.float64)
  value, grad = _value_and_grad(
      functools.partial(nmtune.dominant_singular_value_loss, k=2), low_rank)
  ref_value, ref_grad = _np_dominant(low_rank, 2)
  np.testing.assert_allclose(value, ref_value, rtol=1e-4)
  assert np.isfinite(grad).all()
  u, _, vt = np.linalg.svd(low_rank, full_matrices=False)
  left, right = u[:, :3] @ u[:, :3].T, vt[:3].T @ vt[:3]
  _assert_close(left @ grad @ right, left @ ref_grad @ right, 1e-3)


def _with_spectrum(rows: int, cols: int, sigma: list[float], seed: int) -> np.ndarray:
  """A float32-representable (rows, cols) matrix with singular values `sigma` (zeros beyond)."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((rows, len(sigma))))
  v, _ = np.linalg.qr(rng.standard_normal((cols, len(sigma))))
  return ((u * np.asarray(sigma)) @ v.T).astype(np.float32).astype(np.float64)


_TAIL = [0.05] * 8  # Eight equal small singular values: a tie in every case below.
# Two shapes only (n < D and n > D), so each route compiles twice for all the cases.
SPECTRA = {
    "n<D": lambda: _inputs((16, 48), 10),
    "n>D": lambda: _inputs((48, 16), 11),
    # A large shared offset, as raw z has (sigma_1 / sigma_min ~ 30): the Gram matrix alone
    # would resolve the small directions to 1e-4 only.
    "n<D offset": lambda: (np.random.default_rng(12).standard_normal((16, 48))
                           + 3.0 * np.random.default_rng(13).standard_normal(48)),
    "rank 3, n<D": lambda: _with_spectrum(16, 48, [5.0, 2.0, 1.0], 14),
    "rank 3, n>D": lambda: _with_spectrum(48, 16, [5.0, 2.0, 1.0], 15),
    "tie in the top k": lambda: _with_spectrum(16, 48, [5, 5 + 1e-6, 3, 1, .8, .5, .3, .1] + _TAIL,
                                               16),
    "tie in the tail": lambda: _with_spectrum(48, 16, [5, 4, 3.5, 1, 1 + 1e-6, 1 - 1e-6, .3, .1]
                                              + _TAIL, 17),
    "1% gap at k": lambda: _with_spectrum(16, 48, [5, 2.0, 1.98, 1, .8, .5, .3, .1] + _TAIL, 18),
    "condition 1e3": lambda: _with_spectrum(16, 48, list(np.geomspace(10, 1e-2, 16)), 19),
}


@functools.cache
def _route_value_and_grad(route: str):
  """The jitted value and gradient of the k = 2 share on `route` (compiled once per shape)."""
  return jax.jit(jax.value_and_grad(functools.partial(nmtune.dominant_singular_value_loss, k=2,
                                                      route=route)))


@pytest.mark.parametrize("case", list(SPECTRA))
def test_gram_route_equals_the_svd_route(case):
  """The eigh-of-the-Gram-matrix route against the QR+SVD route and float64 numpy: values to
  1e-5, gradients to 1e-4 of their largest entry (inside the row and column spaces where z is
  rank-deficient: outside them both routes' gradients are float32 noise of arbitrary direction)."""
  z = np.asarray(SPECTRA[case](), np.float32).astype(np.float64)
  rank = 3 if case.startswith("rank") else min(z.shape)
  u, _, vt = np.linalg.svd(z, full_matrices=False)
  left, right = u[:, :rank] @ u[:, :rank].T, vt[:rank].T @ vt[:rank]
  ref_value, ref_grad = _np_dominant(z, 2)
  routes = {}
  for route in ("svd", "gram"):
    value, grad = _route_value_and_grad(route)(jnp.asarray(z, jnp.float32))
    routes[route] = float(value), np.asarray(grad, np.float64)
  for value, grad in routes.values():
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    _assert_close(left @ grad @ right, left @ ref_grad @ right, 1e-4)
  np.testing.assert_allclose(routes["gram"][0], routes["svd"][0], rtol=1e-5)
  _assert_close(left @ routes["gram"][1] @ right, left @ routes["svd"][1] @ right, 1e-4)
  assert np.isfinite(routes["gram"][1]).all()
  sigma = np.linalg.svd(z, compute_uv=False)
  gram = jax.jit(nmtune_losses.gram_singular_values)
  np.testing.assert_allclose(gram(jnp.asarray(z, jnp.float32)), sigma, rtol=1e-5,
                             atol=1e-5 * sigma[0])


def test_singular_value_routes_by_backend():
  assert nmtune_losses.singular_value_route("svd") == "svd"
  fastest = nmtune_losses.FASTEST_SINGULAR_VALUE_ROUTE
  assert nmtune_losses.singular_value_route("auto") == fastest.get(jax.default_backend(), "gram")
  with pytest.raises(ConfigError, match="route='dense' is unknown; allowed: auto, svd, gram"):
    nmtune_losses.singular_value_route("dense")
  # A traced k (one program for a grid over svd_topk) gives the static k's value.
  sigma = jnp.asarray([4.0, 3.0, 2.0, 1.0])
  assert float(jax.jit(nmtune_losses.dominant_share)(sigma, jnp.int32(2))) == pytest.approx(0.35)


def test_regularizers_refuse_bad_arguments():
  z = jnp.ones((4, 6))
  with pytest.raises(ConfigError, match="route='dense' is unknown"):
    nmtune.covariance_loss(z, route="dense")
  with pytest.raises(ConfigError, match="at least 2 rows, got 1"):
    nmtune.covariance_loss(z[:1])
  for k in (0, 5, 2.0, True):
    with pytest.raises(ConfigError, match=r"svd_topk=.* allowed: an integer in \[1, min"):
      nmtune.dominant_singular_value_loss(z, k)


# ------------------------------------------------------------------------------------- head


def test_init_variables_match_model_init_and_the_pytorch_defaults():
  dim, classes = 24, 5
  f = jnp.zeros((4, dim))
  for layers in (0, 1, 2):
    model = nmtune.NMTuneHead(num_classes=classes, mlp_layers=layers, residual_scale_init=0.5)
    expected = jax.eval_shape(lambda key, m=model: m.init(key, f, train=False),
                              jax.random.key(0))
    variables = nmtune_head.init_variables(model, dim, seed=0)
    assert jax.tree.structure(variables) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
      assert (got.shape, got.dtype) == (want.shape, want.dtype)
    params = variables["params"]
    assert sorted(k for k in params if k.startswith("hidden_")) == [
        f"hidden_{i}" for i in range(layers)]
    fan_ins = [dim] + [4 * dim] * layers  # Of hidden_0.., then of out.
    kernels = [(f"hidden_{i}", fan_ins[i]) for i in range(layers)]
    if layers:
      kernels.append(("out", 4 * dim))
      np.testing.assert_array_equal(params["residual_scale"], np.full(dim, 0.5, np.float32))
    for name, fan_in in kernels:
      bound = 1.0 / np.sqrt(fan_in)
      assert np.abs(params[name]["kernel"]).max() <= bound
      assert np.abs(params[name]["bias"]).max() <= bound
      assert np.abs(params[name]["kernel"]).max() > 0.9 * bound  # Uniform over the range.
    for i in range(layers):
      np.testing.assert_array_equal(params[f"norm_{i}"]["scale"], 1.0)
      np.testing.assert_array_equal(params[f"norm_{i}"]["bias"], 0.0)
      np.testing.assert_array_equal(variables["batch_stats"][f"norm_{i}"]["mean"], 0.0)
      np.testing.assert_array_equal(variables["batch_stats"][f"norm_{i}"]["var"], 1.0)
    head_bound = np.sqrt(6.0 / dim)  # He-uniform.
    assert 0.9 * head_bound < np.abs(params["head"]["kernel"]).max() <= head_bound
    np.testing.assert_array_equal(params["head"]["bias"], 0.0)
  model = nmtune.NMTuneHead(num_classes=classes)
  first, again, other = (nmtune_head.init_variables(model, dim, seed)["params"]["out"]["kernel"]
                         for seed in (0, 0, 1))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  # The state built on the host equals AdamW's own init, leaf for leaf.
  params = nmtune_head.init_variables(model, dim, seed=0)["params"]
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))
  hparams = nmtune_programs.program_hparams(nmtune.default_config())
  want = nmtune_programs.make_optimizer(hparams, 10).init(params)
  got = nmtune_programs.initial_optimizer_state(hparams, 10, params)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert (g.shape, g.dtype) == (w.shape, w.dtype)
    np.testing.assert_array_equal(g, w)


def test_head_outputs_and_the_trainable_residual_scale():
  dim, classes, rows = 24, 5, 32
  f = jnp.asarray(np.random.default_rng(6).standard_normal((rows, dim)), jnp.float32)
  labels = jnp.arange(rows) % classes
  for layers in (0, 1, 2):
    model = nmtune.NMTuneHead(num_classes=classes, mlp_layers=layers, residual_scale_init=0.5)
    variables = nmtune_head.init_variables(model, dim, seed=0)
    logits, z = jax.jit(functools.partial(model.apply, train=False))(variables, f)
    assert logits.shape == (rows, classes) and z.shape == (rows, dim)
    assert np.array_equal(z, f) == (layers == 0)

  model = nmtune.NMTuneHead(num_classes=classes, residual_scale_init=0.5)
  variables = nmtune_head.init_variables(model, dim, seed=0)
  params, batch_stats = variables["params"], variables["batch_stats"]

  @jax.jit
  @functools.partial(jax.grad, has_aux=True)
  def loss(params):
    (logits, z), _ = model.apply({"params": params, "batch_stats": batch_stats}, f, train=True,
                                 mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), z

  grads, z = loss(params)
  assert np.all(np.asarray(grads["residual_scale"]) != 0.0) and not np.array_equal(z, f)
  # A zero scale leaves only the skip connection.
  np.testing.assert_array_equal(loss({**params, "residual_scale": jnp.zeros(dim)})[1], f)


# ------------------------------------------------------------------------------ fit on features


def _encode(variables: dict[str, jax.Array], images: jax.Array) -> jax.Array:
  """A tiny frozen encoder: a fixed random affine map of the scaled flat image, then ReLU."""
  pixels = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
  return jax.nn.relu(pixels @ variables["kernel"] + variables["bias"])


@functools.cache
def _encoder_variables() -> dict[str, jax.Array]:
  rng = np.random.default_rng(1)
  return {"kernel": jnp.asarray(rng.standard_normal((64, 64)) / 4.0, jnp.float32),
          "bias": jnp.asarray(rng.uniform(-1.0, 1.0, 64), jnp.float32)}


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """sklearn's digits (1797 8x8 images, 10 classes), shuffled once: uint8 images in 0..255
  (N, 8, 8, 1), their labels, and their plain (unaugmented) features from _encode (D = 64)."""
  digits = load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  images = np.round(digits.images[order] * 255.0 / 16.0).astype(np.uint8)[..., None]
  features = np.asarray(_encode(_encoder_variables(), jnp.asarray(images)))
  return images, digits.target[order].astype(np.int64), features


_NUM_TRAIN = 1200


def _digit_features():
  _, labels, features = _digits()
  return ((features[:_NUM_TRAIN], labels[:_NUM_TRAIN]),
          (features[_NUM_TRAIN:], labels[_NUM_TRAIN:]))


def _config(**fields) -> ml_collections.ConfigDict:
  # One model and epoch count for every features fit: they share one compiled program.
  return ml_collections.ConfigDict({"epochs": 5, "residual_scale_init": 0.5, **fields})


def test_fit_learns_digits_features_and_reports_everything(tmp_path):
  train, test = _digit_features()
  result = nmtune.fit(train, test, _config())
  assert result["accuracy"] > 0.7, result["test_accuracy_per_epoch"]
  assert result["accuracy"] == result["test_accuracy_per_epoch"][-1]
  assert len(result["test_accuracy_per_epoch"]) == 5
  assert 0.0 < result["seconds"] < 60.0
  assert set(result["loss_means"]) == set(nmtune_programs.LOSS_TERMS)
  assert all(np.isfinite(v) for v in result["loss_means"].values())
  assert all(len(v) == 5 for v in result["loss_per_epoch"].values())
  assert result["sve"] > 0.0 and 0.0 < result["lsvr"] < 1.0
  assert (result["views"], result["method"], result["num_train"], result["num_test"]) == (
      "features", "nmtune", _NUM_TRAIN, 1797 - _NUM_TRAIN)
  assert (result["feature_dim"], result["num_classes"]) == (64, 10)
  # The residual scale trains: weight decay alone would move it by about 1e-6.
  assert result["residual_scale_init"] == 0.5
  assert abs(result["residual_scale_mean"] - 0.5) > 1e-3, result["residual_scale_mean"]

  paths = [features_lib.save(str(tmp_path / f"{name}.npz"), *pair)
           for name, pair in (("train", train), ("test", test))]
  from_files = nmtune.fit(*paths, _config())
  assert from_files["test_accuracy_per_epoch"] == result["test_accuracy_per_epoch"]
  assert from_files["loss_means"] == result["loss_means"]


def test_mlp_is_nmtune_with_zero_weights():
  train, test = _digit_features()
  mlp = nmtune.fit(train, test, _config(method="mlp"))
  zero = nmtune.fit(train, test, _config(mse_weight=0.0, cov_weight=0.0, svd_weight=0.0))
  default = nmtune.fit(train, test, _config())
  assert mlp["test_accuracy_per_epoch"] == zero["test_accuracy_per_epoch"]
  assert mlp["loss_means"] == zero["loss_means"]
  assert (mlp["mse_weight"], mlp["cov_weight"], mlp["svd_weight"]) == (0.0, 0.0, 0.0)
  assert mlp["loss_means"]["total"] == mlp["loss_means"]["ce"]
  assert default["loss_means"]["total"] != default["loss_means"]["ce"]
  assert default["loss_means"] != mlp["loss_means"]


def test_a_seed_fixes_the_result():
  train, test = _digit_features()
  first = nmtune.fit(train, test, _config(seed=3))
  again = nmtune.fit(train, test, _config(seed=3))
  other = nmtune.fit(train, test, _config(seed=4))
  assert first["test_accuracy_per_epoch"] == again["test_accuracy_per_epoch"]
  assert first["loss_means"] == again["loss_means"]
  assert first["loss_means"] != other["loss_means"]


def test_a_second_fit_of_the_same_shapes_compiles_nothing():
  (train_x, train_y), test = _digit_features()
  lines = []
  nmtune.fit_multi((train_x, train_y), {"test": test}, _config(), log=lines.append)
  traced = nmtune_programs.TRACES["table_epoch"]
  assert traced >= 1 and len(lines) == 5 and lines[-1].endswith("| ETA 0s"), lines
  # New feature values, labels, seed, learning rate and regularizer weights: the same program.
  order = np.random.default_rng(9).permutation(_NUM_TRAIN)
  nmtune.fit((train_x[order] * 0.5, train_y[order]), test,
             _config(seed=7, lr=3e-3, weight_decay=0.0, mse_weight=0.5, cov_weight=0.1))
  assert nmtune_programs.TRACES["table_epoch"] == traced


def test_probe_config_carries_the_classes_and_seed_to_the_linear_probe():
  config = nmtune.resolve_config({"num_classes": 6, "logit_subset": [0, 1, 2, 3], "seed": 4,
                                  "lp": {"num_epochs": 2, "learning_rate": 0.05}})
  lp = probe_config(config)
  assert (lp.num_classes, lp.logit_subset, lp.seed) == (6, (0, 1, 2, 3), 4)
  assert (lp.num_epochs, lp.learning_rate) == (2, 0.05)
  result = probe.linear_probe(_small(), _small(seed=1), lp)
  assert result["num_classes"] == 6 and len(result["test_accuracy_per_epoch"]) == 2
  assert loss_weights(0, 0, 0, None) == {"mse_weight": 0.0, "cov_weight": 0.0,
                                                "svd_weight": 0.0, "svd_topk": None}


# ----------------------------------------------------------------------------- bad input


def _one_line(error: pytest.ExceptionInfo) -> None:
  assert "\n" not in str(error.value)


def _small(rows: int = 100, dim: int = 8, classes: int = 4, seed: int = 0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((rows, dim)).astype(np.float32),
          (np.arange(rows) % classes).astype(np.int64))


def test_bad_inputs_give_one_line(tmp_path):
  train = _small()
  narrow = features_lib.save(str(tmp_path / "narrow.npz"), train[0][:, :7], train[1])
  small_batch = ml_collections.ConfigDict({"batch_size": 32})
  with pytest.raises(DataError, match=r"dimension 7 differs from the train features' \(8\)") as e:
    nmtune.fit(train, narrow, small_batch)
  _one_line(e)
  beyond = (train[0], np.where(np.arange(100) == 7, 4, train[1]))
  with pytest.raises(DataError, match="label 4 in row 7 is outside the 4 classes inferred") as e:
    nmtune.fit(train, beyond, small_batch)
  _one_line(e)
  cases = [
      ({"batch_size": 128}, DataError, "batch_size=128 needs 128 train examples per step but the"
                                       " train set has 100"),
      ({"cov_weight": -1}, ConfigError, "config.cov_weight=-1.0 is out of range"),
      ({"method": "svm"}, ConfigError, "config.method='svm' is unknown; allowed: nmtune"),
      ({"method": "zeroshot"}, ConfigError, "config.method='zeroshot' fits nothing"),
      ({"svd_wieght": 0.1}, ConfigError, "NMTune config field 'svd_wieght' is unknown; known:"),
      ({"method": "lp_aug", "lp": {"learning_rate": -1.0}}, ConfigError,
       "config.lp.learning_rate=-1.0 is out of range"),
      ({"batch_size": 32, "svd_topk": 9}, ConfigError,
       r"svd_topk=9 is not allowed; allowed: 1 <= svd_topk <= min\(batch_size, D\) = 8"),
  ]
  for fields, error, match in cases:
    with pytest.raises(error, match=match) as e:
      nmtune.fit(train, train, ml_collections.ConfigDict(fields))
    _one_line(e)

  views = nmtune.CachedViews(np.stack([train[0], train[0]]), train[1])
  with pytest.raises(ConfigError, match="batch_size=33 must be even with two views") as e:
    nmtune.fit(views, train, ml_collections.ConfigDict({"batch_size": 33}))
  _one_line(e)
  with pytest.raises(ConfigError, match=r"num_views=1 \(config.cached_views\) is not allowed; allowed: >= 2") as e:
    nmtune.cache_views(_encode, _encoder_variables(), _digits()[0][:4], train[1][:4],
                       num_views=1)
  _one_line(e)


# ---------------------------------------------------------------------------- two-view modes


def _digit_views():
  images, labels, features = _digits()
  return images[:_NUM_TRAIN], labels[:_NUM_TRAIN], (features[_NUM_TRAIN:], labels[_NUM_TRAIN:])


def test_cached_and_online_views_train_the_head():
  images, labels, test = _digit_views()
  config = ml_collections.ConfigDict({"epochs": 3, "batch_size": 64})
  cached = nmtune.cache_views(_encode, _encoder_variables(), images, labels, num_views=3)
  assert cached.features.shape == (3, _NUM_TRAIN, 64)
  assert not np.array_equal(cached.features[0], cached.features[1])  # Distinct augmentations.
  online = nmtune.OnlineViews(_encode, _encoder_variables(), images, labels, feature_dim=64)
  for views, name in ((cached, "cached"), (online, "online")):
    result = nmtune.fit(views, test, config)
    assert result["views"] == name and result["train_accuracy"] is None
    assert result["accuracy"] > 0.6, (name, result["test_accuracy_per_epoch"])
    assert len(result["test_accuracy_per_epoch"]) == 3
    assert all(np.isfinite(v) for v in result["loss_means"].values())
    assert np.isfinite(result["sve"]) and np.isfinite(result["lsvr"])
  traced = nmtune_programs.TRACES["online_epoch"]
  again = nmtune.fit(online, test, config)
  assert nmtune_programs.TRACES["online_epoch"] == traced  # The same shapes: no new trace.
  assert again["test_accuracy_per_epoch"] == result["test_accuracy_per_epoch"]
  assert again["loss_means"] == result["loss_means"]


def test_random_resized_crop_flip_full_crop_is_the_image():
  images = np.random.default_rng(8).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  # Area scale 1.0, aspect ratio exp(0) = 1, any position (only one fits), then the flip draw.
  draws = jnp.asarray([[1.0, 0.5, 0.3, 0.7, 0.9], [1.0, 0.5, 0.6, 0.2, 0.1]], jnp.float32)
  augment = jax.jit(nmtune_views.random_resized_crop_flip)
  out = np.asarray(augment(jnp.asarray(images), draws))
  assert out.dtype == np.float32 and out.shape == images.shape
  np.testing.assert_allclose(out[0], images[0].astype(np.float32), atol=1e-3)
  np.testing.assert_allclose(out[1], images[1, :, ::-1].astype(np.float32), atol=1e-3)
  # The smallest crop (area 0.8: 7 x 7 of 8 x 8) is resized back, not the image itself.
  small = draws.at[:, 0].set(0.0)
  out = np.asarray(augment(jnp.asarray(images), small))
  assert out.shape == images.shape
  assert np.abs(out[0] - images[0]).max() > 1.0
  assert out.min() >= 0.0 and out.max() <= 255.0 + 1e-3


def _pixels(variables, images):
  del variables
  return images.reshape(len(images), -1)


def test_cached_views_are_never_mirrored_with_flip_off():
  """A left-to-right ramp stays increasing through every crop; a mirror makes it decrease."""
  ramp = np.broadcast_to(np.arange(28, dtype=np.uint8)[None, :, None] * 9, (28, 28, 1))
  images = np.repeat(ramp[None], 16, axis=0)
  labels = np.zeros(16, np.int64)

  def increasing(flip):
    views = nmtune.cache_views(_pixels, {}, images, labels, num_views=2, seed=3, batch_size=8,
                               flip=flip).features.reshape(2 * 16, 28, 28)
    return views[:, 14, -1] > views[:, 14, 0]

  assert increasing(False).all()
  assert 0 < increasing(True).sum() < 32  # Some of the 32 views mirrored, some not.
