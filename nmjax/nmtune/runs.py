"""NMTune's runs: train data validated against a config, the seeded validation split carved from
it, and the epoch loop that trains one run, or K runs sharing one program (a grid), from numpy's
seeded draws to final states, per-epoch accuracies and loss terms.

A group of runs shares one compiled program when they differ only in traced hyperparameters
(nmjax.nmtune.programs.HPARAMS), their residual scale's initial value or their seed: same train
data, method structure, epochs and rows per step (group_key), and only as many as keep their
stacked state small (members_per_program: where vmapping them runs faster than one at a
time). K = 1 runs the plain epoch programs; K > 1 the grid programs, with one gather (or one
encoding of the views) per step for all members when they share a seed (so the same data order).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nmjax.errors import ConfigError, DataError, TrainingError
from nmjax.features import (HUGE_FEATURE, MAX_CLASSES, FeatureSet, as_feature_set,
                            check_labels, check_matrix, peak_value, warn_if_degenerate)
from nmjax.nmtune.head import NMTuneHead, init_variables, parameter_count
from nmjax.nmtune.losses import singular_value_route
from nmjax.nmtune.programs import (LOSS_TERMS, ProgramSpec, State, grid_online_epoch,
                                   grid_table_epoch, initial_optimizer_state, online_epoch,
                                   predict_all, program_hparams, table_epoch)
from nmjax.nmtune.views import CachedViews, OnlineViews, epoch_inputs
from nmjax.progress import Countdown

TrainLike = Any  # FeaturesLike | OnlineViews | CachedViews


def single_threaded_lapack() -> contextlib.AbstractContextManager:
  """On CPU, XLA runs the per-step eigh (or SVD) through LAPACK (OpenBLAS). On a 128-row
  matrix its threads cost many times the single-threaded time (most on a busy machine), so
  training limits BLAS to one thread; XLA's own matmuls keep their threads.

  jaxlib takes its LAPACK from scipy (scipy.linalg.cython_lapack), whose OpenBLAS is a library
  of its own that loads only when scipy.linalg is imported: imported here first, or the limit
  misses it and the first fit of a process runs with threaded LAPACK, several times slower.
  threadpoolctl comes with scikit-learn; without it nothing is limited."""
  try:
    from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top
  except ImportError:
    return contextlib.nullcontext()
  try:
    import scipy.linalg  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass  # Without scipy, jaxlib has no CPU LAPACK to limit either.
  return threadpool_limits(1, user_api="blas")


def train_labels(train: TrainLike, num_classes: int | None) -> tuple[Any, np.ndarray, int]:
  """(validated train source, its labels, D)."""
  if isinstance(train, CachedViews):
    if train.features.ndim != 3:
      raise DataError(f"NMTune cached views: features must be (K, N, D), got shape"
                      f" {train.features.shape}")
    table = check_matrix("NMTune cached views", train.features.reshape(-1, train.feature_dim))
    warn_if_degenerate("NMTune cached views", table)
    labels = check_labels("NMTune cached views", train.labels, train.features.shape[1],
                          num_classes)
    return train, labels, train.feature_dim
  if isinstance(train, OnlineViews):
    labels = check_labels("NMTune online views", train.labels, len(train.images), num_classes)
    return train, labels, train.feature_dim
  train_set = as_feature_set(train, name="NMTune train features", num_classes=num_classes)
  warn_if_degenerate(train_set.where("NMTune train features"), train_set.features)
  return train_set, train_set.labels, train_set.feature_dim


def validation_split(labels: np.ndarray, fraction: float, seed: int, *,
                     name: str = "NMTune train features") -> tuple[np.ndarray, np.ndarray]:
  """(train example ids, validation example ids), both sorted: round(fraction * N_c) examples of
  each class c drawn by a generator seeded with `seed` (at most N_c - 1: every class keeps a
  train example). fraction 0: every example trains. A split that would hold no example is a
  DataError naming `name` (the train data) and why."""
  everything = np.arange(len(labels))
  if fraction <= 0:
    return everything, everything[:0]
  rng = np.random.default_rng([seed, 17])
  held = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = min(len(members) - 1, int(round(fraction * len(members))))
    held.append(rng.permutation(members)[:count])
  val = np.sort(np.concatenate(held))
  if not len(val):
    raise DataError(f"{name}: {_empty_validation(labels, fraction)}")
  return np.setdiff1d(everything, val), val


def _empty_validation(labels: np.ndarray, fraction: float) -> str:
  """Why config.val_fraction held out no example: every class has one train example (which it
  keeps), or round(fraction x N_c) is 0 for every class, with what to do."""
  classes, counts = np.unique(labels, return_counts=True)
  if counts.max() < 2:
    shown = ", ".join(f"class {c}: 1" for c in classes[:3]) + (", ..." if len(classes) > 3 else "")
    only = (f"class {classes[0]} has only 1 training example" if len(classes) == 1 else
            f"every class has only 1 training example ({shown})")
    return (f"{only}, so no validation split (config.val_fraction={fraction}) can hold one:"
            " each class keeps its example to train on, at any val_fraction; pass at least 2"
            " train examples of some class (more, for a useful validation split), or set"
            " config.val_fraction=0 without config.grid")
  largest = int(np.argmax(counts))
  return (f"config.val_fraction={fraction} holds out no train example (N = {len(labels)}):"
          f" round({fraction} x N_c) is 0 for every class (the largest, class"
          f" {classes[largest]}, has {counts[largest]} examples); raise it to at least"
          f" {1 / counts[largest]:.3g} or pass more train examples")


def _validation_set(train: Any, labels: np.ndarray, val_ids: np.ndarray) -> FeatureSet | None:
  """The plain features of the held-out examples (views carry them in plain_features)."""
  if not len(val_ids):
    return None
  plain = train.features if isinstance(train, FeatureSet) else train.plain_features
  if plain is None:
    raise ConfigError("config.val_fraction > 0 with augmented views needs the views'"
                      " plain_features (unaugmented features of the same images) to score the"
                      " validation split on")
  return FeatureSet(np.asarray(plain)[val_ids], labels[val_ids], domain="validation split")


@dataclasses.dataclass
class Run:
  """A validated NMTune run: the module, its compiled-program spec, its train data and split."""
  config: ml_collections.ConfigDict
  train: Any                # FeatureSet | CachedViews | OnlineViews
  labels: np.ndarray        # (N,) labels of every train image or example
  examples: np.ndarray      # the ids of the examples that train (all but the validation split)
  val: FeatureSet | None    # the validation split's plain features
  feature_dim: int
  num_classes: int
  model: NMTuneHead
  spec: ProgramSpec
  hparams: dict[str, jax.Array]

  @property
  def views(self) -> str:
    return ("online" if isinstance(self.train, OnlineViews) else
            "cached" if isinstance(self.train, CachedViews) else "features")

  def inputs(self, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """One epoch's numpy-drawn inputs (nmjax.nmtune.views.epoch_inputs)."""
    return epoch_inputs(self.train, self.labels, self.config.batch_size, rng, self.examples)


