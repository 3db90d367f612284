"""NMTune's jitted training step against this machine's own float32 matmul rate (one JSON object).

Three measurements, all on the default backend's first device, timed after a warm-up call with
block_until_ready, best and median of --repeats calls:

  matmul          float32 GFLOP/s of a jitted (n x D) @ (D x 4D) product (the MLP's first layer)
                  for every D, and of square N x N x N products (--square). Each call runs a
                  lax.fori_loop of dependent products (each adds its rows' max to the input, so
                  none can be hoisted or skipped), as many as fill about 0.2 s, so dispatch costs
                  nothing on accelerators. The reference rate is the best of them all.
  nmtune_step     nmjax.nmtune.table_epoch exactly as fit runs it in the features mode:
                  NMTuneHead(C classes, mlp_ratio 4), init_variables, AdamW from
                  make_optimizer, ProgramSpec(two_view=False, svd_topk=5), the reference
                  hparams (lr 1e-3, wd 1e-4, weights 1.0 / 0.04 / 0.001), over a random
                  (--table x D) feature table with rows (S, n), S = --steps steps per call.
                  steps/s and rows/s use the median call. FLOPs: the MLP's matmuls counted
                  analytically (formula in the JSON) and XLA:CPU's own count of the same
                  program at S = 1 (cost_analysis). Achieved GFLOP/s = MLP FLOPs x steps/s;
                  fraction_of_matmul = achieved / reference rate.
  regularizers    each regularizer alone, forward + backward (jax.value_and_grad) on random
                  (n, D) inputs, S of them per jitted lax.scan call: where the step's time goes
                  besides the MLP (the step computes every term whatever its weight).
                  rest_ms_median = step - the MLP's matmuls at the reference rate
                  (mlp_ms_at_reference_rate) - the regularizers: AdamW, BatchNorm, the gather,
                  the loss and the matmuls' shortfall.

Each measurement is also printed to stderr as one JSON line when done (it survives a timeout).

Target: fraction_of_matmul >= 0.5 at D = 2048 (the "target" field says whether it is met).

Float32 matmuls run at the backend's default precision (jax_default_matmul_precision unset: TF32
on NVIDIA Ampere and later), the same in the reference products and in the step, so the fraction
compares like with like.

Threads (CPU backend). --blas-threads N (default 1) limits the OpenBLAS behind XLA:CPU's LAPACK
calls (scipy's, which jaxlib calls for the SVD) with threadpoolctl, as nmtune.fit does during
training (nmtune.single_threaded_lapack); 0 leaves it alone. On a busy 2-core machine, OpenBLAS's
threads spinning against XLA's made the singular-value gradient about 10x slower at D = 2048
(460-590 ms against 44-65 ms with one thread) and the whole step 2-5x slower at D = 512.
--threads N pins the process to N CPUs before JAX starts its CPU client (XLA:CPU sizes its thread
pool from the CPU affinity); by default nothing is pinned. The environment lists the BLAS
libraries and their thread counts (when threadpoolctl is installed).

Runs with only jax, flax, optax and numpy installed: see the ml_collections note below.

    .venv/bin/python benchmarks/nmtune.py                               # D 512 and 2048
    .venv/bin/python benchmarks/nmtune.py --dims 512,2048 --steps 10 --repeats 3  # ~2-3 min
    .venv/bin/python benchmarks/nmtune.py --blas-threads 0      # OpenBLAS's own thread count
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
  import ml_collections  # pylint: disable=unused-import
  ML_COLLECTIONS = "installed"
except ImportError:
  # nmjax.nmtune, nmjax.probe and nmjax.config import ml_collections at module level but use it
  # only to build or check ConfigDicts (default_config, resolve_config, fit), which this
  # benchmark never calls; accelerator hosts may lack the package. An empty module lets the
  # import succeed, and any use of it would fail with an AttributeError, never a wrong number.
  sys.modules["ml_collections"] = types.ModuleType("ml_collections")
  ML_COLLECTIONS = "absent: an empty stand-in module (nothing here uses ConfigDict)"

from nmjax import nmtune  # pylint: disable=wrong-import-position

# The reference's optimizer and loss weights (REFERENCE.md s.4).
REFERENCE_HPARAMS = {"lr": 1e-3, "weight_decay": 1e-4, "mse_weight": 1.0, "cov_weight": 0.04,
                     "svd_weight": 0.001}
TARGET_DIM = 2048
TARGET_FRACTION = 0.5
_MATMUL_CALL_S = 0.2  # Seconds one timed matmul call should last (sets the products per call).
_MAX_PRODUCTS = 100_000


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _time_calls(call: Callable[[], Any], repeats: int) -> list[float]:
  """Seconds of each of `repeats` blocking calls (the caller has warmed `call` up)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return times


