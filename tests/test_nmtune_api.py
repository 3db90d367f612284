"""The library API's checks (issue 29, item 6, and item 5's refit config): the singular-value
loss's static k, input shapes with one-line errors, "did you mean" for library config typos,
py.typed, and the config that refits a grid's chosen member on all of train."""

from __future__ import annotations

import os
import tomllib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nmjax import nmtune, probe
from nmjax.errors import ConfigError, DataError
from nmjax.features import as_feature_set
from nmjax.nmtune import grid as grid_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line(error: pytest.ExceptionInfo) -> str:
  message = str(error.value)
  assert "\n" not in message and message, message
  return message


# ------------------------------------------------------------------ the singular-value loss's k


@pytest.mark.parametrize("k, expected", [
    (2.0, r"svd_topk=2.0 is not allowed; allowed: an integer in \[1, min\(n, D\)\] = \[1, 4\];"
          " k must be a static Python int, got float"),
    (True, "svd_topk=True .* k must be a static Python int, got bool"),
    ("3", "svd_topk='3' .* k must be a static Python int, got str"),
    (jnp.array(2), r"k \(svd_topk\) must be a static Python int, got a JAX array; allowed: an"
                   r" integer in \[1, min\(n, D\)\] = \[1, 4\]"),
    (0, r"svd_topk=0 is not allowed; allowed: an integer in \[1, min\(n, D\)\] = \[1, 4\]"),
    (5, r"= \[1, 4\]"),
])
def test_k_static_and_in_range(k, expected):
  with pytest.raises(ConfigError, match=expected) as e:
    nmtune.dominant_singular_value_loss(jnp.eye(4), k)
  _one_line(e)


def test_traced_k_says_static():
  with pytest.raises(ConfigError, match="k \\(svd_topk\\) must be a static Python int, got a"
                     " traced array") as e:
    jax.jit(nmtune.dominant_singular_value_loss)(jnp.eye(4), 2)
  assert "static_argnames" in _one_line(e)
  jitted = jax.jit(nmtune.dominant_singular_value_loss, static_argnames="k")
  assert float(jitted(jnp.eye(4), k=1)) == pytest.approx(0.25)
  assert float(nmtune.dominant_singular_value_loss(jnp.eye(4), np.int64(1))) == pytest.approx(0.25)


def test_k_documented_static():
  doc = nmtune.dominant_singular_value_loss.__doc__
  args = doc.split("Args:")[1].split("Returns:")[0]
  assert "Static" in args and "traced" in args


@pytest.mark.parametrize("call, expected", [
    (lambda z: nmtune.dominant_singular_value_loss(z, 1), "dominant_singular_value_loss z"),
    (lambda z: nmtune.covariance_loss(z), "covariance_loss z"),
    (lambda z: nmtune.consistency_loss(z, z), "consistency_loss z"),
])
def test_losses_refuse_3d(call, expected):
  with pytest.raises(ConfigError, match=f"{expected} must be a 2-D \\(n, D\\) array, got shape"
                     r" \(2, 3, 4\)") as e:
    call(jnp.ones((2, 3, 4)))
  _one_line(e)


def test_consistency_shapes_match():
  with pytest.raises(ConfigError, match=r"f must have z's shape \(4, 3\), got \(4, 2\)"):
    nmtune.consistency_loss(jnp.ones((4, 3)), jnp.ones((4, 2)))


# -------------------------------------------------------------------------------- input shapes

