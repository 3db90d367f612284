"""The embedded study (configs/default.py): pre-train with label noise r, then measure downstream.

For each seed and noise ratio r of the sweep, two stages run in the workdir:
  pretrain/seed<S>_r<R>/   the pre-training job (nmjax/jobs/pretrain.py) with noise r and seed S;
  eval/seed<S>_r<R>/       the NMTune job's checkpoint mode (nmjax/jobs/nmtune.py): every method
                           on every task over the frozen encoder, with SVE/LSVR and the singular
                           value spectrum of each task's test features.
A stage that finishes writes stage.json (its config and results) atomically; a stage whose
stage.json is there and whose config is the same is reused, never run again. A killed pre-training
stage resumes from its last checkpoint with bitwise the same outcome (nmjax/train/loop.py); a
killed evaluation stage runs again, reusing the features it had cached; every fit is seeded. So a
study killed anywhere and started again ends with the same numbers as an uninterrupted one.

The report, rendered from the stages' stage.json files after every run:
  results.jsonl             every number: one "pretrain" record per (seed, r), one "task"
                            record per (seed, r, task, method), one "spectrum" record per
                            (seed, r, task)
  results.md                rows r; ID and OOD averages per method (mean +- std over seeds when
                            there are several), then per-task tables
  accuracy_vs_noise.png     ID and OOD average accuracy against r, one line per method
  spectra.png               singular value spectra for each r on one ID and one OOD task
  spectral_vs_noise.png     SVE (ID tasks) and LSVR (OOD tasks) against r
  tb/seed<S>/               the same numbers as TensorBoard scalars, r (per mille) as the step
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from nmjax import nmtune, plots, tasks as tasks_lib
from nmjax.errors import ConfigError
from nmjax.jobs import nmtune as nmtune_job
from nmjax.jobs import prepare_workdir
from nmjax.jobs import pretrain as pretrain_job
from nmjax.jobs import transfer
from nmjax.progress import format_seconds

# Fields of the pre-training and NMTune job configs that the study sets for each stage; they are
# not fields of config.pretrain and config.nmtune.
_DISTRIBUTED = ("distributed", "coordinator_address", "num_processes", "process_id")
PRETRAIN_OWNED = ("job", "noise_ratio", "seed", "data_dir", "record_examples", *_DISTRIBUTED)
NMTUNE_OWNED = ("job", "method", "tasks", "train_features", "test_features", "checkpoint", "step",
                "seed", "data_dir", "num_classes", "logit_subset", *_DISTRIBUTED)
# Fields that cannot change a stage's numbers: a finished stage is reused whatever they are.
_NOT_IDENTITY = ("log_every_steps", "checkpoint_every_steps", "max_to_keep", "data_dir",
                 "checkpoint")
STAGE_FILE = "stage.json"
REPORT_FILES = ("results.jsonl", "results.md", "accuracy_vs_noise.png", "spectra.png",
                "spectral_vs_noise.png")


@dataclasses.dataclass(frozen=True)
class Point:
  """One point of the sweep: a seed and a noise ratio."""
  seed: int
  noise_ratio: float

  @property
  def name(self) -> str:
    return f"seed{self.seed}_r{self.noise_ratio:g}"

  def __str__(self) -> str:
    return f"seed {self.seed} r={self.noise_ratio:g}"


@dataclasses.dataclass(frozen=True)
class Plan:
  points: list[Point]
  ratios: list[float]
  seeds: list[int]
  methods: list[str]
  tasks: list[tasks_lib.Task]
  spectrum_tasks: list[str]


def _numbers(config: ml_collections.ConfigDict, field: str, kind: type,
             check: Callable[[Any], bool], allowed: str) -> list:
  """A comma-separated list of numbers in a config field, each checked, no duplicates."""
  items = [t.strip() for t in str(config[field]).split(",") if t.strip()]
  if not items:
    raise ConfigError(f"config.{field} is empty; allowed: {allowed}")
  values = []
  for item in items:
    try:
      value = kind(item)
    except ValueError:
      what = "an integer" if kind is int else "a number"
      raise ConfigError(f"config.{field} entry {item!r} is not {what};"
                        f" allowed: {allowed}") from None
    if not check(value):
      raise ConfigError(f"config.{field} entry {item!r} is out of range; allowed: {allowed}")
    if value in values:
      raise ConfigError(f"config.{field} lists {item!r} twice")
    values.append(value)
  return values


def pretrain_config(config: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  """The pre-training job's config of one point of the sweep."""
  cfg = ml_collections.ConfigDict(config.pretrain.to_dict())
  cfg.job = "pretrain"
  cfg.noise_ratio = float(point.noise_ratio)
  cfg.seed = int(point.seed)
  cfg.data_dir = config.data_dir
  cfg.record_examples = False
  cfg.distributed, cfg.coordinator_address, cfg.num_processes, cfg.process_id = "none", "", 1, 0
  return cfg


