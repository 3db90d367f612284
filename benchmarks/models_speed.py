"""Training throughput of the model zoo on this machine, printed as one JSON object.

For each model: images/s of the project's jitted train step (nmjax.train.steps.train_step with
the SGD-Nesterov + weight-decay recipe of nmjax.train.state: uint8 normalization on device,
forward, backward, update and the batch_stats update, with the state donated), timed after a warmup step so compilation is
excluded, plus the compile time on its own. resnet_small runs at its real input (28x28x1, batch
128); resnet18/50 run on small 64x64x3 batches so the whole script stays under ~2 minutes on a
2-core CPU.

    .venv/bin/python benchmarks/models_speed.py
"""

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nmjax.models import get_model
from nmjax.train import state as state_lib
from nmjax.train.steps import train_step

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
  labels = rng.integers(0, _NUM_CLASSES, batch).astype(np.int32)
  batch_arrays = {
      "image": jnp.asarray(rng.integers(0, 256, (batch, *image_shape), dtype=np.uint8)),
      "label": jnp.asarray(labels), "clean_label": jnp.asarray(labels),
  }
  # The project's own state, optimizer recipe and train step: what main.py runs.
  config = ml_collections.ConfigDict(
      dict(optimizer="sgd", weight_decay=5e-4, momentum=0.9, nesterov=True))
  tx = state_lib.make_optimizer(config, optax.constant_schedule(0.1))
  state = state_lib.create_train_state(model, jax.random.key(0), (1, *image_shape), tx)
  step = jax.jit(functools.partial(train_step, mean=(127.5,) * image_shape[-1],
                                   std=(64.0,) * image_shape[-1], num_classes=_NUM_CLASSES),
                 donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - start

  # The first call also pays one-off allocation costs, so it is warmup, not measurement.
  state, metrics = compiled(state, batch_arrays)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch_arrays)
  jax.block_until_ready(metrics)
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