def prepare(source: tuple[Any, np.ndarray, int], config: ml_collections.ConfigDict) -> Run:
  """A run of `config` on validated train data (source: train_labels' triple): the validation
  split, the module and the program spec, checked against the data."""
  train, labels, feature_dim = source
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
  where = (train.where("NMTune train features") if isinstance(train, FeatureSet) else
           f"NMTune {'online' if isinstance(train, OnlineViews) else 'cached'} views")
  examples, val_ids = validation_split(labels, config.val_fraction, config.seed, name=where)
  if images_per_step > len(examples):
    held = f" after the validation split ({len(val_ids)} held out)" if len(val_ids) else ""
    raise DataError(
        f"config.batch_size={rows_per_step} needs {images_per_step} train examples per step but"
        f" the train set has {len(examples)}{held}; lower config.batch_size")
  if config.svd_topk > min(rows_per_step, feature_dim):
    raise ConfigError(f"config.svd_topk={config.svd_topk} is not allowed; allowed: 1 <= svd_topk"
                      f" <= min(batch_size, D) = {min(rows_per_step, feature_dim)}")
  model = NMTuneHead(num_classes=num_classes, mlp_ratio=float(config.mlp_ratio),
                     mlp_layers=0 if config.method == "lp_aug" else config.mlp_layers,
                     residual_scale_init=float(config.residual_scale_init))
  # The residual scale's initial value lives in the variables: the program's module has one
  # fixed value, so runs that differ in it share a compilation.
  spec = ProgramSpec(model=model.clone(residual_scale_init=1.0),
                     total_steps=len(examples) // images_per_step * config.epochs,
                     two_view=two_view,
                     encode=train.encode if isinstance(train, OnlineViews) else None,
                     sv_route=singular_value_route())
  return Run(config, train, labels, examples, _validation_set(train, labels, val_ids),
             feature_dim, num_classes, model, spec, program_hparams(config))


