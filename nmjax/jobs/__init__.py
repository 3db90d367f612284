"""Jobs: the only place that wires configs, data, models and loops together. No job imports
another job; what two jobs share lives in the library."""

from __future__ import annotations

import os

import ml_collections

from nmjax.errors import ConfigError

JOBS = ("study", "pretrain", "transfer", "nmtune")


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir (absolute path) or fails with one line saying why."""
  path = os.path.abspath(workdir)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be created ({e.strerror}); pass a writable"
                      " directory") from None
  if not os.access(path, os.W_OK):
    raise ConfigError(f"--workdir={workdir} is not writable; pass a writable directory")
  return path


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Dispatches on config.job."""
  job = config.get("job")
  if job == "study":
    from nmjax.jobs import study
    return study.run(config, workdir)
  if job == "pretrain":
    from nmjax.jobs import pretrain
    return pretrain.run(config, workdir)
  if job == "transfer":
    from nmjax.jobs import evaluate
    return evaluate.run_transfer(config, workdir)
  if job == "nmtune":
    from nmjax.jobs import evaluate
    return evaluate.run_nmtune(config, workdir)
  raise ConfigError(f"config.job={job!r} is unknown; allowed: {', '.join(JOBS)}")
