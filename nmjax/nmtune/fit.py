"""Fitting NMTune: the config and its checks, the methods, and the epoch loop from train data
(features or augmented views) to results on one or more test sets.

Methods (config.method): "nmtune" (the config's weights, reference 1.0 / 0.04 / 0.001, k = 5),
"mlp" (the same module and program with the three weights forced to 0) and "lp_aug" (the linear
head alone, z = f, trained by the same program on the same views and rows per step with the
linear probe's learning rate and weight decay, config.lp: the fair control for augmentation).
Training minimizes the loss of nmjax.nmtune.programs.loss_terms with AdamW and a per-step cosine
decay to 0, one jitted program per epoch; the shuffles, view choices and augmentation draws are
numpy's seeded draws outside it (nmjax.nmtune.views.epoch_inputs). Evaluation covers every test
example with BatchNorm's running statistics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nmjax import config as config_lib, probe, spectral
from nmjax.config import check_choice, check_range
from nmjax.errors import ConfigError, DataError, TrainingError
from nmjax.features import (MAX_CLASSES, FeatureSet, FeaturesLike, as_feature_set,
                            check_labels, check_matrix, inferred_classes_note,
                            warn_if_huge)
from nmjax.nmtune.head import NMTuneHead, init_variables
from nmjax.nmtune.programs import (LOSS_TERMS, ProgramSpec, State, make_optimizer, online_epoch,
                                   predict_all, table_epoch)
from nmjax.nmtune.views import CachedViews, OnlineViews, epoch_inputs
from nmjax.progress import Countdown

METHODS = ("nmtune", "mlp", "lp_aug")

TrainLike = Any  # FeaturesLike | OnlineViews | CachedViews


def single_threaded_lapack() -> contextlib.AbstractContextManager:
  """On CPU, XLA runs the per-step SVD through LAPACK (OpenBLAS). On a 128-row matrix its
  threads cost 10-50x (1.2 ms single-threaded, 24-90 ms threaded on a busy 2-core machine), so
  training limits BLAS to one thread; XLA's own matmuls keep their threads. threadpoolctl comes
  with scikit-learn; without it nothing is limited."""
  try:
    from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top
  except ImportError:
    return contextlib.nullcontext()
  return threadpool_limits(1, user_api="blas")


# ------------------------------------------------------------------------------------ config


def default_config() -> ml_collections.ConfigDict:
  """The reference NMTune defaults (REFERENCE.md s.4), a locked ConfigDict."""
  return config_lib.nmtune_fields()


def _resolve_lp(given: Any) -> ml_collections.ConfigDict:
  try:
    return probe.resolve_config(given)
  except ConfigError as e:
    # The probe names its own fields config.X; here they live under config.lp.
    raise ConfigError(str(e).replace("config.", "config.lp.", 1)) from None


def resolve_config(config: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
  """Defaults overlaid with the caller's fields (a ConfigDict or a dict); an unknown field and
  every bad value fail here, before any work, with one line naming the field."""
  resolved = default_config()
  if config is not None:
    config_lib.overlay(resolved, {k: config[k] for k in config.keys() if k != "lp"},
                       what="NMTune", tuple_fields=("logit_subset",))
    if "lp" in config.keys():
      with resolved.unlocked():
        resolved.lp = _resolve_lp(config["lp"])
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


# ------------------------------------------------------------------------------ validation


def _train_labels(train: TrainLike, num_classes: int | None) -> tuple[Any, np.ndarray, int]:
  """(validated train source, its labels, D)."""
  if isinstance(train, CachedViews):
    if train.features.ndim != 3:
      raise DataError(f"NMTune cached views: features must be (K, N, D), got shape"
                      f" {train.features.shape}")
    table = check_matrix("NMTune cached views", train.features.reshape(-1, train.feature_dim))
    warn_if_huge("NMTune cached views", table)
    labels = check_labels("NMTune cached views", train.labels, train.features.shape[1],
                          num_classes)
    return train, labels, train.feature_dim
  if isinstance(train, OnlineViews):
    labels = check_labels("NMTune online views", train.labels, len(train.images), num_classes)
    return train, labels, train.feature_dim
  train_set = as_feature_set(train, name="NMTune train features", num_classes=num_classes)
  warn_if_huge(train_set.where("NMTune train features"), train_set.features)
  return train_set, train_set.labels, train_set.feature_dim


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
    warn_if_huge(sets[name].where(where), sets[name].features)
  return sets


def _logit_bias(config: ml_collections.ConfigDict, name: str, test_set: FeatureSet,
                num_classes: int, logit_subsets: Mapping[str, Any] | None) -> np.ndarray:
  subset = (logit_subsets or {}).get(name, config.logit_subset)
  return probe.test_logit_bias(None if subset is None else tuple(int(c) for c in subset),
                               test_set, num_classes)


# --------------------------------------------------------------------------------------- fit


@dataclasses.dataclass
class _Run:
  """A validated NMTune run: the module, its compiled-program spec and its train data."""
  config: ml_collections.ConfigDict
  train: Any            # FeatureSet | CachedViews | OnlineViews
  labels: np.ndarray    # (N,) train labels (images or examples)
  feature_dim: int
  num_classes: int
  model: NMTuneHead
  spec: ProgramSpec
  hparams: dict[str, jax.Array]

  @property
  def views(self) -> str:
    return ("online" if isinstance(self.train, OnlineViews) else
            "cached" if isinstance(self.train, CachedViews) else "features")

  def epoch_fn(self) -> Callable[[State, tuple[np.ndarray, ...]], tuple[State, jax.Array]]:
    """(state, numpy epoch inputs) -> (state, per-step loss terms), the data moved once."""
    if isinstance(self.train, OnlineViews):
      labels = jnp.asarray(self.labels, jnp.int32)
      images, variables = jnp.asarray(self.train.images), self.train.variables
      return lambda state, inputs: online_epoch(
          state, variables, images, labels, *map(jnp.asarray, inputs), self.hparams,
          spec=self.spec)
    table = jnp.asarray(self.train.features.reshape(-1, self.feature_dim))
    return lambda state, inputs: table_epoch(state, table, *map(jnp.asarray, inputs),
                                             self.hparams, spec=self.spec)


def _prepare(train: TrainLike, config: ml_collections.ConfigDict) -> _Run:
  """Validates the train data against the config and builds the module and program spec."""
  train, labels, feature_dim = _train_labels(train, config.num_classes)
  num_classes = config.num_classes or int(labels.max()) + 1
  if num_classes < 2:
    raise DataError("NMTune train features: every label is 0; a classifier needs at least 2"
                    " classes")
  rows_per_step = config.batch_size
  two_view = not isinstance(train, FeatureSet)
  if two_view and rows_per_step % 2:
    raise ConfigError(f"config.batch_size={rows_per_step} must be even with two views per image"
                      " (it counts rows: 2 views x batch_size / 2 images)")
  images_per_step = rows_per_step // 2 if two_view else rows_per_step
  if images_per_step > len(labels):
    raise DataError(
        f"config.batch_size={rows_per_step} needs {images_per_step} train examples per step but"
        f" the train set has {len(labels)}; lower config.batch_size")
  if config.svd_topk > min(rows_per_step, feature_dim):
    raise ConfigError(f"config.svd_topk={config.svd_topk} is not allowed; allowed: 1 <= svd_topk"
                      f" <= min(batch_size, D) = {min(rows_per_step, feature_dim)}")
  model = NMTuneHead(num_classes=num_classes, mlp_ratio=float(config.mlp_ratio),
                     mlp_layers=0 if config.method == "lp_aug" else config.mlp_layers,
                     residual_scale_init=float(config.residual_scale_init))
  spec = ProgramSpec(model=model, svd_topk=config.svd_topk,
                     total_steps=len(labels) // images_per_step * config.epochs,
                     two_view=two_view,
                     encode=train.encode if isinstance(train, OnlineViews) else None)
  hparams = {k: jnp.float32(config[k]) for k in ("lr", "weight_decay", "mse_weight",
                                                  "cov_weight", "svd_weight")}
  return _Run(config, train, labels, feature_dim, num_classes, model, spec, hparams)


def _accuracy(run: _Run, state: State, test_set: FeatureSet, bias: np.ndarray) -> float:
  logits, _ = predict_all(run.model, state[0], state[1], test_set.features)
  return float((np.argmax(logits + bias, axis=-1) == test_set.labels).mean())


def _train(run: _Run, test_sets: Mapping[str, FeatureSet], biases: Mapping[str, np.ndarray],
           log: Callable[[str], None] | None, start: float
           ) -> tuple[State, dict[str, list[float]], list[np.ndarray]]:
  """The epochs: (final state, test accuracy per epoch per test set, mean loss terms per epoch)."""
  config = run.config
  variables = init_variables(run.model, run.feature_dim, config.seed)
  params = variables["params"]
  state = (params, variables.get("batch_stats", {}),
           make_optimizer(run.hparams, run.spec.total_steps).init(params))
  epoch_fn = run.epoch_fn()
  rng = np.random.default_rng([config.seed, 11])
  countdown = Countdown(config.epochs, start=start)
  per_epoch: dict[str, list[float]] = {n: [] for n in test_sets}
  losses: list[np.ndarray] = []
  with single_threaded_lapack():
    for epoch in range(config.epochs):
      state, terms = epoch_fn(state, epoch_inputs(run.train, run.labels, config.batch_size, rng))
      terms = np.asarray(terms)
      bad = np.flatnonzero(~np.isfinite(terms).all(axis=1))
      if len(bad):
        raise TrainingError(
            f"NMTune: the loss became non-finite at step {epoch * len(terms) + bad[0] + 1}"
            f" (epoch {epoch + 1}; terms {dict(zip(LOSS_TERMS, terms[bad[0]].tolist()))});"
            " lower config.lr or the regularizer weights")
      losses.append(terms.mean(axis=0))
      for name, test_set in test_sets.items():
        per_epoch[name].append(_accuracy(run, state, test_set, biases[name]))
      countdown.done()
      if log is not None:
        accs = " ".join(f"{n} {a[-1]:.4f}" for n, a in per_epoch.items())
        log(f"epoch {epoch + 1}/{config.epochs}: loss {losses[-1][0]:.4f} (ce"
            f" {losses[-1][1]:.4f}) | test {accs} | {countdown.line()}")
  return state, per_epoch, losses


def _settings(run: _Run, state: State, losses: list[np.ndarray]) -> dict[str, Any]:
  """The result fields shared by every test set: the run's settings, train accuracy and losses."""
  config, params = run.config, state[0]
  train_accuracy = None
  if isinstance(run.train, FeatureSet):
    train_accuracy = _accuracy(run, state, run.train, np.zeros(run.num_classes, np.float32))
  loss_per_epoch = {t: [float(v[i]) for v in losses] for i, t in enumerate(LOSS_TERMS)}
  return {
      "method": config.method, "train_accuracy": train_accuracy,
      "loss_per_epoch": loss_per_epoch,
      "loss_means": {t: v[-1] for t, v in loss_per_epoch.items()},
      "num_train": int(len(run.labels)), "feature_dim": run.feature_dim,
      "num_classes": run.num_classes, "views": run.views, "epochs": config.epochs,
      "batch_size": config.batch_size, "lr": config.lr, "weight_decay": config.weight_decay,
      **loss_weights(config.mse_weight, config.cov_weight, config.svd_weight, config.svd_topk),
      "mlp_ratio": config.mlp_ratio, "mlp_layers": run.model.mlp_layers,
      "residual_scale_init": config.residual_scale_init, "seed": config.seed,
      "residual_scale_mean": (float(np.mean(params["residual_scale"]))
                              if "residual_scale" in params else None),
  }


