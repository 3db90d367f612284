"""Identity, not paths, and one run per workdir: a workdir trained again at the same path gets
fresh features; checkpoints without a readable config.json are refused; a resume that changes a
training field is refused unless allowed, and then recorded; a second run on a workdir in use is
refused at once (the first unharmed); a lock left by a dead process is taken over."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nmjax import io as lock, jobs
from nmjax.errors import ConfigError
from nmjax.train import checkpoint as checkpoint_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import nmtune as nmtune_config  # pylint: disable=wrong-import-position
from configs import pretrain as pretrain_config  # pylint: disable=wrong-import-position
from configs import transfer as transfer_config  # pylint: disable=wrong-import-position

# The shared `checkpoint` fixture's run (tests/conftest.py).
SMOKE = "dataset=digits,noise=0.1,smoke"
TIMING_FIELDS = ("examples_per_sec", "eval_seconds")


def _pretrain(workdir, arg=SMOKE, **fields):
  config = pretrain_config.get_config(arg)
  for key, value in fields.items():
    config[key] = value
  return jobs.run(config, str(workdir))


def _copy(checkpoint, tmp_path):
  """A private copy of the shared pre-training workdir, to resume or break."""
  workdir = tmp_path / "pretrain"
  shutil.copytree(checkpoint, workdir, ignore=shutil.ignore_patterns("features"))
  return workdir


def _config_json(workdir):
  return json.load(open(os.path.join(workdir, "config.json")))


def _rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "results.jsonl"))]


def _stale_lock(folder):
  """A lock file naming a process that has exited (its flock went with it)."""
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(lock.lock_path(str(folder)), "w") as f:
    json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60,
               "what": "job transfer"}, f)


def _evaluations(pretrain_dir, transfer_dir, nmtune_dir):
  transfer = transfer_config.get_config("smoke,methods=ridge")
  tuning = nmtune_config.get_config("smoke,methods=lp")
  for config in (transfer, tuning):
    config.checkpoint, config.tasks = str(pretrain_dir), "digits"
  return jobs.run(transfer, str(transfer_dir)), jobs.run(tuning, str(nmtune_dir))


def test_a_workdir_trained_again_at_the_same_path_gets_fresh_features(checkpoint, tmp_path,
                                                                      capsys):
  pretrain_dir = _copy(checkpoint, tmp_path)
  transfer_dir, nmtune_dir = tmp_path / "transfer", tmp_path / "nmtune"
  transfer_dir.mkdir()
  _stale_lock(transfer_dir)  # Left by a killed run: taken over.
  first = _evaluations(pretrain_dir, transfer_dir, nmtune_dir)
  assert "[lock] taking over" in capsys.readouterr().out
  # digits/train and digits/test, once: the NMTune job reads the transfer job's (one cache
  # beside the checkpoint).
  assert [r["features_extracted"] for r in first] == [2, 0]
  before = [_rows(transfer_dir), _rows(nmtune_dir)]
  assert {r["noise_ratio"] for rows in before for r in rows} == {0.1}

  # Trained again at the same path and step count, with other label noise; its feature cache
  # left in place.
  for path in pretrain_dir.iterdir():
    if path.is_dir() and path.name != "features":
      shutil.rmtree(path)
    elif path.is_file():
      path.unlink()
  _pretrain(pretrain_dir, "dataset=digits,noise=0.3,smoke")
  second = _evaluations(pretrain_dir, transfer_dir, nmtune_dir)
  assert [r["features_extracted"] for r in second] == [2, 0]
  after = [_rows(transfer_dir), _rows(nmtune_dir)]
  assert {r["noise_ratio"] for rows in after for r in rows} == {0.3}
  for old, new in zip(before, after):
    assert [r["sve"] for r in old] != [r["sve"] for r in new]
  assert len(os.listdir(pretrain_dir / "features")) == 2  # One folder per encoder content.
  assert not any((out / "features").exists() for out in (transfer_dir, nmtune_dir))


@pytest.mark.parametrize("damage", ["missing", "torn"])
def test_checkpoints_without_a_readable_config_json_are_refused(checkpoint, tmp_path, damage):
  workdir = _copy(checkpoint, tmp_path)
  path = workdir / "config.json"
  if damage == "missing":
    path.unlink()
  else:
    path.write_text(path.read_text()[:40])
  steps = sorted(os.listdir(workdir / "checkpoints"))
  reason = "no config.json" if damage == "missing" else "an unreadable config.json"
  with pytest.raises(ConfigError, match=f"holds checkpoints .* but {reason}.*; pass a new"
                                        " --workdir"):
    _pretrain(workdir, "dataset=digits,noise=0.3,smoke")
  assert sorted(os.listdir(workdir / "checkpoints")) == steps
  assert path.exists() == (damage == "torn")  # Not adopted: nothing written.


def test_a_changed_training_field_is_refused_then_allowed_and_recorded(checkpoint, tmp_path):
  workdir = _copy(checkpoint, tmp_path)
  saved = _config_json(workdir)
  with pytest.raises(ConfigError, match=r"trained with other settings \(learning_rate: saved"
                     r" 0.1 vs now 0.05; num_train_steps: saved 12 vs now 16\); resume with the"
                     r" saved values, or pass --config.allow_changes=learning_rate,"
                     r"num_train_steps "):
    _pretrain(workdir, learning_rate=0.05, num_train_steps=16)
  assert _config_json(workdir) == saved
  with pytest.raises(ConfigError, match="'batch_size' cannot change on a resume"):
    _pretrain(workdir, allow_changes="batch_size")
  with pytest.raises(ConfigError, match="'lr' is not a field of this config; allowed: "):
    _pretrain(workdir, allow_changes="lr")

  # Allowed: it goes on from step 12 with the new values; free fields change unrecorded.
  result = _pretrain(workdir, learning_rate=0.05, num_train_steps=16, log_every_steps=2,
                     allow_changes="learning_rate,num_train_steps")
  assert result["step"] == 16
  record = _config_json(workdir)
  assert (record["learning_rate"], record["num_train_steps"], record["log_every_steps"]) == (
      0.05, 16, 2)
  [entry] = record["history"]
  assert entry["step"] == 12 and entry["time"]
  assert entry["changes"] == {"learning_rate": {"from": 0.1, "to": 0.05},
                              "num_train_steps": {"from": 12, "to": 16}}
  # The same command again changes nothing: no second entry.
  _pretrain(workdir, learning_rate=0.05, num_train_steps=16, log_every_steps=2,
            allow_changes="learning_rate,num_train_steps")
  assert _config_json(workdir)["history"] == [entry]


def test_a_held_lock_refuses_at_once_and_a_dead_holders_lock_is_taken_over(checkpoint,
                                                                          tmp_path, capsys):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from nmjax import io as lock\n"
       f"with lock.hold({str(tmp_path)!r}, 'job test'):\n print('held', flush=True);"
       " time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    expected = (rf"--workdir={tmp_path} is in use by another run \(pid {holder.pid} on host"
                rf" {socket.gethostname()}, job test, started 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d\);"
                " wait for it to finish or pass another --workdir")
    with pytest.raises(lock.InUse, match=expected):
      with lock.hold(str(tmp_path), "job other"):
        pass
    # A job is refused before any work; each process of a run locks its own file.
    config = transfer_config.get_config("smoke")
    config.checkpoint = checkpoint
    start = time.monotonic()
    with pytest.raises(lock.InUse, match=f"pid {holder.pid}"):
      jobs.run(config, str(tmp_path))
    assert time.monotonic() - start < 5 and not (tmp_path / "features").exists()
    with lock.hold(str(tmp_path), "job pair", process_index=1) as second:
      assert second.pid == os.getpid()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # Killed: the kernel dropped its lock; its record is left and reported on takeover.
  with lock.hold(str(tmp_path), "job next") as mine:
    assert mine.pid == os.getpid()
    assert json.load(open(lock.lock_path(str(tmp_path))))["pid"] == os.getpid()
  assert f"taking over {lock.lock_path(str(tmp_path))}" in capsys.readouterr().out
  assert os.path.getsize(lock.lock_path(str(tmp_path))) == 0  # Released cleanly.
  with lock.hold(str(tmp_path), "job again"):
    pass
  assert "taking over" not in capsys.readouterr().out


def _main(workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")  # As the shared fixture's.
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"),
                           f"--config=configs/pretrain.py:{SMOKE}", f"--workdir={workdir}"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _metrics(workdir):
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
          for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow
def test_two_runs_on_one_workdir_one_refused_the_other_equal_to_a_lone_run(checkpoint,
                                                                          tmp_path):
  procs = [_main(tmp_path), _main(tmp_path)]
  try:
    while all(p.poll() is None for p in procs):
      time.sleep(0.05)
    refused = next(p for p in procs if p.poll() is not None)
    other = procs[1 - procs.index(refused)]
    still_running = other.poll() is None
    out = refused.communicate(timeout=60)[0]
    other_out = other.communicate(timeout=300)[0]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert refused.returncode == 2 and still_running, out
  assert other.returncode == 0, other_out
  errors = [line for line in out.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in out, out
  assert errors[0].startswith(f"error: --workdir={tmp_path} is in use by another run (pid"
                              f" {other.pid} on host {socket.gethostname()}, job pretrain,"
                              " started "), errors[0]
  assert _metrics(tmp_path) == _metrics(checkpoint)  # One record per epoch, none twice.
  step, state = checkpoint_lib.load_state(str(tmp_path))
  lone_step, lone_state = checkpoint_lib.load_state(checkpoint)
  assert step == lone_step == 12
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(lone_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_waiting_lock_waits_for_the_holder_then_holds(tmp_path, capsys):
  """lock.hold(wait=True): one line naming the holder, then the block runs once it let go."""
  import threading  # pylint: disable=g-import-not-at-top
  order = []
  held = threading.Event()

  def holder():
    with lock.hold(str(tmp_path), "first"):
      held.set()
      time.sleep(0.5)
      order.append("first done")

  thread = threading.Thread(target=holder)
  thread.start()
  held.wait()
  with pytest.raises(lock.InUse):  # Without wait: refused at once.
    with lock.hold(str(tmp_path), "second"):
      pass
  with lock.hold(str(tmp_path), "second", wait=True):
    order.append("second holds")
  thread.join()
  assert order == ["first done", "second holds"]
  out = capsys.readouterr().out
  assert out.count("[lock]") == 1 and "first" in out and "waiting for it" in out, out
