"""A job's workdir: made (or refused with one line), its compile cache, its lock's process index."""

from __future__ import annotations

import os
from typing import Any

from nmjax import io as nmjax_io
from nmjax.errors import ConfigError


def _check_bucket(workdir: str, path: str) -> None:
  """One line when the bucket of a cloud workdir cannot be reached or does not exist."""
  from nmjax.io import paths  # pylint: disable=g-import-not-at-top
  fs, inner = paths.filesystem(path)
  bucket = inner.strip("/").split("/")[0]
  try:
    found = fs.exists(bucket)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"--workdir={workdir}: its bucket {bucket} cannot be reached"
                      f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                      ) from None
  if not found:
    raise ConfigError(f"--workdir={workdir}: bucket {bucket} does not exist (or this account"
                      " cannot see it); create it or pass another --workdir")


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir (absolute path; a bucket path as given) or fails with one line saying
  why. A bucket workdir (gs://...) needs its client (nmjax[cloud]) and a bucket that exists."""
  path = nmjax_io.absolute(workdir)
  if nmjax_io.is_cloud(path):
    _check_bucket(workdir, path)
    return path
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
    # A bucket workdir keeps the cache on local disk: compiled programs are per host anyway.
    folder = (os.path.join(nmjax_io.paths.mirror_root(), "..", "compile_cache")
              if nmjax_io.is_cloud(workdir) else os.path.join(workdir, "compile_cache"))
    jax.config.update("jax_compilation_cache_dir", os.path.normpath(folder))
    # The default (1 s) leaves out most of the study's programs, which compile faster than that;
    # writing one is cheap.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def process_index(plan: Any) -> int:
  """The index of this process's lock file in the workdir: its index among the job's
  processes, read from the plan (explicit mode) or learned by connecting them first (auto mode,
  nmjax.parallel.maybe_initialize_distributed), else 0.

  Args:
    plan: a job's plan with the distributed fields (distributed, coordinator_address,
      num_processes, process_id); NMJAX_DISTRIBUTED overrides plan.distributed.

  Returns:
    The process's index, 0 for a single process.
  """
  mode = os.environ.get("NMJAX_DISTRIBUTED", plan.distributed)
  if mode == "explicit":
    return max(plan.process_id, 0)
  if mode == "auto":
    import jax  # pylint: disable=g-import-not-at-top
    from nmjax import parallel  # pylint: disable=g-import-not-at-top
    parallel.maybe_initialize_distributed(plan)
    return jax.process_index()
  return 0


def single_process(plan: Any) -> int:
  """The lock file index of a job that runs as one process: 0.

  Args:
    plan: the job's plan (unused).

  Returns:
    0.
  """
  del plan
  return 0
