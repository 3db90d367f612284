"""Training throughput of the model zoo on this machine, printed as one JSON object.

For each model: images/s of a jitted SGD-momentum train step (forward, backward, update and the
batch_stats update, with the state donated), timed after a warmup step so compilation is
excluded, plus the compile time on its own. resnet_small runs at its real input (28x28x1, batch
128); resnet18/50 run on small 64x64x3 batches so the whole script stays under ~2 minutes on a
2-core CPU.

    .venv/bin/python benchmarks/models_speed.py
"""

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nmjax.models import get_model

# (model, batch, image shape, timed steps): one resnet18/50 step takes seconds on a 2-core CPU, so
# they get few steps; that keeps the whole script under ~2 minutes there.
_CASES = (
    ("resnet_small", 128, (28, 28, 1), 30),
    ("resnet18", 32, (64, 64, 3), 3),
    ("resnet50", 32, (64, 64, 3), 3),
)
_NUM_CLASSES = 10


def _benchmark(name: str, batch: int, image_shape: tuple[int, ...], steps: int) -> dict[str, Any]:
  model = get_model(name, _NUM_CLASSES)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((batch, *image_shape), dtype=np.float32))
  labels = jnp.asarray(rng.integers(0, _NUM_CLASSES, batch))
  # Initial values do not affect the timing; the classic threefry kernels compile in seconds where
  # XLA:CPU takes tens of seconds over the partitionable ones.
  with jax.threefry_partitionable(False):
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images[:1])
  tx = optax.sgd(0.1, momentum=0.9)
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

  def train_step(state, images, labels):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      (logits, _), updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  step = jax.jit(train_step, donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, images, labels).compile()
  compile_s = time.perf_counter() - start

  # The first call also pays one-off allocation costs, so it is warmup, not measurement.
  state, loss = compiled(state, images, labels)
  jax.block_until_ready(loss)
  start = time.perf_counter()
  for _ in range(steps):
    state, loss = compiled(state, images, labels)
  jax.block_until_ready(loss)
  elapsed = time.perf_counter() - start
  return {
      "batch": batch,
      "image_shape": list(image_shape),
      "images_per_s": round(batch * steps / elapsed, 1),
      "compile_s": round(compile_s, 2),
  }


def main() -> None:
  results = {
      "machine": {
          "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind,
          "cpu_count": os.cpu_count(),
          "jax": jax.__version__,
      },
  }
  for name, batch, image_shape, steps in _CASES:
    results[name] = _benchmark(name, batch, image_shape, steps)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
