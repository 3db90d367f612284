"""Train state (params + BatchNorm statistics + optimizer) and the optimizer recipe."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from nmjax.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")


class TrainState(train_state.TrainState):
  """flax TrainState plus the model's BatchNorm running statistics."""
  batch_stats: Any = None


def learning_rate_schedule(*, base_lr: float, warmup_steps: int,
                           total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to base_lr, then cosine decay to 0 at total_steps."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=base_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def _decay_mask(params: Any) -> Any:
  """Weight decay on kernels only: never on BatchNorm scale/bias or Dense/Conv biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """An optimizer recipe: sgd reads momentum and nesterov, adamw its b1, b2 and eps (optax's
  defaults unless given; CLIP's recipes give them)."""
  optimizer: str            # sgd | adamw
  weight_decay: float       # On kernels only (not BatchNorm scales or biases).
  momentum: float = 0.9
  nesterov: bool = False
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8


def make_optimizer(spec: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """spec.optimizer in {sgd, adamw}; weight_decay is applied to kernels only.

  Args:
    spec: an OptimizerSpec, or any object with its fields (sgd: optimizer, weight_decay,
      momentum, nesterov; adamw: optimizer, weight_decay, adam_b1, adam_b2, adam_eps).
    schedule: the learning rate per step.
  Returns:
    The optax transformation.
  """
  if spec.optimizer == "sgd":
    return optax.chain(
        optax.add_decayed_weights(spec.weight_decay, mask=_decay_mask),
        optax.sgd(schedule, momentum=spec.momentum, nesterov=spec.nesterov))
  if spec.optimizer == "adamw":
    return optax.adamw(schedule, b1=spec.adam_b1, b2=spec.adam_b2, eps=spec.adam_eps,
                       weight_decay=spec.weight_decay, mask=_decay_mask)
  raise ConfigError(
      f"config.optimizer={spec.optimizer!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")


def create_train_state(model: nn.Module, rng: jax.Array, input_shape: tuple[int, ...],
                       tx: optax.GradientTransformation,
                       extra_inputs: tuple[Any, ...] = ()) -> TrainState:
  """Initializes params and batch_stats with a dummy batch of `input_shape` (batch dim first),
  followed by `extra_inputs` (a CLIP's token ids)."""
  # The partitionable threefry lowering makes XLA:CPU compile the init of even a tiny ResNet
  # several times slower; params are initialized replicated, so it buys nothing here.
  with jax.threefry_partitionable(False):
    variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), *extra_inputs, train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)