def eval_config(config: ml_collections.ConfigDict, point: Point,
                checkpoint: str) -> ml_collections.ConfigDict:
  """The NMTune job's config (checkpoint mode) of one point of the sweep."""
  cfg = ml_collections.ConfigDict(config.nmtune.to_dict())
  cfg.job = "nmtune"
  cfg.method = config.methods
  cfg.tasks = config.tasks
  cfg.train_features, cfg.test_features = "", ""
  cfg.checkpoint = checkpoint
  cfg.step = -1
  cfg.seed = int(point.seed)
  cfg.data_dir = config.data_dir
  cfg.distributed, cfg.coordinator_address, cfg.num_processes, cfg.process_id = "none", "", 1, 0
  return cfg


def validate(config: ml_collections.ConfigDict) -> Plan:
  """Checks the whole study's config, every stage's included, before any work."""
  ratios = _numbers(config, "noise_ratios", float, lambda r: 0 <= r < 1,
                    "numbers 0 <= r < 1, comma-separated, e.g. 0,0.05,0.1,0.2,0.3")
  seeds = _numbers(config, "seeds", int, lambda s: 0 <= s < 2**32,
                   "integers 0 <= seed < 2**32, comma-separated, e.g. 0,1,2")
  methods = transfer.parse_list(config, "methods", nmtune.METHODS)
  chosen = tasks_lib.resolve(config.tasks)
  names = [t.name for t in chosen]
  spectrum_tasks = transfer.parse_list(config, "spectrum_tasks", names)
  points = [Point(seed, ratio) for seed in seeds for ratio in ratios]
  for point in points[:1]:
    pretrain_job.validate(pretrain_config(config, point))
    nmtune_job.validate(eval_config(config, point, checkpoint="<pretrain stage>"))
  return Plan(points, ratios, seeds, methods, chosen, spectrum_tasks)


# ----------------------------------------------------------------------------------------------
# Stages.


def _identity(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """What must match for a finished stage to be reused (JSON-normalized)."""
  fields = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IDENTITY}
  return json.loads(json.dumps(fields, default=str))


def _check_same(saved: dict[str, Any], current: dict[str, Any], what: str, workdir: str) -> None:
  diff = [f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}"
          for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  if diff:
    raise ConfigError(f"--workdir={workdir} holds {what} of a different study ("
                      + "; ".join(diff[:3]) + ("; ..." if len(diff) > 3 else "")
                      + "); use a new --workdir or the same config")


def _read_json(path: str) -> dict[str, Any] | None:
  """A finished stage's record; None when absent or torn (the stage then runs again)."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    print(f"[study] {path} is unreadable; running its stage again", flush=True)
    return None


def _write_json(path: str, record: dict[str, Any]) -> None:
  transfer.write_atomic(path, json.dumps(record, indent=1) + "\n")


class _Preempted(Exception):
  pass


def _finished(stage_dir: str, cfg: ml_collections.ConfigDict, what: str,
              workdir: str) -> dict[str, Any] | None:
  """A finished stage's record (its config checked against `cfg`), or None."""
  saved = _read_json(os.path.join(stage_dir, STAGE_FILE))
  if saved is not None:
    _check_same(saved["config"], _identity(cfg), what, workdir)
    saved["workdir"] = os.path.abspath(stage_dir)  # Where it is now: a workdir may have moved.
  return saved


