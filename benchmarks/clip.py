r"""Throughput of the CLIP contrastive train step, printed as one JSON object.

The project's own step (nmjax.train.contrastive.train_step: uint8 normalization on the device,
both towers forward and backward, the symmetric InfoNCE over the batch, AdamW with open_clip's
RN recipe, the temperature clamp), jitted with the state donated as the training loop does, on
the default backend's first device. Compilation is timed on its own; after one warm-up step,
images/s is the batch over the median of the timed steps.

FLOPs: XLA:CPU's count for the same step compiled for the CPU at a batch of 4
(cost_analysis()["flops"]), per pair, times the batch, on every backend (on GPU, convolutions
become custom calls that the GPU program's own count misses).
MFU = counted FLOP/s / the chip's peak dense bf16 FLOP/s (benchmarks/pretrain.py's table; None on
CPU, where `cpu_matmul_fraction` compares with a float32 matmul measured in the same run).

Defaults by backend:
  cpu:     clip_small 28x28x1 batch 256 (the embedded study's towers) and clip_rn50 at 224,
           batch 8, float32 (a 2-core CPU runs RN50 CLIP at a few pairs/s).
  gpu/tpu: clip_rn50 and clip_vit_b16 at 224, batch 256, bfloat16 compute.

The JSON is also written, with the command, commit, date and machine, to
docs/benchmarks/clip-<device>.json (--out to choose the file), after each model as well.

    .venv/bin/python benchmarks/clip.py
    .venv/bin/python benchmarks/clip.py --models clip_rn50 --batch 256 --dtype bfloat16
"""

import argparse
import functools
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

import provenance  # pylint: disable=wrong-import-position  # benchmarks/provenance.py
from benchmarks.pretrain import peak_tflops  # pylint: disable=wrong-import-position
from nmjax.models.clip_model import get_clip_model  # pylint: disable=wrong-import-position
from nmjax.train import contrastive, state as state_lib  # pylint: disable=wrong-import-position

MEAN, STD = (122.0,) * 3, (68.0,) * 3


def _state(name: str, dtype: Any, context: int) -> tuple[Any, Any]:
  model = get_clip_model(name, dtype=dtype, context_length=context)
  spec = state_lib.OptimizerSpec(optimizer="adamw", weight_decay=0.2)
  tx = state_lib.make_optimizer(spec, optax.constant_schedule(5e-4))
  state = state_lib.create_train_state(model, jax.random.key(0), (1, *model.image_shape), tx,
                                       extra_inputs=(np.zeros((1, context), np.int32),))
  return model, state


def _batch(model: Any, batch: int, context: int) -> dict[str, Any]:
  rng = np.random.default_rng(0)
  shape = (batch, *model.image_shape)
  tokens = rng.integers(1, 49406, (batch, context)).astype(np.int32)
  tokens[:, -1] = 49407
  return {"image": jnp.asarray(rng.integers(0, 256, shape, dtype=np.uint8)),
          "tokens": jnp.asarray(tokens)}


def _step(mean: tuple, std: tuple, dtype: Any) -> Any:
  return jax.jit(functools.partial(contrastive.train_step, mean=mean, std=std, dtype=dtype),
                 donate_argnums=0)


def _flops_per_pair(step: Any, state: Any, data: dict[str, Any]) -> float | None:
  """XLA:CPU's FLOP count of `step` on a batch of 4 pairs, per pair (shapes only; nothing runs).
  Compiled for the CPU on every backend: on GPU the convolutions become custom calls that the
  compiled program's own count misses."""
  small = 4
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu) if hasattr(x, "shape") else x,
      state)
  pairs = {k: jax.ShapeDtypeStruct((small, *v.shape[1:]), v.dtype, sharding=cpu)
           for k, v in data.items()}
  compiled = step.lower(abstract, pairs).compile()
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / small
  except (KeyError, TypeError, IndexError):
    return None


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    mm(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / float(np.median(times)) / 1e9


def case(name: str, batch: int, dtype_name: str, steps: int, context: int) -> dict[str, Any]:
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
  model, state = _state(name, dtype, context)
  channels = model.image_shape[-1]
  step = _step(MEAN[:channels], STD[:channels], dtype)
  data = _batch(model, batch, context)
  flops = _flops_per_pair(step, state, data)
  start = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, data)  # Warm-up.
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  median = float(np.median(times))
  device = jax.devices()[0]
  peak = peak_tflops(device.device_kind)
  entry = {"model": name, "image_shape": list(model.image_shape), "context_length": context,
           "batch": batch, "dtype": dtype_name, "compile_seconds": round(compile_s, 2),
           "step_seconds_median": round(median, 4), "images_per_sec": round(batch / median, 1),
           "step_seconds": [round(t, 4) for t in times],
           "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
           "flops_per_pair": flops}
  if flops is not None:
    entry["achieved_tflops"] = round(flops * batch / median / 1e12, 4)
    entry["mfu"] = (round(flops * batch / median / (peak * 1e12), 4)
                    if peak is not None else None)
  return entry


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="")
  parser.add_argument("--batch", type=int, default=0)
  parser.add_argument("--dtype", default="")
  parser.add_argument("--steps", type=int, default=5)
  provenance.add_out_flag(parser)
  args = parser.parse_args()
  backend = jax.default_backend()
  if backend == "cpu":
    plan = [("clip_small", 256, "float32", 16), ("clip_rn50", 8, "float32", 77)]
  else:
    plan = [("clip_rn50", 256, "bfloat16", 77), ("clip_vit_b16", 256, "bfloat16", 77)]
  if args.models:
    plan = [(m, b, d, c) for m, b, d, c in plan if m in args.models.split(",")] or [
        (m, 256, "bfloat16", 77) for m in args.models.split(",")]
  plan = [(m, args.batch or b, args.dtype or d, c) for m, b, d, c in plan]
  out = {"backend": backend, "device": jax.devices()[0].device_kind, "cases": []}
  for m, b, d, c in plan:
    out["cases"].append(case(m, b, d, args.steps, c))
    provenance.write("clip", out, args.out, complete=False)
  if backend == "cpu":
    peak = matmul_gflops()
    out["cpu_matmul_gflops"] = round(peak, 1)
    for entry in out["cases"]:
      if entry.get("achieved_tflops") is not None:
        entry["cpu_matmul_fraction"] = round(entry["achieved_tflops"] * 1e3 / peak, 3)
  print(json.dumps(out, indent=1))
  provenance.write("clip", out, args.out)


if __name__ == "__main__":
  main()