def group_key(run: Run) -> tuple[Any, ...]:
  """Runs with equal keys may train in one program (the same data, spec, epochs, step rows)."""
  return (id(run.train), run.spec, run.config.epochs, run.config.batch_size,
          run.config.val_fraction)


# The most bytes of training state (parameters, AdamW's two moments) that the members of one
# grid program over a feature table hold together: about half a server CPU's L3 cache. Vmapped
# members are faster per step than one run's program while their stacked state stays in cache;
# past it the update streams the state through memory every step and the grid is slower than
# separate programs (benchmarks/nmtune.py measures both). Online views stay in one program:
# their encoding is shared.
GRID_STATE_BYTES = 16 << 20


def members_per_program(run: Run) -> int:
  """How many runs like `run` (group_key) one grid program trains: all of them with online
  views; over a feature table, as many as fit GRID_STATE_BYTES (at least 1: one run's own
  program, exactly fit's)."""
  if isinstance(run.train, OnlineViews):
    return 1 << 30
  state_bytes = 3 * 4 * parameter_count(run.model, run.feature_dim)
  return max(1, GRID_STATE_BYTES // state_bytes)


def program_groups(runs: Sequence[Run]) -> list[list[int]]:
  """The indices of `runs` grouped into programs: equal group_key, in order, each group split
  into chunks of members_per_program."""
  groups: dict[tuple[Any, ...], list[int]] = {}
  for i, run in enumerate(runs):
    groups.setdefault(group_key(run), []).append(i)
  chunks = []
  for members in groups.values():
    size = members_per_program(runs[members[0]])
    chunks += [members[start:start + size] for start in range(0, len(members), size)]
  return chunks


def initial_state(run: Run) -> State:
  """(params, batch_stats, optimizer state) at the run's seed."""
  variables = init_variables(run.model, run.feature_dim, run.config.seed)
  params = variables["params"]
  return (params, variables.get("batch_stats", {}),
          initial_optimizer_state(run.hparams, run.spec.total_steps, params))


def _stack(trees: Sequence[Any]) -> Any:
  """The trees stacked along a new leading axis, on the host (no per-shape compilation)."""
  return jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves)), *trees)


def _epoch_fn(runs: Sequence[Run], shared: bool) -> Callable[[State, tuple[np.ndarray, ...]],
                                                             tuple[State, jax.Array]]:
  """(state, numpy epoch inputs) -> (state, loss terms): the plain program for one run, the grid
  program (stacked states and hyperparameters) for several; the data moves to the device once."""
  run = runs[0]
  if len(runs) == 1:
    hparams, static = run.hparams, {"spec": run.spec}
  else:
    hparams, static = _stack([r.hparams for r in runs]), {"spec": run.spec, "shared": shared}
  if isinstance(run.train, OnlineViews):
    labels = jnp.asarray(run.labels, jnp.int32)
    images, variables = jnp.asarray(run.train.images), run.train.variables
    program = online_epoch if len(runs) == 1 else grid_online_epoch
    return lambda state, inputs: program(state, variables, images, labels,
                                         *map(jnp.asarray, inputs), hparams, **static)
  table = jnp.asarray(run.train.features.reshape(-1, run.feature_dim))
  program = table_epoch if len(runs) == 1 else grid_table_epoch
  return lambda state, inputs: program(state, table, *map(jnp.asarray, inputs), hparams, **static)


@dataclasses.dataclass
class Trained:
  """One run after training: its state, accuracies per epoch and mean loss terms per epoch."""
  run: Run
  state: State
  test_accuracy: dict[str, list[float]]
  val_accuracy: list[float]
  losses: list[np.ndarray]
  diverged: str | None = None   # a grid member whose loss became non-finite: where
  diverged_step: int | None = None  # ... and at which step (1-based)


