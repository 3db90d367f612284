"""Tables: rows -> JSON lines and markdown tables (the runner's; the study's plots and
TensorBoard scalars are in nmjax.jobs.figures, its claims in nmjax.jobs.claims)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from nmjax import io as nmjax_io
from nmjax.io import atomic_path, write_jsonl, write_text
from nmjax.stats import SPECTRAL
from nmjax.tasks import KIND_LABELS, KINDS


def present_kinds(kinds: Any) -> list[str]:
  """The kinds of KINDS that occur in `kinds` (an iterable of task kinds), in KINDS order."""
  seen = set(kinds)
  return [k for k in KINDS if k in seen]


# ----------------------------------------------------------------------------------- plots


def pyplot() -> Any:
  """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def label_axes(ax: Any, *, title: str, xlabel: str, ylabel: str,
               legend_fontsize: int | None = 7) -> None:
  """Title 9 pt, axis labels 8 pt, ticks 7 pt; a legend unless legend_fontsize is None."""
  ax.set_title(title, fontsize=9)
  ax.set_xlabel(xlabel, fontsize=8)
  ax.set_ylabel(ylabel, fontsize=8)
  ax.tick_params(labelsize=7)
  if legend_fontsize is not None:
    ax.legend(fontsize=legend_fontsize)


def save_figure(fig: Any, path: str) -> None:
  """Lays out (tight, unless the figure has a layout engine), writes `path` (PNG) atomically and
  closes the figure."""
  if fig.get_layout_engine() is None:
    fig.tight_layout()
  with atomic_path(path) as tmp:
    fig.savefig(tmp)
  pyplot().close(fig)


# ------------------------------------------------------------------ evaluation (rows per task)


def format_results(rows: list[dict[str, Any]], methods: list[str], title: str, header: str
                   ) -> str:
  """results.md of an evaluation: averages by kind and method, then one row per task."""
  kinds = present_kinds(r["kind"] for r in rows)
  lines = [f"# {title}\n\n{header}\n",
           "| method | " + " | ".join(f"{KIND_LABELS[k]} avg" for k in kinds) + " |",
           "|---|" + "---|" * len(kinds)]
  for method in methods:
    cells = []
    for kind in kinds:
      accs = [r["accuracy"] for r in rows if r["method"] == method and r["kind"] == kind]
      cells.append(f"{100 * np.mean(accs):.2f}" if accs else "-")
    lines.append(f"| {method} | {' | '.join(cells)} |")
  lines += ["", "| task | kind | " + " | ".join(methods) + " | SVE | LSVR | train | test |",
            "|---|---|" + "---|" * (len(methods) + 4)]
  for name in dict.fromkeys(r["task"] for r in rows):
    task_rows = {r["method"]: r for r in rows if r["task"] == name}
    # The row of a method that trained (zero-shot trains nothing: num_train 0).
    first = max(task_rows.values(), key=lambda r: r.get("num_train", 0))
    accs = [f"{100 * task_rows[m]['accuracy']:.2f}" if m in task_rows else "-" for m in methods]
    lines.append(f"| {name} | {first['kind']} | {' | '.join(accs)} | {first['sve']:.4f} |"
                 f" {first['lsvr']:.4f} | {first['num_train']} | {first['num_test']} |")
  return "\n".join(lines) + "\n"


def encoder_header(enc: Any, text: str) -> str:
  """The first line under an evaluation's title: which encoder, then `text`."""
  pre = enc.pretraining
  return (f"Encoder: {pre.model} pre-trained on {pre.dataset}, noise"
          f" {pre.noise_type} {pre.noise_ratio}, checkpoint {enc.workdir} step {enc.step}. {text}")


def write_evaluation(rows: list[dict[str, Any]], methods: list[str], workdir: str, *,
                     title: str, header: str) -> str:
  """An evaluation's results.jsonl and results.md in workdir; returns the markdown."""
  write_jsonl(nmjax_io.join(workdir, "results.jsonl"), rows)
  table = format_results(rows, methods, title, header)
  write_text(nmjax_io.join(workdir, "results.md"), table)
  return table


HEADS_DIR = "heads"  # workdir/heads/<task>/<method>/ (features files: heads/<method>/)


