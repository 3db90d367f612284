"""Test-wide setup: eight fake CPU devices, so sharded code paths run in-process, and one real
smoke pre-training checkpoint shared by the jobs that evaluate encoders (transfer, nmtune).

Code that wants one device builds its mesh from jax.devices()[:1]; subprocesses (main.py runs)
get whatever their own environment says, and share the run's persistent XLA cache.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA cache for the whole run, in-process and in the main.py subprocesses the
# tests start (they inherit the environment): the same smoke programs are compiled once, not in
# every subprocess. A cached executable is the one a fresh compile gives, bit for bit.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"nmjax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
  """A pre-training workdir from the real job: 12 smoke steps of the small ResNet on digits."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  from nmjax import jobs  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  jobs.run(pretrain_config.get_config("dataset=digits,noise=0.1,smoke"), workdir)
  return workdir