def _accuracies(runs: Sequence[Run], state: State, features: np.ndarray, labels: np.ndarray,
                bias: np.ndarray) -> list[float]:
  """Each run's accuracy on (features, labels) with a logit bias (a class subset)."""
  logits, _ = predict_all(runs[0].spec.model, state[0], state[1], features,
                          stacked=len(runs) > 1)
  logits = logits.reshape(len(runs), len(features), -1)
  return [float(v) for v in (np.argmax(logits + bias, axis=-1) == labels).mean(axis=1)]


def _nonfinite(terms: np.ndarray, epoch: int) -> tuple[int, str] | None:
  """(step, where) of the first non-finite loss of a run this epoch (terms (S, len(LOSS_TERMS)))."""
  bad = np.flatnonzero(~np.isfinite(terms).all(axis=1))
  if not len(bad):
    return None
  step = epoch * len(terms) + int(bad[0]) + 1
  return step, (f"step {step} (epoch {epoch + 1}; terms"
                f" {dict(zip(LOSS_TERMS, terms[bad[0]].tolist()))})")


def train_scale(train: Any) -> tuple[float | None, str]:
  """(the largest |x| of the train features, how messages name them), for any TrainLike form;
  the peak is None for online views, whose features the encoder makes in each step."""
  if isinstance(train, OnlineViews):
    return None, "the train features"
  if isinstance(train, CachedViews):
    return peak_value(np.asarray(train.features)), "the cached views' features"
  train = as_feature_set(train, name="NMTune train features", num_classes=MAX_CLASSES)
  return peak_value(train.features), ("the train features" + (
      f" (features file {train.path})" if train.path else ""))


def divergence_advice(peak: float | None, step: int, name: str = "the train features") -> str:
  """What to change when the loss became non-finite at `step` (1-based) on train features (named
  `name`) whose largest |x| is `peak` (None: not known): their scale when it is past
  HUGE_FEATURE or the very first step failed (before any update, where config.lr plays no
  part), else config.lr."""
  reach = "" if peak is None else f" (largest |x| {peak:.3g})"
  if peak is not None and peak > HUGE_FEATURE:
    return (f"{name} reach {peak:.3g} in absolute value (over {HUGE_FEATURE:g}): that scale, not"
            " config.lr, makes the float32 loss overflow; standardize the features (subtract each"
            " feature's mean, divide by its standard deviation) and run again")
  if step == 1:
    return (f"it failed before any update, so config.lr plays no part: the scale of {name}"
            f"{reach} or the regularizer weights make it overflow; standardize the features"
            " (subtract each feature's mean, divide by its standard deviation) or lower the"
            " weights")
  large = (f"; {name} reach {peak:.3g} in absolute value: standardizing them may help too"
           if peak is not None and peak > 1e3 else "")
  return f"lower config.lr or the regularizer weights{large}"


def refuse_total_divergence(results: Sequence[Mapping[str, Any]], train: Any) -> None:
  """Raises TrainingError, naming the cause (divergence_advice), when every grid member's
  result (fit's) is marked diverged: no configuration is left to choose."""
  steps = [r.get("diverged_step") for r in results]
  if not steps or None in steps:
    return
  first = int(np.argmin(steps))
  peak, name = train_scale(train)
  raise TrainingError(f"config.grid: the loss of all {len(steps)} configurations became"
                      f" non-finite (the first at {results[first]['diverged']});"
                      f" {divergence_advice(peak, steps[first], name)}")