def _run_pretrain(cfg: ml_collections.ConfigDict, point: Point, stage_dir: str,
                  workdir: str) -> dict[str, Any]:
  """Runs (or, after a kill, resumes) a pre-training stage; returns its record."""
  started = _read_json(os.path.join(stage_dir, "config.json"))
  if started is not None:  # Killed mid-way: the pre-training job resumes from its checkpoint.
    _check_same(_identity(ml_collections.ConfigDict(started)), _identity(cfg),
                f"a pre-training run {point.name}", workdir)
  start = time.perf_counter()
  result = pretrain_job.run(cfg, stage_dir)
  if result.get("preempted"):
    raise _Preempted(f"pre-training {point}")
  keep = ("step", "epoch", "test_acc", "test_loss", "test_count", "train_loss", "train_acc_noisy",
          "train_acc_clean", "examples_per_sec")
  record = {"config": _identity(cfg), "workdir": os.path.abspath(stage_dir),
            "result": {k: result[k] for k in keep if k in result},
            "seconds": time.perf_counter() - start}
  _write_json(os.path.join(stage_dir, STAGE_FILE), record)
  return record


def _run_eval(cfg: ml_collections.ConfigDict, plan: Plan, stage_dir: str) -> dict[str, Any]:
  """Runs an evaluation stage (reusing the features it cached before a kill); its record."""
  start = time.perf_counter()
  out = nmtune_job.run_checkpoint(cfg, plan.methods, plan.tasks, stage_dir, echo=False)
  record = {"config": _identity(cfg), "workdir": os.path.abspath(stage_dir), "rows": out["rows"],
            "spectra": out["spectra"], "seconds": time.perf_counter() - start}
  _write_json(os.path.join(stage_dir, STAGE_FILE), record)
  return record


class _Clock:
  """The study's elapsed time and ETA: stages still to run, times the mean of that kind so far."""

  def __init__(self, pending: dict[str, int]):
    self.start = time.perf_counter()
    self.pending = dict(pending)
    self.seconds: dict[str, list[float]] = {kind: [] for kind in pending}

  def done(self, kind: str, seconds: float) -> None:
    self.seconds[kind].append(seconds)
    self.pending[kind] = max(0, self.pending[kind] - 1)

  def line(self) -> str:
    measured = [s for values in self.seconds.values() for s in values]
    elapsed = f"elapsed {format_seconds(time.perf_counter() - self.start)}"
    if not measured:
      return f"{elapsed} | ETA ?"
    eta = sum(n * float(np.mean(self.seconds[kind] or measured))
              for kind, n in self.pending.items())
    return f"{elapsed} | ETA {format_seconds(eta)}"


def _averages(rows: list[dict[str, Any]], method: str) -> dict[str, float]:
  return {kind: float(np.mean(a)) for kind in tasks_lib.KINDS
          if (a := [r["accuracy"] for r in rows if r["method"] == method and r["kind"] == kind])}


# ----------------------------------------------------------------------------------------------
# The report.


def _records(plan: Plan, stages: dict[Point, tuple[dict, dict]]) -> list[dict[str, Any]]:
  """results.jsonl's records, from the finished stages."""
  records = []
  for point in plan.points:
    pre, ev = stages[point]
    common = {"seed": point.seed, "noise_ratio": point.noise_ratio}
    records.append({"record": "pretrain", **common, **pre["result"],
                    "seconds": pre["seconds"], "workdir": pre["workdir"]})
    for row in ev["rows"]:
      records.append({"record": "task", **common, **{k: v for k, v in row.items()
                                                     if k not in ("seed", "noise_ratio")}})
    for task in plan.tasks:
      spectrum = ev["spectra"][task.name]
      records.append({"record": "spectrum", **common, "task": task.name, "kind": task.kind,
                      **spectrum})
  return records