class HeadKeeper:
  """An evaluation's row function that also keeps each fit's head (its result["head"]).

  Attributes:
    row: the row function it wraps (evaluate.probe_row, evaluate.tuning_row).
    heads: (task, method) -> the fitted nmjax.heads.Head, filled as rows are made.
  """

  def __init__(self, row: Callable[[Any, Any], dict[str, Any]]):
    self.row = row
    self.heads: dict[tuple[str, ...], Any] = {}

  def __call__(self, fit: Any, enc: Any) -> dict[str, Any]:
    """The wrapped row of `fit` (an evaluate.Fit), keeping its head when it has one."""
    head = fit.result.get("head")
    if head is not None:
      self.heads[(fit.task.name, fit.method)] = head
    return self.row(fit, enc)


def save_heads(heads: Mapping[tuple[str, ...], Any], workdir: str) -> list[str]:
  """Saves each head in workdir/heads/<key parts>/ (head.save: head.json + variables.npz).

  Args:
    heads: (task, method) or (method,) -> a fitted nmjax.heads.Head.
    workdir: the job's workdir.

  Returns:
    The folders written, in the order of `heads`.
  """
  folders = []
  for key, head in heads.items():
    folder = nmjax_io.join(workdir, HEADS_DIR, *key)
    nmjax_io.makedirs(folder)
    head.save(folder)
    folders.append(folder)
  return folders