_RNG = np.random.default_rng(0)
_X = _RNG.normal(size=(16, 8)).astype(np.float32)
_Y = np.arange(16) % 2
_BAD_INPUTS = {
    "3-D features": ((_X.reshape(16, 2, 4), _Y), r"features must be 2-D \(N, D\), got shape"
                     r" \(16, 2, 4\)"),
    "1-D features": ((_X[:, 0], _Y), r"features must be 2-D \(N, D\), got shape \(16,\)"),
    "2-D labels": ((_X, _Y[:, None]), r"labels must be 1-D with shape \(16,\) to match the"
                   r" features, got \(16, 1\)"),
    "short labels": ((_X, _Y[:10]), r"labels must be 1-D with shape \(16,\) .* got \(10,\)"),
    "float labels": ((_X, _Y + 0.5), "labels must be integers, got dtype float64"),
    "a bare array": (np.stack([_X, _X]), r"pair, got ndarray of shape \(2, 16, 8\)"),
    "a triple": ((_X, _Y, _Y), "pair, got tuple of 3 items"),
}


@pytest.mark.parametrize("case", sorted(_BAD_INPUTS))
def test_bad_inputs_one_line(case):
  given, expected = _BAD_INPUTS[case]
  for fit in (lambda t: nmtune.fit(t, (_X, _Y), {"epochs": 1, "batch_size": 8}),
              lambda t: probe.linear_probe(t, (_X, _Y)),
              lambda t: as_feature_set(t, name="train")):
    with pytest.raises(DataError, match=expected) as e:
      fit(given)
    assert "too many values" not in _one_line(e)


def test_bad_test_set_one_line():
  with pytest.raises(DataError, match=r"NMTune test features: features must be 2-D") as e:
    nmtune.fit((_X, _Y), (_X[None], _Y), {"epochs": 1, "batch_size": 8})
  _one_line(e)


@pytest.mark.parametrize("make, expected", [
    (lambda: nmtune.CachedViews(np.zeros((8, 4), np.float32), _Y[:8]),
     r"NMTune cached views: features must be 3-D \(K, N, D\), got shape \(8, 4\)"),
    (lambda: nmtune.CachedViews(np.zeros((2, 8, 4), np.float32), _Y),
     r"labels must be 1-D with 8 entries \(one per image\), got shape \(16,\)"),
    (lambda: nmtune.CachedViews(np.zeros((2, 8, 4), np.float32), _Y[:8],
                                plain_features=np.zeros((8, 3))),
     r"plain_features must have shape \(8, 4\), got \(8, 3\)"),
    (lambda: nmtune.OnlineViews(None, None, np.zeros((8, 6, 6), np.uint8), _Y[:8], 4),
     r"NMTune online views: images must be 4-D \(N, H, W, C\), got shape \(8, 6, 6\)"),
    (lambda: nmtune.OnlineViews(None, None, np.zeros((8, 6, 6, 1), np.uint8), _Y[:8, None], 4),
     r"labels must be 1-D with 8 entries"),
    (lambda: nmtune.OnlineViews(None, None, np.zeros((8, 6, 6, 1), np.uint8), _Y[:8], 0),
     "feature_dim must be a positive int, got 0"),
    (lambda: nmtune.cache_views(None, None, np.zeros((8, 6, 6), np.uint8), _Y[:8], num_views=2),
     r"cache_views: images must be 4-D \(N, H, W, C\), got shape \(8, 6, 6\)"),
])
def test_views_shapes_one_line(make, expected):
  with pytest.raises(DataError, match=expected) as e:
    make()
  _one_line(e)


# ---------------------------------------------------------------------------- did you mean


@pytest.mark.parametrize("resolve, field, expected", [
    (nmtune.resolve_config, "svd_wieght", "did you mean svd_weight( or [a-z_]+)?[?]"),
    (nmtune.resolve_config, "epoch", "did you mean epochs( or [a-z_]+)?[?]"),
    (probe.resolve_config, "learning_rat", "did you mean learning_rate( or [a-z_]+)?[?]"),
    (probe.resolve_config, "epochs", "did you mean num_epochs( or [a-z_]+)?[?]"),
])
def test_config_typo_did_you_mean(resolve, field, expected):
  with pytest.raises(ConfigError, match=f"config field '{field}' is unknown; known: .*"
                     f"{expected}$") as e:
    resolve({field: 1})
  _one_line(e)