def _mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  mean = float(np.mean(values))
  return mean, float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _cell(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
  if not values:
    return "-"
  mean, std = _mean_std([scale * v for v in values])
  return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


class Table:
  """Per-seed numbers of the report, indexed for the tables, plots and scalars."""

  def __init__(self, plan: Plan, records: list[dict[str, Any]]):
    self.plan = plan
    self.records = records
    self.kinds = {t.name: t.kind for t in plan.tasks}

  def _seed_values(self, ratio: float, fn: Callable[[list[dict]], float | None]) -> list[float]:
    values = []
    for seed in self.plan.seeds:
      value = fn([r for r in self.records if r["seed"] == seed and r["noise_ratio"] == ratio])
      if value is not None:
        values.append(value)
    return values

  def avg_accuracy(self, ratio: float, method: str, kind: str) -> list[float]:
    def fn(rows):
      accs = [r["accuracy"] for r in rows if r["record"] == "task" and r["method"] == method
              and r["kind"] == kind]
      return float(np.mean(accs)) if accs else None
    return self._seed_values(ratio, fn)

  def accuracy(self, ratio: float, method: str, task: str) -> list[float]:
    return self._seed_values(ratio, lambda rows: next(
        (r["accuracy"] for r in rows if r["record"] == "task" and r["method"] == method
         and r["task"] == task), None))

  def spectral(self, ratio: float, metric: str, task: str | None = None,
               kind: str | None = None) -> list[float]:
    def fn(rows):
      values = [r[metric] for r in rows if r["record"] == "spectrum"
                and (task is None or r["task"] == task) and (kind is None or r["kind"] == kind)]
      return float(np.mean(values)) if values else None
    return self._seed_values(ratio, fn)

  def pretrain(self, ratio: float, field: str) -> list[float]:
    return self._seed_values(ratio, lambda rows: next(
        (r[field] for r in rows if r["record"] == "pretrain" and field in r), None))


def _ratio_label(ratio: float) -> str:
  return f"{100 * ratio:g}%"


def format_summary(table: Table) -> str:
  """The study's main table: rows r, ID and OOD averages per method (and the spectral metrics)."""
  plan = table.plan
  head = (["r", "pretrain test acc"] + [f"ID {m}" for m in plan.methods]
          + [f"OOD {m}" for m in plan.methods] + ["SVE (ID)", "LSVR (OOD)"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for ratio in plan.ratios:
    cells = [_ratio_label(ratio), _cell(table.pretrain(ratio, "test_acc"))]
    for kind in tasks_lib.KINDS:
      cells += [_cell(table.avg_accuracy(ratio, m, kind)) for m in plan.methods]
    cells += [_cell(table.spectral(ratio, "sve", kind="id"), 1, 4),
              _cell(table.spectral(ratio, "lsvr", kind="ood"), 1, 4)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def format_md(table: Table, header: str) -> str:
  """results.md: the main table, then per-task tables (accuracy per method, SVE, LSVR)."""
  plan = table.plan
  names = [t.name for t in plan.tasks]
  task_head = ["r"] + [f"{n} ({table.kinds[n].upper()})" for n in names]

  def task_table(title: str, cell: Callable[[float, str], str]) -> list[str]:
    lines = [f"\n## {title}\n", "| " + " | ".join(task_head) + " |", "|" + "---|" * len(task_head)]
    for ratio in plan.ratios:
      lines.append("| " + " | ".join([_ratio_label(ratio)] + [cell(ratio, n) for n in names])
                   + " |")
    return lines

  parts = ["# Embedded study: label noise in pre-training, measured downstream\n", header, "",
           format_summary(table)]
  for method in plan.methods:
    parts += task_table(f"{method}: test accuracy (%) per task",
                        lambda r, n, m=method: _cell(table.accuracy(r, m, n)))
  parts += task_table("SVE of the frozen test features per task",
                      lambda r, n: _cell(table.spectral(r, "sve", task=n), 1, 4))
  parts += task_table("LSVR of the frozen test features per task",
                      lambda r, n: _cell(table.spectral(r, "lsvr", task=n), 1, 4))
  return "\n".join(parts) + "\n"


def _errorbar(ax, xs: list[float], series: list[list[float]], **kwargs) -> None:
  stats = [_mean_std(v) if v else (math.nan, 0.0) for v in series]
  ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, marker="o",
              markersize=3, **kwargs)


_NOISE_AXIS = "pre-training label noise r (%)"


def plot_accuracy(table: Table, path: str, title: str) -> None:
  """accuracy_vs_noise.png: ID and OOD average accuracy against r, one line per method."""
  plt = plots.pyplot()
  plan = table.plan
  xs = [100 * r for r in plan.ratios]
  fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2), dpi=100)
  for ax, kind in zip(axes, tasks_lib.KINDS):
    for method in plan.methods:
      _errorbar(ax, xs, [[100 * v for v in table.avg_accuracy(r, method, kind)]
                         for r in plan.ratios], label=method,
                linestyle="--" if method.startswith("lp") else "-")
    plots.label_axes(ax, title=f"{kind.upper()} average accuracy", xlabel=_NOISE_AXIS,
                     ylabel="test accuracy (%)")
  fig.suptitle(title, fontsize=9)
  plots.save(fig, path)


def plot_spectra(table: Table, path: str, title: str) -> None:
  """spectra.png: sigma_k / sum(sigma) for each r (first seed) on one ID and one OOD task."""
  plt = plots.pyplot()
  plan = table.plan
  seed = plan.seeds[0]
  fig, axes = plt.subplots(1, len(plan.spectrum_tasks), figsize=(4.0 * len(plan.spectrum_tasks),
                                                                 3.2), dpi=100, squeeze=False)
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(plan.ratios)))
  for ax, name in zip(axes.flat, plan.spectrum_tasks):
    for color, ratio in zip(colors, plan.ratios):
      record = next(r for r in table.records if r["record"] == "spectrum" and r["seed"] == seed
                    and r["noise_ratio"] == ratio and r["task"] == name)
      p = np.asarray(record["spectrum"])
      p = p[p > 1e-6 * p[0]]  # Row centering removes one direction: its ~0 would flatten the plot.
      ax.semilogy(np.arange(1, len(p) + 1), p, color=color,
                  label=f"r={_ratio_label(ratio)} (SVE {record['sve']:.3f}, LSVR"
                        f" {record['lsvr']:.3f})")
    plots.label_axes(ax, title=f"{name} ({table.kinds[name].upper()}) test features, seed {seed}",
                     xlabel="k", ylabel="sigma_k / sum(sigma)", legend_fontsize=6)
  fig.suptitle(title, fontsize=9)
  plots.save(fig, path)