def _summary(times: list[float]) -> dict[str, Any]:
  return {"call_ms_best": round(min(times) * 1e3, 3),
          "call_ms_median": round(float(np.median(times)) * 1e3, 3),
          "call_ms_all": [round(t * 1e3, 3) for t in times]}


# ------------------------------------------------------------------------------------ matmul


@jax.jit
def _chained_products(x: jax.Array, w: jax.Array, count: jax.Array) -> jax.Array:
  """`count` dependent products x @ w: each adds its rows' max to x, so every one must run."""
  def body(_, x):
    return x + 1e-6 * jnp.max(x @ w, axis=-1, keepdims=True)

  return jax.lax.fori_loop(0, count, body, x)


def matmul_rate(rows: int, inner: int, outer: int, repeats: int, rng: np.random.Generator
                ) -> dict[str, Any]:
  """GFLOP/s of float32 (rows x inner) @ (inner x outer) products, best and median call."""
  x = jnp.asarray(rng.standard_normal((rows, inner), dtype=np.float32))
  w = jnp.asarray(rng.standard_normal((inner, outer), dtype=np.float32) / np.sqrt(inner))
  one = jnp.int32(1)
  jax.block_until_ready(_chained_products(x, w, one))  # Compiles (count is traced: one program).
  single = min(_time_calls(lambda: _chained_products(x, w, one), 2))
  products = int(min(_MAX_PRODUCTS, max(1, math.ceil(_MATMUL_CALL_S / single))))
  count = jnp.int32(products)
  times = _time_calls(lambda: _chained_products(x, w, count), repeats)
  flops = 2.0 * rows * inner * outer * products
  return {"shape": f"({rows} x {inner}) @ ({inner} x {outer})", "products_per_call": products,
          "gflops_best": round(flops / min(times) / 1e9, 2),
          "gflops_median": round(flops / float(np.median(times)) / 1e9, 2), **_summary(times)}


# ------------------------------------------------------------------------------- nmtune step


def mlp_flops(rows: int, dim: int, width: int, classes: int) -> float:
  """Matmul FLOPs of one step's MLP and head, forward and backward (f is frozen: no input
  gradient for the first layer)."""
  first = 2 * (2 * rows * dim * width)         # forward + weight gradient
  second = 3 * (2 * rows * width * dim)        # forward + weight and input gradients
  head = 3 * (2 * rows * dim * classes)
  return float(first + second + head)


def regularizer_flops(rows: int, dim: int) -> dict[str, float]:
  """Rough counts of the regularizers' matmul-like work at rows < dim (not in achieved GFLOP/s)."""
  return {
      # Gram z_c z_c^T forward, two (n x n) @ (n x D) products backward.
      "covariance_gram": float(6 * rows**2 * dim),
      # Thin SVD with U and V (needed by the gradient; Golub-Van Loan R-SVD 6 D n^2 + 11 n^3)
      # plus the gradient U diag(g) V^T.
      "dominant_singular_value": float(6 * dim * rows**2 + 11 * rows**3 + 2 * rows**2 * dim),
  }


def _flops(compiled: Any) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per computation.
    analysis = analysis[0] if analysis else None
  flops = analysis.get("flops") if analysis else None
  return float(flops) if flops and flops > 0 else None


