"""NMTune's jitted programs: the loss of one batch, one epoch of training as a lax.scan over its
steps (over a feature table, or over images augmented and encoded inside the step), the same
epoch for K configurations at once (grid_table_epoch, grid_online_epoch: one program, the
members' states and hyperparameters stacked along a leading axis and vmapped), and inference.
Each compiles once per shape and ProgramSpec."""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nmjax.nmtune.head import NMTuneHead
from nmjax.nmtune.losses import (consistency_loss, covariance_loss, dominant_share,
                                 gram_singular_values, singular_values)
from nmjax.nmtune.views import Encode, random_resized_crop_flip

LOSS_TERMS = ("total", "ce", "mse", "cov", "svd", "train_batch_accuracy")
# The traced hyperparameters of a program (one value each, or a (K,) stack in a grid): a new value
# never compiles again.
HPARAMS = ("lr", "weight_decay", "mse_weight", "cov_weight", "svd_weight", "svd_topk")
# How many times each jitted epoch program was traced; tests read it to catch silent
# recompilation.
TRACES: collections.Counter[str] = collections.Counter()
_EVAL_CHUNK = 4096  # Test rows per evaluation call.

State = tuple[Any, Any, Any]  # (params, batch_stats, optimizer state)


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
  """What a compiled training program depends on besides array shapes (a static argument)."""
  model: NMTuneHead
  total_steps: int
  two_view: bool
  encode: Encode | None = None  # OnlineViews only
  sv_route: str = "gram"        # the singular-value route (nmjax.nmtune.losses)


def program_hparams(config: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The traced hyperparameters (HPARAMS) of a config: float32, svd_topk int32 (made on the
  host and moved in one transfer, so no small conversion program compiles)."""
  return jax.device_put({k: (np.int32 if k == "svd_topk" else np.float32)(config[k])
                         for k in HPARAMS})


def make_optimizer(hparams: Mapping[str, jax.Array], total_steps: int
                   ) -> optax.GradientTransformation:
  """AdamW (PyTorch's betas and eps), weight decay on every parameter, per-step cosine to 0."""
  schedule = optax.cosine_decay_schedule(hparams["lr"], decay_steps=total_steps)
  return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=hparams["weight_decay"])


def initial_optimizer_state(hparams: Mapping[str, jax.Array], total_steps: int, params: Any
                            ) -> Any:
  """make_optimizer(...).init(params) without running it: AdamW's state (step counts, first and
  second moments, the schedule's count) starts at zeros, built on the host and moved in one
  transfer; jnp.zeros_like per parameter would compile a small program per shape."""
  shapes = jax.eval_shape(make_optimizer(hparams, total_steps).init, params)
  return jax.device_put(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))


def loss_terms(spec: ProgramSpec, params: Any, batch_stats: Any, f: jax.Array, labels: jax.Array,
               hparams: Mapping[str, jax.Array]) -> tuple[jax.Array, tuple[Any, jax.Array]]:
  """(total loss, (new batch stats, [total, ce, mse, cov, svd, accuracy])) on one batch of rows:
  CE + mse_weight * consistency + cov_weight * covariance - svd_weight * dominant share."""
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  (logits, z), updates = spec.model.apply(variables, f, train=True, mutable=["batch_stats"])
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  if spec.two_view:
    half = f.shape[0] // 2
    mse = consistency_loss(z[half:], f[:half])  # z of the second view, f of the first.
  else:
    mse = consistency_loss(z, f)
  cov = covariance_loss(z)
  values = gram_singular_values if spec.sv_route == "gram" else singular_values
  svd = dominant_share(values(z), hparams["svd_topk"])
  total = (ce + hparams["mse_weight"] * mse + hparams["cov_weight"] * cov
           - hparams["svd_weight"] * svd)
  accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return total, (updates.get("batch_stats", {}), jnp.stack([total, ce, mse, cov, svd, accuracy]))


def _update(spec: ProgramSpec, state: State, f: jax.Array, labels: jax.Array,
            hparams: Mapping[str, jax.Array]) -> tuple[State, jax.Array]:
  params, batch_stats, opt_state = state
  grads, (batch_stats, terms) = jax.grad(
      lambda p: loss_terms(spec, p, batch_stats, f, labels, hparams), has_aux=True)(params)
  updates, opt_state = make_optimizer(hparams, spec.total_steps).update(grads, opt_state, params)
  return (optax.apply_updates(params, updates), batch_stats, opt_state), terms


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(0,))
def table_epoch(state: State, table: jax.Array, rows: jax.Array, row_labels: jax.Array,
                hparams: Mapping[str, jax.Array], *, spec: ProgramSpec
                ) -> tuple[State, jax.Array]:
  """One epoch over rows of a feature table: rows (S, n) indices into table (M, D), row_labels
  (S, n). Returns the new state and the loss terms of every step (S, len(LOSS_TERMS))."""
  TRACES["table_epoch"] += 1

  def step(state, batch):
    ids, y = batch
    return _update(spec, state, table[ids], y, hparams)

  return jax.lax.scan(step, state, (rows, row_labels))


