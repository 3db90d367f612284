"""Plot helpers the jobs share: matplotlib without a display, axes labelled one way, and PNGs
written atomically (a kill mid-write never leaves a torn file under the final name)."""

from __future__ import annotations

import os
from typing import Any


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


def save(fig: Any, path: str) -> None:
  """Lays out, writes `path` (PNG) atomically and closes the figure."""
  fig.tight_layout()
  fig.savefig(path + ".tmp.png")
  pyplot().close(fig)
  os.replace(path + ".tmp.png", path)
