"""Files and paths: one layer for local and cloud paths (gs://, any fsspec protocol), the one
atomic writer, and the one lock (a flock locally, a lease in a bucket).

`nmjax.io.paths` holds the path functions (exists, listdir, open, ... for both kinds of path),
`nmjax.io.files` the atomic writer, `nmjax.io.locks` the lock; their names are all here.
"""

from nmjax.io.files import append_line, atomic_path, write_bytes, write_json, write_jsonl, \
  write_text
from nmjax.io.locks import Holder, InUse, LOCK_FILE, exclusive, hold, lock_path
from nmjax.io.paths import absolute, exists, getsize, is_cloud, isdir, isfile, join, listdir, \
  local_mirror, makedirs, open, read_bytes, read_text, remove, rmtree, upload  # pylint: disable=redefined-builtin

__all__ = ["atomic_path", "write_text", "write_bytes", "write_json", "write_jsonl", "append_line",
           "hold", "exclusive", "InUse", "Holder", "lock_path", "LOCK_FILE", "is_cloud",
           "absolute", "join", "exists", "isdir", "isfile", "listdir", "makedirs", "open",
           "read_text", "read_bytes", "getsize", "remove", "rmtree", "upload", "local_mirror"]