def test_nested_lp_typo_did_you_mean():
  with pytest.raises(ConfigError, match="did you mean weight_decay[?]"):
    nmtune.resolve_config({"lp": {"weight_decy": 0.1}})


def test_no_close_match_no_hint():
  with pytest.raises(ConfigError) as e:
    nmtune.resolve_config({"zzzzzz": 1})
  assert "did you mean" not in _one_line(e)


# -------------------------------------------------------------------------------- py.typed


def test_py_typed_shipped():
  assert os.path.isfile(os.path.join(ROOT, "nmjax", "py.typed"))
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
  assert "py.typed" in package_data["nmjax"]


# ----------------------------------------------------------------------- the grid's refit


def test_refit_config_all_of_train():
  config = nmtune.resolve_config({"grid": "svd_weight=0.001,0.01;seed=0,3", "val_fraction": 0.2,
                                  "epochs": 2, "lp": {"learning_rate": 0.5}})
  members = grid_lib.point_configs(config)
  chosen = members[3]
  refit = grid_lib.refit_config(chosen)
  assert refit.val_fraction == 0.0 and refit.grid == ""
  assert chosen.val_fraction == 0.2  # The member itself is unchanged.
  expected = {**chosen.to_dict(), "val_fraction": 0.0}
  assert refit.to_dict() == expected
  resolved = nmtune.resolve_config(refit)  # A valid fit config as it is.
  assert (resolved.svd_weight, resolved.seed, resolved.epochs) == (0.01, 3, 2)
  assert resolved.lp.learning_rate == 0.5 and resolved.val_fraction == 0.0
  assert grid_lib.refit_config(chosen.to_dict()).to_dict() == expected  # A dict works too.


def test_refit_config_refuses_a_grid():
  with pytest.raises(ConfigError, match="still holds config.grid='svd_weight=0.1,1'"):
    grid_lib.refit_config({"grid": "svd_weight=0.1,1", "val_fraction": 0.1})
  with pytest.raises(ConfigError, match="lacks val_fraction"):
    grid_lib.refit_config(ml_collections.ConfigDict({"grid": ""}))


def test_refit_trains_on_all_of_train():
  x = _RNG.normal(size=(40, 8)).astype(np.float32)
  y = np.arange(40) % 2
  config = nmtune.resolve_config({"grid": "svd_weight=0.001,0.01", "val_fraction": 0.25,
                                  "epochs": 1, "batch_size": 8})
  member = grid_lib.point_configs(config)[1]
  assert nmtune.fit((x, y), (x, y), member)["num_train"] == 30
  result = nmtune.fit((x, y), (x, y), grid_lib.refit_config(member))
  assert result["num_train"] == 40 and "val_accuracy" not in result


def test_chosen_line():
  line = grid_lib.chosen_line({"svd_weight": 0.01, "seed": 3}, ["svd_weight", "seed"], 1, 4,
                              num_train=1257)
  assert line == "grid: chose 2/4 svd_weight=0.01 seed=3 on validation; refit on all 1257 train" \
                 " examples"
  assert grid_lib.chosen_line({}, [], 0, 1).endswith("(the config) on validation; kept as"
                                                     " trained (no refit)")


def test_fit_takes_every_method_the_command_line_takes():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(120, 8)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int64)
  for method in ("lp", "ridge", "mlp", "lp_aug", "nmtune"):
    result = nmtune.fit((x, y), (x, y), {"method": method, "epochs": 1, "batch_size": 32})
    predicted = np.argmax(np.asarray(result["head"].predict(x)), axis=1)
    assert result["method"] == method
    assert np.mean(predicted == y) == pytest.approx(result["accuracy"], abs=1e-6), method
  with pytest.raises(ConfigError, match=r"config.method='zeroshot' fits nothing"):
    nmtune.fit((x, y), (x, y), {"method": "zeroshot"})
