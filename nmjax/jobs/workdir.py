"""A job's workdir: made (or refused with one line), its compile cache, its lock's process index."""

from __future__ import annotations

import os

from nmjax.errors import ConfigError


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
    # The default (1 s) leaves out most of the study's programs, which compile faster than that;
    # writing one is cheap.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def process_index(distributed: str, process_id: int, initialize: object) -> int:
  """This process's index among the job's processes, before they connect where the plan tells
  it (explicit), else after connecting (auto: `initialize()` connects); it names the process's
  lock file."""
  mode = os.environ.get("NMJAX_DISTRIBUTED", distributed)
  if mode == "explicit":
    return process_id if process_id > 0 else 0
  if mode == "auto":
    import jax  # pylint: disable=g-import-not-at-top
    initialize()
    return jax.process_index()
  return 0
