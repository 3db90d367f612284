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
    if not sep:
      raise ConfigError(f"config.grid part {part!r} needs field=value,value,...; e.g."
                        " svd_weight=0.001,0.01;cov_weight=0.04,0.4")
    if field not in GRID_FIELDS:
      raise ConfigError(f"config.grid field {field!r} is unknown; allowed:"
                        f" {', '.join(GRID_FIELDS)}")
    if field in (f for f, _ in axes):
      raise ConfigError(f"config.grid lists {field} twice")
    if values[:1] + values[-1:] in ("[]", "()"):  # A list written as one: [v1,v2].
      values = values[1:-1]
    parsed = [_value(field, v) for v in values.split(",") if v]
    if not parsed:
      raise ConfigError(f"config.grid: the {field} axis is empty ({part!r} lists no value), so"
                        f" the grid has no configuration; give it values ({field}=v1,v2,...) or"
                        " drop it")
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


def refit_config(chosen: ml_collections.ConfigDict | Mapping[str, Any]
                 ) -> ml_collections.ConfigDict:
  """The config that refits the grid's chosen member on all of train.

  The member was trained on train less its validation split (config.val_fraction) and chosen on
  that split; the refit trains the same configuration (every hyperparameter and the seed) on
  every train example: no validation split, no grid.

  Args:
    chosen: the chosen member's config, as point_configs gives it (config.grid emptied), a
      ConfigDict or a dict (the `lp` field may be a ConfigDict or a dict).

  Returns:
    A new ConfigDict (the input is not changed): `chosen` with val_fraction 0.0 and grid "".

  Raises:
    ConfigError: `chosen` still holds a grid (pass one of point_configs' members), or lacks the
      grid or val_fraction field (not an NMTune config).

  Examples:
    >>> import ml_collections
    >>> from nmjax.nmtune import grid
    >>> member = ml_collections.ConfigDict({"grid": "", "val_fraction": 0.1, "svd_weight": 0.01})
    >>> refit = grid.refit_config(member)
    >>> refit.val_fraction, refit.grid, refit.svd_weight, member.val_fraction
    (0.0, '', 0.01, 0.1)
  """
  fields = chosen.to_dict() if isinstance(chosen, ml_collections.ConfigDict) else dict(chosen)
  missing = [f for f in ("grid", "val_fraction") if f not in fields]
  if missing:
    raise ConfigError(f"refit_config: the chosen member's config lacks {', '.join(missing)}; pass"
                      " an NMTune config (one of nmjax.nmtune.grid.point_configs)")
  if parse_grid(fields["grid"]):
    raise ConfigError(f"refit_config: the chosen member still holds config.grid="
                      f"{fields['grid']!r}; pass one of nmjax.nmtune.grid.point_configs")
  if isinstance(fields.get("lp"), ml_collections.ConfigDict):
    fields["lp"] = fields["lp"].to_dict()
  fields.update(grid="", val_fraction=0.0)
  return ml_collections.ConfigDict(fields)


def chosen_line(config: Mapping[str, Any], fields: Sequence[str], chosen: int, size: int, *,
                num_train: int | None = None) -> str:
  """The one line that names the grid's chosen configuration (and the refit, if any).

  Args:
    config: the chosen member's config (or its grid_results "values").
    fields: the grid's fields (parse_grid's), in order.
    chosen: its index in the grid.
    size: how many configurations the grid trained.
    num_train: the train examples of the refit; None: no refit (the member as trained).

  Returns:
    E.g. "grid: chose 2/6 svd_weight=0.01 cov_weight=0.04 on validation; refit on all 1257 train
    examples".
  """
  values = " ".join(f"{f}={config[f]:g}" for f in fields) or "(the config)"
  refit = ("; kept as trained (no refit)" if num_train is None
           else f"; refit on all {num_train} train examples")
  return f"grid: chose {chosen + 1}/{size} {values} on validation{refit}"


def choose(val_accuracies: Sequence[float | None], diverged: Sequence[bool]) -> int:
  """The index of the highest validation accuracy among the members that did not diverge (the
  first of a tie); reads nothing of any test set."""
  candidates = [i for i, (v, bad) in enumerate(zip(val_accuracies, diverged))
                if v is not None and not bad]
  if not candidates:
    why = ("the grid has no configuration" if not diverged else
           "the loss of every configuration became non-finite" if all(diverged)
           else "config.val_fraction is 0, so there is no validation split")
    raise ConfigError(f"config.grid: no configuration has a validation accuracy to choose on"
                      f" ({why})")
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
    tests = " ".join(("" if list(results) == ["test"] else f"{name} ")
                     + f"{r['grid_results'][i]['accuracy']:.4f}" for name, r in results.items())
    note = " (diverged)" if member["diverged"] else ""
    if i == first["grid_chosen"]:
      note += " <- chosen on validation" + (
          f", then fit again on all {first['num_train']} train examples"
          if first.get("grid_refit") else "")
    val = member["val_accuracy"]
    lines.append(f"grid {i + 1}/{len(members)}: {values or '(the config)'} | val"
                 f" {'-' if val is None else f'{val:.4f}'} | test {tests}{note}")
  return lines