def _online_rows(spec: ProgramSpec, encoder_variables: Any, images: jax.Array,
                 labels: jax.Array, ids: jax.Array, view_draws: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """The 2B rows of one online step: B images augmented twice ([first views; second views]),
  encoded by the frozen encoder (no gradient reaches it), and their duplicated labels."""
  batch_images = images[ids]
  views = jnp.concatenate([random_resized_crop_flip(batch_images, view_draws[0]),
                           random_resized_crop_flip(batch_images, view_draws[1])])
  f = jax.lax.stop_gradient(spec.encode(encoder_variables, views).astype(jnp.float32))
  return f, jnp.concatenate([labels[ids], labels[ids]])


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(0,))
def online_epoch(state: State, encoder_variables: Any, images: jax.Array, labels: jax.Array,
                 image_ids: jax.Array, draws: jax.Array, hparams: Mapping[str, jax.Array], *,
                 spec: ProgramSpec) -> tuple[State, jax.Array]:
  """One epoch of the reference data flow: image_ids (S, B), draws (S, 2, B, AUGMENT_DRAWS).

  Each step augments its B images twice, encodes both views with the frozen encoder, and trains
  on the 2B rows [first views; second views] with duplicated labels (_online_rows).
  """
  TRACES["online_epoch"] += 1

  def step(state, batch):
    return _update(spec, state, *_online_rows(spec, encoder_variables, images, labels, *batch),
                   hparams)

  return jax.lax.scan(step, state, (image_ids, draws))


def _grid_scan(spec: ProgramSpec, states: State, hparams: Mapping[str, jax.Array],
               batches: tuple[jax.Array, ...], rows_of: Any, shared: bool
               ) -> tuple[State, jax.Array]:
  """One epoch of K members in one scan: each step vmaps the update over the stacked states and
  hyperparameters. shared: every member trains on the same rows (rows_of runs once per step);
  otherwise the batches carry a member axis after the step axis and rows_of runs per member."""

  def step(states, batch):
    if shared:
      f, y = rows_of(batch)
      return jax.vmap(lambda s, h: _update(spec, s, f, y, h))(states, hparams)
    return jax.vmap(lambda s, b, h: _update(spec, s, *rows_of(b), h))(states, batch, hparams)

  return jax.lax.scan(step, states, batches)


@functools.partial(jax.jit, static_argnames=("spec", "shared"), donate_argnums=(0,))
def grid_table_epoch(states: State, table: jax.Array, rows: jax.Array, row_labels: jax.Array,
                     hparams: Mapping[str, jax.Array], *, spec: ProgramSpec, shared: bool
                     ) -> tuple[State, jax.Array]:
  """table_epoch for K configurations in one program: states and hparams stacked along a
  leading (K,) axis; rows and row_labels (S, n) shared by every member (one gather per step) or
  (S, K, n) with shared=False. Returns the states and the loss terms (S, K, len(LOSS_TERMS))."""
  TRACES["grid_table_epoch"] += 1
  return _grid_scan(spec, states, hparams, (rows, row_labels),
                    lambda batch: (table[batch[0]], batch[1]), shared)


@functools.partial(jax.jit, static_argnames=("spec", "shared"), donate_argnums=(0,))
def grid_online_epoch(states: State, encoder_variables: Any, images: jax.Array,
                      labels: jax.Array, image_ids: jax.Array, draws: jax.Array,
                      hparams: Mapping[str, jax.Array], *, spec: ProgramSpec, shared: bool
                      ) -> tuple[State, jax.Array]:
  """online_epoch for K configurations in one program (see grid_table_epoch): with shared
  draws, each step augments and encodes its views once for all members."""
  TRACES["grid_online_epoch"] += 1
  return _grid_scan(spec, states, hparams, (image_ids, draws),
                    lambda batch: _online_rows(spec, encoder_variables, images, labels, *batch),
                    shared)


@functools.partial(jax.jit, static_argnames=("model",))
def predict(model: NMTuneHead, params: Any, batch_stats: Any, features: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
  """(logits, z) in inference mode (BatchNorm running statistics)."""
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  return model.apply(variables, features, train=False)


@functools.partial(jax.jit, static_argnames=("model",))
def grid_predict(model: NMTuneHead, params: Any, batch_stats: Any, features: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """predict for K stacked members on shared features: (K, rows, C) logits, (K, rows, D) z."""
  return jax.vmap(lambda p, b: predict(model, p, b, features))(params, batch_stats)


def predict_all(model: NMTuneHead, params: Any, batch_stats: Any, features: np.ndarray, *,
                stacked: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """predict over every row, in chunks padded to one shape (one compilation per dataset);
  stacked: params and batch_stats hold K members (grid_predict), the outputs a leading K axis."""
  num_rows = len(features)
  chunk = min(num_rows, _EVAL_CHUNK)
  apply = grid_predict if stacked else predict
  logits, zs = [], []
  for start in range(0, num_rows, chunk):
    idx = np.minimum(np.arange(start, start + chunk), num_rows - 1)
    out_logits, out_z = apply(model, params, batch_stats, jnp.asarray(features[idx]))
    keep = min(chunk, num_rows - start)
    logits.append(np.asarray(out_logits)[..., :keep, :])
    zs.append(np.asarray(out_z)[..., :keep, :])
  return np.concatenate(logits, axis=-2), np.concatenate(zs, axis=-2)