def fit_multi(train: TrainLike, tests: Mapping[str, FeaturesLike],
              config: ml_collections.ConfigDict | None = None, *,
              logit_subsets: Mapping[str, Any] | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
  """Trains once on `train` and evaluates on every test set; returns {test name: result}.

  train: features (a features file, a FeatureSet or a (features, labels) pair: one row per
  example, config.batch_size rows per step, each row's z paired with its own f), OnlineViews or
  CachedViews (n/2 images per step, two views each, z of the second view paired with f of the
  first). tests: {name: features}, plain (unaugmented) features of the same encoder.
  logit_subsets: optional {name: class indices} for tests predicted over a class subset.
  log: called with one progress line per epoch (None: silent).
  Each result holds accuracy (final), test_accuracy_per_epoch, train_accuracy (feature mode),
  loss_per_epoch and loss_means (means of the terms over the steps of each epoch / the last
  epoch), sve and lsvr of z on that test set, seconds (the whole fit), and the run's settings.
  """
  start = time.perf_counter()
  config = resolve_config(config)
  if not tests:
    raise DataError("NMTune: no test sets given")
  run = _prepare(train, _method_config(config))
  test_sets = _test_sets(tests, run.feature_dim, run.num_classes,
                         given_classes=config.num_classes is not None)
  biases = {n: _logit_bias(run.config, n, s, run.num_classes, logit_subsets)
            for n, s in test_sets.items()}
  state, per_epoch, losses = _train(run, test_sets, biases, log, start)
  settings = _settings(run, state, losses)
  settings["seconds"] = time.perf_counter() - start
  results = {}
  for name, test_set in test_sets.items():
    _, z = predict_all(run.model, state[0], state[1], test_set.features)
    spectrum = spectral.metrics(z)
    results[name] = {**settings, "accuracy": per_epoch[name][-1],
                     "test_accuracy_per_epoch": per_epoch[name], "sve": spectrum["sve"],
                     "lsvr": spectrum["lsvr"], "num_test": test_set.num_examples}
  return results


def fit(train: TrainLike, test: FeaturesLike,
        config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """NMTune (or config.method) trained on `train`, scored on `test`: the result dict (fit_multi).

  train/test: (features, labels) pairs of numpy arrays or paths of features files (train may
  also be OnlineViews or CachedViews); config None: default_config().
  """
  return fit_multi(train, {"test": test}, config)["test"]
