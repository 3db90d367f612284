"""Generates docs/performance.md from the benchmark JSON files in docs/benchmarks/.

Every figure on the page is read from a file that a script in benchmarks/ wrote
(benchmarks/provenance.py): one section per benchmark, one table (or a few) per file, each with
the command, commit, date and machine it came from. Nothing on the page is typed by hand.

    .venv/bin/python benchmarks/performance_page.py            # rewrites docs/performance.md
    .venv/bin/python benchmarks/performance_page.py --check    # exit 1 if the page is stale
    .venv/bin/python benchmarks/performance_page.py --benchmarks /tmp/bench --out /tmp/perf.md
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Row = Sequence[Any]

INTRO = """\
# Performance

Every figure on this page comes from a JSON file in `docs/benchmarks/`, written by one of the
scripts in `benchmarks/` together with the command that produced it, the commit it ran at, the
date (UTC) and the machine: CPU model and cores, jax's device, jax's version. This page is
generated from those files by `benchmarks/performance_page.py`; no figure on it is typed by hand.

Read the figures with their machine. A shared CPU gives noisy times: compare the ratios that one
run measured side by side (JAX against PyTorch, new against old, grid against sequential), not
times from different tables. Files named `*-cpu.json` come from each script's quick settings, as
their commands show; accelerator files come from `benchmarks/device_check.sh`.
"""

REMEASURE = """\
## How to re-measure

Each table names the command that produced it; run it again from the repository root. A
script prints its JSON and writes it to `docs/benchmarks/<benchmark>-<device>.json` (`--out FILE`
or `--out FOLDER/` to write elsewhere), where `<device>` is jax's device kind (`cpu`,
`nvidia-h200`, ...). Then regenerate this page:

<!-- docs-test: skip rewrites docs/benchmarks and this page; the benchmarks take minutes -->
```bash
.venv/bin/python benchmarks/nmtune.py --sections step --dims 512,2048
.venv/bin/python benchmarks/performance_page.py
```

On a machine with a GPU or TPU, one call measures every accelerator benchmark (pre-training step
per model, CLIP step, NMTune step and grid, feature extraction of images and of BERT-Large's
text, the input pipeline on every core) in under 9 minutes, each benchmark under its own time
limit, and writes their JSON to
`docs/benchmarks/` (or the folder given as its argument). Without an accelerator it runs a short
version of itself (the same scripts at toy sizes) into a temporary folder; the tests run that.

<!-- docs-test: skip needs a GPU or TPU machine -->
```bash
bash benchmarks/device_check.sh
.venv/bin/python benchmarks/performance_page.py
```

Where the tree is a copy without git history, set `NMJAX_BENCHMARK_COMMIT` to the commit it was
copied from, so the files record it.
"""


# ------------------------------------------------------------------------------ formatting


def fmt(value: Any) -> str:
  """A figure as a table cell: thousands separated, about four significant digits."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, int):
    return f"{value:,}"
  if isinstance(value, float):
    if abs(value) >= 1000:
      return f"{value:,.0f}"
    if abs(value) >= 100:
      return f"{value:.1f}"
    return f"{value:.4g}"
  if isinstance(value, (list, tuple)):
    return " / ".join(fmt(v) for v in value)
  return str(value).replace("|", "\\|")


def percent(value: Any) -> str:
  return "-" if value is None else f"{100 * value:.1f}%"


def shape(value: Any) -> str:
  return "x".join(str(v) for v in value) if value else "-"


def table(header: Sequence[str], rows: Iterable[Row]) -> str:
  """A markdown table; columns where no row has a value are left out."""
  rows = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
  keep = [i for i in range(len(header)) if any(row[i] not in ("-", "") for row in rows)]
  lines = ["| " + " | ".join(header[i] for i in keep) + " |",
           "|" + "|".join("---" for _ in keep) + "|"]
  lines += ["| " + " | ".join(row[i] for i in keep) + " |" for row in rows]
  return "\n".join(lines)


def pairs(mapping: dict[str, Any], names: dict[str, str] | None = None) -> str:
  """A two-column table of a flat dict's scalar entries (names: labels for some keys)."""
  names = names or {}
  rows = [(names.get(k, k.replace("_", " ")), v) for k, v in mapping.items()
          if not isinstance(v, (dict, list))]
  return table(("what", "value"), rows)


