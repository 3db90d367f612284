"""The study's figures (write_study draws them) and its TensorBoard scalars: average accuracy
against the noise ratio with its change from r = 0 and that change's 95% interval (nmjax.stats),
the singular value spectra per r, and SVE / LSVR against r.

Every title is wrapped to fit inside its figure; every error bar says what it is (a legend
title); a panel with nothing to draw is left out, and a plumbing report (tables.Sweep.plumbing)
draws no changes from r = 0.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import textwrap
from typing import Any

import numpy as np

from nmjax import io as nmjax_io
from nmjax.jobs import tables
from nmjax.jobs.tables import (KIND_LABELS, Sweep, Table, label_axes, mean_std, pyplot, ratio_label,
                               save_figure)
from nmjax.writers import summary_writer

SD_BARS = "bars: ± sd over seeds"
INTERVAL_BARS = "bars: 95% interval (seeds, test examples)"


def fit_text(fig: Any, text: Any, width: float) -> None:
  """Wraps a title (a matplotlib Text of `fig`) onto as few lines as keep it `width` (a fraction
  of the figure's width) wide or less."""
  renderer = fig.canvas.get_renderer()
  words, limit = text.get_text(), width * fig.bbox.width
  chars = len(words)
  while chars > 10 and text.get_window_extent(renderer).width > limit:
    chars = max(10, int(chars * 0.9))
    text.set_text(textwrap.fill(words, chars))


def _figure(rows: int, columns: int, panel: tuple[float, float], title: str,
            sweep: Sweep) -> tuple[Any, Any]:
  """A figure of rows x columns panels (each `panel` inches), laid out by matplotlib's
  constrained layout, with its title wrapped to fit (a plumbing report's says so)."""
  fig, axes = pyplot().subplots(rows, columns, figsize=(panel[0] * columns, panel[1] * rows),
                                dpi=100, squeeze=False, layout="constrained")
  if sweep.plumbing:
    title = f"{sweep.plumbing.capitalize()}, plumbing only: {title}"
  fit_text(fig, fig.suptitle(title, fontsize=9), 0.96)
  return fig, axes


def _label(fig: Any, ax: Any, columns: int, *, title: str, xlabel: str, ylabel: str,
           bars: str | None = None) -> None:
  """label_axes with a legend titled by what its bars are, the panel title fitting its column."""
  label_axes(ax, title=title, xlabel=xlabel, ylabel=ylabel, legend_fontsize=None)
  fit_text(fig, ax.title, 0.92 / columns)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=6, title=bars, title_fontsize=6)


def _errorbar(ax, xs: list[float], series: list[list[float]], **kwargs) -> None:
  stats = [mean_std(v) if v else (math.nan, 0.0) for v in series]
  ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, marker="o",
              markersize=3, **kwargs)


def _deltas(table: Table, method: str, kind: str) -> list[tuple[float, float, list[float]]]:
  """(r in %, change in points, its interval in points) of (method, kind), r = 0 first."""
  out = [(0.0, 0.0, [0.0, 0.0])]
  for ratio in table.sweep.ratios:
    record = table.find("delta", ratio, method=method, kind=kind)
    if record is not None:
      ci = record["delta_ci95"] or [record["delta"]] * 2
      out.append((100 * ratio, 100 * record["delta"], [100 * c for c in ci]))
  return out if len(out) > 1 else []


def _delta_bars(ax: Any, points: list[tuple[float, float, list[float]]], **kwargs: Any) -> None:
  """The change from r = 0 against r, with its 95% interval as error bars."""
  ax.errorbar([x for x, _, _ in points], [y for _, y, _ in points],
              yerr=[[y - ci[0] for _, y, ci in points], [ci[1] - y for _, y, ci in points]],
              capsize=3, marker="o", markersize=3, **kwargs)


def _noise_axis(sweep: Sweep) -> str:
  return f"pre-training {sweep.noise} noise r (%)"


