"""nmjax.nmtune grids and validation splits: fit_grid against separate fits (one program for
configurations differing in weights, k, lr, weight decay, residual scale and seed), the grid
syntax and its refusals, the stratified seeded validation split, diverging members, and a choice
that never reads test labels."""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits

from nmjax import nmtune
from nmjax.nmtune import grid as nmtune_grid, head as nmtune_head
from nmjax.nmtune import programs as nmtune_programs, runs as nmtune_runs
from nmjax.errors import ConfigError, DataError


@functools.cache
def _digits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """sklearn's digits as 64-d features (pixels / 16), shuffled: 1,300 train, 497 test."""
  digits = load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  features = (digits.data[order] / 16.0).astype(np.float32)
  labels = digits.target[order].astype(np.int64)
  return (features[:1300], labels[:1300]), (features[1300:], labels[1300:])


def _small(rows: int = 120, dim: int = 8, classes: int = 3, seed: int = 0):
  rng = np.random.default_rng(seed)
  labels = np.arange(rows) % classes
  centers = np.random.default_rng(9).normal(size=(classes, dim)) * 3.0
  return (centers[labels] + rng.normal(size=(rows, dim))).astype(np.float32), labels


# The fields one program may vary (grid.ONE_PROGRAM_FIELDS), seed included: the seed-1 member
# has its own data order and validation split, so every member gathers its own rows.
VARIANTS = [{}, {"svd_weight": 0.01}, {"cov_weight": 0.4}, {"mse_weight": 0.0}, {"svd_topk": 2},
            {"lr": 3e-3}, {"weight_decay": 0.0}, {"residual_scale_init": 0.5}, {"seed": 1}]


def test_fit_grid_equals_separate_fits_in_one_program():
  train, test = _digits()
  configs = [{"epochs": 3, "val_fraction": 0.1, **v} for v in VARIANTS]
  traced = nmtune_programs.TRACES["grid_table_epoch"]
  grid = nmtune.fit_grid(train, test, configs)
  assert nmtune_programs.TRACES["grid_table_epoch"] == traced + 1  # One program for all nine.
  separate = [nmtune.fit(train, test, c) for c in configs]
  num_test, num_val = len(test[1]), separate[0]["num_val"]
  for variant, got, want in zip(VARIANTS, grid, separate):
    assert got["configs_in_program"] == len(VARIANTS) and "configs_in_program" in want
    for field in ("seed", "lr", "svd_topk", "residual_scale_init", "num_train", "num_val"):
      assert got[field] == want[field], (variant, field)
    # Batched and single float32 kernels round differently; Adam turns that into tiny parameter
    # differences: the losses agree to 1e-5, an accuracy to a prediction or so near a tie.
    for term, value in want["loss_means"].items():
      np.testing.assert_allclose(got["loss_means"][term], value, rtol=1e-5, atol=1e-7,
                                 err_msg=f"{variant} {term}")
    np.testing.assert_allclose(got["test_accuracy_per_epoch"], want["test_accuracy_per_epoch"],
                               atol=2.01 / num_test, err_msg=str(variant))
    np.testing.assert_allclose(got["val_accuracy_per_epoch"], want["val_accuracy_per_epoch"],
                               atol=2.01 / num_val, err_msg=str(variant))
    assert got["accuracy"] > 0.6 and got["sv_route"] == want["sv_route"]
  # The configurations really differ, and the seed moves the split and the data order.
  assert len({round(r["loss_means"]["total"], 6) for r in grid}) == len(VARIANTS)
  assert grid[-1]["val_accuracy_per_epoch"] != grid[0]["val_accuracy_per_epoch"]