def plot_spectral(table: Table, path: str, title: str) -> None:
  """spectral_vs_noise.png: SVE on ID tasks and LSVR on OOD tasks against r (average and each
  task)."""
  plt = plots.pyplot()
  plan = table.plan
  xs = [100 * r for r in plan.ratios]
  fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2), dpi=100)
  for ax, (metric, kind) in zip(axes, (("sve", "id"), ("lsvr", "ood"))):
    for task in plan.tasks:
      if task.kind == kind:
        _errorbar(ax, xs, [table.spectral(r, metric, task=task.name) for r in plan.ratios],
                  label=task.name, linewidth=0.8, alpha=0.6)
    _errorbar(ax, xs, [table.spectral(r, metric, kind=kind) for r in plan.ratios],
              label=f"{kind.upper()} average", color="black", linewidth=1.8)
    plots.label_axes(ax, title=f"{metric.upper()} of frozen features, {kind.upper()} tasks",
                     xlabel=_NOISE_AXIS, ylabel=metric.upper(), legend_fontsize=6)
  fig.suptitle(title, fontsize=9)
  plots.save(fig, path)


def write_scalars(table: Table, root: str) -> None:
  """TensorBoard: one run per seed under root (rewritten), r in per mille as the step."""
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  shutil.rmtree(root, ignore_errors=True)
  plan = table.plan
  for seed in plan.seeds:
    writer = SummaryWriter(os.path.join(root, f"seed{seed}"))
    for record in table.records:
      if record["seed"] != seed:
        continue
      step = int(round(1000 * record["noise_ratio"]))
      if record["record"] == "pretrain" and "test_acc" in record:
        writer.add_scalar("pretrain/test_acc", record["test_acc"], step)
      elif record["record"] == "task":
        writer.add_scalar(f"accuracy/{record['task']}/{record['method']}", record["accuracy"],
                          step)
      elif record["record"] == "spectrum":
        writer.add_scalar(f"spectral/{record['task']}/sve", record["sve"], step)
        writer.add_scalar(f"spectral/{record['task']}/lsvr", record["lsvr"], step)
    # The averages, as the tables compute them, over this seed alone.
    one_seed = Table(dataclasses.replace(plan, seeds=[seed]), table.records)
    for ratio in plan.ratios:
      step = int(round(1000 * ratio))
      for method in plan.methods:
        for kind in tasks_lib.KINDS:
          for value in one_seed.avg_accuracy(ratio, method, kind):
            writer.add_scalar(f"accuracy/{kind}_avg/{method}", value, step)
      for metric, kind in (("sve", "id"), ("lsvr", "ood")):
        for value in one_seed.spectral(ratio, metric, kind=kind):
          writer.add_scalar(f"spectral/{metric}_{kind}_avg", value, step)
    writer.close()


