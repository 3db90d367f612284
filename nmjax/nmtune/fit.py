"""Fitting NMTune: the config and its checks, the methods, and the results of one fit
(fit, fit_multi) or of K configurations trained as one program (fit_grid, fit_grid_multi) on
train data (features or augmented views), scored on one or more test sets and, with
config.val_fraction > 0, on a validation split carved from train (nmjax.nmtune.runs).

Methods (config.method): "nmtune" (the config's weights, reference 1.0 / 0.04 / 0.001, k = 5),
"mlp" (the same module and program with the three weights forced to 0) and "lp_aug" (the linear
head alone, z = f, trained by the same program on the same views and rows per step with the
linear probe's learning rate and weight decay, config.lp: the fair control for augmentation).
Training minimizes the loss of nmjax.nmtune.programs.loss_terms with AdamW and a per-step cosine
decay to 0, one jitted program per epoch; the shuffles, view choices and augmentation draws are
numpy's seeded draws outside it (nmjax.nmtune.views.epoch_inputs). Evaluation covers every test
example with BatchNorm's running statistics. A config with a grid (config.grid, the syntax of
nmjax.nmtune.grid) trains every point of it and returns the one chosen on validation.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from nmjax import config as config_lib, heads, probe, spectral
from nmjax.config import check_choice, check_range
from nmjax.errors import ConfigError, DataError
from nmjax.features import MAX_CLASSES, FeatureSet, FeaturesLike, as_feature_set, \
    inferred_classes_note, warn_if_degenerate
from nmjax.nmtune import grid as grid_lib
from nmjax.nmtune.programs import LOSS_TERMS, predict_all
from nmjax.nmtune.runs import (TrainLike, Trained, prepare, program_groups,
                               refuse_total_divergence, train_group, train_labels)

METHODS = ("nmtune", "mlp", "lp_aug")


# ------------------------------------------------------------------------------------ config


def default_config() -> ml_collections.ConfigDict:
  """One NMTune fit's config with the reference implementation's defaults.

  Returns:
    A locked ConfigDict: method, the hyperparameters (epochs, batch_size, lr, weight_decay,
    mse_weight, cov_weight, svd_weight, svd_topk, mlp_ratio, mlp_layers, residual_scale_init),
    val_fraction, grid, lp (the linear probe's), seed, num_classes and logit_subset.

  Examples:
    >>> from nmjax import nmtune
    >>> config = nmtune.default_config()
    >>> config.method, config.mse_weight, config.cov_weight, config.svd_weight, config.svd_topk
    ('nmtune', 1.0, 0.04, 0.001, 5)
  """
  return config_lib.nmtune_fields()


def _resolve_lp(given: Any) -> ml_collections.ConfigDict:
  try:
    return probe.resolve_config(given)
  except ConfigError as e:
    # The probe names its own fields config.X; here they live under config.lp.
    raise ConfigError(str(e).replace("config.", "config.lp.", 1)) from None


def resolve_config(config: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
  """default_config() overlaid with the caller's fields, every value checked before any work.

  Args:
    config: the fields to set (a ConfigDict or a dict; `lp` may be a dict of the linear probe's
      fields), or None for the defaults.

  Returns:
    The resolved, locked ConfigDict.

  Raises:
    ConfigError: an unknown field or a bad value (one line naming it), or a grid without a
      validation split (config.val_fraction).

  Examples:
    >>> from nmjax import nmtune
    >>> nmtune.resolve_config({"epochs": 3}).epochs
    3
  """
  resolved = default_config()
  if config is not None:
    given = {k: config[k] for k in list(config.keys())}
    lp = given.pop("lp", None)  # The linear probe's own fields, checked by nmjax.probe.
    config_lib.overlay(resolved, given, what="NMTune", tuple_fields=("logit_subset",))
    if lp is not None:
      with resolved.unlocked():
        resolved.lp = _resolve_lp(lp)
  check_choice(resolved, "method", METHODS)
  check_range(resolved, "epochs", low=1, integer=True)
  check_range(resolved, "batch_size", low=2, integer=True)
  check_range(resolved, "lr", low=0.0, low_inclusive=False)
  for field in ("weight_decay", "mse_weight", "cov_weight", "svd_weight"):
    check_range(resolved, field, low=0.0)
  check_range(resolved, "svd_topk", low=1, integer=True)
  check_range(resolved, "mlp_ratio", low=0.0, low_inclusive=False)
  check_range(resolved, "mlp_layers", low=1, integer=True)
  check_range(resolved, "residual_scale_init", low=-1e6, high=1e6)
  check_range(resolved, "seed", low=0, integer=True)
  check_range(resolved, "val_fraction", low=0.0, high=1.0, high_inclusive=False)
  if grid_lib.parse_grid(resolved.grid) and resolved.val_fraction == 0:
    raise ConfigError("config.grid needs a validation split to choose on: set"
                      " config.val_fraction (e.g. 0.1)")
  for point in grid_lib.point_configs(resolved):
    resolve_config(point)  # Every point's values checked before any work.
  if resolved.num_classes is not None:
    check_range(resolved, "num_classes", low=2, high=MAX_CLASSES, integer=True)
  return resolved


def _method_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with the method's overrides: mlp zeroes the weights; lp_aug drops the MLP and
  takes the linear probe's learning rate and weight decay."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.method in ("mlp", "lp_aug"):
    config.mse_weight = config.cov_weight = config.svd_weight = 0.0
  if config.method == "lp_aug":
    config.lr = config.lp.learning_rate
    config.weight_decay = config.lp.weight_decay
  return config


def probe_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The linear probe's config for an NMTune config: config.lp with its classes and seed."""
  lp = ml_collections.ConfigDict(config.lp.to_dict())
  lp.num_classes = config.num_classes
  lp.logit_subset = config.logit_subset
  lp.seed = config.seed
  return lp


def loss_weights(mse: float, cov: float, svd: float, topk: int | None) -> dict[str, Any]:
  """The regularizer fields of a result row (all 0 and topk None for a method without them)."""
  return {"mse_weight": float(mse), "cov_weight": float(cov), "svd_weight": float(svd),
          "svd_topk": topk}


# --------------------------------------------------------------------------------- test sets


def _test_sets(tests: Mapping[str, FeaturesLike], feature_dim: int, num_classes: int,
               given_classes: bool) -> dict[str, FeatureSet]:
  note = " (config.num_classes)" if given_classes else inferred_classes_note(num_classes)
  sets = {}
  for name, test in tests.items():
    where = "NMTune test features" + ("" if name == "test" else f" {name!r}")
    sets[name] = as_feature_set(test, name=where, num_classes=num_classes, note=note)
    if sets[name].feature_dim != feature_dim:
      raise DataError(f"{where}: feature dimension {sets[name].feature_dim} differs from the"
                      f" train features' ({feature_dim})")
    warn_if_degenerate(sets[name].where(where), sets[name].features)
  return sets


def _logit_bias(config: ml_collections.ConfigDict, name: str, test_set: FeatureSet,
                num_classes: int, logit_subsets: Mapping[str, Any] | None) -> np.ndarray:
  subset = (logit_subsets or {}).get(name, config.logit_subset)
  return probe.test_logit_bias(None if subset is None else tuple(int(c) for c in subset),
                               test_set, num_classes)


# ----------------------------------------------------------------------------------- results


def _settings(trained: Trained) -> dict[str, Any]:
  """The result fields shared by every test set: the run's settings, train and validation
  accuracy and losses."""
  run, params = trained.run, trained.state[0]
  config = run.config
  train_accuracy = None
  if isinstance(run.train, FeatureSet):
    logits, _ = predict_all(run.spec.model, params, trained.state[1],
                            run.train.features[run.examples])
    train_accuracy = float((np.argmax(logits, -1) == run.labels[run.examples]).mean())
  loss_per_epoch = {t: [float(v[i]) for v in trained.losses] for i, t in enumerate(LOSS_TERMS)}
  settings = {
      "method": config.method, "train_accuracy": train_accuracy,
      "loss_per_epoch": loss_per_epoch,
      "loss_means": {t: v[-1] for t, v in loss_per_epoch.items()},
      "num_train": int(len(run.examples)), "feature_dim": run.feature_dim,
      "num_classes": run.num_classes, "views": run.views, "epochs": config.epochs,
      "batch_size": config.batch_size, "lr": config.lr, "weight_decay": config.weight_decay,
      **loss_weights(config.mse_weight, config.cov_weight, config.svd_weight, config.svd_topk),
      "mlp_ratio": config.mlp_ratio, "mlp_layers": run.model.mlp_layers,
      "residual_scale_init": config.residual_scale_init, "seed": config.seed,
      # np.asarray first: np.mean of a device array calls its .mean() (a compiled program).
      "residual_scale_mean": (float(np.mean(np.asarray(params["residual_scale"])))
                              if "residual_scale" in params else None),
      "sv_route": run.spec.sv_route, "val_fraction": config.val_fraction,
  }
  if run.val is not None:
    settings.update(num_val=run.val.num_examples, val_accuracy=trained.val_accuracy[-1],
                    val_accuracy_per_epoch=trained.val_accuracy)
  if trained.diverged:
    settings.update(diverged=trained.diverged, diverged_step=trained.diverged_step)
  return settings


def _head(trained: Trained, bias: np.ndarray) -> Any:
  """The trained run's fitted nmjax.heads.Head, its logit_subset the classes bias leaves open."""
  run = trained.run
  subset = None if np.isfinite(bias).all() else np.flatnonzero(np.isfinite(bias)).tolist()
  return heads.from_nmtune(run.config.method, run.model, run.feature_dim, trained.state[0],
                     trained.state[1], subset)


def _results(group: Sequence[Trained], test_sets: Mapping[str, FeatureSet],
             biases: Mapping[str, np.ndarray], seconds: float
             ) -> list[dict[str, dict[str, Any]]]:
  """{test name: result} of every member of a group trained together in `seconds`."""
  out = []
  for trained in group:
    settings = {**_settings(trained), "seconds": seconds, "configs_in_program": len(group)}
    results = {}
    for name, test_set in test_sets.items():
      spectrum = {"sve": None, "lsvr": None}  # A diverged member's z is not finite.
      correct = None
      if not trained.diverged:
        logits, z = predict_all(trained.run.spec.model, trained.state[0], trained.state[1],
                                test_set.features)
        # A z whose singular values are all 0 (constant test features under lp_aug; a warning
        # line said so) has no SVE or LSVR: None, as a diverged member's.
        with contextlib.suppress(DataError):
          spectrum = spectral.metrics(z)
        correct = np.argmax(logits + biases[name], axis=-1) == test_set.labels
      results[name] = {**settings, "accuracy": trained.test_accuracy[name][-1],
                       "head": _head(trained, biases[name]),
                       "test_accuracy_per_epoch": trained.test_accuracy[name],
                       "sve": spectrum["sve"], "lsvr": spectrum["lsvr"], "correct": correct,
                       "num_test": test_set.num_examples}
    out.append(results)
  return out


# --------------------------------------------------------------------------------------- fit


def fit_grid_multi(train: TrainLike, tests: Mapping[str, FeaturesLike],
                   configs: Sequence[ml_collections.ConfigDict | Mapping[str, Any]], *,
                   logit_subsets: Mapping[str, Any] | None = None,
                   log: Callable[[str], None] | None = None) -> list[dict[str, dict[str, Any]]]:
  """Trains every config on `train` and evaluates each on every test set.

  Each config is trained as fit_multi(train, tests, config) trains it (the same rows, views, seed
  and hyperparameters; batched float32 kernels round differently, so the losses agree to float
  rounding and an accuracy may differ by a prediction near a tie). Configs that differ only in
  grid.ONE_PROGRAM_FIELDS train in one jitted program, as many as keep their stacked state small
  (nmjax.nmtune.runs.program_groups; a large head trains alone, as fit trains it).

  Args:
    train: as fit_multi's.
    tests: {name: test features}, as fit_multi's.
    configs: the configurations (ConfigDicts or dicts, as resolve_config takes), none with a grid.
    logit_subsets: optional {test name: class indices}, as fit_multi's.
    log: called with one progress line per epoch (None: silent).

  Returns:
    One {test name: result} per config, in order (results as fit_multi's). Each result's
    configs_in_program says how many shared its program, and seconds is that program's whole
    fit. With several configs, one whose loss becomes non-finite is marked (its results'
    "diverged") instead of failing the others.

  Raises:
    ConfigError: a bad config, or one with a grid.
    DataError: bad features, or no test sets.
  """
  start = time.perf_counter()
  if not tests:
    raise DataError("NMTune: no test sets given")
  resolved = [resolve_config(c) for c in configs]
  if any(c.grid for c in resolved):
    raise ConfigError("fit_grid takes the grid's configurations (nmjax.nmtune.grid"
                      ".point_configs); config.grid must be empty in each")
  sources: dict[Any, tuple[Any, np.ndarray, int]] = {}
  runs = []
  for config in resolved:
    if config.num_classes not in sources:  # Validated once, shared by every run.
      sources[config.num_classes] = train_labels(train, config.num_classes)
    runs.append(prepare(sources[config.num_classes], _method_config(config)))
  out: list[dict[str, dict[str, Any]]] = [{} for _ in runs]
  for number, members in enumerate(program_groups(runs)):
    group_start = start if number == 0 else time.perf_counter()
    first, config = runs[members[0]], resolved[members[0]]
    test_sets = _test_sets(tests, first.feature_dim, first.num_classes,
                           given_classes=config.num_classes is not None)
    biases = {n: _logit_bias(first.config, n, s, first.num_classes, logit_subsets)
              for n, s in test_sets.items()}
    trained = train_group([runs[i] for i in members], test_sets, biases, log, group_start,
                          mark_divergence=len(runs) > 1)
    for i, results in zip(members, _results(trained, test_sets, biases,
                                            time.perf_counter() - group_start)):
      out[i] = results
  return out


def fit_grid(train: TrainLike, test: FeaturesLike,
             configs: Sequence[ml_collections.ConfigDict | Mapping[str, Any]]
             ) -> list[dict[str, Any]]:
  """fit for every config, in order: fit_grid_multi with one test set.

  Args:
    train: as fit's.
    test: as fit's.
    configs: the configurations (ConfigDicts or dicts), none with a grid.

  Returns:
    The result dicts (as fit's), one per config, in order.

  Raises:
    ConfigError: a bad config, or one with a grid.
    DataError: bad features.

  Examples:
    >>> import numpy as np
    >>> from nmjax import nmtune
    >>> x, y = np.random.default_rng(0).normal(size=(64, 8)), np.arange(64) % 2
    >>> configs = [{"epochs": 1, "batch_size": 32, "svd_weight": w} for w in (0.0, 0.01)]
    >>> [r["svd_weight"] for r in nmtune.fit_grid((x, y), (x, y), configs)]
    [0.0, 0.01]
  """
  return [r["test"] for r in fit_grid_multi(train, {"test": test}, configs)]


def _grid_fit(train: TrainLike, tests: Mapping[str, FeaturesLike],
              config: ml_collections.ConfigDict, logit_subsets: Mapping[str, Any] | None,
              log: Callable[[str], None] | None) -> dict[str, dict[str, Any]]:
  """config.grid's points (those the method leaves distinct) trained by fit_grid_multi; the
  results of the one with the best validation accuracy, each holding the whole grid."""
  fields = [f for f, _ in grid_lib.parse_grid(config.grid)]
  points, seen = [], set()
  for point in grid_lib.point_configs(config):
    identity = json.dumps(_method_config(resolve_config(point)).to_dict(), sort_keys=True,
                          default=str)
    if identity not in seen:  # mlp zeroes the weights: their grid points are one fit.
      seen.add(identity)
      points.append(point)
  all_results = fit_grid_multi(train, tests, points, logit_subsets=logit_subsets, log=log)
  # Any test set's result carries the run's validation accuracy: the choice reads only that.
  shared = [next(iter(r.values())) for r in all_results]
  refuse_total_divergence(shared, train)
  chosen = grid_lib.choose([r.get("val_accuracy") for r in shared],
                           [bool(r.get("diverged")) for r in shared])
  best = all_results[chosen]
  if config.grid_refit:  # The winner fit again on all of train: its head is what is kept.
    best = fit_grid_multi(train, tests, [grid_lib.refit_config(points[chosen])],
                          logit_subsets=logit_subsets, log=log)[0]
  out = {}
  for name in tests:
    out[name] = {**best[name], "grid": config.grid, "grid_chosen": chosen,
                 "grid_refit": bool(config.grid_refit),
                 "grid_val_accuracy": all_results[chosen][name].get("val_accuracy"),
                 "grid_results": [grid_lib.summary(p, fields, r[name])
                                  for p, r in zip(points, all_results)]}
  return out


def fit_multi(train: TrainLike, tests: Mapping[str, FeaturesLike],
              config: ml_collections.ConfigDict | None = None, *,
              logit_subsets: Mapping[str, Any] | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
  """Trains once on `train` and evaluates on every test set.

  Args:
    train: features (a features file, a FeatureSet or a (features, labels) pair: one row per
      example, config.batch_size rows per step, each row's z paired with its own f), or
      OnlineViews or CachedViews (n/2 images per step, two views each, z of the second view
      paired with f of the first).
    tests: {name: test features}, plain (unaugmented) features of the same encoder, in any of
      the feature forms.
    config: the fit's config (a ConfigDict or a dict, as resolve_config takes); None: defaults.
    logit_subsets: optional {name: class indices} for tests predicted over a class subset.
    log: called with one progress line per epoch (None: silent).

  Returns:
    {test name: result}. Each result holds accuracy (final), head (the fitted nmjax.heads.Head:
    its predictions on that test set, over its logit subset, score as accuracy; kind nmtune for
    nmtune and mlp, linear for lp_aug), correct (its per-example hits, None for a diverged grid
    member), test_accuracy_per_epoch, train_accuracy (feature mode),
    loss_per_epoch and loss_means (the terms' means over each epoch's steps / the last epoch's),
    sve and lsvr of z on that test set, seconds (the whole fit), sv_route (the singular-value
    route), the run's settings and, with config.val_fraction > 0, num_val, val_accuracy and
    val_accuracy_per_epoch (the validation split, carved from train). With config.grid: the
    results of the grid point with the best validation accuracy, plus grid, grid_chosen (its
    index) and grid_results (every point's grid fields, val_accuracy, accuracy, diverged).

  Raises:
    ConfigError: a bad config field or value.
    DataError: bad features (one line naming the file or the split), or no test sets.

  Examples:
    >>> import numpy as np
    >>> from nmjax import nmtune
    >>> x, y = np.random.default_rng(0).normal(size=(64, 8)), np.arange(64) % 2
    >>> tests = {"a": (x, y), "b": (x[:8], y[:8])}
    >>> results = nmtune.fit_multi((x, y), tests, {"epochs": 1, "batch_size": 32})
    >>> sorted(results), results["b"]["num_test"]
    (['a', 'b'], 8)
  """
  config = resolve_config(config)
  if config.grid:
    return _grid_fit(train, tests, config, logit_subsets, log)
  return fit_grid_multi(train, tests, [config], logit_subsets=logit_subsets, log=log)[0]


def fit(train: TrainLike, test: FeaturesLike,
        config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """NMTune (or config.method: nmtune, mlp, lp_aug, lp or ridge) trained on `train`, scored on
  `test`.

  Args:
    train: a features file path, a FeatureSet, a (features, labels) pair of arrays, or
      OnlineViews or CachedViews (two augmented views per image and step).
    test: the test features (a path, a FeatureSet or a pair) of the same encoder.
    config: the fit's config (a ConfigDict or a dict, as resolve_config takes); None: the
      defaults (default_config()).

  Returns:
    The result dict (as fit_multi's results): accuracy, head (the fitted nmjax.heads.Head),
    per-epoch curves, sve and lsvr of z on the test features, the settings.

  Raises:
    ConfigError: a bad config field or value.
    DataError: bad features (one line naming the file or the split).

  Examples:
    >>> import numpy as np
    >>> from nmjax import nmtune
    >>> x, y = np.random.default_rng(0).normal(size=(64, 8)), np.arange(64) % 2
    >>> result = nmtune.fit((x, y), (x, y), {"epochs": 1, "batch_size": 32})
    >>> result["method"], 0.0 <= result["accuracy"] <= 1.0
    ('nmtune', True)
  """
  given = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config or {})
  method = given.pop("method", "nmtune")
  if method in ("lp", "ridge"):  # The command line's probes: their own protocol, NMTune's seed.
    probe_fn = probe.linear_probe if method == "lp" else probe.ridge_probe
    return {**probe_fn(train, test, probe_config(resolve_config(given))), "method": method}
  if method == "zeroshot":
    raise ConfigError("config.method='zeroshot' fits nothing: it scores a CLIP encoder's text"
                      " tower; run the nmtune job on a pretrain_clip checkpoint with it")
  return fit_multi(train, {"test": test}, {**given, "method": method})["test"]