def test_the_choice_never_reads_test_labels():
  train, (test_x, test_y) = _digits()
  config = ml_collections.ConfigDict({"epochs": 3, "val_fraction": 0.2,
                                      "grid": "svd_weight=0.001,0.1;lr=0.0003,0.003"})
  permuted = np.random.default_rng(5).permutation(test_y)
  results = nmtune.fit_multi(train, {"test": (test_x, test_y), "shuffled": (test_x, permuted)},
                             config)
  again = nmtune.fit(train, (test_x, permuted), config)
  real, shuffled = results["test"], results["shuffled"]
  assert real["grid_chosen"] == shuffled["grid_chosen"] == again["grid_chosen"]
  vals = [m["val_accuracy"] for m in real["grid_results"]]
  assert vals == [m["val_accuracy"] for m in again["grid_results"]]
  assert real["grid_chosen"] == int(np.argmax(vals)) and len(vals) == 4
  assert [m["values"] for m in real["grid_results"]] == [
      {"svd_weight": w, "lr": lr} for w in (0.001, 0.1) for lr in (0.0003, 0.003)]
  # The test labels change the test accuracies, never the validation ones or the choice.
  assert [m["accuracy"] for m in real["grid_results"]] != [
      m["accuracy"] for m in shuffled["grid_results"]]
  chosen = real["grid_results"][real["grid_chosen"]]
  # The winner is fit again on all of train (no validation split): its head is what is kept.
  assert real["grid_refit"] and real["grid_val_accuracy"] == chosen["val_accuracy"]
  assert "val_accuracy" not in real and real["num_train"] == len(train[1])
  assert real["lr"] == chosen["values"]["lr"] and real["grid"] == config.grid
  refit = nmtune.fit(train, (test_x, test_y), {"epochs": 3, **chosen["values"]})
  assert real["accuracy"] == refit["accuracy"]
  predicted = np.argmax(np.asarray(real["head"].predict(test_x)), axis=1)
  assert np.mean(predicted == test_y) == real["accuracy"]
  lines = nmtune_grid.report_lines(results)
  assert len(lines) == 4 and sum("<- chosen on validation" in line for line in lines) == 1
  assert lines[0].startswith("grid 1/4: svd_weight=0.001 lr=0.0003 | val ")
  assert "| test test " in lines[0] and " shuffled " in lines[0]
  assert f"then fit again on all {len(train[1])} train examples" in "".join(lines)
  # grid_refit=False keeps the chosen member as it was trained (on train minus validation).
  kept = nmtune.fit(train, (test_x, test_y), {**config.to_dict(), "grid_refit": False})
  assert (kept["val_accuracy"], kept["accuracy"]) == (chosen["val_accuracy"], chosen["accuracy"])
  assert nmtune_grid.report_lines({"test": kept})[0].count(" test ") == 1


def test_validation_split_is_stratified_and_seeded():
  labels = np.repeat([0, 1, 2, 3], [50, 30, 7, 1])
  train_ids, val_ids = nmtune_runs.validation_split(labels, 0.2, seed=0)
  assert [int((labels[val_ids] == c).sum()) for c in range(4)] == [10, 6, 1, 0]
  assert np.array_equal(np.sort(np.concatenate([train_ids, val_ids])), np.arange(len(labels)))
  assert np.all(np.diff(val_ids) > 0) and not np.intersect1d(train_ids, val_ids).size
  again = nmtune_runs.validation_split(labels, 0.2, seed=0)[1]
  other = nmtune_runs.validation_split(labels, 0.2, seed=1)[1]
  assert np.array_equal(val_ids, again) and not np.array_equal(val_ids, other)
  assert len(nmtune_runs.validation_split(labels, 0.0, seed=0)[1]) == 0
  with pytest.raises(DataError, match="val_fraction=0.01 holds out no train example"):
    nmtune_runs.validation_split(labels[-9:], 0.01, seed=0)

  train, test = _small(), _small(60, seed=1)
  plain = nmtune.fit(train, test, {"epochs": 2, "batch_size": 32})
  held = nmtune.fit(train, test, {"epochs": 2, "batch_size": 32, "val_fraction": 0.25})
  assert "val_accuracy" not in plain and plain["num_train"] == 120
  assert (held["num_train"], held["num_val"]) == (90, 30)  # 10 of each class's 40.
  assert 0.0 <= held["val_accuracy"] <= 1.0 and len(held["val_accuracy_per_epoch"]) == 2
  assert held["val_accuracy"] == held["val_accuracy_per_epoch"][-1]


