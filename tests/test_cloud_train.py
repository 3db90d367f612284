"""Pre-training with its workdir in a bucket (gs://, the GCS emulator of tests/conftest.py):
checkpoints, metrics, TensorBoard events and config.json land there; a run killed (SIGKILL) once
its first checkpoint is in the bucket resumes and ends bitwise where a local run ends; a damaged
newest step in a bucket is skipped and moved aside; the metrics writer keeps whole files there;
a bucket that does not exist is refused in one line."""

import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

import helpers

from nmjax import io as nmjax_io, jobs
from nmjax.io import paths
from nmjax.train import checkpoint as checkpoint_lib
from nmjax.writers import MetricWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import pretrain as pretrain_config  # pylint: disable=wrong-import-position

SMOKE = "configs/pretrain.py:dataset=digits,noise=0.1,smoke"
# 320 examples in batches of 32: 10 steps an epoch, 3 epochs, a checkpoint every 3 steps.
LONGER = ("--config.num_train_steps=30", "--config.max_train_examples=320",
          "--config.checkpoint_every_steps=3", "--config.log_every_steps=1")
TIMINGS = ("examples_per_sec", "eval_seconds")  # Record fields that differ from run to run.
FIXTURE_ARG = "dataset=digits,noise=0.1,smoke"  # conftest's `checkpoint`: steps 8, 10, 12.


@pytest.fixture
def orbax_bucket(bucket, gcs_emulator):
  """`bucket`, once the emulator is known to send an object's generation with its bytes, as GCS
  does (x-goog-generation): tensorstore's OCDBT store conditions its manifest writes on it and
  fails with 'Malformed StorageGeneration' without it."""
  nmjax_io.write_text(f"{bucket}/probe", "x")
  inner = paths.filesystem(f"{bucket}/probe")[1]
  bucket_name, _, name = inner.partition("/")
  url = (f"{gcs_emulator}/download/storage/v1/b/{bucket_name}/o/"
         f"{urllib.parse.quote(name, safe='')}?alt=media")
  with urllib.request.urlopen(url, timeout=10) as response:
    generation = response.headers.get("x-goog-generation")
  nmjax_io.remove(f"{bucket}/probe")
  if not generation:
    pytest.fail("the GCS emulator sends no x-goog-generation header with an object's bytes;"
                " tests/conftest.py's gcs_emulator must start it with that header added")
  return bucket


def _main(workdir, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), f"--config={SMOKE}",
                           f"--workdir={workdir}", *overrides], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(workdir, *overrides):
  proc = _main(workdir, *overrides)
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out


def _kill_after_first_checkpoint(workdir):
  """A LONGER run killed (SIGKILL) at the first progress line after a checkpoint is committed
  in the bucket; returns (exit code, output, the steps committed when it was killed)."""
  proc = _main(workdir, *LONGER)
  lines, saved = [], []
  for line in proc.stdout:
    lines.append(line)
    if "/30 " in line and (saved := checkpoint_lib.saved_steps(workdir)):
      proc.send_signal(signal.SIGKILL)
      break
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, "".join(lines) + out, saved


def _records(path):
  return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
          for line in nmjax_io.read_text(path).splitlines()]


@pytest.mark.slow
def test_a_bucket_run_killed_and_resumed_ends_bitwise_as_a_local_run(orbax_bucket, tmp_path):
  local = str(tmp_path / "local")
  code, out = _run(local, *LONGER)
  assert code == 0, out

  code, out, saved = _kill_after_first_checkpoint(orbax_bucket)
  assert code == -signal.SIGKILL, out
  assert saved and max(saved) < 30, (saved, out)
  code, out = _run(orbax_bucket, *LONGER)
  assert code == 0, out
  resumed = [l for l in out.splitlines() if "resumed from" in l]
  assert len(resumed) == 1 and f"resumed from {orbax_bucket}/checkpoints/" in resumed[0], out
  assert "Traceback" not in out and "[checkpoint] warning" not in out, out

  step_a, state_a = checkpoint_lib.load_state(local)
  step_b, state_b = checkpoint_lib.load_state(orbax_bucket)
  assert step_a == step_b == 30
  helpers.assert_trees_equal(state_a, state_b)
  # The records are the local run's (each epoch once), timings aside.
  assert _records(f"{orbax_bucket}/metrics.jsonl") == _records(os.path.join(local,
                                                                            "metrics.jsonl"))
  config = json.loads(nmjax_io.read_text(f"{orbax_bucket}/config.json"))
  assert config["dataset"] == "digits" and config["num_train_steps"] == 30
  assert nmjax_io.exists(f"{orbax_bucket}/plan.json")
  assert any(n.startswith("events.out.tfevents") for n in nmjax_io.listdir(f"{orbax_bucket}/tb"))
  assert checkpoint_lib.saved_steps(orbax_bucket)[0] == 30