def _xla_cpu_step_flops(args: tuple[Any, ...], spec: Any) -> float | None:
  """XLA:CPU's FLOP count of table_epoch at one step (rows (1, n)); shapes only, nothing runs.

  One step, not S: XLA counts a while loop's body once whatever its trip count."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  state, table, rows, row_labels, hparams = args
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
                          (state, table, rows[:1], row_labels[:1], hparams))
  try:
    return _flops(nmtune.table_epoch.lower(*abstract, spec=spec).compile())
  except Exception as e:  # pylint: disable=broad-except
    _log(f"XLA:CPU cost analysis unavailable: {type(e).__name__}: {e}")
    return None


def step_case(dim: int, opts: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
  """Times nmtune.table_epoch at feature dimension `dim`; returns the JSON entry."""
  rows, steps, classes = opts.rows, opts.steps, opts.classes
  model = nmtune.NMTuneHead(num_classes=classes)
  width = max(1, int(round(model.mlp_ratio * dim)))  # As NMTuneHead sizes its hidden layer.
  hparams = {k: jnp.float32(v) for k, v in REFERENCE_HPARAMS.items()}
  # Every step the benchmark runs (warm-up and timed calls) fits inside the cosine schedule.
  spec = nmtune.ProgramSpec(model=model, svd_topk=opts.svd_topk,
                            total_steps=steps * (opts.repeats + 1), two_view=False)
  variables = nmtune.init_variables(model, dim, seed=0)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = nmtune.make_optimizer(hparams, spec.total_steps)
  state = (params, batch_stats, tx.init(params))
  table = jnp.asarray(rng.standard_normal((opts.table, dim), dtype=np.float32))
  table_labels = rng.integers(0, classes, opts.table).astype(np.int32)
  # Distinct rows within each step, as a shuffled epoch gives them.
  step_rows = np.stack([rng.permutation(opts.table)[:rows] for _ in range(steps)]).astype(np.int32)
  call_args = (state, table, jnp.asarray(step_rows), jnp.asarray(table_labels[step_rows]),
               hparams)

  xla_flops = _xla_cpu_step_flops(call_args, spec)
  start = time.perf_counter()
  compiled = nmtune.table_epoch.lower(*call_args, spec=spec).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def call() -> tuple[Any, jax.Array]:
    holder["state"], holder["terms"] = compiled(holder["state"], *call_args[1:])  # Donated.
    return holder["state"], holder["terms"]

  start = time.perf_counter()
  jax.block_until_ready(call())
  first_call_s = time.perf_counter() - start
  times = _time_calls(call, opts.repeats)
  terms = np.asarray(holder["terms"])
  if not np.isfinite(terms).all():
    raise RuntimeError(f"D={dim}: non-finite loss terms in the benchmark: {terms[-1]}")

  flops = mlp_flops(rows, dim, width, classes)
  median_s, best_s = float(np.median(times)), min(times)
  entry = {
      "rows": rows, "classes": classes, "hidden_width": width, "steps_per_call": steps,
      "table_rows": opts.table, "svd_topk": opts.svd_topk,
      "covariance_route": "gram" if rows < dim else "covariance",
      "compile_s": round(compile_s, 2), "first_call_s": round(first_call_s, 3),
      "step_ms_median": round(median_s / steps * 1e3, 3),
      "step_ms_best": round(best_s / steps * 1e3, 3),
      "steps_per_s": round(steps / median_s, 2), "rows_per_s": round(steps * rows / median_s, 1),
      **_summary(times),
      "mlp_flops_per_step": flops,
      "xla_cpu_flops_per_step": xla_flops,
      "xla_over_mlp_flops": None if xla_flops is None else round(xla_flops / flops, 4),
      "regularizer_flops_per_step_estimate": regularizer_flops(rows, dim),
      "achieved_gflops": round(flops * steps / median_s / 1e9, 2),
      "achieved_gflops_best_call": round(flops * steps / best_s / 1e9, 2),
      "final_loss_terms": dict(zip(nmtune.LOSS_TERMS, (round(float(v), 5) for v in terms[-1]))),
  }
  return entry


# ---------------------------------------------------------------------------- regularizers


def regularizer_times(rows: int, dim: int, opts: argparse.Namespace, rng: np.random.Generator
                      ) -> dict[str, Any]:
  """ms per forward + backward of each regularizer alone on (rows, dim) inputs."""
  zs = jnp.asarray(rng.standard_normal((opts.steps, rows, dim), dtype=np.float32))
  fs = jnp.asarray(rng.standard_normal((opts.steps, rows, dim), dtype=np.float32))
  losses = {
      "consistency": nmtune.consistency_loss,
      "covariance": lambda z, f: nmtune.covariance_loss(z),
      "dominant_singular_value": lambda z, f: nmtune.dominant_singular_value_loss(z, opts.svd_topk),
  }
  result = {}
  for name, loss in losses.items():

    @jax.jit
    def scan(zs, fs, loss=loss):
      def body(total, pair):
        value, grad = jax.value_and_grad(loss)(*pair)
        return total + value + jnp.mean(grad), None  # Uses the gradient, so it is computed.

      return jax.lax.scan(body, jnp.float32(0.0), (zs, fs))[0]

    jax.block_until_ready(scan(zs, fs))
    times = _time_calls(lambda scan=scan: scan(zs, fs), opts.repeats)
    result[name] = {"ms_median": round(float(np.median(times)) / opts.steps * 1e3, 3),
                    "ms_best": round(min(times) / opts.steps * 1e3, 3)}
  return result


# ------------------------------------------------------------------------------------- main


def _blas(limit: int) -> list[dict[str, Any]] | str:
  """The BLAS libraries loaded (with LAPACK's, scipy's) and their threads, after applying
  `limit` threads when it is not 0."""
  try:
    import threadpoolctl  # pylint: disable=import-outside-toplevel
  except ImportError:
    return "unknown (threadpoolctl is not installed)"
  try:
    import scipy.linalg  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pass  # Without scipy, jaxlib has no LAPACK to call either.
  if limit:
    threadpoolctl.threadpool_limits(limit)  # Applied now; kept for the rest of the process.
  return [{"library": info["internal_api"], "threads": info["num_threads"],
           "file": os.path.basename(info["filepath"])} for info in threadpoolctl.threadpool_info()]


def _environment(opts: argparse.Namespace, blas: list[dict[str, Any]] | str) -> dict[str, Any]:
  device = jax.devices()[0]

  def version(package: str) -> str | None:
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return None

  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "backend": jax.default_backend(), "device_kind": device.device_kind,
      "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
      "cpus_usable": len(os.sched_getaffinity(0)), "threads_option": opts.threads or None,
      "blas_threads_option": opts.blas_threads or None, "blas": blas,
      "jax": jax.__version__, "jaxlib": version("jaxlib"), "flax": version("flax"),
      "optax": version("optax"), "numpy": np.__version__, "python": platform.python_version(),
      "ml_collections": ML_COLLECTIONS,
      "matmul_precision": jax.config.jax_default_matmul_precision or "backend default",
      "load_average_before": round(os.getloadavg()[0], 2),
  }


def _int_list(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a comma-separated list of integers") from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
  return values


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dims", type=_int_list, default=[512, 2048], help="feature dims D")
  parser.add_argument("--rows", type=int, default=128, help="rows per step n")
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--steps", type=int, default=20, help="steps per timed call S")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
  parser.add_argument("--table", type=int, default=4096, help="rows of the feature table")
  parser.add_argument("--svd-topk", type=int, default=5)
  parser.add_argument("--square", type=_int_list, default=None,
                      help="square matmul sizes; default 2048 on CPU, 2048,8192 elsewhere")
  parser.add_argument("--threads", type=int, default=0,
                      help="pin to this many CPUs (XLA:CPU's thread pool); 0: set nothing")
  parser.add_argument("--blas-threads", type=int, default=1,
                      help="OpenBLAS threads (LAPACK under XLA:CPU's SVD); default 1 as"
                           " nmtune.fit; 0: set nothing")
  opts = parser.parse_args()
  for name in ("threads", "blas_threads"):
    if getattr(opts, name) < 0:
      parser.error(f"--{name.replace('_', '-')}={getattr(opts, name)} must be >= 0")
  for name in ("rows", "classes", "steps", "repeats", "table"):
    if getattr(opts, name) < (2 if name in ("rows", "classes") else 1):
      parser.error(f"--{name}={getattr(opts, name)} is too small")
  if opts.table < opts.rows:
    parser.error(f"--table={opts.table} must hold at least --rows={opts.rows} rows")
  if not 1 <= opts.svd_topk <= min(opts.rows, *opts.dims):
    parser.error(f"--svd-topk={opts.svd_topk} must lie in [1, min(rows, D)]")
  if opts.threads:
    # Before the first JAX computation: the CPU client reads the affinity when it starts.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:opts.threads])
  # Without threadpoolctl nothing is limited; the environment says so ("unknown").
  blas = _blas(opts.blas_threads)

  report: dict[str, Any] = {"environment": _environment(opts, blas)}
  backend = report["environment"]["backend"]
  squares = opts.square or ([2048] if backend == "cpu" else [2048, 8192])
  rng = np.random.default_rng(0)

  matmuls = {}
  for dim in opts.dims:
    matmuls[f"mlp_first_layer_D{dim}"] = matmul_rate(opts.rows, dim, 4 * dim, opts.repeats, rng)
    _log(json.dumps({f"mlp_first_layer_D{dim}": matmuls[f"mlp_first_layer_D{dim}"]}))
  for size in squares:
    matmuls[f"square_{size}"] = matmul_rate(size, size, size, opts.repeats, rng)
    _log(json.dumps({f"square_{size}": matmuls[f"square_{size}"]}))
  reference_name = max(matmuls, key=lambda k: matmuls[k]["gflops_best"])
  reference = matmuls[reference_name]["gflops_best"]
  report["matmul"] = {**matmuls, "reference": reference_name, "reference_gflops": reference}

  report["flops_formula"] = (
      "mlp_flops_per_step = first Dense (D -> W) forward 2nDW + weight gradient 2nDW (f is"
      " frozen: no input gradient) + second Dense (W -> D) forward, weight and input gradients"
      " 3 x 2nWD + head (D -> C) 3 x 2nDC = 10nDW + 6nDC = 40nD^2 + 6nDC at W = 4D. The"
      " regularizers (estimates listed apart), BatchNorm, the loss and AdamW are not in it;"
      " xla_cpu_flops_per_step is XLA:CPU's cost_analysis of the whole step (table_epoch at S = 1)")
  report["nmtune_step"] = {}
  for dim in opts.dims:
    entry = step_case(dim, opts, rng)
    entry["fraction_of_matmul"] = round(entry["achieved_gflops"] / reference, 4)
    entry["fraction_of_matmul_best_call"] = round(entry["achieved_gflops_best_call"] / reference,
                                                  4)
    entry["regularizers_fwd_bwd"] = regularizer_times(opts.rows, dim, opts, rng)
    for term in entry["regularizers_fwd_bwd"].values():
      term["share_of_step_median"] = round(term["ms_median"] / entry["step_ms_median"], 4)
    # The step's time apart from its MLP matmuls at the reference rate and the regularizers:
    # AdamW, BatchNorm, the row gather, the loss, and the matmuls' shortfall from that rate
    # (a difference of separate timings: noise can make it negative at small D).
    entry["mlp_ms_at_reference_rate"] = round(entry["mlp_flops_per_step"] / reference / 1e6, 3)
    entry["rest_ms_median"] = round(
        entry["step_ms_median"] - entry["mlp_ms_at_reference_rate"]
        - sum(t["ms_median"] for t in entry["regularizers_fwd_bwd"].values()), 3)
    report["nmtune_step"][f"D{dim}"] = entry
    _log(json.dumps({f"D{dim}": entry}))

  at_target = report["nmtune_step"].get(f"D{TARGET_DIM}")
  report["target"] = {
      "criterion": f"fraction_of_matmul >= {TARGET_FRACTION} at D = {TARGET_DIM}: the MLP's"
                   " achieved GFLOP/s (median call) over the best measured float32 matmul rate",
      "fraction": at_target["fraction_of_matmul"] if at_target else None,
      "met": at_target["fraction_of_matmul"] >= TARGET_FRACTION if at_target else None,
  }
  report["environment"]["load_average_after"] = round(os.getloadavg()[0], 2)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
