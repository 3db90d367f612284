"""Grids of NMTune configurations: the `config.grid` syntax, its expansion into configs, and the
choice of one configuration on the validation split (never on a test set).

Syntax: `field=v1,v2,...;field2=w1,w2,...` (spaces ignored), the Cartesian product in the order
written, the last field varying fastest, e.g.

    --config.grid="svd_weight=0.001,0.01,0.1;cov_weight=0.04,0.4"     # 6 configurations

Fields: GRID_FIELDS. Configurations that differ only in ONE_PROGRAM_FIELDS train together in one
jitted program (nmjax.nmtune.fit_grid); the others (epochs, rows per step, the MLP's shape)
split the grid into one program per combination of theirs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from nmjax.errors import ConfigError

# Traced hyperparameters, the residual scale's initial value and the seed: one program for all.
ONE_PROGRAM_FIELDS = ("lr", "weight_decay", "mse_weight", "cov_weight", "svd_weight", "svd_topk",
                      "residual_scale_init", "seed")
GRID_FIELDS = ONE_PROGRAM_FIELDS + ("epochs", "batch_size", "mlp_ratio", "mlp_layers")
_INTEGER_FIELDS = ("svd_topk", "seed", "epochs", "batch_size", "mlp_layers")


def _value(field: str, text: str) -> int | float:
  kind = int if field in _INTEGER_FIELDS else float
  try:
    value = kind(text)
  except ValueError:
    what = "an integer" if kind is int else "a number"
    raise ConfigError(f"config.grid: {field} value {text!r} is not {what}") from None
  if kind is float and not math.isfinite(value):
    raise ConfigError(f"config.grid: {field} value {text!r} is not finite")
  return value


def parse_grid(text: str) -> list[tuple[str, list[int | float]]]:
  """[(field, values), ...] of a grid string (module docstring); '' gives []."""
  axes: list[tuple[str, list[int | float]]] = []
  for part in str(text).split(";"):
    part = part.replace(" ", "")
    if not part:
      continue
    field, sep, values = part.partition("=")
    if not sep or not values:
      raise ConfigError(f"config.grid part {part!r} needs field=value,value,...; e.g."
                        " svd_weight=0.001,0.01;cov_weight=0.04,0.4")
    if field not in GRID_FIELDS:
      raise ConfigError(f"config.grid field {field!r} is unknown; allowed:"
                        f" {', '.join(GRID_FIELDS)}")
    if field in (f for f, _ in axes):
      raise ConfigError(f"config.grid lists {field} twice")
    parsed = [_value(field, v) for v in values.split(",") if v]
    if len(set(parsed)) != len(parsed):
      raise ConfigError(f"config.grid repeats a value of {field}: {values}")
    axes.append((field, parsed))
  return axes


def expand(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The grid's configurations: one dict of grid-field values per point, in the product order
  (the module docstring); [] when config.grid is empty."""
  axes = parse_grid(config.grid)
  if not axes:
    return []
  fields = [f for f, _ in axes]
  return [dict(zip(fields, point)) for point in itertools.product(*(v for _, v in axes))]


def point_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """config at every point of its grid, config.grid emptied (what fit_grid trains)."""
  configs = []
  for point in expand(config):
    member = ml_collections.ConfigDict(config.to_dict())
    member.grid = ""
    for field, value in point.items():
      member[field] = value
    configs.append(member)
  return configs


def choose(val_accuracies: Sequence[float | None], diverged: Sequence[bool]) -> int:
  """The index of the highest validation accuracy among the members that did not diverge (the
  first of a tie); reads nothing of any test set."""
  candidates = [i for i, (v, bad) in enumerate(zip(val_accuracies, diverged))
                if v is not None and not bad]
  if not candidates:
    raise ConfigError("config.grid: no configuration has a validation accuracy to choose on"
                      " (all diverged, or config.val_fraction is 0)")
  return max(candidates, key=lambda i: (val_accuracies[i], -i))


def summary(config: Mapping[str, Any], fields: Sequence[str], result: Mapping[str, Any]
            ) -> dict[str, Any]:
  """One grid member as a result's grid_results lists it: its grid-field values, validation
  accuracy, accuracy on that result's test set and where it diverged (None: it did not)."""
  return {"values": {f: config[f] for f in fields}, "val_accuracy": result.get("val_accuracy"),
          "accuracy": result["accuracy"], "diverged": result.get("diverged")}


def report_lines(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """One line per grid configuration of a fit's {test name: result} (none without a grid): its
  grid values, validation accuracy, accuracy on every test set, and the one chosen."""
  first = next(iter(results.values()), {})
  members = first.get("grid_results", [])
  lines = []
  for i, member in enumerate(members):
    values = " ".join(f"{k}={v:g}" for k, v in member["values"].items())
    tests = " ".join(f"{name} {r['grid_results'][i]['accuracy']:.4f}"
                     for name, r in results.items())
    note = " (diverged)" if member["diverged"] else ""
    note += " <- chosen on validation" if i == first["grid_chosen"] else ""
    val = member["val_accuracy"]
    lines.append(f"grid {i + 1}/{len(members)}: {values or '(the config)'} | val"
                 f" {'-' if val is None else f'{val:.4f}'} | test {tests}{note}")
  return lines