def _describe(config: ml_collections.ConfigDict, plan: Plan) -> str:
  pre = config.pretrain
  images = ("all" if pre.max_train_examples <= 0 else f"the first {pre.max_train_examples:,}")
  length = (f"{pre.num_train_steps} steps" if pre.num_train_steps > 0
            else f"{pre.num_epochs:g} epochs")
  seeds = ", ".join(map(str, plan.seeds))
  return (f"Pre-training: {pre.model} on {pre.dataset} ({images} training images, {length}, batch"
          f" {pre.batch_size}, {pre.optimizer}) with {pre.noise_type} label noise r; seed(s)"
          f" {seeds}. Downstream: {', '.join(plan.methods)} over the frozen features on"
          f" {len(plan.tasks)} tasks ({sum(t.kind == 'id' for t in plan.tasks)} ID,"
          f" {sum(t.kind == 'ood' for t in plan.tasks)} OOD), {config.nmtune.epochs} epochs on"
          f" {config.nmtune.views}; accuracy in % averaged over tasks; SVE averaged over ID tasks"
          " and LSVR over OOD tasks, of the frozen test features (row centering)."
          + (" Cells are mean ± sample std over seeds." if len(plan.seeds) > 1 else ""))


def render(config: ml_collections.ConfigDict, plan: Plan, stages: dict[Point, tuple[dict, dict]],
           workdir: str) -> tuple[Table, str]:
  """Writes the report; returns the table and results.md's text."""
  records = _records(plan, stages)
  transfer.write_atomic(os.path.join(workdir, "results.jsonl"),
                        "".join(json.dumps(r) + "\n" for r in records))
  table = Table(plan, records)
  text = format_md(table, _describe(config, plan))
  transfer.write_atomic(os.path.join(workdir, "results.md"), text)
  title = (f"{config.pretrain.model} pre-trained on {config.pretrain.dataset} with"
           f" {config.pretrain.noise_type} label noise r")
  plot_accuracy(table, os.path.join(workdir, "accuracy_vs_noise.png"), title)
  plot_spectra(table, os.path.join(workdir, "spectra.png"), title)
  plot_spectral(table, os.path.join(workdir, "spectral_vs_noise.png"), title)
  write_scalars(table, os.path.join(workdir, "tb"))
  return table, text


# ----------------------------------------------------------------------------------------------
# The job.


def _eval_line(record: dict[str, Any], methods: list[str]) -> str:
  parts = []
  for kind in tasks_lib.KINDS:
    cells = [(m, _averages(record["rows"], m).get(kind)) for m in methods]
    if any(v is not None for _, v in cells):
      parts.append(f"{kind.upper()} " + " ".join(f"{m} {100 * v:.2f}" for m, v in cells
                                                 if v is not None))
  return " | ".join(parts)


