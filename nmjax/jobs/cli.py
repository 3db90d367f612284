"""main.py's one-line errors: config flags that do not parse and environment faults.

absl parses --config (ml_collections config_flags) before main() runs, and a bad flag there is a
traceback. `parse_flags` (main.py's flags_parser) turns each into one line on stderr and exit
code 2: a missing config file, an unknown config argument (`pretrain.py:smok`), an unknown field at
any level with the close names (difflib), a field set at the wrong level of a study (where it
lives, or that the study sets it for each stage), a value of the wrong type. `one_line_errors`
does the same for what a job raises: an NmjaxError, or an OSError of a full disk (ENOSPC, EDQUOT)
or of a path that cannot be written (EROFS, EACCES, EPERM), named by its path.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags

from nmjax.errors import NmjaxError, fail

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([\w.]+)(?:=(.*))?$", re.S)


def parse_flags(argv: Sequence[str], *, default_config: str) -> list[str]:
  """absl's FLAGS(argv), with every parsing error as one line and exit code 2. The --config
  flag is defined without a default (config_flags would load it at import time, before any
  error could be caught); argv without --config gets --config=default_config here."""
  given = config_argument(argv)
  config_arg = given or default_config
  problem = missing_config_file(config_arg)
  if problem:
    fail(problem)
  argv = list(argv)
  if given is None:
    argv.insert(1, f"--config={default_config}")
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # flags.Error, or what get_config raised (config_flags wraps it): nmjax's own errors and bad
    # overrides are one line; anything else raised in a config file is a bug there and keeps
    # its traceback (explain_flag_error raises it again).
    fail(explain_flag_error(e, argv, config_arg))
  return []


def config_argument(argv: Sequence[str]) -> str | None:
  """The value of --config (path[:args]) in argv, None when it has none."""
  for i, arg in enumerate(argv):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
    for prefix in ("--config=", "-config="):
      if arg.startswith(prefix):
        return arg[len(prefix):]
  return None


def missing_config_file(config_arg: str) -> str | None:
  """One line when the config file of `path[:args]` is missing, with the close file names."""
  path = config_arg.split(":", 1)[0]
  if os.path.isfile(path):
    return None
  if os.path.isdir(path):
    return f"--config={config_arg}: {path} is a directory, not a config file (.py)"
  folder = os.path.dirname(path) or "."
  names = sorted(n for n in os.listdir(folder) if n.endswith(".py")) if os.path.isdir(
      folder) else []
  close = difflib.get_close_matches(os.path.basename(path), names, n=3)
  hint = (f"; did you mean {' or '.join(os.path.join(folder, n) for n in close)}?" if close else
          f"; config files there: {', '.join(names)}" if names else "")
  return f"--config={config_arg}: config file {path} does not exist{hint}"


def _innermost_nmjax_error(error: BaseException) -> NmjaxError | None:
  """The deepest NmjaxError in the chain of causes (config_flags re-raises it with a traceback
  in its text; the original holds the one line)."""
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, NmjaxError):
      found = error
    error = error.__cause__ or error.__context__
  return found


def explain_flag_error(error: BaseException, argv: Sequence[str], config_arg: str) -> str:
  """The one line for a flag-parsing error."""
  cause = _innermost_nmjax_error(error)
  if cause is not None:
    return f"--config={config_arg}: {cause}"
  try:
    config = load_config(config_arg)
  except SyntaxError as e:
    return f"--config={config_arg} cannot be loaded ({type(e).__name__}: {_first_line(e)})"
  # Any other exception of the config file's own code propagates with its traceback.
  for path, value in overrides(argv):
    problem = check_override(config, path, value)
    if problem:
      return problem
  return _first_line(error)


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def load_config(config_arg: str) -> ml_collections.ConfigDict:
  """get_config(args) of the config file of `path[:args]`, as config_flags loads it."""
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("nmjax_cli_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if ":" in config_arg else module.get_config()


def overrides(argv: Sequence[str]) -> list[tuple[str, str | None]]:
  """(field path, value text) of every --config.FIELD=VALUE (or --config.FIELD VALUE) in argv."""
  found = []
  for i, arg in enumerate(argv):
    match = _OVERRIDE.match(arg)
    if match:
      value = match.group(2)
      if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
        value = argv[i + 1]
      found.append((match.group(1), value))
  return found


def check_override(config: ml_collections.ConfigDict, path: str, value: str | None
                   ) -> str | None:
  """One line when --config.PATH=VALUE names no field of `config` or a value of the wrong type."""
  node, parent, walked = config, None, "config"
  parts = path.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      return (f"--config.{path}: {walked} is a single value ({type(node).__name__}), not a group"
              " of fields")
    if part not in node:
      return (f"--config.{path}: {walked} has no field {part!r}; "
              + where_else(config, parts[:i], part))
    parent, node, walked = node, node[part], f"{walked}.{part}"
  if isinstance(node, ml_collections.ConfigDict) or parent is None:
    return None
  return _check_value(path, parent.get_type(parts[-1]), node, value)


_KINDS = ((bool, "true or false"), (int, "an integer"), (float, "a number"))


def _check_value(path: str, kind: type, current: Any, value: str | None) -> str | None:
  if value is None:
    return None
  for expected, words in _KINDS:
    if kind is expected:
      try:
        if expected is bool:
          ok = value.lower() in ("true", "false", "t", "f", "1", "0")
        else:
          expected(value)
          ok = True
      except ValueError:
        ok = False
      if not ok:
        return (f"--config.{path}={value}: config.{path} is {words} (now {current!r}), and"
                f" {value!r} is not")
      return None
  return None


def _leaf_paths(config: ml_collections.ConfigDict, prefix: str = "config") -> list[str]:
  paths = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      paths += _leaf_paths(value, f"{prefix}.{key}")
    else:
      paths.append(f"{prefix}.{key}")
  return paths


def _study_stage_fields(config: ml_collections.ConfigDict) -> dict[str, set[str]]:
  """The fields a study stage's own config has that the study's section lacks: the study sets
  them for each stage (nmjax/jobs/study.py builds the stages with these builders)."""
  from nmjax.config import pretrain_run, tuning_config  # pylint: disable=g-import-not-at-top
  try:
    stages = {"pretrain": pretrain_run(config.pretrain, noise_ratio=0.0, seed=0),
              "nmtune": tuning_config(config.nmtune, methods="nmtune", tasks="")}
  except Exception:  # pylint: disable=broad-except
    return {}  # Not a study's sections after all: no stage hint.
  return {name: set(stage.keys()) - set(config[name].keys()) for name, stage in stages.items()}


def where_else(config: ml_collections.ConfigDict, prefix: Sequence[str], name: str) -> str:
  """Where a field `name` that is not under config.<prefix> is meant to go, as a hint."""
  elsewhere = [p for p in _leaf_paths(config) if p.rsplit(".", 1)[-1] == name]
  section = config
  for part in prefix:
    section = section[part]
  top = difflib.get_close_matches(name, list(config.keys()), n=2)
  if (config.get("job") == "study" and prefix
      and name in _study_stage_fields(config).get(prefix[0], ())):
    instead = f"; set {' or '.join(f'config.{t}' for t in top)} instead" if top else ""
    return f"the study sets it for each stage itself{instead}"
  if elsewhere:
    listed = ", ".join(elsewhere[:-1]) + " and " if len(elsewhere) > 1 else ""
    return f"it lives at {listed}{elsewhere[-1]}"
  siblings = list(section.keys())
  close = difflib.get_close_matches(name, siblings, n=3)
  base = "config" + "".join(f".{p}" for p in prefix)
  if close:
    return f"did you mean {' or '.join(f'{base}.{c}' for c in close)}?"
  leaves = [p for p in _leaf_paths(config)
            if difflib.get_close_matches(name, [p.rsplit(".", 1)[-1]], n=1)]
  if leaves:
    return f"did you mean {' or '.join(leaves[:3])}?"
  return f"its fields: {', '.join(sorted(siblings))}"


def configs_help(folder: str) -> str:
  """The configs in `folder` (name, job, first docstring line) and the jobs, for --help."""
  lines = ["Configs (--config=configs/NAME.py[:args]; each docstring has its command):"]
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".py") or name.startswith("_"):
      continue
    path = os.path.join(folder, name)
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    try:
      job = load_config(path).job
    except Exception:  # pylint: disable=broad-except
      job = "?"  # A config that fails to load says why when it is run.
    lines.append(f"  {name:<22} job {job:<14} {first}")
  from nmjax import jobs  # pylint: disable=g-import-not-at-top
  lines.append(f"Jobs (config.job): {', '.join(jobs.job_names())}")
  return "\n".join(lines) + "\n"
