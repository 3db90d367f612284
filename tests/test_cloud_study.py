"""Everything downstream of pre-training on bucket paths (a GCS emulator, tests/conftest.py): a
transfer job reading its encoder from a gs:// checkpoint and writing there, the feature cache
beside that checkpoint, the smoke study and its report in a gs:// workdir with the numbers of a
local run, and a bucket workdir held by another process refused as a local one is."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

import helpers
from nmjax import io as nmjax_io
from nmjax import jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import default as default_config  # pylint: disable=wrong-import-position
from configs import report as report_config  # pylint: disable=wrong-import-position
from configs import transfer as transfer_config  # pylint: disable=wrong-import-position

# Fields naming where a row came from or how long it took: the rest are the numbers compared.
NOT_NUMBERS = ("checkpoint", "workdir", "seconds")


def _rows(workdir):
  return [json.loads(line) for line in nmjax_io.read_text(
      nmjax_io.join(workdir, "results.jsonl")).splitlines()]


def _numbers(rows):
  return [{k: v for k, v in r.items() if k not in NOT_NUMBERS} for r in rows]


def _local_copy(checkpoint, folder):
  """A private copy of the shared pre-training workdir, with an empty feature cache."""
  shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("features", ".lock*"))
  return str(folder)


def _transfer(checkpoint, workdir):
  config = transfer_config.get_config("smoke")
  config.checkpoint = checkpoint
  config.methods = "ridge"  # The quickest fit: the paths, not the probes, are under test.
  return jobs.run(config, workdir)


@pytest.mark.slow  # A transfer job end to end in a bucket: about ten seconds.
def test_transfer_reads_a_bucket_checkpoint_and_writes_a_bucket_workdir(checkpoint, bucket,
                                                                       tmp_path):
  local = _local_copy(checkpoint, tmp_path / "pretrain")
  cloud = nmjax_io.join(bucket, "pretrain")
  nmjax_io.upload(local, cloud)
  expected = _transfer(local, str(tmp_path / "transfer"))
  got = _transfer(cloud, nmjax_io.join(bucket, "transfer"))
  out = nmjax_io.join(bucket, "transfer")
  assert got["features_extracted"] == expected["features_extracted"] == 3
  assert _numbers(_rows(out)) == _numbers(_rows(str(tmp_path / "transfer")))
  assert {r["checkpoint"] for r in _rows(out)} == {cloud}
  for name in ("results.md", "spectra.png", "plan.json", "heads/digits/ridge/head.json"):
    assert nmjax_io.isfile(nmjax_io.join(out, name)), name
  # The cache lies beside the bucket checkpoint (features/<digest>/step_N/), not in the workdir.
  (digest,) = nmjax_io.listdir(nmjax_io.join(cloud, "features"))
  cached = nmjax_io.listdir(nmjax_io.join(cloud, "features", digest, "step_12"))
  assert sorted(n for n in cached if n.endswith(".npz")) == sorted(
      os.listdir(os.path.join(local, "features", digest, "step_12")))
  assert not nmjax_io.exists(nmjax_io.join(out, "features"))
  # A second run over the bucket checkpoint reads its cache: nothing is extracted again.
  again = _transfer(cloud, nmjax_io.join(bucket, "transfer2"))
  assert again["features_extracted"] == 0
  assert _numbers(_rows(nmjax_io.join(bucket, "transfer2"))) == _numbers(_rows(out))


def test_heads_save_load_and_export_in_a_bucket(bucket):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from nmjax import heads, probe  # pylint: disable=g-import-not-at-top
  x, y = np.eye(3, dtype=np.float32).repeat(4, axis=0), np.arange(12) // 4
  head = probe.ridge_probe((x, y), (x, y))["head"]
  folder = nmjax_io.join(bucket, "head")
  head.save(folder)
  assert (heads.load(folder).predict(x) == head.predict(x)).all()
  heads.export(head, nmjax_io.join(bucket, "head.jax"))
  import jax  # pylint: disable=g-import-not-at-top
  exported = jax.export.deserialize(nmjax_io.read_bytes(nmjax_io.join(bucket, "head.jax")))
  assert np.allclose(np.asarray(exported.call(x)), head.predict(x))


def _smoke(**fields):
  config = default_config.get_config("smoke")
  for key, value in fields.items():
    config[key] = value
  return config


@pytest.mark.slow
def test_the_smoke_study_runs_in_a_bucket_with_a_local_runs_numbers(bucket, tmp_path):
  local = str(tmp_path / "study")
  jobs.run(_smoke(), local)
  cloud = nmjax_io.join(bucket, "study")
  assert jobs.run(_smoke(), cloud)["stages_run"] == 4
  for name in ("results.jsonl", "results.md", "accuracy_vs_noise.png", "spectra.png",
               "spectral_vs_noise.png", "plan.json", "tune/stage.json",
               "eval/seed0_r0.3/correct.npz", "eval/seed0_r0.3/stage.json",
               "eval/seed0_r0.3/curves.png", "pretrain/seed0_r0.3/stage.json"):
    assert nmjax_io.isfile(nmjax_io.join(cloud, name)), name
  assert nmjax_io.listdir(nmjax_io.join(cloud, "tb")) == ["seed0"]
  assert nmjax_io.listdir(nmjax_io.join(cloud, "pretrain", "seed0_r0.3", "features"))
  assert helpers.study_scores(_rows(cloud)) == helpers.study_scores(_rows(local))
  # Again, whole or as a job array's tasks: every stage is reused from the bucket.
  assert jobs.run(_smoke(), cloud)["stages_run"] == 0
  assert jobs.run(_smoke(stage="seed0_r0.3"), cloud)["stages_run"] == 0
  assert not jobs.run(_smoke(stage="render"), cloud)["missing"]
  # The report job renders the bucket study into another bucket folder.
  out = nmjax_io.join(bucket, "report")
  jobs.run(report_config.get_config(f"workdirs={cloud}"), out)
  assert "# Embedded study" in nmjax_io.read_text(nmjax_io.join(out, "results.md"))
  assert nmjax_io.read_bytes(nmjax_io.join(out, "spectra.png"))[:4] == b"\x89PNG"
  assert helpers.study_scores(_rows(out)) == helpers.study_scores(_rows(local))


def _holder(folder):
  """A process holding `folder`'s lock ("job x") until killed; returns it once it holds."""
  code = ("import sys, time\nfrom nmjax import io\n"
          "with io.hold(sys.argv[1], 'job x'):\n  print('held', flush=True)\n  time.sleep(600)\n")
  proc = subprocess.Popen([sys.executable, "-c", code, folder], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def _refusal(workdir, checkpoint):
  """The message of a transfer job refused on `workdir` while _holder holds it, its workdir,
  pid and start time replaced by placeholders."""
  proc = _holder(workdir)
  try:
    with pytest.raises(nmjax_io.InUse) as refused:
      _transfer(checkpoint, workdir)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  message = str(refused.value).replace(workdir, "WORKDIR").replace(f"pid {proc.pid} ", "pid P ")
  return re.sub(r"started [0-9-]+ [0-9:]+", "started T", message)


def test_a_bucket_workdir_held_by_another_process_is_refused_as_a_local_one(
    checkpoint, bucket, tmp_path, capsys):
  local = str(tmp_path / "held")
  os.makedirs(local)
  cloud = nmjax_io.join(bucket, "held")
  expected = _refusal(local, checkpoint)
  assert expected.startswith("--workdir=WORKDIR is in use by another run (pid P on host ")
  assert _refusal(cloud, checkpoint) == expected
  # The holder was killed (SIGKILL: no release): its lease, left in the bucket, names a dead
  # process of this host, so it is taken over at once.
  lease = nmjax_io.lock_path(cloud)
  assert nmjax_io.exists(lease)
  with nmjax_io.hold(cloud, "job y") as holder:
    assert holder.pid == os.getpid()
    assert json.loads(nmjax_io.read_text(lease))["what"] == "job y"
  assert "taking over" in capsys.readouterr().out
  assert not nmjax_io.exists(lease)  # A clean release leaves nothing behind.
