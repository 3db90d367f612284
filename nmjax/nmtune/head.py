"""The NMTune head: a residual MLP over a frozen feature, then a linear classifier, with
PyTorch's default initializations and a numpy-drawn init of its variables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np



def _torch_uniform(fan_in: int) -> Callable[..., jax.Array]:
  """PyTorch's nn.Linear default for weight and bias alike: U(+-1 / sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class NMTuneHead(nn.Module):
  """z = residual_scale * MLP(f) + f and logits = Dense(C)(z); returns (logits, z).

  The MLP is mlp_layers blocks of Dense(round(mlp_ratio * D)) -> BatchNorm -> ReLU, then
  Dense(D), with PyTorch's default Linear initialization; BatchNorm uses PyTorch's defaults
  (running-average momentum 0.1, i.e. flax momentum 0.9, eps 1e-5). The residual scale is one
  learnable value per dimension, initialized to residual_scale_init. mlp_layers = 0 drops the
  MLP (z = f): the linear-probe control. The classifier is He-uniform with a zero bias.
  Known difference from the reference: flax's BatchNorm keeps the biased batch variance in its
  running average where PyTorch keeps the unbiased one (a factor n / (n - 1)).

  Called as head.apply(variables, f, train=...) with f the (n, D) frozen features; returns
  (logits (n, num_classes), z (n, D)), both float32. train=True uses the batch's statistics and
  needs mutable=["batch_stats"]; train=False uses the running averages.

  Attributes:
    num_classes: C, the classifier's outputs.
    mlp_ratio: the hidden width over D (default 4.0).
    mlp_layers: how many hidden blocks (default 1; 0: no MLP, z = f).
    residual_scale_init: the residual scale's initial value (default 1.0).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nmjax import nmtune
    >>> head = nmtune.NMTuneHead(num_classes=3)
    >>> variables = head.init(jax.random.key(0), jnp.ones((4, 8)), train=False)
    >>> logits, z = head.apply(variables, jnp.ones((4, 8)), train=False)
    >>> logits.shape, z.shape
    ((4, 3), (4, 8))
  """
  num_classes: int
  mlp_ratio: float = 4.0
  mlp_layers: int = 1
  residual_scale_init: float = 1.0

  @nn.compact
  def __call__(self, f: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    f = f.astype(jnp.float32)
    dim = f.shape[-1]
    z = f
    if self.mlp_layers > 0:
      hidden = f
      width = max(1, int(round(self.mlp_ratio * dim)))
      for i in range(self.mlp_layers):
        fan_in = hidden.shape[-1]
        hidden = nn.Dense(width, kernel_init=_torch_uniform(fan_in),
                          bias_init=_torch_uniform(fan_in), name=f"hidden_{i}")(hidden)
        hidden = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                              name=f"norm_{i}")(hidden)
        hidden = nn.relu(hidden)
      hidden = nn.Dense(dim, kernel_init=_torch_uniform(width), bias_init=_torch_uniform(width),
                        name="out")(hidden)
      scale = self.param("residual_scale", nn.initializers.constant(self.residual_scale_init),
                         (dim,))
      z = scale * hidden + f
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.he_uniform(),
                      bias_init=nn.initializers.zeros, name="head")(z)
    return logits, z


def init_variables(model: NMTuneHead, feature_dim: int, seed: int) -> dict[str, Any]:
  """model.init's variables ({"params", "batch_stats"}, same tree and distributions) drawn by
  numpy's seeded generator: flax's init runs jax.random op by op (seconds on a CPU) or costs
  seconds of compilation, more than tuning a small head. The arrays are drawn and filled on the
  host and moved to the device in one transfer (no compilation at all)."""
  rng = np.random.default_rng([seed, 3])

  def uniform(bound: float, *shape: int) -> np.ndarray:
    return rng.uniform(-bound, bound, shape).astype(np.float32)

  params: dict[str, Any] = {}
  batch_stats: dict[str, Any] = {}
  if model.mlp_layers > 0:
    width = max(1, int(round(model.mlp_ratio * feature_dim)))
    fan_in = feature_dim
    for i in range(model.mlp_layers):
      bound = 1.0 / np.sqrt(fan_in)
      params[f"hidden_{i}"] = {"kernel": uniform(bound, fan_in, width), "bias": uniform(bound, width)}
      params[f"norm_{i}"] = {"scale": np.ones(width, np.float32),
                             "bias": np.zeros(width, np.float32)}
      batch_stats[f"norm_{i}"] = {"mean": np.zeros(width, np.float32),
                                  "var": np.ones(width, np.float32)}
      fan_in = width
    bound = 1.0 / np.sqrt(width)
    params["out"] = {"kernel": uniform(bound, width, feature_dim),
                     "bias": uniform(bound, feature_dim)}
    params["residual_scale"] = np.full(feature_dim, model.residual_scale_init, np.float32)
  params["head"] = {"kernel": uniform(np.sqrt(6.0 / feature_dim), feature_dim, model.num_classes),
                    "bias": np.zeros(model.num_classes, np.float32)}
  # Built on the host and moved in one transfer: jnp.ones, jnp.zeros and dtype conversions
  # would each compile a small program the first time a process meets its shape.
  return jax.device_put({"params": params, **({"batch_stats": batch_stats} if batch_stats else {})})


def parameter_count(model: NMTuneHead, feature_dim: int) -> int:
  """How many trainable values init_variables(model, feature_dim, seed)["params"] holds."""
  count = feature_dim * model.num_classes + model.num_classes  # The classifier.
  if model.mlp_layers > 0:
    width = max(1, int(round(model.mlp_ratio * feature_dim)))
    fan_in = feature_dim
    for _ in range(model.mlp_layers):
      count += fan_in * width + 3 * width  # Kernel, bias, BatchNorm scale and bias.
      fan_in = width
    count += width * feature_dim + 2 * feature_dim  # The output kernel and bias, the scale.
  return count
