"""NMTune against a plain PyTorch loop and this machine's own limits (one JSON object on stdout).

Sections (--sections, all by default; each entry is also printed to stderr when done):
  first_fit  a fresh process's nmtune.fit (compilation included; no persistent XLA cache) and the
             same fit again in that process (warm), against a fresh process's plain PyTorch loop
             of the same computation run twice (when torch is installed): --rows x D=512
             features of --classes Gaussian classes, 5 epochs, 128 rows per step, the reference
             weights (1.0 / 0.04 / 0.001, k = 5), AdamW lr 1e-3 wd 1e-4, per-step cosine, the
             test accuracy after every epoch (2,000 rows). Times are the fit calls' only
             (imports and data excluded). --fit-rounds rounds interleave the two sides; each
             round's speedup is against its own PyTorch runs. Target: speedup_first >= 1.5.
  grid       K = 16 configurations (svd_weight x cov_weight, 4 x 4) as one nmtune.fit_grid
             program against 16 sequential nmtune.fit calls, each in a fresh process, called
             twice (cold includes compilation, warm does not), at D = 64 (--grid-rows rows) and
             D = 512 (--grid-rows-512 rows). Target at D = 64: speedup_cold >= 3.
  step       nmtune's table_epoch exactly as fit runs it (n = 128 rows, C classes, the reference
             hparams) at every --dims D: steps/s and rows/s of the median call of --steps steps,
             and each singular-value route's forward + backward alone (svd: QR + SVD; gram: eigh
             of the Gram matrix and matmuls; the one "auto" takes is FASTEST_SINGULAR_VALUE_ROUTE).
             With torch, the PyTorch step's median at the same D (its own fresh process).
  grid_bound what bounds the K = 16 grid at D = 64 (--bound-dim): one member's step (table_epoch)
             and the K-member grid step (grid_table_epoch) as fit_grid runs them; the same grid
             step with the covariance and singular-value terms replaced by trivial ones (a
             profile: the MLP, cross-entropy, consistency and AdamW of 16 members alone); the
             batch of K eighs of the D x D Gram matrices alone (XLA's LAPACK call, one thread as
             fit runs it). max_step_speedup = K x member step / (grid without those terms + the
             eighs): the most a grid step could gain over K member steps even if everything else
             the two regularizers do were free. max_step_speedup_at_machine_floor = member step /
             (its MLP's FLOPs at the matmul peak measured here + its eigh split over every
             core): the most any grid program could gain on this machine.
  limit      how far the step at D = 2048 is from this machine: the MLP's matmul FLOPs at the
             best float32 matmul rate measured here (square products and the MLP's own shape,
             lax.fori_loop chains of dependent products) plus AdamW's passes over the parameters
             at the memory bandwidth measured here (a jitted a * x + y over 256 MB).

The machine is shared: compare the ratios measured side by side in one run, and repeat.
On CPU the benchmark limits LAPACK's OpenBLAS to one thread as nmtune.fit does.
The JSON is also written, with the command, commit, date and machine, to
docs/benchmarks/nmtune-<device>.json (--out to choose the file), after each section as well.

    .venv/bin/python benchmarks/nmtune.py                       # all sections, ~8 min on 2 cores
    .venv/bin/python benchmarks/nmtune.py --sections step,limit --dims 512,2048
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import provenance  # benchmarks/provenance.py

REFERENCE = {"lr": 1e-3, "weight_decay": 1e-4, "mse_weight": 1.0, "cov_weight": 0.04,
             "svd_weight": 0.001, "svd_topk": 5}
GRID = [{"svd_weight": s, "cov_weight": c} for s in (3e-4, 1e-3, 3e-3, 1e-2)
        for c in (0.01, 0.04, 0.1, 0.4)]
SECTIONS = ("first_fit", "grid", "grid_bound", "step", "limit")


def _log(entry: dict[str, Any]) -> None:
  print(json.dumps(entry), file=sys.stderr, flush=True)


def blobs(rows: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Gaussian classes: the same arrays in every process for the same arguments."""
  centers = np.random.default_rng(1234).standard_normal((classes, dim)).astype(np.float32)
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, rows)
  return (centers[labels] + 2.0 * rng.standard_normal((rows, dim))).astype(np.float32), labels


# ----------------------------------------------------------------- children (fresh processes)