def _train_epoch(runs: Sequence[Run], epoch: int, rngs: Sequence[np.random.Generator],
                 epoch_fn: Callable[..., tuple[State, jax.Array]], state: State,
                 done: Sequence[Trained], test_sets: Mapping[str, FeatureSet],
                 biases: Mapping[str, np.ndarray], mark_divergence: bool) -> State:
  """One epoch of a group: the draws, the program call, the loss checks and the accuracies."""
  inputs = [r.inputs(rng) for r, rng in zip(runs, rngs)]
  if len(inputs) > 1:  # One array per input, the member axis after the step axis.
    inputs = [tuple(np.stack(parts, axis=1) for parts in zip(*inputs))]
  state, terms = epoch_fn(state, inputs[0])
  terms = np.asarray(terms).reshape(-1, len(runs), len(LOSS_TERMS))
  for i, trained in enumerate(done):
    trained.losses.append(terms[:, i].mean(axis=0))
    if trained.diverged:
      continue
    found = _nonfinite(terms[:, i], epoch)
    if found and not mark_divergence:
      peak, name = train_scale(trained.run.train)
      raise TrainingError(f"NMTune: the loss became non-finite at {found[1]};"
                          f" {divergence_advice(peak, found[0], name)}")
    trained.diverged_step, trained.diverged = found or (None, None)
  for name, test_set in test_sets.items():
    for trained, accuracy in zip(done, _accuracies(runs, state, test_set.features,
                                                   test_set.labels, biases[name])):
      trained.test_accuracy[name].append(accuracy)
  if runs[0].val is not None:
    _record_validation(runs, state, done)
  return state


def train_group(runs: Sequence[Run], test_sets: Mapping[str, FeatureSet],
                biases: Mapping[str, np.ndarray], log: Callable[[str], None] | None,
                start: float, *, mark_divergence: bool) -> list[Trained]:
  """The epochs of runs sharing one program (program_groups): every epoch, each run's own seeded
  draws (one set when they share a seed), one program call, then each run's test and validation
  accuracy. A run whose loss becomes non-finite is marked diverged (mark_divergence: a member
  of a grid) or fails."""
  shared = len({r.config.seed for r in runs}) == 1
  rngs = [np.random.default_rng([r.config.seed, 11]) for r in (runs[:1] if shared else runs)]
  states = [initial_state(r) for r in runs]
  state = states[0] if len(runs) == 1 else _stack(states)
  epoch_fn = _epoch_fn(runs, shared)
  done = [Trained(r, None, {n: [] for n in test_sets}, [], []) for r in runs]
  countdown = Countdown(runs[0].config.epochs, start=start)
  with single_threaded_lapack():
    for epoch in range(runs[0].config.epochs):
      state = _train_epoch(runs, epoch, rngs, epoch_fn, state, done, test_sets, biases,
                           mark_divergence)
      countdown.done()
      if log is not None:
        log(_epoch_line(done, epoch, countdown))
  members = _unstack(state, len(runs)) if len(runs) > 1 else [state]
  for trained, member in zip(done, members):
    trained.state = member
  return done


def _unstack(state: State, count: int) -> list[State]:
  """The members of a stacked state, sliced on the host: slicing device arrays by a Python index
  compiles one program per index and leaf (seconds for a grid of 16)."""
  host = jax.tree.map(np.asarray, state)
  return [jax.tree.map(lambda x, i=i: x[i], host) for i in range(count)]


def _record_validation(runs: Sequence[Run], state: State, done: Sequence[Trained]) -> None:
  """Each run's accuracy on its own validation split (runs of one seed share one split)."""
  if len({r.config.seed for r in runs}) == 1:
    val = runs[0].val
    for trained, accuracy in zip(done, _accuracies(runs, state, val.features, val.labels, 0.0)):
      trained.val_accuracy.append(accuracy)
    return
  for trained, member in zip(done, _unstack(state, len(runs))):
    val = trained.run.val
    trained.val_accuracy += _accuracies([trained.run], member, val.features, val.labels, 0.0)


def _epoch_line(done: Sequence[Trained], epoch: int, countdown: Countdown) -> str:
  """One progress line: the loss and accuracies of a run, or the best of a grid's members."""
  first = done[0]
  if len(done) == 1:
    accs = " ".join(f"{n} {a[-1]:.4f}" for n, a in first.test_accuracy.items())
    val = f" | val {first.val_accuracy[-1]:.4f}" if first.val_accuracy else ""
    return (f"epoch {epoch + 1}/{first.run.config.epochs}: loss {first.losses[-1][0]:.4f} (ce"
            f" {first.losses[-1][1]:.4f}) | test {accs}{val} | {countdown.line()}")
  val = (f" | best val {max(t.val_accuracy[-1] for t in done):.4f}"
         if first.val_accuracy else "")
  diverged = sum(t.diverged is not None for t in done)
  return (f"epoch {epoch + 1}/{first.run.config.epochs}: {len(done)} configurations"
          f"{val}{f' ({diverged} diverged)' if diverged else ''} | {countdown.line()}")