def accuracy_figure(table: Table, title: str) -> Any:
  """accuracy_vs_noise.png's figure: each kind's average accuracy against r, one line per
  method (top), and its change from r = 0 with its 95% interval (bottom; left out where there
  is none, and in a plumbing report)."""
  sweep = table.sweep
  xs = [100 * r for r in sweep.ratios]
  kinds = sweep.present_kinds
  deltas = {} if sweep.plumbing else {
      (k, m): d for k in kinds for m in sweep.methods if (d := _deltas(table, m, k))}
  fig, axes = _figure(2 if deltas else 1, len(kinds), (4.0, 3.1), title, sweep)
  bars = SD_BARS if len(sweep.seeds) > 1 else None
  for column, kind in enumerate(kinds):
    for i, method in enumerate(sweep.methods):
      style = "--" if method.startswith("lp") else "-"
      dodge = 0.4 * (i - (len(sweep.methods) - 1) / 2)  # Side by side: bars that do not hide.
      _errorbar(axes[0, column], [x + dodge for x in xs],
                [[100 * v for v in table.avg_accuracy(r, method, kind)] for r in sweep.ratios],
                label=method, linestyle=style)
      if (kind, method) in deltas:
        _delta_bars(axes[1, column], [(x + dodge, y, ci) for x, y, ci in deltas[(kind, method)]],
                    label=method, linestyle=style)
    _label(fig, axes[0, column], len(kinds), title=f"{KIND_LABELS[kind]} average accuracy",
           xlabel=_noise_axis(sweep), ylabel="test accuracy (%)", bars=bars)
    if deltas:
      axes[1, column].axhline(0.0, color="grey", linewidth=0.8)
      _label(fig, axes[1, column], len(kinds), title=f"{KIND_LABELS[kind]}: change from r = 0",
             xlabel=_noise_axis(sweep), ylabel="change (points)", bars=INTERVAL_BARS)
  return fig


def spectra_figure(table: Table, title: str) -> Any:
  """spectra.png's figure: sigma_k / sum(sigma) for each r (first seed) on each spectrum task."""
  sweep = table.sweep
  seed = sweep.seeds[0]
  names = [n for n in sweep.spectrum_tasks if any(
      r["record"] == "spectrum" and r["task"] == n for r in table.records)]
  fig, axes = _figure(1, len(names), (4.0, 3.4), title, sweep)
  colors = pyplot().cm.viridis(np.linspace(0, 0.9, len(sweep.ratios)))
  for ax, name in zip(axes.flat, names):
    for color, ratio in zip(colors, sweep.ratios):
      record = table.find("spectrum", ratio, seed=seed, task=name)
      p = np.asarray(record["spectrum"])
      p = p[p > 1e-6 * p[0]]  # Row centering removes one direction: its ~0 would flatten the plot.
      ax.semilogy(np.arange(1, len(p) + 1), p, color=color,
                  label=f"r={ratio_label(ratio)} (SVE {record['sve']:.3f}, LSVR"
                        f" {record['lsvr']:.3f})")
    _label(fig, ax, len(names), title=f"{name} ({table.kinds[name].upper()}) test features,"
           f" seed {seed}", xlabel="k", ylabel="sigma_k / sum(sigma)")
  return fig


def spectral_panels(sweep: Sweep) -> list[tuple[str, str]]:
  """The (metric, kind) panels of spectral_vs_noise.png: SVE on ID and LSVR on OOD tasks where
  the study has them, else SVE and LSVR on its first kind."""
  panels = [(m, k) for m, k in (("sve", "id"), ("lsvr", "ood")) if k in sweep.present_kinds]
  return panels or [(m, sweep.present_kinds[0]) for m in ("sve", "lsvr")]


def spectral_figure(table: Table, title: str) -> Any:
  """spectral_vs_noise.png's figure: spectral_panels against r (each task and their average)."""
  sweep = table.sweep
  xs = [100 * r for r in sweep.ratios]
  panels = spectral_panels(sweep)
  fig, axes = _figure(1, len(panels), (4.0, 3.4), title, sweep)
  for ax, (metric, kind) in zip(axes.flat, panels):
    for name, task_kind in sweep.kinds.items():
      if task_kind == kind:
        _errorbar(ax, xs, [table.spectral(r, metric, task=name) for r in sweep.ratios],
                  label=name, linewidth=0.8, alpha=0.6)
    _errorbar(ax, xs, [table.spectral(r, metric, kind=kind) for r in sweep.ratios],
              label=f"{KIND_LABELS[kind]} average", color="black", linewidth=1.8)
    _label(fig, ax, len(panels), title=f"{metric.upper()} of frozen features,"
           f" {KIND_LABELS[kind]} tasks", xlabel=_noise_axis(sweep), ylabel=metric.upper(),
           bars=SD_BARS if len(sweep.seeds) > 1 else None)
  return fig


