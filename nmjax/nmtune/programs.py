"""NMTune's jitted programs: the loss of one batch, one epoch of training as a lax.scan over its
steps (over a feature table, or over images augmented and encoded inside the step), and
inference. Each compiles once per shape and ProgramSpec."""

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
from nmjax.nmtune.losses import consistency_loss, covariance_loss, dominant_singular_value_loss
from nmjax.nmtune.views import Encode, random_resized_crop_flip

LOSS_TERMS = ("total", "ce", "mse", "cov", "svd", "train_batch_accuracy")
# How many times each jitted epoch program was traced; tests read it to catch silent
# recompilation.
TRACES: collections.Counter[str] = collections.Counter()
_EVAL_CHUNK = 4096  # Test rows per evaluation call.

State = tuple[Any, Any, Any]  # (params, batch_stats, optimizer state)


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
  """What a compiled training program depends on besides array shapes (a static argument)."""
  model: NMTuneHead
  svd_topk: int
  total_steps: int
  two_view: bool
  encode: Encode | None = None  # OnlineViews only


def make_optimizer(hparams: Mapping[str, jax.Array], total_steps: int
                   ) -> optax.GradientTransformation:
  """AdamW (PyTorch's betas and eps), weight decay on every parameter, per-step cosine to 0."""
  schedule = optax.cosine_decay_schedule(hparams["lr"], decay_steps=total_steps)
  return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=hparams["weight_decay"])


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
  svd = dominant_singular_value_loss(z, spec.svd_topk)
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


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(0,))
def online_epoch(state: State, encoder_variables: Any, images: jax.Array, labels: jax.Array,
                 image_ids: jax.Array, draws: jax.Array, hparams: Mapping[str, jax.Array], *,
                 spec: ProgramSpec) -> tuple[State, jax.Array]:
  """One epoch of the reference data flow: image_ids (S, B), draws (S, 2, B, AUGMENT_DRAWS).

  Each step augments its B images twice, encodes both views with the frozen encoder (no gradient
  reaches it), and trains on the 2B rows [first views; second views] with duplicated labels.
  """
  TRACES["online_epoch"] += 1

  def step(state, batch):
    ids, view_draws = batch
    batch_images = images[ids]
    views = jnp.concatenate([random_resized_crop_flip(batch_images, view_draws[0]),
                             random_resized_crop_flip(batch_images, view_draws[1])])
    f = jax.lax.stop_gradient(spec.encode(encoder_variables, views).astype(jnp.float32))
    y = jnp.concatenate([labels[ids], labels[ids]])
    return _update(spec, state, f, y, hparams)

  return jax.lax.scan(step, state, (image_ids, draws))


@functools.partial(jax.jit, static_argnames=("model",))
def predict(model: NMTuneHead, params: Any, batch_stats: Any, features: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
  """(logits, z) in inference mode (BatchNorm running statistics)."""
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  return model.apply(variables, features, train=False)


def predict_all(model: NMTuneHead, params: Any, batch_stats: Any, features: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """predict over every row, in chunks padded to one shape (one compilation per dataset)."""
  num_rows = len(features)
  chunk = min(num_rows, _EVAL_CHUNK)
  logits, zs = [], []
  for start in range(0, num_rows, chunk):
    idx = np.minimum(np.arange(start, start + chunk), num_rows - 1)
    out_logits, out_z = predict(model, params, batch_stats, jnp.asarray(features[idx]))
    keep = min(chunk, num_rows - start)
    logits.append(np.asarray(out_logits)[:keep])
    zs.append(np.asarray(out_z)[:keep])
  return np.concatenate(logits), np.concatenate(zs)