def get(mapping: Any, *path: str) -> Any:
  """mapping[path[0]][path[1]]..., None where any step is missing."""
  for key in path:
    if not isinstance(mapping, dict) or key not in mapping:
      return None
    mapping = mapping[key]
  return mapping


# ------------------------------------------------------------------------------ provenance


def provenance_line(record: dict[str, Any], source: str) -> str:
  """The command, commit, date and machine of one file, as a paragraph under its table."""
  machine = record.get("machine", {})
  device = machine.get("device_kind", "?")
  count = machine.get("device_count")
  if count and count > 1:
    device = f"{count} x {device}"
  cores = machine.get("cpus_usable") or machine.get("cpu_cores")
  commit = record.get("commit")
  commit_text = f"`{commit[:12]}`" if commit else "unknown"
  if commit and record.get("worktree_clean") is False:
    commit_text += " with local changes"
  date = str(record.get("date", "?")).replace("T", " ").replace("Z", " UTC")
  load = record.get("load_average")
  load_text = "" if load is None else f", load average {fmt(float(load))} at the end"
  platform = machine.get("device_platform", "?")
  device = "jax's CPU backend" if platform == "cpu" else f"{device} ({platform})"
  text = (f"Machine: {machine.get('cpu_model', '?')}, {cores} cores{load_text}; device: "
          f"{device}; jax {machine.get('jax', '?')}. "
          f"Commit {commit_text}, {date}. Source: [{source}](benchmarks/{source}).")
  if not record.get("complete", True):
    text += " **Incomplete**: the run stopped before its last case."
  return f"{text}\n\nCommand: `{record.get('command', '?')}`"


# ------------------------------------------------------------------------------ per benchmark


def pretrain_tables(figures: dict[str, Any]) -> list[str]:
  rows = []
  for name, e in figures.items():
    if not isinstance(e, dict) or "images_per_s" not in e:
      continue
    torch = e.get("torch_eager", {})
    rows.append((name, e.get("batch"), shape(e.get("image_shape")), e.get("dtype"),
                 e.get("images_per_s"), e.get("step_ms_median"), e.get("compile_s"),
                 e.get("gflops_per_image"), e.get("tflops_per_s"),
                 percent(e.get("mfu")), torch.get("images_per_s"),
                 e.get("jax_over_torch_speed")))
  header = ("model", "batch", "image", "dtype", "images/s", "step ms (median)", "compile s",
            "GFLOP/image", "TFLOP/s", "MFU", "PyTorch eager images/s", "JAX / PyTorch speed")
  return [table(header, rows)]


def clip_tables(figures: dict[str, Any]) -> list[str]:
  rows = []
  for e in figures.get("cases", []):
    flops = e.get("flops_per_pair")
    rows.append((e.get("model"), e.get("batch"), shape(e.get("image_shape")), e.get("dtype"),
                 e.get("images_per_sec"), e.get("step_seconds_median"), e.get("compile_seconds"),
                 None if flops is None else flops / 1e9, e.get("achieved_tflops"),
                 percent(e.get("mfu")), percent(e.get("cpu_matmul_fraction"))))
  header = ("model", "batch", "image", "dtype", "pairs/s", "step s (median)", "compile s",
            "GFLOP/pair", "TFLOP/s", "MFU", "of the CPU matmul rate")
  out = [table(header, rows)]
  if figures.get("cpu_matmul_gflops") is not None:
    out.append(f"Float32 matmul rate measured in the same run: "
               f"{fmt(figures['cpu_matmul_gflops'])} GFLOP/s.")
  return out


def nmtune_step_table(steps: dict[str, Any]) -> str:
  rows = []
  for name, e in steps.items():
    routes = e.get("sv_routes_fwd_bwd_ms", {})
    rows.append((name.lstrip("D"), e.get("sv_route"), e.get("step_ms_median"),
                 e.get("steps_per_s"), e.get("rows_per_s"), e.get("first_call_s"),
                 routes.get("gram"), routes.get("svd"), e.get("torch_step_ms_median"),
                 e.get("speedup_vs_torch")))
  header = ("D", "singular-value route", "step ms (median)", "steps/s", "rows/s",
            "first call s", "gram route fwd+bwd ms", "svd route fwd+bwd ms",
            "PyTorch step ms", "speed-up vs PyTorch")
  return "Step (128 rows, reference weights):\n\n" + table(header, rows)


