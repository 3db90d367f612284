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


@pytest.fixture(scope="session")
def gcs_emulator():
  """A GCS emulator (PyPI: gcp-storage-emulator) on 127.0.0.1, in memory, for this test process
  and the main.py runs it starts: gcsfs, orbax and tensorstore are pointed at it through their
  documented variables. Skips with the reason when the package is not installed."""
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("gcp_storage_emulator") is None or importlib.util.find_spec(
      "gcsfs") is None:
    pytest.skip("the GCS emulator needs `pip install gcp-storage-emulator gcsfs` (.ci/run does)")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  # tests/gcs_emulator.py: the server, dying with this process, with GCS's generation headers.
  server = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py")
  proc = subprocess.Popen([sys.executable, server, "start", "--host=127.0.0.1", f"--port={port}",
                           "--in-memory", "--default-bucket=nmjax-tests"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  for _ in range(200):
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
      break
    except OSError:
      time.sleep(0.05)
  else:
    proc.kill()
    pytest.fail("the GCS emulator did not start in 10 s")
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                          "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                                          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
  # gcsfs's plain JSON-API client (its bucket-type probe speaks gRPC, which the emulator lacks).
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                    GOOGLE_AUTH_TOKEN_FOR_TESTING="x", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  yield url
  proc.kill()
  proc.wait()
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@pytest.fixture
def bucket(gcs_emulator, request):  # pylint: disable=unused-argument
  """A fresh gs:// folder in the emulated bucket, one per test."""
  import uuid  # pylint: disable=g-import-not-at-top
  return f"gs://nmjax-tests/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
