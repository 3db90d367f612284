"""Pure train and eval steps: state in, state out. The loop jits them with explicit shardings.

Images arrive as uint8 and are normalized here, on the device, so hosts ship a quarter of the bytes.
An `Objective` is what the loop trains: its two steps and how their numbers read in records and
log lines (`supervised` here; the contrastive one is nmjax/train/contrastive.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from nmjax.train.state import TrainState


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype: Any = jnp.float32) -> jax.Array:
  """uint8 images -> (x - mean) / std, with mean and std per channel in pixel units (0..255)."""
  x = images.astype(jnp.float32)
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, mean: Sequence[float],
               std: Sequence[float], num_classes: int, label_smoothing: float = 0.0,
               dtype: Any = jnp.float32) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD/AdamW step on the noisy labels; also counts hits against the clean labels.

  Returns the new state and metrics: loss (batch mean), correct_noisy, correct_clean, count.
  """
  images = normalize(batch["image"], mean, std, dtype)

  def loss_fn(params):
    (logits, _), updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"])
    loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  predictions = jnp.argmax(logits, axis=-1)
  metrics = {
      "loss": loss,
      "correct_noisy": jnp.sum(predictions == batch["label"]),
      "correct_clean": jnp.sum(predictions == batch["clean_label"]),
      "count": jnp.asarray(predictions.shape[0]),
  }
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, mean: Sequence[float],
              std: Sequence[float], num_classes: int,
              dtype: Any = jnp.float32) -> dict[str, jax.Array]:
  """Masked sums over a padded batch: padded rows (mask 0) count nowhere."""
  images = normalize(batch["image"], mean, std, dtype)
  logits, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images,
                             train=False)
  mask = batch["mask"].astype(jnp.float32)
  loss = cross_entropy(logits, batch["label"], num_classes)
  correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
  return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask),
          "count": jnp.sum(mask)}


@dataclasses.dataclass(frozen=True)
class Objective:
  """The loop's two pure steps and how their sums read.

  train_step(state, batch) -> (state, metrics): metrics hold `loss` (the batch mean), `count`
  and the counters named in `train_fields` (summed over an epoch, reported as fractions of
  count under the field's record name). eval_step(state, batch) -> masked sums: `count`,
  `loss_sum` and the counters named in `eval_fields`; `headline` is the eval field the epoch
  line leads with. `labels` gives each record field its short name in log lines.
  """
  train_step: Callable
  eval_step: Callable
  train_fields: Mapping[str, str]
  eval_fields: Mapping[str, str]
  headline: str
  labels: Mapping[str, str]


def supervised(*, mean: Sequence[float], std: Sequence[float], num_classes: int,
               dtype: Any = jnp.float32, label_smoothing: float = 0.0) -> Objective:
  """Cross-entropy on the noisy labels; accuracy against the noisy and the clean labels."""
  kw = dict(mean=tuple(mean), std=tuple(std), num_classes=num_classes, dtype=dtype)
  return Objective(
      train_step=functools.partial(train_step, label_smoothing=label_smoothing, **kw),
      eval_step=functools.partial(eval_step, **kw),
      train_fields={"correct_noisy": "train_acc_noisy", "correct_clean": "train_acc_clean"},
      eval_fields={"correct": "test_acc"}, headline="test_acc",
      labels={"train_acc_noisy": "acc(noisy)", "train_acc_clean": "acc(clean)",
              "test_acc": "test acc"})