def child_jax(opts: argparse.Namespace) -> dict[str, Any]:
  """opts.what = fit: nmtune.fit twice; grid / sequential: 16 configs twice."""
  start = time.perf_counter()
  from nmjax import nmtune  # pylint: disable=import-outside-toplevel
  imported = time.perf_counter() - start
  train = blobs(opts.rows, opts.dim, opts.classes, 0)
  test = blobs(2000, opts.dim, opts.classes, 1)
  base = {"epochs": opts.epochs, "batch_size": 128}
  configs = [{**base, **g} for g in GRID]
  calls, accuracies = [], []
  for _ in range(2):
    start = time.perf_counter()
    if opts.what == "fit":
      results = [nmtune.fit(train, test, base)]
    elif opts.what == "grid":
      results = nmtune.fit_grid(train, test, configs)
    else:
      results = [nmtune.fit(train, test, c) for c in configs]
    calls.append(round(time.perf_counter() - start, 3))
    accuracies = [round(r["accuracy"], 4) for r in results]
  return {"cold_s": calls[0], "warm_s": calls[1], "import_s": round(imported, 2),
          "accuracy": accuracies, "sv_route": results[0]["sv_route"]}


def _torch_head(dim: int, classes: int) -> Any:
  import torch  # pylint: disable=import-outside-toplevel

  class Head(torch.nn.Module):
    """The reference NMTune head (PyTorch defaults; He-uniform classifier, zero bias)."""

    def __init__(self):
      super().__init__()
      self.hidden = torch.nn.Linear(dim, 4 * dim)
      self.norm = torch.nn.BatchNorm1d(4 * dim)
      self.out = torch.nn.Linear(4 * dim, dim)
      self.scale = torch.nn.Parameter(torch.ones(dim))
      self.head = torch.nn.Linear(dim, classes)
      torch.nn.init.kaiming_uniform_(self.head.weight, nonlinearity="relu")
      torch.nn.init.zeros_(self.head.bias)

    def forward(self, f):
      z = self.scale * self.out(torch.relu(self.norm(self.hidden(f)))) + f
      return self.head(z), z

  return Head()


