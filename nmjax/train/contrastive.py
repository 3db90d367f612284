"""Contrastive (CLIP) train and eval steps and their loop Objective.

A batch holds uint8 images, int32 caption tokens (the caption the pair was given: under caption
noise, another pair's), and for eval a mask. The loss is taken over the global batch: under jit
the batch is one array sharded over the mesh's data axis, and `image @ text.T` in the loss is
the product of the whole global batch with itself (XLA gathers the text embeddings across
devices), so every image is scored against every caption of the global batch on any device
count, as open_clip's gather_with_grad with local_loss=False does.

After each update the temperature parameter is clamped to [0, log 100], as open_clip does.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from nmjax.clip.loss import contrastive_loss, l2_normalize, siglip_loss
from nmjax.train.state import TrainState
from nmjax.train.steps import Objective, normalize

LOSSES = ("softmax", "sigmoid")  # InfoNCE (CLIP) | SigLIP
MAX_LOG_SCALE = math.log(100.0)


def _variables(state: TrainState, params: Any) -> dict[str, Any]:
  return {"params": params, "batch_stats": state.batch_stats}


def _loss(params: Any, image: jax.Array, text: jax.Array, scale: jax.Array,
          kind: str) -> jax.Array:
  if kind == "sigmoid":
    return siglip_loss(image, text, scale, params["logit_bias"])
  return contrastive_loss(image, text, scale)


def _retrieval_hits(image: jax.Array, text: jax.Array, tokens: jax.Array,
                    mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Image->text and text->image top-1 hits within the batch. A hit retrieves the pair's own
  caption text (equal tokens), so a batch holding a caption twice (templated captions) counts
  either copy."""
  sims = l2_normalize(image) @ l2_normalize(text).T
  if mask is not None:
    sims = jnp.where(mask[None, :] & mask[:, None] | jnp.eye(sims.shape[0], dtype=bool),
                     sims, -jnp.inf)
  same = jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)  # (B, B) equal captions
  rows = jnp.arange(sims.shape[0])
  return same[rows, jnp.argmax(sims, axis=1)], same[jnp.argmax(sims, axis=0), rows]


def train_step(state: TrainState, batch: dict[str, jax.Array], *, mean: Sequence[float],
               std: Sequence[float], dtype: Any = jnp.float32,
               loss: str = "softmax") -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step on the batch's pairs; metrics: loss, in-batch retrieval hits, count."""
  images = normalize(batch["image"], mean, std, dtype)

  def loss_fn(params):
    (image, text, scale), updates = state.apply_fn(
        _variables(state, params), images, batch["tokens"], train=True, mutable=["batch_stats"])
    value = _loss(params, image, text, scale, loss)
    return value, (image, text, scale, updates.get("batch_stats", state.batch_stats))

  (value, (image, text, scale, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  params = dict(new_state.params)
  params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, MAX_LOG_SCALE)
  new_state = new_state.replace(params=type(new_state.params)(params))
  i2t, t2i = _retrieval_hits(image, text, batch["tokens"])
  return new_state, {"loss": value, "correct_i2t": jnp.sum(i2t), "correct_t2i": jnp.sum(t2i),
                     "logit_scale": scale, "count": jnp.asarray(i2t.shape[0])}


def _masked_cross_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Per row: cross-entropy against the diagonal over the valid columns only."""
  logits = jnp.where(mask[None, :], logits, -jnp.inf)
  log_probs = jax.nn.log_softmax(logits, axis=1)
  return -jnp.diagonal(log_probs)


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, mean: Sequence[float],
              std: Sequence[float], dtype: Any = jnp.float32) -> dict[str, jax.Array]:
  """Masked sums over a padded eval batch: the symmetric InfoNCE among the valid pairs of the
  batch (at the final temperature) and in-batch retrieval hits; padded rows count nowhere."""
  images = normalize(batch["image"], mean, std, dtype)
  image, text, scale = state.apply_fn(_variables(state, state.params), images, batch["tokens"],
                                      train=False)
  mask = batch["mask"].astype(bool)
  logits = scale * (l2_normalize(image) @ l2_normalize(text).T)
  per_row = 0.5 * (_masked_cross_entropy(logits, mask) + _masked_cross_entropy(logits.T, mask))
  weights = mask.astype(jnp.float32)
  i2t, t2i = _retrieval_hits(image, text, batch["tokens"], mask)
  return {"loss_sum": jnp.sum(jnp.where(mask, per_row, 0.0)),
          "correct_i2t": jnp.sum(i2t * weights), "correct_t2i": jnp.sum(t2i * weights),
          "count": jnp.sum(weights)}


def objective(*, mean: Sequence[float], std: Sequence[float], dtype: Any = jnp.float32,
              loss: str = "softmax") -> Objective:
  """The loop's contrastive objective: loss and in-batch retrieval accuracy (image->text,
  text->image) in training and on the held-out pairs."""
  kw = dict(mean=tuple(mean), std=tuple(std), dtype=dtype)
  return Objective(
      train_step=functools.partial(train_step, loss=loss, **kw),
      eval_step=functools.partial(eval_step, **kw),
      train_fields={"correct_i2t": "train_i2t_acc", "correct_t2i": "train_t2i_acc"},
      eval_fields={"correct_i2t": "test_i2t_acc", "correct_t2i": "test_t2i_acc"},
      headline="test_i2t_acc",
      labels={"train_i2t_acc": "i2t", "train_t2i_acc": "t2i", "test_i2t_acc": "test i2t acc"})
