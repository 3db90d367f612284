"""Convolutions that vmap well over a stacked model axis (several seeds trained side by side).

`jax.vmap` of a train step over stacked parameters turns every convolution into one grouped
convolution (feature_group_count = number of models). XLA:CPU runs grouped convolutions far
slower than the same convolutions one at a time (a resnet_small train step: 3.5x slower per
model at 8 models, measured on 2 cores), and XLA's loops (lax.map, scan) run convolutions
slower still. `conv_general_dilated` here is `lax.conv_general_dilated` with a batching rule of
its own: under vmap on the CPU it emits one plain convolution per model, unrolled in the one
program, for the forward pass and for both gradients; on GPU and TPU it keeps the grouped
convolution, which they run well. Without vmap it is the plain convolution, forward and
backward, so a model built with it computes exactly what it computes without it.

The rule is chosen when the program is traced: NMJAX_SEED_CONV=unroll|group overrides the
backend's choice (benchmarks/seeds.py measures both).

`compiler_options()` is what the train and eval steps of pre-training compile with, alone or
stacked, so that a member of a stack computes bitwise what its separate run computes. On the
CPU, XLA hands reductions (BatchNorm's statistics, pooling, the loss) to YNNPACK by default, and
YNNPACK's summation order depends on the whole shape: a BatchNorm mean over one model's (B, H, W)
sums in another order once four or more models are stacked, and training amplifies that last bit
into visibly different weights (0.35 after 76 steps of nine stacked runs). The options keep
YNNPACK for the convolutions and matrix products (stacked or not, they sum alike: checked
on the shapes here) and leave reductions to XLA's own emitter, which sums each output in one order
whatever the other dimensions (benchmarks/seeds.py measures the cost).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

BATCHINGS = ("unroll", "group")
# XLA:CPU's option naming the fusions it hands to YNNPACK, and its values from the most to the
# least preferred: convolutions and matrix products there, reductions not; nothing there.
_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
_YNN_CHOICES = ("LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
                "")


@functools.lru_cache(maxsize=None)
def _cpu_takes(option: str, value: str) -> bool:
  """Whether this jaxlib's CPU compiler takes the option's value (an experimental one may go)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options={option: value}).lower(
        jnp.zeros((), jnp.float32)).compile()
  except Exception:  # pylint: disable=broad-except  # XlaRuntimeError: an unknown option or value.
    return False
  return True


def compiler_options() -> dict[str, str]:
  """jax.jit's compiler_options for steps that must compute alike alone and stacked: on the
  CPU, reductions off YNNPACK (theirs sum in a shape-dependent order); elsewhere none."""
  if jax.default_backend() != "cpu":
    return {}
  for value in _YNN_CHOICES:
    if _cpu_takes(_YNN_FUSIONS, value):
      return {_YNN_FUSIONS: value}
  return {}


def seed_batching() -> str:
  """How a vmapped convolution runs: 'unroll' (one per model) on the CPU, 'group' elsewhere,
  unless NMJAX_SEED_CONV names one of BATCHINGS."""
  chosen = os.environ.get("NMJAX_SEED_CONV", "").strip()
  if chosen in BATCHINGS:
    return chosen
  return "unroll" if jax.default_backend() == "cpu" else "group"


def _batched(fn: Callable[..., Any], axis_size: int, in_batched: Any, *args: Any) -> Any:
  """fn over the leading axis of the batched args: unrolled on 'unroll', vmapped on 'group'."""
  flags = [bool(b) for b in in_batched]
  if seed_batching() == "group":
    return jax.vmap(fn, in_axes=tuple(0 if b else None for b in flags))(*args)
  outs = [fn(*[a[i] if b else a for a, b in zip(args, flags)]) for i in range(axis_size)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


@functools.lru_cache(maxsize=None)
def _conv_op(settings: tuple[tuple[str, Any], ...]) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The convolution with these static settings, its gradient and both batching rules."""
  kwargs = dict(settings)

  def plain(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, **kwargs)

  @jax.custom_batching.custom_vmap
  def forward(x, kernel):
    return plain(x, kernel)

  @forward.def_vmap
  def _forward_rule(axis_size, in_batched, x, kernel):
    return _batched(plain, axis_size, in_batched, x, kernel), True

  def gradients(x, kernel, g):
    return jax.vjp(plain, x, kernel)[1](g)

  @jax.custom_batching.custom_vmap
  def backward(x, kernel, g):
    return gradients(x, kernel, g)

  @backward.def_vmap
  def _backward_rule(axis_size, in_batched, x, kernel, g):
    return _batched(gradients, axis_size, in_batched, x, kernel, g), (True, True)

  @jax.custom_vjp
  def conv(x, kernel):
    return forward(x, kernel)

  conv.defvjp(lambda x, kernel: (forward(x, kernel), (x, kernel)),
              lambda res, g: backward(*res, g))
  return conv


def _static(value: Any) -> Any:
  """Lists as tuples (hashable settings); named tuples (lax's ConvDimensionNumbers), strings
  and None as they are."""
  if isinstance(value, list) or type(value) is tuple:  # pylint: disable=unidiomatic-typecheck
    return tuple(_static(v) for v in value)
  return value


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Any, padding: Any,
                         lhs_dilation: Any = None, rhs_dilation: Any = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated` (same arguments and result) whose vmap over stacked models
  runs as `seed_batching()` says; flax's `nn.Conv(conv_general_dilated=...)` takes it."""
  settings = (("window_strides", _static(window_strides)), ("padding", _static(padding)),
              ("lhs_dilation", _static(lhs_dilation)), ("rhs_dilation", _static(rhs_dilation)),
              ("dimension_numbers", _static(dimension_numbers)),
              ("feature_group_count", feature_group_count),
              ("batch_group_count", batch_group_count), ("precision", precision),
              ("preferred_element_type", preferred_element_type))
  return _conv_op(settings)(lhs, rhs)