def _read_rows(path: str) -> list[dict[str, Any]]:
  """The JSON lines of `path` (none when it is missing; a torn last line is dropped)."""
  if not nmjax_io.exists(path):
    return []
  rows = []
  with nmjax_io.open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def replace_rows(path: str, rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
  """Writes `rows` into the JSON-lines file `path`, replacing the rows with the same `keys`.

  A job run again on one workdir leaves one set of rows, not duplicates; other rows (another
  method, other files) stay, in their order.

  Args:
    path: the results.jsonl file (its folder must exist).
    rows: the new rows.
    keys: the fields that name a row (e.g. method, train_features, test_features).
  """
  new = {tuple(r.get(k) for k in keys) for r in rows}
  kept = [r for r in _read_rows(path) if tuple(r.get(k) for k in keys) not in new]
  write_jsonl(path, kept + list(rows))


def write_tuning(rows: list[dict[str, Any]], enc: Any, config: Any, methods: list[str],
                 workdir: str) -> str:
  """An NMTune evaluation's results.jsonl, results.md and curves.png; returns the markdown."""
  header = encoder_header(enc, f"Accuracy in %; MLP methods trained on {config.views} views,"
                               f" {config.epochs} epochs; SVE/LSVR of the frozen test features"
                               " (row centering).")
  table = write_evaluation(rows, methods, workdir, title="NMTune results", header=header)
  plot_curves(rows, nmjax_io.join(workdir, "curves.png"),
              f"{enc.pretraining.model}, {enc.pretraining.dataset}, noise"
              f" {enc.pretraining.noise_ratio},"
              f" {config.views} views")
  return table


def plot_task_spectra(spectra: dict[str, dict[str, Any]], kinds: dict[str, str], path: str,
                  title: str) -> None:
  """spectra.png: sigma_k / sum(sigma) of every task's test features (ID solid, OOD dashed)."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
  for name, values in spectra.items():
    # Row centering removes one direction exactly: its ~0 value would flatten the plot.
    p = np.asarray(values["spectrum"])
    p = p[p > 1e-6 * p[0]]
    ax.semilogy(np.arange(1, len(p) + 1), p, "-" if kinds[name] == "id" else "--",
                label=f"{name} (SVE {values['sve']:.2f}, LSVR {values['lsvr']:.3f})")
  ax.set_xlabel("k")
  ax.set_ylabel("sigma_k / sum(sigma)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  save_figure(fig, path)


def plot_curves(rows: list[dict[str, Any]], path: str, title: str) -> None:
  """curves.png: test accuracy per epoch of every method, one panel per task."""
  plt = pyplot()
  names = list(dict.fromkeys(r["task"] for r in rows))
  columns = min(3, len(names))
  lines = -(-len(names) // columns)
  fig, axes = plt.subplots(lines, columns, figsize=(3.4 * columns, 2.6 * lines), dpi=100,
                           squeeze=False)
  for ax, name in zip(axes.flat, names):
    for row in rows:
      if row["task"] == name and row.get("test_accuracy_per_epoch"):
        curve = 100 * np.asarray(row["test_accuracy_per_epoch"])
        ax.plot(np.arange(1, len(curve) + 1), curve, label=row["method"],
                linestyle="--" if row["method"].startswith("lp") else "-")
    kind = next(r["kind"] for r in rows if r["task"] == name)
    label_axes(ax, title=f"{name} ({kind.upper()})", xlabel="epoch",
                     ylabel="test accuracy (%)", legend_fontsize=None)
  for ax in axes.flat[len(names):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  save_figure(fig, path)


# ------------------------------------------------------------- the study (rows per noise ratio)


@dataclasses.dataclass(frozen=True)
class Sweep:
  """The study's axes: noise ratios x seeds, the methods, the tasks (name -> kind, in order) and
  the tasks whose spectra are drawn; `plumbing` says why its numbers test the plumbing only (a
  smoke run, one seed), "" when they test the science."""
  ratios: list[float]
  seeds: list[int]
  methods: list[str]
  kinds: dict[str, str]
  spectrum_tasks: list[str]
  noise: str = "label"              # label | caption: what r corrupts in pre-training
  pretrain_field: str = "test_acc"  # the pre-training record's number in the main table
  plumbing: str = ""

  @property
  def present_kinds(self) -> list[str]:
    return present_kinds(self.kinds.values())

  @property
  def pretrain_label(self) -> str:
    return {"test_acc": "pretrain test acc",
            "test_i2t_acc": "pretrain i2t acc"}.get(self.pretrain_field, self.pretrain_field)


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  mean = float(np.mean(values))
  return mean, float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _cell(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
  if not values:
    return "-"
  mean, std = mean_std([scale * v for v in values])
  return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


class Table:
  """Per-seed numbers of the report, indexed for the tables, plots and scalars."""

  def __init__(self, sweep: Sweep, records: list[dict[str, Any]]):
    self.sweep = sweep
    self.records = records
    self.kinds = dict(sweep.kinds)

  def _seed_values(self, ratio: float, fn: Callable[[list[dict]], float | None]) -> list[float]:
    values = []
    for seed in self.sweep.seeds:
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

  def find(self, record: str, ratio: float, **fields: Any) -> dict[str, Any] | None:
    """The first record of type `record` at r = ratio whose fields match, or None."""
    return next((r for r in self.records if r["record"] == record and r["noise_ratio"] == ratio
                 and all(r.get(k) == v for k, v in fields.items())), None)

  def pretrain(self, ratio: float, field: str) -> list[float]:
    return self._seed_values(ratio, lambda rows: next(
        (r[field] for r in rows if r["record"] == "pretrain" and field in r), None))


def ratio_label(ratio: float) -> str:
  return f"{100 * ratio:g}%"


def plumbing_line(sweep: Sweep) -> str:
  """The one line that opens a plumbing report ('' for a report of the science)."""
  if not sweep.plumbing:
    return ""
  return (f"**{sweep.plumbing.capitalize()}: these numbers test the plumbing, not the science**"
          " (no claims, intervals, changes from r = 0 or gains are shown).")


def format_summary(table: Table) -> str:
  """The study's main table: rows r, the averages per kind and method, the spectral metrics
  (mean ± sample std over seeds); then, unless its numbers are plumbing, the changes from r = 0,
  the gains and the spectral changes with their intervals."""
  sweep = table.sweep
  gap = any(r.get("memorization_gap") is not None for r in table.records
            if r["record"] == "pretrain")
  head = (["r", sweep.pretrain_label] + (["memorization gap"] if gap else [])
          + [f"{KIND_LABELS[k]} {m}" for k in sweep.present_kinds for m in sweep.methods]
          + ["SVE (ID)", "LSVR (OOD)"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for ratio in sweep.ratios:
    cells = [ratio_label(ratio), _cell(table.pretrain(ratio, sweep.pretrain_field))]
    if gap:
      cells.append(_cell(table.pretrain(ratio, "memorization_gap")))
    for kind in sweep.present_kinds:
      cells += [_cell(table.avg_accuracy(ratio, m, kind)) for m in sweep.methods]
    cells += [_cell(table.spectral(ratio, "sve", kind="id"), 1, 4),
              _cell(table.spectral(ratio, "lsvr", kind="ood"), 1, 4)]
    lines.append("| " + " | ".join(cells) + " |")
  if sweep.plumbing:
    return "\n".join(lines) + "\n"
  return ("\n".join(lines) + "\n" + format_deltas(table) + format_gains(table)
          + format_spectral_deltas(table))


def interval_cell(record: dict[str, Any] | None, scale: float = 100.0, digits: int = 2) -> str:
  """'+0.58 [-1.30, +2.41]': a record's delta and delta_ci95 (scaled), '-' without one."""
  if record is None:
    return "-"
  ci = record["delta_ci95"]
  return f"{scale * record['delta']:+.{digits}f}" + (
      "" if ci is None else f" [{scale * ci[0]:+.{digits}f}, {scale * ci[1]:+.{digits}f}]")


def _interval_table(words: str, head: list[str], ratios: list[float],
                    cell: Callable[[float, int], str]) -> str:
  """A titled table of intervals: a row per r, cell(r, column) in each column of `head`."""
  lines = ["", words, "", "| r | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
  for ratio in ratios:
    cells = [cell(ratio, i) for i in range(len(head))]
    lines.append("| " + " | ".join([ratio_label(ratio)] + cells) + " |")
  return "\n".join(lines) + "\n"


def format_deltas(table: Table) -> str:
  """The change from r = 0 of each average (points): the mean over seeds and its interval
  (nmjax.stats); '' when the sweep has no r = 0 or no r > 0."""
  sweep = table.sweep
  ratios = [r for r in sweep.ratios if r > 0]
  if not ratios or 0 not in sweep.ratios:
    return ""
  columns = [(k, m) for k in sweep.present_kinds for m in sweep.methods]
  return _interval_table(
      "Change from r = 0 (points; mean over seeds [95% interval: seeds and test examples]):",
      [f"{KIND_LABELS[k]} {m}" for k, m in columns], ratios,
      lambda r, i: interval_cell(table.find("delta", r, method=columns[i][1],
                                            kind=columns[i][0])))


def format_gains(table: Table) -> str:
  """Each "gain" record (nmjax.stats.add_gains): a method's accuracy over a baseline's on the same
  encoder, per r and kind, with its interval; '' without them."""
  gains = [r for r in table.records if r["record"] == "gain"]
  columns = list(dict.fromkeys((r["method"], r["baseline"], r["kind"]) for r in gains
                               if r["kind"] in table.sweep.present_kinds))
  if not columns:
    return ""
  head = [f"{KIND_LABELS[k]} {m} - {b}" for m, b, k in columns]
  return _interval_table(
      "Gain of one method over another on the same encoder (points; mean over seeds [95%"
      " interval: seeds and test examples]):", head, table.sweep.ratios,
      lambda r, i: interval_cell(table.find("gain", r, method=columns[i][0],
                                            baseline=columns[i][1], kind=columns[i][2])))


def format_spectral_deltas(table: Table) -> str:
  """The change from r = 0 of each kind's average SVE and LSVR (nmjax.stats.add_spectral_deltas)
  with its interval over seeds; '' without them."""
  found = {(r["metric"], r["kind"]) for r in table.records
           if r["record"] == "spectral_delta" and r["task"] is None}
  columns = [(m, k) for m in SPECTRAL for k in table.sweep.present_kinds if (m, k) in found]
  if not columns:
    return ""
  return _interval_table(
      "Change of the spectral metrics from r = 0 (mean over seeds [95% t interval over seeds]):",
      [f"{m.upper()} ({KIND_LABELS[k]})" for m, k in columns],
      [r for r in table.sweep.ratios if r > 0],
      lambda r, i: interval_cell(table.find("spectral_delta", r, metric=columns[i][0],
                                            kind=columns[i][1], task=None), 1.0, 4))


def format_study(table: Table, header: str) -> str:
  """results.md: the plumbing line where the numbers are plumbing, the title, `header`, the main
  table (format_summary), then per-task tables (accuracy per method, SVE, LSVR)."""
  sweep = table.sweep
  names = list(sweep.kinds)
  task_head = ["r"] + [f"{n} ({table.kinds[n].upper()})" for n in names]

  def task_table(title: str, cell: Callable[[float, str], str]) -> list[str]:
    lines = [f"\n## {title}\n", "| " + " | ".join(task_head) + " |", "|" + "---|" * len(task_head)]
    for ratio in sweep.ratios:
      lines.append("| " + " | ".join([ratio_label(ratio)] + [cell(ratio, n) for n in names])
                   + " |")
    return lines

  parts = ([plumbing_line(sweep) + "\n"] if sweep.plumbing else []) + [
      f"# Embedded study: {sweep.noise} noise in pre-training, measured downstream\n", header,
      "\n## Averages per noise ratio\n", format_summary(table)]
  for method in sweep.methods:
    parts += task_table(f"{method}: test accuracy (%) per task",
                        lambda r, n, m=method: _cell(table.accuracy(r, m, n)))
  parts += task_table("SVE of the frozen test features per task",
                      lambda r, n: _cell(table.spectral(r, "sve", task=n), 1, 4))
  parts += task_table("LSVR of the frozen test features per task",
                      lambda r, n: _cell(table.spectral(r, "lsvr", task=n), 1, 4))
  return "\n".join(parts) + "\n"


STUDY_FILES = ("results.jsonl", "results.md", "accuracy_vs_noise.png", "spectra.png",
               "spectral_vs_noise.png")