def _use_compile_cache(workdir: str) -> None:
  """Every stage of a kind compiles the same programs (only the noise and the seed differ):
  XLA's persistent cache in the workdir lets the later stages, and a restarted study, load
  them. Left alone when the user has set one (e.g. JAX_COMPILATION_CACHE_DIR); it takes effect
  only if nothing was compiled yet in this process (main.py's case)."""
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "compile_cache"))
    # The default (1 s) leaves out most of the study's programs on 2 cores; writing one costs
    # milliseconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  plan = validate(config)
  workdir = prepare_workdir(workdir)
  _use_compile_cache(workdir)
  num_stages = 2 * len(plan.points)
  pre_dirs = {p: os.path.join(workdir, "pretrain", p.name) for p in plan.points}
  eval_dirs = {p: os.path.join(workdir, "eval", p.name) for p in plan.points}
  # Finished pre-training stages (a different study's fails here, before any work); the ETA
  # counts the stages still to run.
  done = {p: _finished(pre_dirs[p], pretrain_config(config, p),
                       f"the pre-training stage {p.name}", workdir) for p in plan.points}
  pending = {"pretrain": sum(done[p] is None for p in plan.points),
             "eval": sum(done[p] is None
                         or not os.path.exists(os.path.join(eval_dirs[p], STAGE_FILE))
                         for p in plan.points)}
  print(f"[study] {len(plan.ratios)} noise ratio(s) x {len(plan.seeds)} seed(s): {num_stages}"
        f" stages ({pending['pretrain'] + pending['eval']} to run, the others done); tasks"
        f" {', '.join(t.name for t in plan.tasks)}; methods {', '.join(plan.methods)}; workdir"
        f" {workdir}", flush=True)
  clock = _Clock(pending)
  stages: dict[Point, tuple[dict, dict]] = {}
  ran = 0
  index = 0
  try:
    for point in plan.points:
      start = time.perf_counter()
      pre = done[point]
      pre_ran = pre is None
      if pre_ran:
        pre = _run_pretrain(pretrain_config(config, point), point, pre_dirs[point], workdir)
        clock.done("pretrain", time.perf_counter() - start)
        ran += 1
        # Its encoder was trained again: nothing an earlier evaluation left is valid.
        shutil.rmtree(eval_dirs[point], ignore_errors=True)
      index += 1
      acc = pre["result"].get("test_acc")
      acc_text = "" if acc is None else f"test acc {acc:.4f} (train acc vs clean labels" \
          f" {pre['result'].get('train_acc_clean', math.nan):.4f})"
      print(f"[study] stage {index}/{num_stages} pretrain {point}: {acc_text}"
            f"{' | ' + format_seconds(time.perf_counter() - start) if pre_ran else ', reused'} |"
            f" {clock.line()}", flush=True)

      start = time.perf_counter()
      eval_cfg = eval_config(config, point, pre_dirs[point])
      ev = _finished(eval_dirs[point], eval_cfg, f"the evaluation stage {point.name}", workdir)
      ev_ran = ev is None
      if ev_ran:
        ev = _run_eval(eval_cfg, plan, eval_dirs[point])
        clock.done("eval", time.perf_counter() - start)
        ran += 1
      index += 1
      print(f"[study] stage {index}/{num_stages} eval {point}: {_eval_line(ev, plan.methods)}"
            f"{' | ' + format_seconds(time.perf_counter() - start) if ev_ran else ', reused'} |"
            f" {clock.line()}", flush=True)
      stages[point] = (pre, ev)
  except _Preempted as e:
    print(f"[study] preempted during {e}; the finished stages are saved: run the same command"
          " to continue", flush=True)
    return {"preempted": True, "stages_run": ran}

  table, _ = render(config, plan, stages, workdir)
  print("\n" + _describe(config, plan) + "\n\n" + format_summary(table), flush=True)
  print(f"[study] done in {format_seconds(time.perf_counter() - clock.start)} ({ran} stage(s) run,"
        f" {num_stages - ran} reused). Report in {workdir}: "
        + ", ".join(REPORT_FILES) + ", tb/ (tensorboard --logdir " + os.path.join(workdir, "tb")
        + "); per-task curves in eval/*/curves.png", flush=True)
  return {"records": table.records, "stages_run": ran, "workdir": workdir}
