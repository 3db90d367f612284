"""Runs gcp-storage-emulator (PyPI) as tests/conftest.py's gcs_emulator fixture starts it:

  python tests/gcs_emulator.py start --host=127.0.0.1 --port=PORT --in-memory ...

Two things differ from its console script:
- the server dies with the process that started it (PR_SET_PDEATHSIG): a killed test run leaves
  no server behind;
- object downloads carry the `x-goog-generation` and `x-goog-metageneration` headers, as GCS's
  do. tensorstore (orbax's array store) stamps what it reads with that generation and makes its
  next write of a checkpoint's manifest conditional on it; without the header the emulator's
  answers read as a malformed generation and a second checkpoint write fails.
"""

import ctypes
import signal
import sys

ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top,wrong-import-position

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  except Exception:  # pylint: disable=broad-except
    pass  # A missing object: the emulator's own handler answers 404.
  return _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation  # Before the server module binds its handlers.

from gcp_storage_emulator.__main__ import main  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  main(sys.argv[1:])