@pytest.mark.slow
def test_a_damaged_newest_step_in_a_bucket_is_skipped_and_moved_aside(checkpoint, orbax_bucket,
                                                                      capfd):
  nmjax_io.upload(checkpoint, orbax_bucket)
  nmjax_io.remove(f"{orbax_bucket}/checkpoints/12/state/_METADATA")
  capfd.readouterr()
  result = jobs.run(pretrain_config.get_config(FIXTURE_ARG), orbax_bucket)
  out, err = capfd.readouterr()
  assert "Traceback" not in out + err
  root = f"{orbax_bucket}/checkpoints"
  moved = [n for n in nmjax_io.listdir(root) if n.startswith("12.bad-")]
  assert len(moved) == 1, nmjax_io.listdir(root)
  warnings = [l for l in err.splitlines() if l.startswith("[checkpoint] warning: ")]
  assert warnings == [f"[checkpoint] warning: skipping {root}/12: state/_METADATA is missing;"
                      f" moved it to {root}/{moved[0]}; using step 10"], err
  assert f"resumed from {root}/10 (step 10)" in out, out
  assert result["step"] == 12 and checkpoint_lib.saved_steps(orbax_bucket) == [12, 10, 8]
  step, state = checkpoint_lib.load_state(orbax_bucket)
  ref_step, ref = checkpoint_lib.load_state(checkpoint)
  assert step == ref_step == 12
  helpers.assert_trees_equal(state, ref)


def test_an_unfinished_step_in_a_bucket_is_not_a_step(bucket):
  # orbax saves in place in a bucket and marks a finished step with commit_success.txt.
  nmjax_io.write_text(f"{bucket}/checkpoints/4/commit_success.txt", "done")
  nmjax_io.write_text(f"{bucket}/checkpoints/8/state/_METADATA", "{}")
  nmjax_io.write_text(f"{bucket}/checkpoints/8.orbax-checkpoint-tmp-1/x", "")
  assert checkpoint_lib.saved_steps(bucket) == [4]
  assert checkpoint_lib.saved_steps(f"{bucket}/nothing-here") == []
  assert checkpoint_lib.directory(bucket) == f"{bucket}/checkpoints"


def test_the_metric_writer_keeps_whole_files_in_a_bucket(bucket):
  nmjax_io.write_text(f"{bucket}/metrics.jsonl", '{"step": 5}\n{"step": 10}\n{"step": 1')
  writer = MetricWriter(bucket)
  writer.truncate_after(7)  # A resume from step 7: later and torn records go.
  assert nmjax_io.read_text(f"{bucket}/metrics.jsonl") == '{"step": 5}\n'
  writer.write(8, {"train_loss": 0.5, "test_acc": float("nan")})
  writer.flush()
  assert _records(f"{bucket}/metrics.jsonl") == [{"step": 5},
                                                 {"step": 8, "train_loss": 0.5,
                                                  "test_acc": "nan"}]
  writer.write(9, {"train_loss": 0.25})
  writer.close()
  assert [r["step"] for r in _records(f"{bucket}/metrics.jsonl")] == [5, 8, 9]
  events = nmjax_io.listdir(f"{bucket}/tb")
  assert len(events) == 1 and events[0].startswith("events.out.tfevents"), events
  assert nmjax_io.getsize(f"{bucket}/tb/{events[0]}") > 0


def test_a_bucket_that_does_not_exist_is_one_line_exit_2(bucket):
  del bucket  # The emulator's environment only.
  out = subprocess.run([sys.executable, "main.py", f"--config={SMOKE}",
                        "--workdir=gs://nmjax-no-such-bucket/run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: "), out.stderr
  assert "bucket nmjax-no-such-bucket does not exist" in out.stderr, out.stderr
