"""Plans: what a job's validate(config) returns, and what its run(plan, workdir) reads.

A plan is a frozen dataclass of plain values (numbers, strings, tuples, nested plans and plain
dicts of them): everything a run needs, resolved and checked once. After validate nothing reads a
ConfigDict. A plan writes itself to its workdir as plan.json, and its JSON form is the identity a
resume or a sweep's reuse of a finished stage compares.

This module is validation code: it is where a config's fields are read into a plan.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import ml_collections

from nmjax import io as nmjax_io
from nmjax.errors import ConfigError

PLAN_FILE = "plan.json"
P = TypeVar("P")


def plain(value: Any) -> Any:
  """`value` as JSON-ready plain values (plans, dicts, ConfigDicts, tuples and numbers)."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, ml_collections.ConfigDict):
    return plain(value.to_dict())
  if isinstance(value, Mapping):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if hasattr(value, "item") and not isinstance(value, (str, bytes)):
    return value.item()
  return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def as_dict(plan: Any) -> dict[str, Any]:
  """The plan's fields as plain values (what plan.json holds)."""
  return plain(plan)


def to_json(plan: Any, job: str) -> str:
  """The plan as indented JSON, with the job's name first."""
  return json.dumps({"job": job, **as_dict(plan)}, indent=1, sort_keys=False)


def write(plan: Any, job: str, workdir: str) -> None:
  """Writes workdir/plan.json atomically."""
  nmjax_io.write_text(nmjax_io.join(workdir, PLAN_FILE), to_json(plan, job) + "\n")


def identity(plan: Any, ignore: Iterable[str] = ()) -> dict[str, Any]:
  """The plan's fields but `ignore` (those that cannot change a result), JSON-normalized."""
  skip = set(ignore)
  return {k: v for k, v in json.loads(json.dumps(as_dict(plan))).items() if k not in skip}


def _field_types(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, hint: Any) -> Any:
  """A config value as the plan's field type: lists become tuples, ints become floats where the
  field is a float; anything else of the wrong type is refused naming the field."""
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(hint)
    if value is None and type(None) in options:
      return None
    hint = next(o for o in options if o is not type(None))
    origin = typing.get_origin(hint)
  if hint is Any:
    return plain(value)
  if origin is tuple or hint is tuple:
    if isinstance(value, str):
      value = [v.strip() for v in value.replace("+", ",").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"config.{name}={value!r} is not a list")
    return tuple(plain(v) for v in value)
  if origin is dict or hint is dict:
    return plain(value)
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(hint, type) and not isinstance(value, hint):
    raise ConfigError(f"config.{name}={value!r} has the wrong type; expected {hint.__name__}")
  return value


def from_config(cls: type[P], config: ml_collections.ConfigDict | Mapping[str, Any], *,
                job: str, ignore: Iterable[str] = (), **given: Any) -> P:
  """`cls` with each field read from `config` (or from `given`, which wins); a field the config
  lacks takes the dataclass default, and fails naming it when there is none. A config field the
  plan does not know fails with the close names, unless `ignore` lists it."""
  hints = _field_types(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  skip = set(ignore) | {"job"}
  for key in config.keys():
    if key not in hints and key not in skip and key not in given:
      close = difflib.get_close_matches(key, names, n=2)
      hint = f"did you mean {' or '.join(close)}? " if close else ""
      raise ConfigError(f"config.{key} is not a field of the {job} job; {hint}its fields:"
                        f" {', '.join(sorted(names))}")
  values = {}
  for f in dataclasses.fields(cls):
    if f.name in given:
      values[f.name] = given[f.name]
    elif f.name in config:
      values[f.name] = _coerce(f.name, config[f.name], hints[f.name])
    elif (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
      raise ConfigError(f"the {job} config has no field {f.name!r}; add it (configs/ hold"
                        " complete configs)")
  return cls(**values)