def nmtune_grid_table(grid: dict[str, Any]) -> str:
  rows = []
  for name, e in grid.items():
    g, s = e.get("grid", {}), e.get("sequential", {})
    rows.append((name.lstrip("D"), e.get("rows"), e.get("configs"), g.get("cold_s"),
                 g.get("warm_s"), s.get("cold_s"), s.get("warm_s"), e.get("speedup_cold"),
                 e.get("speedup_warm"), g.get("error") or s.get("error")))
  header = ("D", "rows", "configs", "grid s (cold)", "grid s (warm)", "sequential s (cold)",
            "sequential s (warm)", "speed-up (cold)", "speed-up (warm)", "error")
  return "One `fit_grid` program against sequential `fit` calls:\n\n" + table(header, rows)


def nmtune_first_fit_table(first: dict[str, Any]) -> str:
  rows = []
  for i, e in enumerate(first.get("rounds", []), 1):
    torch = [e[k] for k in ("torch_default", "torch_blas1") if k in e and "error" not in e[k]]
    rows.append((i, get(e, "jax", "cold_s"), get(e, "jax", "warm_s"),
                 min((t["cold_s"] for t in torch), default=None),
                 min((t["warm_s"] for t in torch), default=None),
                 e.get("speedup_first"), e.get("speedup_warm")))
  header = ("run", "nmjax first fit s", "nmjax again s", "PyTorch first s", "PyTorch again s",
            "speed-up (first)", "speed-up (again)")
  return "A fresh process's first `fit` and the same fit again:\n\n" + table(header, rows)


def nmtune_tables(figures: dict[str, Any]) -> list[str]:
  out = []
  if figures.get("first_fit"):
    out.append(nmtune_first_fit_table(figures["first_fit"]))
  if figures.get("step"):
    out.append(nmtune_step_table(figures["step"]))
  if figures.get("grid"):
    out.append(nmtune_grid_table(figures["grid"]))
  if figures.get("grid_bound"):
    out.append("What bounds the grid step:\n\n" + pairs(figures["grid_bound"]))
  if figures.get("limit"):
    out.append("The step against this machine's matmul rate and memory bandwidth:\n\n"
               + pairs(figures["limit"]))
  return out


def features_tables(figures: dict[str, Any]) -> list[str]:
  rows = [(name, e.get("batch"), e.get("examples"), shape(e.get("image_shape")), e.get("dtype"),
           e.get("feature_dim"), e.get("devices"), e.get("images_per_s"),
           e.get("encode_only_images_per_s"), e.get("first_call_s"))
          for name, e in figures.get("models", {}).items()]
  header = ("model", "batch", "examples", "image", "dtype", "feature dim", "devices",
            "images/s (extract)", "images/s (encoder alone)", "first call s")
  return [table(header, rows)]


def text_features_tables(figures: dict[str, Any]) -> list[str]:
  rows = [(name, e.get("length"), e.get("batch"), e.get("examples"), e.get("mean_real_tokens"),
           e.get("dtype"), e.get("pooling"), e.get("feature_dim"), e.get("devices"),
           e.get("sequences_per_s"), e.get("encode_only_sequences_per_s"),
           e.get("first_call_s"))
          for name, e in figures.get("models", {}).items()]
  header = ("model", "length", "batch", "sequences", "mean real tokens", "dtype", "pooling",
            "feature dim", "devices", "sequences/s (extract)", "sequences/s (encoder alone)",
            "first call s")
  return [table(header, rows)]


