"""Where a benchmark's figures came from, written beside them in one JSON file.

Every script in benchmarks/ prints its figures as JSON on stdout and writes them, with their
provenance, to docs/benchmarks/<benchmark>-<device>.json (or the path given with --out):

    {"benchmark": "nmtune",
     "figures":   {...},                       what the script prints
     "complete":  true,                        false while the script is still measuring
     "command":   ".venv/bin/python benchmarks/nmtune.py --sections step",
     "commit":    "b69ccbd...",                the checked-out commit (null outside a git checkout)
     "worktree_clean": false,                  whether files differed from that commit
     "date":      "2026-01-31T12:00:00Z",      UTC, when the file was written
     "load_average": 1.2,                      the host's 1-minute load then (a shared CPU)
     "machine":   {"cpu_model", "cpu_cores", "cpus_usable", "device_platform", "device_kind",
                   "device_count", "jax", "jaxlib", "python"}}

<device> is jax's device kind of the default device, lower-cased with dashes: "cpu",
"nvidia-h200", "tpu-v4". Outside a git checkout (a copied tree on a lent machine) the commit is
read from $NMJAX_BENCHMARK_COMMIT when set. docs/performance.md is generated from these files by
benchmarks/performance_page.py. This module is for the scripts in benchmarks/ only.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(REPO, "docs", "benchmarks")
FORMAT = 1


def add_out_flag(parser: argparse.ArgumentParser) -> None:
  """Adds --out: where the JSON file goes (default docs/benchmarks/<benchmark>-<device>.json)."""
  parser.add_argument("--out", default="",
                      help="the JSON file to write, or a folder (an existing one, or a path "
                           "ending in /) to write <benchmark>-<device kind>.json into; default: "
                           "this repository's docs/benchmarks/")


def slug(text: str) -> str:
  """'NVIDIA H200' -> 'nvidia-h200': a device kind as a file-name part."""
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model() -> str:
  """The CPU's model name as the study's stages record it (nmjax.jobs.report.cpu_model)."""
  from nmjax.jobs import report  # pylint: disable=import-outside-toplevel
  return report.cpu_model()


@functools.lru_cache(maxsize=None)
def machine() -> dict[str, Any]:
  """The host and jax's default device. Imports jax (and so picks its backend): scripts that
  start worker processes call it after they have stopped them."""
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  return {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
          "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else os.cpu_count(),
          "device_platform": jax.default_backend(), "device_kind": devices[0].device_kind,
          "device_count": len(devices), "jax": jax.__version__,
          "jaxlib": getattr(jaxlib, "__version__", None), "python": platform.python_version()}


def _git(*args: str) -> str | None:
  try:
    done = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                          timeout=30, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def commit() -> tuple[str | None, bool | None]:
  """(commit, worktree_clean): the checked-out commit and whether no tracked file differs from
  it; ($NMJAX_BENCHMARK_COMMIT, None) outside a git checkout."""
  head = _git("rev-parse", "HEAD")
  if head is None:
    return os.environ.get("NMJAX_BENCHMARK_COMMIT") or None, None
  changes = _git("status", "--porcelain", "--untracked-files=no")
  return head, None if changes is None else changes == ""


def _shown(path: str) -> str:
  """A path as a reader would type it: relative to the repository root when inside it."""
  absolute = os.path.abspath(path)
  if absolute.startswith(REPO + os.sep):
    return os.path.relpath(absolute, REPO)
  return path


def command() -> str:
  """This process's command line, paths inside the repository relative to its root."""
  executable = _shown(sys.executable)
  if os.sep not in executable:
    executable = os.path.basename(sys.executable)
  return shlex.join([executable, _shown(sys.argv[0]), *sys.argv[1:]])


def out_path(benchmark: str, out: str = "") -> str:
  """Where write() puts the file: `out`, or <benchmark>-<device>.json in the folder `out` names
  (an existing folder or a path ending in a separator), by default docs/benchmarks/."""
  if out and not (out.endswith(os.sep) or os.path.isdir(out)):
    return out
  return os.path.join(out or DEFAULT_DIR, f"{benchmark}-{slug(machine()['device_kind'])}.json")


def record(benchmark: str, figures: Any, *, complete: bool = True) -> dict[str, Any]:
  """The figures with their command, commit, date (UTC) and machine."""
  head, clean = commit()
  now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
  return {"benchmark": benchmark, "format": FORMAT, "figures": figures, "complete": complete,
          "command": command(), "commit": head, "worktree_clean": clean,
          "date": now.isoformat().replace("+00:00", "Z"),
          "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
          "machine": machine()}


def write(benchmark: str, figures: Any, out: str = "", *, complete: bool = True) -> str:
  """Writes record(...) atomically to out_path(benchmark, out); returns the path. Scripts that
  measure several cases call it after each with complete=False, so a run cut short by a time
  limit still leaves what it measured."""
  path = out_path(benchmark, out)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  text = json.dumps(record(benchmark, figures, complete=complete), indent=1) + "\n"
  partial = f"{path}.tmp{os.getpid()}"
  with open(partial, "w") as f:
    f.write(text)
  os.replace(partial, path)
  if complete:
    print(f"[{benchmark}] wrote {path}", file=sys.stderr, flush=True)
  return path