def _torch_loss(model: Any, f: Any, labels: Any) -> Any:
  """The reference loss: CE + MSE + 0.04 COV - 0.001 SVD (D x D covariance, svdvals)."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  logits, z = model(f)
  num_rows, dim = z.shape
  mse = torch.mean((F.normalize(z) - F.normalize(f).detach()) ** 2)
  centered = z - z.mean(0)
  cov_matrix = centered.T @ centered / (num_rows - 1)
  cov = (torch.sum(cov_matrix ** 2) - torch.sum(torch.diagonal(cov_matrix) ** 2)) / dim
  sigma = torch.linalg.svdvals(z)
  share = torch.mean(sigma[:REFERENCE["svd_topk"]] / sigma.sum())
  return (F.cross_entropy(logits, labels) + REFERENCE["mse_weight"] * mse
          + REFERENCE["cov_weight"] * cov - REFERENCE["svd_weight"] * share)


def child_torch(opts: argparse.Namespace) -> dict[str, Any]:
  """The plain PyTorch loop of child_jax's fit, twice; then its median step at each --dims.
  opts.torch_blas 1: OpenBLAS (torch's matmuls and LAPACK here) limited to one thread, as
  nmtune.fit limits LAPACK's; 0: torch's defaults."""
  import torch  # pylint: disable=import-outside-toplevel
  if opts.torch_blas:
    import threadpoolctl  # pylint: disable=import-outside-toplevel
    torch.linalg.svdvals(torch.ones(2, 2))  # Loads the BLAS, so the limit reaches it.
    threadpoolctl.threadpool_limits(opts.torch_blas, user_api="blas")
  torch.manual_seed(0)
  train = [torch.from_numpy(a) for a in blobs(opts.rows, opts.dim, opts.classes, 0)]
  test = [torch.from_numpy(a) for a in blobs(2000, opts.dim, opts.classes, 1)]

  def fit() -> float:
    model = _torch_head(opts.dim, opts.classes)
    steps = len(train[1]) // 128 * opts.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=REFERENCE["lr"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=REFERENCE["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    for _ in range(opts.epochs):
      model.train()
      order = torch.randperm(len(train[1]))
      for i in range(len(order) // 128):
        ids = order[i * 128:(i + 1) * 128]
        opt.zero_grad(set_to_none=True)
        _torch_loss(model, train[0][ids], train[1][ids]).backward()
        opt.step()
        sched.step()
      model.eval()
      with torch.no_grad():
        accuracy = float((model(test[0])[0].argmax(-1) == test[1]).float().mean())
    return accuracy

  calls = []
  for _ in range(2):
    start = time.perf_counter()
    accuracy = fit()
    calls.append(round(time.perf_counter() - start, 3))
  return {"cold_s": calls[0], "warm_s": calls[1], "accuracy": round(accuracy, 4),
          "threads": torch.get_num_threads(), "blas_threads": opts.torch_blas or "default",
          "torch": torch.__version__,
          "step_ms_median": {f"D{d}": _torch_step_ms(d, opts) for d in opts.dims}}


def _torch_step_ms(dim: int, opts: argparse.Namespace) -> float:
  import torch  # pylint: disable=import-outside-toplevel
  model = _torch_head(dim, opts.classes)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
  f = torch.randn(128, dim)
  labels = torch.randint(0, opts.classes, (128,))
  times = []
  for i in range(opts.steps + 2):
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    _torch_loss(model, f, labels).backward()
    opt.step()
    if i >= 2:
      times.append(time.perf_counter() - start)
  return round(float(np.median(times)) * 1e3, 3)


def run_child(kind: str, opts: argparse.Namespace, **fields: Any) -> dict[str, Any]:
  """A fresh interpreter running child_<kind>; its JSON (or the error's last lines)."""
  args = {"rows": opts.rows, "dim": 512, "classes": opts.classes, "epochs": 5, "what": "fit",
          "dims": ",".join(map(str, opts.dims)), "steps": opts.steps, "torch_blas": 0, **fields}
  command = [sys.executable, os.path.abspath(__file__), "--child", kind]
  command += [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  if done.returncode:
    return {"error": done.stderr.strip().splitlines()[-3:]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def torch_installed() -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec("torch") is not None


# ---------------------------------------------------------------------------- in-process


def _time_calls(call: Callable[[], Any], repeats: int) -> list[float]:
  import jax  # pylint: disable=import-outside-toplevel
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return times


def matmul_gflops(rows: int, inner: int, outer: int, repeats: int) -> float:
  """Best float32 GFLOP/s of chained dependent (rows x inner) @ (inner x outer) products."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((rows, inner), dtype=np.float32))
  w = jnp.asarray(rng.standard_normal((inner, outer), dtype=np.float32) / np.sqrt(inner))
  chain = jax.jit(lambda x, w, n: jax.lax.fori_loop(
      0, n, lambda _, x: x + 1e-6 * jnp.max(x @ w, axis=-1, keepdims=True), x))
  jax.block_until_ready(chain(x, w, 1))
  single = min(_time_calls(lambda: chain(x, w, 1), 2))
  count = int(min(10_000, max(1, math.ceil(0.2 / single))))
  best = min(_time_calls(lambda: chain(x, w, count), repeats))
  return 2.0 * rows * inner * outer * count / best / 1e9


def matmul_peak_gflops(dim: int, opts: argparse.Namespace) -> float:
  """The best float32 matmul rate measured here: square 2048 products or the MLP's own shape at
  feature dimension `dim` (128 rows, D x 4D), whichever runs faster."""
  return max(matmul_gflops(2048, 2048, 2048, opts.repeats),
             matmul_gflops(128, dim, 4 * dim, opts.repeats))


def memory_gbps(repeats: int) -> float:
  """Best GB/s of a jitted a * x + y over 256 MB (two reads, one write per element)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = jnp.ones((1 << 26,), jnp.float32)
  y = jnp.ones((1 << 26,), jnp.float32)
  axpy = jax.jit(lambda x, y: 1.0001 * x + y)
  jax.block_until_ready(axpy(x, y))
  return 3 * x.nbytes / min(_time_calls(lambda: axpy(x, y), repeats)) / 1e9


def mlp_flops(rows: int, dim: int, classes: int) -> float:
  """Matmul FLOPs of one step's MLP and head, forward and backward (no input gradient for f):
  10 n D W + 6 n D C at W = 4D."""
  return float(10 * rows * dim * 4 * dim + 6 * rows * dim * classes)


def step_case(dim: int, opts: argparse.Namespace) -> dict[str, Any]:
  """nmjax.nmtune.programs.table_epoch as fit runs it at feature dimension `dim`: steps/s and
  rows/s."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from nmjax import nmtune  # pylint: disable=import-outside-toplevel
  from nmjax.nmtune import head as nmtune_head  # pylint: disable=import-outside-toplevel
  from nmjax.nmtune import losses as nmtune_losses  # pylint: disable=import-outside-toplevel
  from nmjax.nmtune import programs as nmtune_programs  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  model = nmtune.NMTuneHead(num_classes=opts.classes)
  hparams = nmtune_programs.program_hparams(REFERENCE)
  spec = nmtune_programs.ProgramSpec(model=model, total_steps=opts.steps * (opts.repeats + 2),
                                     two_view=False,
                                     sv_route=nmtune_losses.singular_value_route())
  variables = nmtune_head.init_variables(model, dim, seed=0)
  params = variables["params"]
  holder = {"state": (params, variables["batch_stats"],
                      nmtune_programs.make_optimizer(hparams, spec.total_steps).init(params))}
  table = jnp.asarray(rng.standard_normal((4096, dim), dtype=np.float32))
  labels = rng.integers(0, opts.classes, 4096).astype(np.int32)
  rows = np.stack([rng.permutation(4096)[:128] for _ in range(opts.steps)]).astype(np.int32)
  args = (table, jnp.asarray(rows), jnp.asarray(labels[rows]), hparams)

  def call():
    holder["state"], terms = nmtune_programs.table_epoch(holder["state"], *args, spec=spec)
    return terms

  start = time.perf_counter()
  _time_calls(call, 1)
  first = time.perf_counter() - start
  median = float(np.median(_time_calls(call, opts.repeats))) / opts.steps
  return {"sv_route": spec.sv_route, "first_call_s": round(first, 2),
          "step_ms_median": round(median * 1e3, 3), "steps_per_s": round(1 / median, 2),
          "rows_per_s": round(128 / median, 1), "sv_routes_fwd_bwd_ms": sv_route_ms(dim, opts)}


def sv_route_ms(dim: int, opts: argparse.Namespace) -> dict[str, float]:
  """ms per forward + backward of the singular-value term alone, on each route."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from nmjax import nmtune  # pylint: disable=import-outside-toplevel
  zs = jnp.asarray(np.random.default_rng(1).standard_normal((opts.steps, 128, dim)), jnp.float32)
  out = {}
  for route in ("svd", "gram"):
    loss = lambda z, route=route: nmtune.dominant_singular_value_loss(z, 5, route=route)
    scan = jax.jit(lambda zs, loss=loss: jax.lax.scan(
        lambda c, z: (c + jnp.mean(jax.grad(loss)(z)), None), 0.0, zs)[0])
    _time_calls(lambda: scan(zs), 1)
    out[route] = round(float(np.median(_time_calls(lambda: scan(zs), opts.repeats)))
                       / opts.steps * 1e3, 3)
  return out


def _stacked_states(model: Any, dim: int, count: int, total_steps: int, hparams: Any) -> Any:
  """count members' initial (params, batch_stats, AdamW state), stacked on the host."""
  import jax  # pylint: disable=import-outside-toplevel
  from nmjax.nmtune import head as nmtune_head  # pylint: disable=import-outside-toplevel
  from nmjax.nmtune import programs as nmtune_programs  # pylint: disable=import-outside-toplevel
  members = []
  for seed in range(count):
    variables = jax.tree.map(np.asarray, nmtune_head.init_variables(model, dim, seed=seed))
    opt = nmtune_programs.initial_optimizer_state(hparams, total_steps, variables["params"])
    members.append((variables["params"], variables["batch_stats"], jax.tree.map(np.asarray, opt)))
  return jax.tree.map(lambda *leaves: np.stack(leaves), *members)


def grid_bound(opts: argparse.Namespace) -> dict[str, Any]:
  """The grid step at D = --bound-dim against K member steps, and what bounds it (SECTIONS)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from nmjax import nmtune  # pylint: disable=import-outside-toplevel
  from nmjax.nmtune import losses as nmtune_losses  # pylint: disable=import-outside-toplevel
  from nmjax.nmtune import programs as nmtune_programs  # pylint: disable=import-outside-toplevel
  dim, count, rng = opts.bound_dim, len(GRID), np.random.default_rng(0)
  model = nmtune.NMTuneHead(num_classes=opts.classes)
  table = jnp.asarray(rng.standard_normal((4096, dim), dtype=np.float32))
  labels = rng.integers(0, opts.classes, 4096).astype(np.int32)
  rows = np.stack([rng.permutation(4096)[:128] for _ in range(opts.steps)]).astype(np.int32)
  rows, row_labels = jnp.asarray(rows), jnp.asarray(labels[rows])
  member = nmtune_programs.program_hparams(REFERENCE)
  stacked = jax.device_put({k: np.stack([np.asarray(member[k])] * count) for k in member})

  def step_ms(total_steps: int, grid: bool) -> float:
    spec = nmtune_programs.ProgramSpec(model=model, total_steps=total_steps, two_view=False,
                                       sv_route=nmtune_losses.singular_value_route())
    holder = {"state": jax.device_put(_stacked_states(model, dim, count if grid else 1,
                                                      total_steps, member))}
    if not grid:
      holder["state"] = jax.tree.map(lambda x: x[0], holder["state"])

    def call():
      if grid:
        holder["state"], terms = nmtune_programs.grid_table_epoch(
            holder["state"], table, rows, row_labels, stacked, spec=spec, shared=True)
      else:
        holder["state"], terms = nmtune_programs.table_epoch(
            holder["state"], table, rows, row_labels, member, spec=spec)
      return terms

    _time_calls(call, 1)
    return float(np.median(_time_calls(call, opts.repeats))) / opts.steps * 1e3

  total = opts.steps * (opts.repeats + 2)
  out = {"dim": dim, "configs": count, "member_step_ms": step_ms(total, False),
         "grid_step_ms": step_ms(total, True)}
  # A profile: the two regularizers' terms replaced (a new total_steps, so a new trace).
  saved = (nmtune_programs.covariance_loss, nmtune_programs.gram_singular_values,
           nmtune_programs.singular_values)
  nmtune_programs.covariance_loss = lambda z: 0.0 * jnp.sum(z)
  nmtune_programs.gram_singular_values = nmtune_programs.singular_values = (
      lambda z: jnp.sort(jnp.linalg.norm(z, axis=0))[::-1][:min(z.shape)])
  try:
    out["grid_step_without_cov_and_sv_ms"] = step_ms(total + 1, True)
  finally:
    (nmtune_programs.covariance_loss, nmtune_programs.gram_singular_values,
     nmtune_programs.singular_values) = saved
  z = rng.standard_normal((count, 128, dim)).astype(np.float32)
  grams = jnp.asarray(np.einsum("knd,kne->kde", z, z) if dim <= 128 else
                      np.einsum("knd,kmd->knm", z, z))
  eigh = jax.jit(jnp.linalg.eigh)
  _time_calls(lambda: eigh(grams), 1)
  out["eigh_batch_ms"] = float(np.median(_time_calls(lambda: eigh(grams), 4 * opts.repeats))) * 1e3
  floor = out["grid_step_without_cov_and_sv_ms"] + out["eigh_batch_ms"]
  out.update(_machine_floor(out, dim, count, opts))
  out = {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}
  out["step_speedup"] = round(count * out["member_step_ms"] / out["grid_step_ms"], 3)
  out["max_step_speedup"] = round(count * out["member_step_ms"] / floor, 3)
  return out


def _machine_floor(out: dict[str, Any], dim: int, count: int, opts: argparse.Namespace
                   ) -> dict[str, float]:
  """The least time a member's share of a grid step could take on this machine, whatever
  the program: its MLP's matmul FLOPs at the best matmul rate measured here (every core) plus
  its eigh (the batch's time over K) split perfectly over every usable core; the loss terms,
  BatchNorm and AdamW counted as free."""
  peak = matmul_peak_gflops(dim, opts)
  mlp_ms = mlp_flops(128, dim, opts.classes) / peak / 1e6
  cores = len(os.sched_getaffinity(0))
  eigh_ms = out["eigh_batch_ms"] / count / cores
  return {"matmul_peak_gflops": peak, "member_mlp_ms_at_peak": mlp_ms,
          "member_eigh_ms_over_all_cores": eigh_ms, "cores": cores,
          "machine_floor_per_member_ms": mlp_ms + eigh_ms,
          "max_step_speedup_at_machine_floor": out["member_step_ms"] / (mlp_ms + eigh_ms)}


def limit(step: dict[str, Any], dim: int, opts: argparse.Namespace) -> dict[str, Any]:
  """The step at `dim` against matmul peak x MLP FLOPs + AdamW's bytes at memory bandwidth."""
  peak = matmul_peak_gflops(dim, opts)
  bandwidth = memory_gbps(opts.repeats)
  num_params = dim * 4 * dim * 2 + 4 * dim * 3 + 2 * dim + dim * opts.classes + opts.classes
  # AdamW per parameter: read the gradient, m, v and the parameter; write m, v, the parameter;
  # and the gradient itself written once by the backward pass: 8 float32 passes.
  adamw_bytes = 8 * 4 * num_params
  mlp_ms = mlp_flops(128, dim, opts.classes) / peak / 1e6
  adamw_ms = adamw_bytes / bandwidth / 1e6
  return {"dim": dim, "matmul_peak_gflops": round(peak, 1), "memory_gbps": round(bandwidth, 2),
          "mlp_flops": mlp_flops(128, dim, opts.classes), "params": num_params,
          "mlp_ms_at_peak": round(mlp_ms, 2), "adamw_ms_at_bandwidth": round(adamw_ms, 2),
          "limit_ms": round(mlp_ms + adamw_ms, 2), "step_ms_median": step["step_ms_median"],
          "step_over_limit": round(step["step_ms_median"] / (mlp_ms + adamw_ms), 3)}


# ------------------------------------------------------------------------------------ main


def _torch_steps(opts: argparse.Namespace) -> dict[str, float]:
  """PyTorch's median step per D, the faster of its default and one-BLAS-thread settings."""
  runs = [run_child("torch", opts, rows=256, epochs=1, torch_blas=b).get("step_ms_median", {})
          for b in (0, 1)]
  return {name: min(r[name] for r in runs if name in r) for name in runs[0] or runs[1]}


def first_fit(opts: argparse.Namespace, has_torch: bool) -> dict[str, Any]:
  """--fit-rounds rounds, each a fresh JAX process then fresh PyTorch processes (its defaults,
  and its BLAS limited to one thread, often faster on a busy machine): each round's speedups are
  against the faster PyTorch of that round, so the two sides meet the same load."""
  rounds = []
  for _ in range(opts.fit_rounds):
    entry = {"jax": run_child("jax", opts)}
    if has_torch:  # dims "": the fits only (the step section times PyTorch's steps).
      entry["torch_default"], entry["torch_blas1"] = [
          run_child("torch", opts, torch_blas=b, dims="") for b in (0, 1)]
      good = [entry[k] for k in ("torch_default", "torch_blas1") if "error" not in entry[k]]
      if good and "error" not in entry["jax"]:
        for phase, name in (("cold", "first"), ("warm", "warm")):
          entry[f"speedup_{name}"] = round(min(r[f"{phase}_s"] for r in good)
                                           / entry["jax"][f"{phase}_s"], 3)
    rounds.append(entry)
    _log({"first_fit_round": entry})
  out: dict[str, Any] = {"rounds": rounds}
  for name in ("first", "warm"):
    values = [r[f"speedup_{name}"] for r in rounds if f"speedup_{name}" in r]
    if values:
      out[f"speedup_{name}_median"] = round(float(np.median(values)), 3)
      out[f"speedup_{name}_min"] = min(values)
  if "speedup_first_min" in out:
    out["target_first_met"] = out["speedup_first_min"] >= 1.5
  return out


def _section_done(opts: argparse.Namespace, report: dict[str, Any],
                  entry: dict[str, Any]) -> None:
  """Logs a finished section and writes the report so far (a run cut short keeps it)."""
  _log(entry)
  provenance.write("nmtune", report, opts.out, complete=False)


def _sections(opts: argparse.Namespace, report: dict[str, Any]) -> None:
  has_torch = torch_installed()
  if "first_fit" in opts.sections:
    report["first_fit"] = first_fit(opts, has_torch)
    _section_done(opts, report, {"first_fit": report["first_fit"]})
  if "grid" in opts.sections:
    report["grid"] = {}
    for dim, rows in ((64, opts.grid_rows), (512, opts.grid_rows_512)):
      if dim not in opts.grid_dims:
        continue
      entry = {"rows": rows, "configs": len(GRID)}
      for what in ("grid", "sequential"):
        entry[what] = run_child("jax", opts, dim=dim, rows=rows, what=what)
      if all("error" not in entry[w] for w in ("grid", "sequential")):
        for phase in ("cold", "warm"):
          entry[f"speedup_{phase}"] = round(entry["sequential"][f"{phase}_s"]
                                            / entry["grid"][f"{phase}_s"], 3)
        entry["configs_per_s_warm"] = round(len(GRID) / entry["grid"]["warm_s"], 3)
      report["grid"][f"D{dim}"] = entry
      _section_done(opts, report, {f"grid_D{dim}": entry})
  if "grid_bound" in opts.sections:
    report["grid_bound"] = grid_bound(opts)
    _section_done(opts, report, {"grid_bound": report["grid_bound"]})
  if "step" in opts.sections or "limit" in opts.sections:
    steps = {f"D{d}": step_case(d, opts) for d in opts.dims}
    if has_torch and "step" in opts.sections:
      torch_steps = _torch_steps(opts)
      for name, ms in torch_steps.items():
        steps[name]["torch_step_ms_median"] = ms
        steps[name]["speedup_vs_torch"] = round(ms / steps[name]["step_ms_median"], 3)
    report["step"] = steps
    _section_done(opts, report, {"step": steps})
    if "limit" in opts.sections and 2048 in opts.dims:
      report["limit"] = limit(steps["D2048"], 2048, opts)
      _section_done(opts, report, {"limit": report["limit"]})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sections", default=",".join(SECTIONS))
  parser.add_argument("--rows", type=int, default=20000, help="first_fit train rows")
  parser.add_argument("--fit-rounds", type=int, default=2, help="first_fit: interleaved rounds")
  parser.add_argument("--grid-rows", type=int, default=20000, help="grid train rows at D=64")
  parser.add_argument("--grid-rows-512", type=int, default=4000, help="grid rows at D=512")
  parser.add_argument("--grid-dims", default="64,512", help="grid: which of 64, 512")
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--bound-dim", type=int, default=64, help="grid_bound: feature dim D")
  parser.add_argument("--dims", default="512,2048", help="step: feature dims D")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed step call")
  parser.add_argument("--repeats", type=int, default=5)
  provenance.add_out_flag(parser)
  parser.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--dim", type=int, default=512, help=argparse.SUPPRESS)
  parser.add_argument("--epochs", type=int, default=5, help=argparse.SUPPRESS)
  parser.add_argument("--what", default="fit", help=argparse.SUPPRESS)
  parser.add_argument("--torch-blas", type=int, default=0, help=argparse.SUPPRESS)
  opts = parser.parse_args()
  opts.dims = [int(d) for d in str(opts.dims).split(",") if d]
  opts.grid_dims = [int(d) for d in str(opts.grid_dims).split(",") if d]
  opts.sections = [s for s in opts.sections.split(",") if s]
  unknown = set(opts.sections) - set(SECTIONS)
  if unknown:
    parser.error(f"--sections: unknown {sorted(unknown)}; allowed: {', '.join(SECTIONS)}")
  if opts.child:
    print(json.dumps((child_jax if opts.child == "jax" else child_torch)(opts)))
    return
  import jax  # pylint: disable=import-outside-toplevel
  from nmjax.nmtune import losses as nmtune_losses  # pylint: disable=import-outside-toplevel
  from nmjax.nmtune import runs as nmtune_runs  # pylint: disable=import-outside-toplevel
  report: dict[str, Any] = {"environment": {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "cpus_usable": len(os.sched_getaffinity(0)), "jax": jax.__version__,
      "python": platform.python_version(), "sv_route_auto": nmtune_losses.singular_value_route(),
      "load_average_before": round(os.getloadavg()[0], 2), "torch": torch_installed()}}
  with nmtune_runs.single_threaded_lapack():
    _sections(opts, report)
  report["environment"]["load_average_after"] = round(os.getloadavg()[0], 2)
  print(json.dumps(report, indent=1))
  provenance.write("nmtune", report, opts.out)


if __name__ == "__main__":
  main()
