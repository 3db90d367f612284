r"""Throughput of frozen-encoder feature extraction (nmjax.features.extract), as one JSON object.

For each model: a randomly initialised encoder in inference mode returning its pooled features,
as nmjax.encoder's `encode` does (uint8 images normalised on the device, BatchNorm running
statistics), run by nmjax.features.extract over the padded, masked batches of
nmjax.data.pipeline.eval_batches on a mesh of every local device: what a transfer or NMTune job
spends encoding a split. --examples positions read --distinct random uint8 images in turn, so
the host reads, stacks and copies every batch as it would a real split's.

  extract:     the first call (compilation included), then the median of --repeats more calls:
               images/s end to end (host batches, transfer, encoder, features back to the host).
  encode_only: the jitted encoder alone on one batch already on the device (median of --steps
               calls): the device's rate, which the end-to-end figure approaches when the host
               keeps up.

Defaults by backend:
  cpu:     resnet_small 28x28x1, batch 256, 4,096 examples; resnet18 at 128x128x3, batch 32,
           256 examples; float32.
  gpu/tpu: resnet50 and vit_s16 at 224x224x3, batch 512, 16,384 examples, bfloat16 compute.

The JSON is also written, with the command, commit, date and machine, to
docs/benchmarks/features-<device>.json (--out to choose the file), after each model as well.

    .venv/bin/python benchmarks/features.py
    .venv/bin/python benchmarks/features.py --models resnet_small --batch 64 --examples 512
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import provenance  # benchmarks/provenance.py
from nmjax import features, models, parallel
from nmjax.data import pipeline
from nmjax.data.records import ArrayRecords, SubsetRecords
from nmjax.train.steps import normalize

_MEAN, _STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def _defaults(backend: str) -> list[tuple[str, int, int, tuple[int, int, int]]]:
  """(model, batch, examples, image shape) per case."""
  if backend == "cpu":
    return [("resnet_small", 256, 4096, (28, 28, 1)), ("resnet18", 32, 256, (128, 128, 3))]
  return [(name, 512, 16384, (224, 224, 3)) for name in ("resnet50", "vit_s16")]


def _median_seconds(call: Any, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def case(name: str, batch: int, examples: int, image_shape: tuple[int, ...], dtype: Any,
         opts: argparse.Namespace) -> dict[str, Any]:
  """Extraction and encoder-only images/s of one randomly initialised encoder."""
  model = models.get_model(name, num_classes=1000, dtype=dtype)
  channels = image_shape[-1]
  mean, std = _MEAN[:channels], _STD[:channels]
  start = time.perf_counter()
  with jax.threefry_partitionable(False):  # Random weights only; XLA:CPU compiles this faster.
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                           train=False))()
  init_s = time.perf_counter() - start

  def encode(variables: Any, images: jax.Array) -> jax.Array:
    _, pooled = model.apply(variables, normalize(images, mean, std, dtype), train=False)
    return pooled.astype(jnp.float32)

  rng = np.random.default_rng(0)
  distinct = min(opts.distinct, examples)
  images = rng.integers(0, 256, (distinct, *image_shape), dtype=np.uint8)
  records = SubsetRecords(ArrayRecords(images, np.zeros(distinct, np.int64)),
                          np.arange(examples) % distinct)
  mesh = parallel.make_mesh()

  def extract() -> np.ndarray:
    batches = pipeline.eval_batches(records, batch_size=batch, num_threads=opts.threads)
    values, _ = features.extract(encode, variables, batches, mesh=mesh)
    return values

  start = time.perf_counter()
  values = extract()
  first_s = time.perf_counter() - start
  if values.shape != (examples, model.feature_dim) or not np.isfinite(values).all():
    raise RuntimeError(f"{name}: extract returned {values.shape}, expected finite "
                       f"({examples}, {model.feature_dim})")
  extract_s = _median_seconds(extract, opts.repeats)
  on_device = jax.device_put(images[np.arange(batch) % distinct])
  encoder = jax.jit(encode)
  jax.block_until_ready(encoder(variables, on_device))
  encode_s = _median_seconds(lambda: encoder(variables, on_device), opts.steps)
  return {"batch": batch, "examples": examples, "image_shape": list(image_shape),
          "dtype": jnp.dtype(dtype).name, "feature_dim": int(model.feature_dim),
          "devices": int(mesh.devices.size), "read_threads": opts.threads,
          "init_s": round(init_s, 2), "first_call_s": round(first_s, 2),
          "extract_s_median": round(extract_s, 3),
          "images_per_s": round(examples / extract_s, 1),
          "encode_only_batch_ms_median": round(encode_s * 1e3, 2),
          "encode_only_images_per_s": round(batch / encode_s, 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="", help="comma-separated; default: per backend")
  parser.add_argument("--batch", type=int, default=0, help="0: the backend's default")
  parser.add_argument("--examples", type=int, default=0, help="0: the backend's default")
  parser.add_argument("--distinct", type=int, default=1024, help="distinct images to cycle")
  parser.add_argument("--repeats", type=int, default=2, help="timed extract calls")
  parser.add_argument("--steps", type=int, default=10, help="timed encoder-only calls")
  parser.add_argument("--threads", type=int, default=1, help="eval_batches read threads")
  parser.add_argument("--dtype", choices=("auto", *models.DTYPES), default="auto",
                      help="auto: float32 on CPU, bfloat16 on accelerators")
  provenance.add_out_flag(parser)
  opts = parser.parse_args()
  backend = jax.default_backend()
  dtype = (models.DTYPES[opts.dtype] if opts.dtype != "auto"
           else jnp.float32 if backend == "cpu" else jnp.bfloat16)
  cases = _defaults(backend)
  if opts.models:
    wanted = opts.models.split(",")
    known = {c[0]: c for c in cases}
    cases = [known.get(m, (m, 32 if backend == "cpu" else 512, 256 if backend == "cpu"
                           else 16384, (224, 224, 3))) for m in wanted]
  results: dict[str, Any] = {"backend": backend, "device": jax.devices()[0].device_kind,
                             "models": {}}
  for name, batch, examples, shape in cases:
    entry = case(name, opts.batch or batch, opts.examples or examples, shape, dtype, opts)
    results["models"][name] = entry
    print(json.dumps({name: entry}), flush=True)  # partial results survive a timeout
    provenance.write("features", results, opts.out, complete=False)
  print(json.dumps(results))
  provenance.write("features", results, opts.out)


if __name__ == "__main__":
  main()
