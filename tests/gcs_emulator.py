"""Runs gcp-storage-emulator (PyPI) as tests/conftest.py's gcs_emulator fixture starts it:

  python tests/gcs_emulator.py start --host=127.0.0.1 --port=PORT --in-memory ...

Two things differ from its console script:
- the server dies with the process that started it (PR_SET_PDEATHSIG): a killed test run leaves
  no server behind;
- object downloads carry the `x-goog-generation` and `x-goog-metageneration` headers, as GCS's
  do. tensorstore (orbax's array store) stamps what it reads with that generation and makes its
  next write of a checkpoint's manifest conditional on it; without the header the emulator's
  answers read as a malformed generation and a second checkpoint write fails;
- a multipart upload (gcsfs's, for small files) keeps its bytes exactly. gcsfs ends its lines
  with LF; the emulator parses the body with Python's e-mail parser, which reads a file's last
  byte, when it is a carriage return, as part of the line end before the closing delimiter and
  drops it (one file in 256 of random bytes: now and then one of a checkpoint's data files,
  which tensorstore then cannot read). The parts are cut here at the delimiters instead.
"""

import base64
import ctypes
import json
import re
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

from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top,wrong-import-position

_read_data = server._read_data  # pylint: disable=protected-access


def _multipart_related(raw, content_type):
  """The emulator's {"meta", "content", "content-type"} of a multipart/related upload body, cut
  at its delimiters (newline, "--", boundary) with each part's bytes kept as sent. The newline is
  the one the body's first line ends with: gcsfs writes LF, other clients CRLF."""
  boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
  first = raw.split(b"\n", 1)[0]
  newline = b"\r\n" if first.endswith(b"\r") else b"\n"
  parts = (newline + raw).split(newline + b"--" + boundary)[1:-1]  # Preamble and epilogue off.
  decoded = []
  for part in parts:
    head, _, body = part.partition(newline + newline)
    headers = dict(line.split(b":", 1) for line in head.split(newline) if b":" in line)
    headers = {k.strip().lower().decode(): v.strip().decode() for k, v in headers.items()}
    if headers.get("content-transfer-encoding", "").lower() == "base64":
      body = base64.b64decode(body)
    decoded.append((headers.get("content-type", "application/octet-stream"), body))
  return {"meta": json.loads(decoded[0][1]), "content": decoded[1][1],
          "content-type": decoded[1][0].split(";")[0].strip()}


def _read_data_exact(request_handler, query):
  content_type = request_handler.headers.get("Content-Type") or ""
  if not content_type.startswith("multipart/related"):
    return _read_data(request_handler, query)
  raw = server._decode_raw_data(server._read_raw_data(request_handler), request_handler)  # pylint: disable=protected-access
  return _multipart_related(raw, content_type) if raw else None


server._read_data = _read_data_exact  # pylint: disable=protected-access

from gcp_storage_emulator.__main__ import main  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  main(sys.argv[1:])
