"""Jobs: the only place that wires configs, data, models and loops together. No job imports
another job; what two jobs share lives in the library."""

from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections

from nmjax import lock
from nmjax.errors import ConfigError

JOBS = ("study", "pretrain", "pretrain_clip", "transfer", "nmtune", "import")


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


def use_compile_cache(workdir: str) -> None:
  """Every stage of a kind compiles the same programs (only the noise and the seed differ):
  XLA's persistent cache in the workdir lets the later stages, and a restarted study, load
  them. Left alone when the user has set one (e.g. JAX_COMPILATION_CACHE_DIR); it takes effect
  only if nothing was compiled yet in this process (main.py's case)."""
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "compile_cache"))
    # The default (1 s) leaves out most of the study's programs on 2 cores; writing one costs
    # milliseconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def _job(name: Any) -> tuple[Callable[[ml_collections.ConfigDict], Any], Callable[..., dict]]:
  """(check, run) of a job: the config check that comes before any work, and the job."""
  if name == "study":
    from nmjax.jobs import study
    return study.validate, study.run
  if name == "pretrain":
    from nmjax.jobs import pretrain
    return pretrain.validate, pretrain.run
  if name == "pretrain_clip":
    from nmjax.train import pretrain_clip
    return pretrain_clip.validate, pretrain_clip.run
  if name in ("transfer", "nmtune"):
    from nmjax import evaluate
    from nmjax.jobs import evaluate as evaluate_job
    if name == "transfer":
      return evaluate.check_transfer, evaluate_job.run_transfer
    return evaluate.check_tuning, evaluate_job.run_nmtune
  if name == "import":
    from nmjax.jobs import importer
    return importer.validate, importer.run
  raise ConfigError(f"config.job={name!r} is unknown; allowed: {', '.join(JOBS)}")


def _process_index(config: ml_collections.ConfigDict) -> int:
  """This process's index in the job's processes, before they connect where the config tells it
  (explicit), else after connecting (auto); it names the process's lock file."""
  mode = os.environ.get("NMJAX_DISTRIBUTED", str(config.get("distributed", "none")))
  if mode == "explicit":
    process_id = config.get("process_id", 0)
    return process_id if isinstance(process_id, int) and process_id > 0 else 0
  if mode == "auto":
    import jax  # pylint: disable=g-import-not-at-top
    from nmjax import parallel  # pylint: disable=g-import-not-at-top
    parallel.maybe_initialize_distributed(config)
    return jax.process_index()
  return 0


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs config.job in `workdir`, holding the workdir's lock (nmjax.lock) while it writes."""
  job = config.get("job")
  check, run_job = _job(job)
  check(config)  # A bad config fails before the workdir is made.
  if job == "study" and str(config.get("stage", "")).strip():
    # One stage of a sweep (a job-array task), its listing or its report: the study locks each
    # point it runs, so several such processes share the workdir.
    return run_job(config, workdir)
  with lock.hold(prepare_workdir(workdir), f"job {job}", process_index=_process_index(config)):
    return run_job(config, workdir)