def plot_accuracy(table: Table, path: str, title: str) -> None:
  """Writes accuracy_figure to `path` (PNG)."""
  save_figure(accuracy_figure(table, title), path)


def plot_spectra(table: Table, path: str, title: str) -> None:
  """Writes spectra_figure to `path` (PNG)."""
  save_figure(spectra_figure(table, title), path)


def plot_spectral(table: Table, path: str, title: str) -> None:
  """Writes spectral_figure to `path` (PNG)."""
  save_figure(spectral_figure(table, title), path)


def write_study(records: list[dict[str, Any]], sweep: tables.Sweep, workdir: str, *, header: str,
                title: str) -> tables.Table:
  """The study's report in workdir: STUDY_FILES and tb/; returns the table."""
  nmjax_io.write_jsonl(nmjax_io.join(workdir, "results.jsonl"), records)
  table = tables.Table(sweep, records)
  nmjax_io.write_text(nmjax_io.join(workdir, "results.md"), tables.format_study(table, header))
  plot_accuracy(table, nmjax_io.join(workdir, "accuracy_vs_noise.png"), title)
  plot_spectra(table, nmjax_io.join(workdir, "spectra.png"), title)
  plot_spectral(table, nmjax_io.join(workdir, "spectral_vs_noise.png"), title)
  write_tensorboard(table, nmjax_io.join(workdir, "tb"))
  return table


def write_scalars(table: Table, root: str) -> None:
  """TensorBoard: one run per seed under the local folder root (rewritten), r in per mille as
  the step."""
  shutil.rmtree(root, ignore_errors=True)
  sweep = table.sweep
  for seed in sweep.seeds:
    writer = summary_writer(os.path.join(root, f"seed{seed}"))
    for record in table.records:
      if record["seed"] != seed:
        continue
      step = int(round(1000 * record["noise_ratio"]))
      field = sweep.pretrain_field
      if record["record"] == "pretrain" and field in record:
        writer.add_scalar(f"pretrain/{field}", record[field], step)
      elif record["record"] == "task":
        writer.add_scalar(f"accuracy/{record['task']}/{record['method']}", record["accuracy"],
                          step)
      elif record["record"] == "spectrum":
        writer.add_scalar(f"spectral/{record['task']}/sve", record["sve"], step)
        writer.add_scalar(f"spectral/{record['task']}/lsvr", record["lsvr"], step)
    _write_averages(writer, Table(dataclasses.replace(sweep, seeds=[seed]), table.records))
    writer.close()


def _write_averages(writer: Any, one_seed: Table) -> None:
  """The averages, as the tables compute them, over one seed alone."""
  sweep = one_seed.sweep
  for ratio in sweep.ratios:
    step = int(round(1000 * ratio))
    for method in sweep.methods:
      for kind in sweep.present_kinds:
        for value in one_seed.avg_accuracy(ratio, method, kind):
          writer.add_scalar(f"accuracy/{kind}_avg/{method}", value, step)
    for metric, kind in (("sve", "id"), ("lsvr", "ood")):
      for value in one_seed.spectral(ratio, metric, kind=kind):
        writer.add_scalar(f"spectral/{metric}_{kind}_avg", value, step)


def write_tensorboard(table: tables.Table, root: str) -> None:
  """write_scalars into root; a bucket root's event files are written to a local folder, then
  uploaded in place of what root held."""
  if not nmjax_io.is_cloud(root):
    write_scalars(table, root)
    return
  with tempfile.TemporaryDirectory(prefix="nmjax-tb-") as local:
    write_scalars(table, local)
    nmjax_io.rmtree(root)
    nmjax_io.upload(local, root)