def test_grid_syntax_and_refusals():
  assert nmtune_grid.parse_grid(" svd_weight=0.001,0.01 ; cov_weight=0.04,0.4;") == [
      ("svd_weight", [0.001, 0.01]), ("cov_weight", [0.04, 0.4])]
  assert nmtune_grid.parse_grid("") == []
  config = nmtune.resolve_config({"val_fraction": 0.1, "grid": "seed=0,1;svd_topk=1,2,3"})
  points = nmtune_grid.point_configs(config)
  assert [(p.seed, p.svd_topk) for p in points] == [(s, k) for s in (0, 1) for k in (1, 2, 3)]
  assert all(p.grid == "" and p.val_fraction == 0.1 for p in points)
  cases = [
      ({"grid": "svd_weight=0.1"}, "config.grid needs a validation split to choose on"),
      ({"grid": "svd_wieght=0.1", "val_fraction": 0.1}, "field 'svd_wieght' is unknown"),
      ({"grid": "lr=0.1;lr=0.2", "val_fraction": 0.1}, "lists lr twice"),
      ({"grid": "lr=0.1,0.1", "val_fraction": 0.1}, "repeats a value of lr"),
      ({"grid": "svd_topk=2.5", "val_fraction": 0.1}, "svd_topk value '2.5' is not an integer"),
      ({"grid": "lr", "val_fraction": 0.1}, "part 'lr' needs field=value"),
      ({"grid": "lr=0.1,-1", "val_fraction": 0.1}, r"config.lr=-1.0 is out of range"),
      ({"val_fraction": 1.0}, r"config.val_fraction=1.0 is out of range"),
  ]
  for fields, match in cases:
    with pytest.raises(ConfigError, match=match) as error:
      nmtune.resolve_config(fields)
    assert "\n" not in str(error.value)
  with pytest.raises(ConfigError, match="fit_grid takes the grid's configurations"):
    nmtune.fit_grid(_small(), _small(), [{"grid": "lr=0.1", "val_fraction": 0.1}])


def test_a_diverging_member_is_marked_and_never_chosen():
  train, test = _small(), _small(60, seed=1)
  config = {"epochs": 2, "batch_size": 32, "val_fraction": 0.25, "grid": "lr=0.001,1e12"}
  result = nmtune.fit(train, test, config)
  members = result["grid_results"]
  assert members[0]["diverged"] is None and "step" in members[1]["diverged"]
  assert result["grid_chosen"] == 0 and "diverged" not in result
  # Training the two in separate programs: each as fit_grid trained it.
  configs = nmtune_grid.point_configs(nmtune.resolve_config(config))
  assert [r.get("diverged") is not None for r in nmtune.fit_grid(train, test, configs)] == [
      False, True]


def test_large_heads_train_one_per_program_and_still_mark_divergence():
  from nmjax.nmtune import runs as runs_lib  # The grouping rule itself (not in the public API).
  for dim, expected in ((64, [[0, 1, 2]]), (512, [[0], [1], [2]])):
    source = runs_lib.train_labels(_small(dim=dim), None)
    prepared = [runs_lib.prepare(source, nmtune.resolve_config({"lr": lr, "batch_size": 32}))
                for lr in (1e-3, 2e-3, 3e-3)]
    assert runs_lib.program_groups(prepared) == expected, dim
    variables = nmtune_head.init_variables(prepared[0].model, dim, seed=0)
    assert nmtune_head.parameter_count(prepared[0].model, dim) == sum(
        x.size for x in jax.tree.leaves(variables["params"]))
  train, test = _small(dim=512), _small(60, dim=512, seed=1)
  configs = [{"epochs": 1, "batch_size": 32, "lr": lr} for lr in (1e-3, 1e12)]
  grid = nmtune.fit_grid(train, test, configs)
  assert [r["configs_in_program"] for r in grid] == [1, 1]
  assert grid[0].get("diverged") is None and "step" in grid[1]["diverged"]
  alone = nmtune.fit(train, test, configs[0])
  assert grid[0]["loss_means"] == alone["loss_means"]  # The same program as fit: bit-equal.