def seeds_tables(figures: dict[str, Any]) -> list[str]:
  out = []
  runs = figures.get("runs")
  if runs:
    out.append(table(("runs", "steps each", "batch", "one after another s", "side by side s",
                      "speed-up", "largest parameter difference"),
                     [(runs.get("runs"), runs.get("steps"), runs.get("batch"),
                       runs.get("separate_s"), runs.get("side_by_side_s"), runs.get("speed_up"),
                       runs.get("max_param_difference"))]))
  step = figures.get("step")
  if step:
    out.append(table(("runs", "batch", "K plain steps s", "vmapped, unrolled convolutions s",
                      "speed-up", "vmapped, grouped convolutions s", "speed-up"),
                     [(step.get("runs"), step.get("batch"), step.get("plain_steps_s"),
                       step.get("vmapped_unroll_s"), step.get("speed_up_unroll"),
                       step.get("vmapped_group_s"), step.get("speed_up_group"))]))
    defaults = step.get("xla_defaults")
    if defaults:
      out.append(table(("compiled with", "K plain steps s", "vmapped, unrolled convolutions s"),
                       [("the runs' options " + ", ".join(
                           f"`{k}={v!r}`" for k, v in (step.get("compiler_options") or {}).items()),
                         step.get("plain_steps_s"), step.get("vmapped_unroll_s")),
                        ("XLA's defaults (not bitwise side by side)",
                         defaults.get("plain_steps_s"), defaults.get("vmapped_unroll_s"))]))
  return out


def input_tables(figures: dict[str, Any]) -> list[str]:
  rows = []
  for e in figures.get("pipeline", []):
    old, new = e.get("old", {}), e.get("new", {})
    rows.append((e.get("workers"), e.get("threads"), old.get("images_per_s"),
                 new.get("images_per_s"), old.get("images_per_sec_per_core"),
                 new.get("images_per_sec_per_core"), e.get("new_over_old_per_core"),
                 new.get("cores_used")))
  header = ("worker processes", "threads", "old images/s", "new images/s",
            "old images per CPU-second", "new images per CPU-second", "new / old per core",
            "cores used (new)")
  out = ["Train pipeline (224 random-resized crop and flip), old path against new:\n\n"
         + table(header, rows)]
  transform = [(name, e.get("old_ms"), e.get("new_ms"), e.get("old_images_per_cpu_s"),
                e.get("new_images_per_cpu_s"))
               for name, e in figures.get("transform", {}).items()]
  out.append("Decode, crop and flip alone, CPU ms per image:\n\n" + table(
      ("JPEGs", "old ms", "new ms", "old images per CPU-second", "new images per CPU-second"),
      transform))
  if figures.get("profile_cpu_ms_per_image"):
    out.append("CPU ms per image of each stage:\n\n" + table(
        ("stage", "CPU ms per image"), list(figures["profile_cpu_ms_per_image"].items())))
  dataset = figures.get("dataset", {})
  if dataset:
    out.append(f"Synthetic JPEGs: {fmt(dataset.get('images'))} at a mean of "
               f"{fmt(dataset.get('mean_jpeg_kb'))} KB; larger ones at "
               f"{fmt(dataset.get('large_mean_jpeg_kb'))} KB.")
  return out


def probe_tables(figures: dict[str, Any]) -> list[str]:
  rows = []
  for name, e in figures.get("tasks", {}).items():
    lp, ridge = e.get("linear_probe", {}), e.get("ridge_probe", {})
    sk = e.get("sklearn_logistic_regression", {})
    rows.append((name, f"{fmt(e.get('num_train'))} / {fmt(e.get('num_test'))}",
                 e.get("feature_dim"), percent(lp.get("accuracy")), lp.get("seconds"),
                 percent(ridge.get("accuracy")), ridge.get("seconds"),
                 ridge.get("seconds_compiled"), percent(sk.get("accuracy")), sk.get("seconds"),
                 sk.get("iterations"), e.get("ridge_speedup_vs_sklearn")))
  header = ("task", "train / test", "D", "linear_probe", "linear_probe s", "ridge_probe",
            "ridge_probe s", "ridge_probe s (compiled)", "scikit-learn", "scikit-learn s",
            "lbfgs iterations", "ridge speed-up")
  out = [table(header, rows)]
  if figures.get("sklearn"):
    out.append(f"scikit-learn: {figures['sklearn']}; BLAS threads: "
               f"{fmt(figures.get('blas_threads'))}.")
  return out


def generic_tables(figures: Any) -> list[str]:
  """Any other benchmark: its scalar figures, by their JSON path."""
  flat: list[tuple[str, Any]] = []

  def walk(value: Any, path: str) -> None:
    if isinstance(value, dict):
      for k, v in value.items():
        walk(v, f"{path}.{k}" if path else str(k))
    elif not isinstance(value, list):
      flat.append((path, value))

  walk(figures, "")
  return [table(("figure", "value"), flat)]


