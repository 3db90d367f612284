r"""Throughput of text-encoder feature extraction (BERT, RoBERTa, GPT-2), as one JSON object.

A randomly initialised encoder (nmjax.models.get_text_model: the published sizes, built from
their config, nothing downloaded) returns its pooled features of padded, masked token batches,
run by nmjax.features.extract on a mesh of every local device: what a text transfer or NMTune
job spends encoding a split. Each sequence has between length/8 and length real tokens (uniform,
seeded), padded to --length with mask 0; the last batch is padded with masked rows.

  extract:     the first call (compilation included), then the median of --repeats more calls:
               sequences/s end to end (host batches, transfer, encoder, features back).
  encode_only: the jitted encoder alone on one batch already on the device (median of --steps
               calls): the device's rate, which the end-to-end figure approaches when the host
               keeps up.

Defaults by backend:
  cpu:     bert_base at length 128, batch 8, 32 sequences, float32.
  gpu/tpu: bert_base at length 128, batch 256, 8,192 sequences, bfloat16 compute.

The JSON is also written, with the command, commit, date and machine, to
docs/benchmarks/text_features-<device>.json (--out to choose the file), after each model as
well.

    .venv/bin/python benchmarks/text_features.py
    .venv/bin/python benchmarks/text_features.py --model bert_base --batch 8 --examples 32
    # On a GPU: BERT-Large at length 128, bfloat16.
    .venv/bin/python benchmarks/text_features.py --model bert_large --batch 256 \
        --examples 16384 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import provenance  # benchmarks/provenance.py
from nmjax import features, models, parallel


def _defaults(backend: str) -> tuple[int, int]:
  """(batch, examples) of the backend."""
  return (8, 32) if backend == "cpu" else (256, 8192)


def _median_seconds(call: Any, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def token_batches(ids: np.ndarray, mask: np.ndarray, batch: int
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Batches of `batch` rows: "ids" and "attention" (the tokens' mask), "label" and "mask"
  (False on the rows that pad the last batch), as nmjax.features.extract takes them."""
  for start in range(0, len(ids), batch):
    rows = np.arange(start, start + batch)
    real = rows < len(ids)
    rows = np.where(real, rows, 0)
    yield {"ids": ids[rows], "attention": mask[rows] * real[:, None].astype(mask.dtype),
           "label": np.zeros(batch, np.int64), "mask": real}


def case(name: str, length: int, batch: int, examples: int, dtype: Any,
         opts: argparse.Namespace) -> dict[str, Any]:
  """Extraction and encoder-only sequences/s of one randomly initialised text encoder."""
  model = models.get_text_model(name, dtype=dtype)
  config = model.config
  rng = np.random.default_rng(0)
  lengths = rng.integers(max(length // 8, 2), length + 1, examples)
  ids = rng.integers(0, config.vocab_size, (examples, length)).astype(np.int32)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  start = time.perf_counter()
  with jax.threefry_partitionable(False):  # Random weights only; XLA:CPU compiles this faster.
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.asarray(ids[:1]),
                                           jnp.asarray(mask[:1])))()
  jax.block_until_ready(variables)
  init_s = time.perf_counter() - start
  parameters = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables))

  def encode(variables: Any, token_ids: jax.Array, token_mask: jax.Array) -> jax.Array:
    _, pooled = model.apply(variables, token_ids, token_mask, train=False)
    return pooled

  mesh = parallel.make_mesh()

  def extract() -> np.ndarray:
    values, _ = features.extract(encode, variables, token_batches(ids, mask, batch), mesh=mesh,
                                 inputs=("ids", "attention"))
    return values

  start = time.perf_counter()
  values = extract()
  first_s = time.perf_counter() - start
  if values.shape != (examples, model.feature_dim) or not np.isfinite(values).all():
    raise RuntimeError(f"{name}: extract returned {values.shape}, expected finite"
                       f" ({examples}, {model.feature_dim})")
  extract_s = _median_seconds(extract, opts.repeats)
  rows = np.arange(batch) % examples
  on_device = jax.device_put((ids[rows], mask[rows]))
  encoder = jax.jit(encode)
  jax.block_until_ready(encoder(variables, *on_device))
  encode_s = _median_seconds(lambda: encoder(variables, *on_device), opts.steps)
  return {"length": length, "batch": batch, "examples": examples,
          "dtype": jnp.dtype(dtype).name, "feature_dim": int(model.feature_dim),
          "pooling": model.pooling, "parameters": parameters,
          "mean_real_tokens": round(float(mask.sum(1).mean()), 1),
          "devices": int(mesh.devices.size), "init_s": round(init_s, 2),
          "first_call_s": round(first_s, 2), "extract_s_median": round(extract_s, 3),
          "sequences_per_s": round(examples / extract_s, 1),
          "encode_only_batch_ms_median": round(encode_s * 1e3, 2),
          "encode_only_sequences_per_s": round(batch / encode_s, 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="bert_base",
                      help=f"comma-separated, of {', '.join(models.TEXT_MODELS)}")
  parser.add_argument("--length", type=int, default=128, help="tokens per sequence (padded)")
  parser.add_argument("--batch", type=int, default=0, help="0: the backend's default")
  parser.add_argument("--examples", type=int, default=0, help="0: the backend's default")
  parser.add_argument("--repeats", type=int, default=2, help="timed extract calls")
  parser.add_argument("--steps", type=int, default=5, help="timed encoder-only calls")
  parser.add_argument("--dtype", choices=("auto", *models.DTYPES), default="auto",
                      help="auto: float32 on CPU, bfloat16 on accelerators")
  provenance.add_out_flag(parser)
  opts = parser.parse_args()
  backend = jax.default_backend()
  dtype = (models.DTYPES[opts.dtype] if opts.dtype != "auto"
           else jnp.float32 if backend == "cpu" else jnp.bfloat16)
  batch, examples = _defaults(backend)
  results: dict[str, Any] = {"backend": backend, "device": jax.devices()[0].device_kind,
                             "models": {}}
  for name in opts.model.split(","):
    entry = case(name, opts.length, opts.batch or batch, opts.examples or examples, dtype, opts)
    results["models"][name] = entry
    print(json.dumps({name: entry}), flush=True)  # partial results survive a timeout
    provenance.write("text_features", results, opts.out, complete=False)
  print(json.dumps(results))
  provenance.write("text_features", results, opts.out)


if __name__ == "__main__":
  main()
