"""The path layer (nmjax.io) on bucket paths: a GCS emulator on 127.0.0.1 (tests/conftest.py)."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from nmjax import io as nmjax_io


def test_local_and_cloud_paths_are_told_apart_and_kept():
  assert nmjax_io.is_cloud("gs://b/run") and nmjax_io.is_cloud("s3://b/x")
  assert not nmjax_io.is_cloud("runs/a") and not nmjax_io.is_cloud("file:///tmp/a")
  assert nmjax_io.absolute("gs://b/run/") == "gs://b/run"
  assert nmjax_io.absolute("runs/a") == os.path.abspath("runs/a")
  assert nmjax_io.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"


def test_files_in_a_bucket_are_written_whole_listed_mirrored_and_removed(bucket):
  path = nmjax_io.join(bucket, "a", "x.json")
  assert not nmjax_io.exists(path)
  nmjax_io.makedirs(nmjax_io.join(bucket, "a"))  # No folders in a bucket: nothing to make.
  nmjax_io.write_json(path, {"k": 1})
  assert nmjax_io.isfile(path) and nmjax_io.isdir(nmjax_io.join(bucket, "a"))
  assert json.loads(nmjax_io.read_text(path)) == {"k": 1}
  rows = nmjax_io.join(bucket, "rows.jsonl")
  nmjax_io.append_line(rows, {"a": 1})
  nmjax_io.append_line(rows, {"a": 2})
  assert nmjax_io.read_text(rows).splitlines() == ['{"a": 1}', '{"a": 2}']
  assert nmjax_io.listdir(bucket) == ["a", "rows.jsonl"]
  with pytest.raises(FileNotFoundError):
    nmjax_io.listdir(nmjax_io.join(bucket, "none"))
  with pytest.raises(ValueError):  # A failed write leaves the object as it was.
    with nmjax_io.atomic_path(path) as tmp:
      with open(tmp, "w") as f:
        f.write("torn")
      raise ValueError("killed mid-write")
  assert json.loads(nmjax_io.read_text(path)) == {"k": 1}
  local = nmjax_io.local_mirror(nmjax_io.join(bucket, "a"))
  assert not nmjax_io.is_cloud(local)
  assert open(os.path.join(local, "x.json")).read() == nmjax_io.read_text(path)
  nmjax_io.rmtree(nmjax_io.join(bucket, "a"))
  assert not nmjax_io.exists(path)



def test_uploaded_files_keep_every_byte_whatever_they_end_with(bucket, tmp_path):
  # Binary files ending in line-end bytes or in the start of a delimiter-like line, as an
  # orbax/tensorstore data file may: each comes back byte for byte.
  tails = [b"", b"\r", b"\r\r", b"\n", b"\r\n", b"\r\n--x", b"\n\r"]
  rng = np.random.default_rng(0)
  local = tmp_path / "files"
  local.mkdir()
  sent = {}
  for i, tail in enumerate(tails):
    sent[f"f{i}.bin"] = rng.integers(0, 256, 300 + 97 * i, dtype=np.uint8).tobytes() + tail
    (local / f"f{i}.bin").write_bytes(sent[f"f{i}.bin"])
  nmjax_io.upload(str(local), nmjax_io.join(bucket, "up"))
  back = nmjax_io.local_mirror(nmjax_io.join(bucket, "up"))
  assert {n: open(os.path.join(back, n), "rb").read() for n in sorted(os.listdir(back))} == sent

def _holder(workdir, what="job pretrain"):
  """A process holding `workdir`'s lock until killed (it prints 'held' once it holds it)."""
  code = ("import sys, time; from nmjax import io\n"
          f"with io.hold({workdir!r}, {what!r}):\n  print('held', flush=True); time.sleep(600)")
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_bucket_workdir_is_refused_as_a_local_one_and_taken_over_when_its_holder_died(
    bucket, tmp_path):
  messages = []
  for workdir in (str(tmp_path), bucket):
    proc = _holder(workdir)
    try:
      with pytest.raises(nmjax_io.InUse) as refused:
        with nmjax_io.hold(workdir, "job transfer"):
          pass
      messages.append(re.sub(r"pid \d+ (.*) started [0-9: -]+", r"pid P \1 started T",
                             str(refused.value).replace(workdir, "WORKDIR")))
    finally:
      proc.kill()
      proc.wait()
    with nmjax_io.hold(workdir, "job transfer") as holder:  # Its holder was killed: taken over.
      assert holder.pid == os.getpid()
  assert messages[0] == messages[1]
  assert messages[0].startswith("--workdir=WORKDIR is in use by another run (pid P on host")
  assert not nmjax_io.exists(nmjax_io.lock_path(bucket))  # A clean release deletes the lease.


def test_a_lease_is_renewed_while_held_and_binds_until_it_expires(bucket, monkeypatch):
  monkeypatch.setenv("NMJAX_LEASE_SECONDS", "1.5")
  lease = nmjax_io.lock_path(bucket, 3)
  with nmjax_io.hold(bucket, "job a", process_index=3):
    first = json.loads(nmjax_io.read_text(lease))["expires"]
    time.sleep(1.2)  # Renewed every third of its length.
    assert json.loads(nmjax_io.read_text(lease))["expires"] > first
  # A lease of another host (whose process cannot be checked) binds until it expires.
  record = {"pid": 1, "host": "worker-7", "started": time.time(), "what": "job pretrain",
            "token": "t", "expires": time.time() + 1.0}
  nmjax_io.write_json(lease, record)
  with pytest.raises(nmjax_io.InUse, match="pid 1 on host worker-7, job pretrain"):
    with nmjax_io.hold(bucket, "job b", process_index=3):
      pass
  time.sleep(1.1)
  with nmjax_io.hold(bucket, "job b", process_index=3) as holder:
    assert holder.what == "job b"