SECTIONS: dict[str, tuple[str, str, Callable[[Any], list[str]]]] = {
    "pretrain": ("Pre-training step", "`benchmarks/pretrain.py`: the project's jitted train step "
                 "(forward, backward, update, BatchNorm statistics; state donated). FLOPs are "
                 "XLA:CPU's count of the same step; MFU is against the chip's peak dense bf16 "
                 "rate.", pretrain_tables),
    "clip": ("CLIP step", "`benchmarks/clip.py`: the contrastive train step (both towers, "
             "symmetric InfoNCE, AdamW), jitted with the state donated.", clip_tables),
    "nmtune": ("NMTune", "`benchmarks/nmtune.py`: the NMTune head's step as `fit` runs it, the "
               "K = 16 grid as one program against sequential fits, and, where run, the first "
               "fit against a plain PyTorch loop.", nmtune_tables),
    "features": ("Feature extraction", "`benchmarks/features.py`: `nmjax.features.extract` of "
                 "a frozen encoder over padded, masked batches, end to end and the encoder "
                 "alone.", features_tables),
    "text_features": ("Text feature extraction", "`benchmarks/text_features.py`: "
                      "`nmjax.features.extract` of a randomly initialised text encoder (BERT, "
                      "RoBERTa, GPT-2 at their published sizes) over padded, masked token "
                      "batches, end to end and the encoder alone.", text_features_tables),
    "seeds": ("Seeds side by side", "`benchmarks/seeds.py`: the study's pre-training runs "
              "trained one after another (each a whole run: data, steps, checkpoints, the test "
              "evaluation) against the same runs side by side in one vmapped program, both "
              "with their compilation; and the train step alone.", seeds_tables),
    "input": ("ImageNet input pipeline", "`benchmarks/input.py`: the training input on "
              "synthetic JPEGs of ImageNet's sizes; images per CPU-second count this process "
              "and its workers.", input_tables),
    "probe": ("Probes", "`benchmarks/probe.py`: nmjax's probes against scikit-learn's logistic "
              "regression on the same features (seconds include compilation on a first call).",
              probe_tables),
}


# ------------------------------------------------------------------------------ the page


def load(folder: str) -> list[tuple[str, dict[str, Any]]]:
  """(file name, record) of every *.json in `folder`, sorted by name."""
  found = []
  for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
    with open(path) as f:
      found.append((os.path.basename(path), json.load(f)))
  return found


def section(title: str, about: str, render: Callable[[Any], list[str]],
            files: list[tuple[str, dict[str, Any]]]) -> str:
  parts = [f"## {title}", about]
  for source, record in files:
    machine = record.get("machine", {})
    where = (f"CPU: {machine.get('cpu_model', '?')}" if machine.get("device_platform") == "cpu"
             else machine.get("device_kind", "?"))
    parts.append(f"### {where}")
    parts += render(record.get("figures", {}))
    parts.append(provenance_line(record, source))
  return "\n\n".join(parts)


def render(folder: str) -> str:
  """The whole page from the JSON files in `folder`."""
  records = load(folder)
  parts = [INTRO]
  names = list(SECTIONS) + sorted({r.get("benchmark", s.rsplit("-", 1)[0]) for s, r in records}
                                  - set(SECTIONS))
  for name in names:
    files = [(s, r) for s, r in records if r.get("benchmark", s.rsplit("-", 1)[0]) == name]
    if files:
      title, about, renderer = SECTIONS.get(name, (name, f"`{name}`", generic_tables))
      parts.append(section(title, about, renderer, files))
  if not records:
    parts.append("No benchmark files yet: run the commands below.")
  parts.append(REMEASURE)
  return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--benchmarks", default=os.path.join(REPO, "docs", "benchmarks"),
                      help="the folder of benchmark JSON files")
  parser.add_argument("--out", default=os.path.join(REPO, "docs", "performance.md"))
  parser.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if --out differs from the generated page")
  args = parser.parse_args(argv)
  page = render(args.benchmarks)
  if args.check:
    current = open(args.out).read() if os.path.exists(args.out) else None
    if current != page:
      print(f"{args.out} is not the page generated from {args.benchmarks}: run "
            f"benchmarks/performance_page.py", file=sys.stderr)
      return 1
    return 0
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(page)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
