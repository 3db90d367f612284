"""The study's figures (write_study draws them): average accuracy against the noise ratio
with its change from r = 0 and the paired bootstrap interval (nmjax.stats), the singular value
spectra per r, and SVE / LSVR against r."""

from __future__ import annotations

import math
import tempfile
from typing import Any

import numpy as np

from nmjax import io as nmjax_io
from nmjax.jobs import tables
from nmjax.jobs.tables import (KIND_LABELS, Sweep, Table, label_axes, mean_std, pyplot, ratio_label,
                          save_figure)


def _errorbar(ax, xs: list[float], series: list[list[float]], **kwargs) -> None:
  stats = [mean_std(v) if v else (math.nan, 0.0) for v in series]
  ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, marker="o",
              markersize=3, **kwargs)


def _delta_bars(ax: Any, table: Table, method: str, kind: str, **kwargs: Any) -> None:
  """The change from r = 0 of (method, kind) against r, with its paired bootstrap interval."""
  xs, ys, low, high = [0.0], [0.0], [0.0], [0.0]
  for ratio in table.sweep.ratios:
    record = table.delta(ratio, method, kind)
    if record is not None:
      ci = record["delta_ci95"] or [record["delta"]] * 2
      xs.append(100 * ratio)
      ys.append(100 * record["delta"])
      low.append(100 * (record["delta"] - ci[0]))
      high.append(100 * (ci[1] - record["delta"]))
  if len(xs) > 1:  # Nothing to draw without r = 0 and another r.
    ax.errorbar(xs, ys, yerr=[low, high], capsize=3, marker="o", markersize=3, **kwargs)


def _noise_axis(sweep: Sweep) -> str:
  return f"pre-training {sweep.noise} noise r (%)"


def plot_accuracy(table: Table, path: str, title: str) -> None:
  """accuracy_vs_noise.png: each kind's average accuracy against r, one line per method (top),
  and its change from r = 0 with the paired 95% interval (bottom)."""
  plt = pyplot()
  sweep = table.sweep
  xs = [100 * r for r in sweep.ratios]
  kinds = sweep.present_kinds
  fig, axes = plt.subplots(2, len(kinds), figsize=(4.0 * len(kinds), 6.2), dpi=100,
                           squeeze=False)
  for column, kind in enumerate(kinds):
    for method in sweep.methods:
      style = "--" if method.startswith("lp") else "-"
      _errorbar(axes[0, column], xs, [[100 * v for v in table.avg_accuracy(r, method, kind)]
                                      for r in sweep.ratios], label=method, linestyle=style)
      _delta_bars(axes[1, column], table, method, kind, label=method, linestyle=style)
    label_axes(axes[0, column], title=f"{KIND_LABELS[kind]} average accuracy",
               xlabel=_noise_axis(sweep), ylabel="test accuracy (%)")
    axes[1, column].axhline(0.0, color="grey", linewidth=0.8)
    label_axes(axes[1, column], title=f"{KIND_LABELS[kind]}: change from r = 0 (95% interval)",
               xlabel=_noise_axis(sweep), ylabel="points",
               legend_fontsize=7 if axes[1, column].containers else None)
  fig.suptitle(title, fontsize=9)
  save_figure(fig, path)


def plot_spectra(table: Table, path: str, title: str) -> None:
  """spectra.png: sigma_k / sum(sigma) for each r (first seed) on one ID and one OOD task."""
  plt = pyplot()
  sweep = table.sweep
  seed = sweep.seeds[0]
  fig, axes = plt.subplots(1, len(sweep.spectrum_tasks), figsize=(4.0 * len(sweep.spectrum_tasks),
                                                                 3.2), dpi=100, squeeze=False)
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(sweep.ratios)))
  for ax, name in zip(axes.flat, sweep.spectrum_tasks):
    for color, ratio in zip(colors, sweep.ratios):
      record = next(r for r in table.records if r["record"] == "spectrum" and r["seed"] == seed
                    and r["noise_ratio"] == ratio and r["task"] == name)
      p = np.asarray(record["spectrum"])
      p = p[p > 1e-6 * p[0]]  # Row centering removes one direction: its ~0 would flatten the plot.
      ax.semilogy(np.arange(1, len(p) + 1), p, color=color,
                  label=f"r={ratio_label(ratio)} (SVE {record['sve']:.3f}, LSVR"
                        f" {record['lsvr']:.3f})")
    label_axes(ax, title=f"{name} ({table.kinds[name].upper()}) test features, seed {seed}",
                     xlabel="k", ylabel="sigma_k / sum(sigma)", legend_fontsize=6)
  fig.suptitle(title, fontsize=9)
  save_figure(fig, path)


def plot_spectral(table: Table, path: str, title: str) -> None:
  """spectral_vs_noise.png: SVE on ID tasks and LSVR on OOD tasks against r (average and each
  task)."""
  plt = pyplot()
  sweep = table.sweep
  xs = [100 * r for r in sweep.ratios]
  fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2), dpi=100)
  for ax, (metric, kind) in zip(axes, (("sve", "id"), ("lsvr", "ood"))):
    for name, task_kind in sweep.kinds.items():
      if task_kind == kind:
        _errorbar(ax, xs, [table.spectral(r, metric, task=name) for r in sweep.ratios],
                  label=name, linewidth=0.8, alpha=0.6)
    _errorbar(ax, xs, [table.spectral(r, metric, kind=kind) for r in sweep.ratios],
              label=f"{kind.upper()} average", color="black", linewidth=1.8)
    label_axes(ax, title=f"{metric.upper()} of frozen features, {kind.upper()} tasks",
                     xlabel=_noise_axis(sweep), ylabel=metric.upper(), legend_fontsize=6)
  fig.suptitle(title, fontsize=9)
  save_figure(fig, path)


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


def write_tensorboard(table: tables.Table, root: str) -> None:
  """tables.write_scalars into root; a bucket root's event files are written to a local folder,
  then uploaded in place of what root held."""
  if not nmjax_io.is_cloud(root):
    tables.write_scalars(table, root)
    return
  with tempfile.TemporaryDirectory(prefix="nmjax-tb-") as local:
    tables.write_scalars(table, local)
    nmjax_io.rmtree(root)
    nmjax_io.upload(local, root)
