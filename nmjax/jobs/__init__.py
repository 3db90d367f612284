"""The runner: one module per job, each with NAME, validate(config) -> Plan and run(plan, workdir).

JOBS maps a job's name (config.job) to its module, imported on first use. main.py loads a
config, looks its job up here, validates it once into a plan, takes the workdir and its lock, and
runs the plan; run(config, workdir) does the same from Python:

    job, plan = nmjax.jobs.validate(config)       # every field checked, before any work
    result = nmjax.jobs.execute(job, plan, "runs/my_run")

The library (every nmjax room outside nmjax.jobs) never imports the runner.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from nmjax import io as nmjax_io
from nmjax.errors import ConfigError
from nmjax.jobs import plans
from nmjax.jobs.workdir import prepare_workdir

# Job name -> its module in nmjax.jobs (the module's NAME is the job's name).
_MODULES = {
    "study": "study",
    "pretrain": "pretrain",
    "pretrain_clip": "pretrain_clip",
    "transfer": "transfer",
    "nmtune": "tuning",
    "import": "importer",
    "report": "report",
    "predict": "predict",
}


def __getattr__(name: str) -> Any:
  """JOBS, imported on first use: flag parsing and --help stay quick (no jax import)."""
  if name != "JOBS":
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  jobs = {job: importlib.import_module(f"nmjax.jobs.{module}") for job, module in _MODULES.items()}
  globals()["JOBS"] = jobs
  return jobs


def job_names() -> tuple[str, ...]:
  """The jobs' names, without importing them."""
  return tuple(_MODULES)


__all__ = ["JOBS", "validate", "execute", "run"]


def validate(config: Any) -> tuple[ModuleType, Any]:
  """Looks config.job up in JOBS and validates the config once.

  Args:
    config: a complete job config (an ml_collections.ConfigDict from configs/*.py).

  Returns:
    (the job's module, its plan).

  Raises:
    ConfigError: an unknown job, or a bad field (one line naming it and the allowed values).
  """
  try:
    name = config.job
  except AttributeError:  # A config without a job field.
    name = None
  if name not in _MODULES:
    raise ConfigError(f"config.job={name!r} is unknown; allowed: {', '.join(_MODULES)}")
  job = importlib.import_module(f"nmjax.jobs.{_MODULES[name]}")
  return job, job.validate(config)


def execute(job: ModuleType, plan: Any, workdir: str) -> dict:
  """Runs a validated plan in `workdir`, holding the workdir's lock.

  A job with a check_workdir(plan, workdir) first has it read what the workdir holds (a refusal
  there leaves the workdir as it was); then the workdir is made, locked (nmjax.io.hold) in the
  lock file of this process (job.lock_index(plan); None: the job locks what it writes itself),
  and plan.json written.

  Args:
    job: the job's module (from validate or JOBS).
    plan: its plan (job.validate(config)).
    workdir: where the job writes (made if needed).

  Returns:
    What job.run returns (a dict; see each job's run).

  Raises:
    InUse: another run holds the workdir's lock.
    ConfigError: the workdir cannot be made or locked, or holds another run's results (or, for
      a study, stages of other flags).
    DataError: input data the job cannot read.
    TrainingError: training cannot go on (a non-finite loss).
  """
  check = getattr(job, "check_workdir", None)
  if check is not None:
    check(plan, workdir)
  index = job.lock_index(plan)
  if index is None:
    return job.run(plan, workdir)  # A job that locks what it writes itself (a sweep's stage).
  path = prepare_workdir(workdir)
  with nmjax_io.hold(path, f"job {job.NAME}", process_index=index):
    first = not nmjax_io.exists(nmjax_io.join(path, plans.PLAN_FILE))
    if index == 0 and first:  # A crash mid-run still leaves the plan it ran.
      plans.write(plan, job.NAME, path)
    result = job.run(plan, path)
    if index == 0 and not first:  # A run its checks refused leaves the earlier plan.json.
      plans.write(plan, job.NAME, path)
    return result


def run(config: Any, workdir: str) -> dict:
  """Validates `config` once and runs its job in `workdir` (what main.py does).

  Args:
    config: a complete job config (configs/*.py's get_config(...)).
    workdir: where the job writes (made if needed).

  Returns:
    What the job's run returns (a dict).

  Raises:
    ConfigError: a bad config field, or a workdir in use (InUse) or not this run's.
    DataError: input data the job cannot read.
    TrainingError: training cannot go on (a non-finite loss).
  """
  job, plan = validate(config)
  return execute(job, plan, workdir)
