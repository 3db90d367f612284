"""The pre-training job end to end through main.py: a smoke run, exact resume after SIGTERM
(preemption) and SIGKILL at random steps, bad input, and the non-finite-loss guard; and the
library call the study makes (nmjax.train.supervised)."""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers

from nmjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# digits: the same job as Fashion-MNIST without its seconds of loading at every start.
SMOKE = "configs/pretrain.py:dataset=digits,noise=0.2,smoke"
FMNIST_SMOKE = "configs/pretrain.py:dataset=fashion_mnist,noise=0.2,smoke"


def _main(workdir, *overrides, config=SMOKE, **popen):
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={config}",
         f"--workdir={workdir}", *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def _run(workdir, *overrides, config=SMOKE):
  proc = _main(workdir, *overrides, config=config)
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out


def _final_params(workdir):
  mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
  step = mngr.latest_step()
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  return step, restored["state"]


LONGER = ("--config.num_train_steps=30", "--config.max_train_examples=320",
          "--config.checkpoint_every_steps=3", "--config.log_every_steps=1",
          "--config.record_examples=true")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  code, out = _run(workdir, *LONGER)
  assert code == 0, out
  return workdir, out


def test_smoke_run_writes_metrics_and_checkpoints(uninterrupted):
  workdir, out = uninterrupted
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  # 320 examples / batch 32 = 10 steps per epoch, 30 steps = 3 epochs.
  assert [r["epoch"] for r in records] == [1, 2, 3]
  assert [r["step"] for r in records] == [10, 20, 30]
  for r in records:
    for key in ("train_loss", "train_acc_noisy", "train_acc_clean", "test_acc",
                "examples_per_sec"):
      assert np.isfinite(r[key]), (key, r)
    assert 0.0 <= r["test_acc"] <= 1.0
    assert r["test_count"] == 250
  assert "ETA" in out and "img/s" in out
  assert os.listdir(workdir / "tb")
  assert _final_params(workdir)[0] == 30


def _signal_at(workdir, step, sig):
  """Starts a LONGER run (resuming whatever the workdir holds) and sends `sig` once the progress
  line of `step` appears; returns (return code, output)."""
  proc = _main(workdir, *LONGER)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if f"step {step}/30 " in line:
      proc.send_signal(sig)
      break
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, "".join(lines) + out


@pytest.mark.slow
def test_sigterm_ctrl_c_and_sigkill_at_random_steps_then_resume_is_bitwise_identical(
    uninterrupted, tmp_path):
  reference, _ = uninterrupted
  rng = random.Random(20261127)  # Seeded: a failure names steps that reproduce it.
  term_at = rng.randint(2, 8)
  int_at = rng.randint(term_at + 4, 17)
  kill_at = rng.randint(int_at + 4, 27)
  where = f"(SIGTERM after step {term_at}, SIGINT after {int_at}, SIGKILL after {kill_at})"

  # Preemption: SIGTERM makes the run save after the step in flight and exit cleanly.
  code, out = _signal_at(tmp_path, term_at, signal.SIGTERM)
  assert code == 0, (where, out)
  saved = ocp.CheckpointManager(str(tmp_path / "checkpoints")).latest_step()
  assert saved is not None and term_at <= saved < 30, (where, saved)
  assert f"preempted: saved {tmp_path / 'checkpoints' / str(saved)} (step {saved})" in out, out
  assert f"step {saved + 1}/30" not in out, out  # It stopped right there.

  # Ctrl-C: the same save after the step in flight, then one line and exit 130, no traceback.
  code, out = _signal_at(tmp_path, int_at, signal.SIGINT)
  assert code == 130 and "Traceback" not in out, (where, out)
  interrupted = ocp.CheckpointManager(str(tmp_path / "checkpoints")).latest_step()
  assert int_at <= interrupted < 30 and f"step {interrupted + 1}/30" not in out, (where, out)
  errors = [l for l in out.splitlines() if l.startswith("error: ")]
  assert errors == [f"error: interrupted (Ctrl-C) at step {interrupted} of 30: checkpoint saved"
                    f" in {tmp_path / 'checkpoints' / str(interrupted)}; run the same command to"
                    " resume"], out
  saved = interrupted

  # A kill without warning, later in the resumed run.
  code, out = _signal_at(tmp_path, kill_at, signal.SIGKILL)
  assert code == -signal.SIGKILL, (where, out)
  assert f"resumed from {tmp_path / 'checkpoints' / str(saved)}" in out, out
  killed_saved = ocp.CheckpointManager(str(tmp_path / "checkpoints")).latest_step()
  assert killed_saved is not None and killed_saved < 30, (where, killed_saved)

  code, out = _run(tmp_path, *LONGER)
  assert code == 0, out
  assert "resumed from" in out
  step_a, state_a = _final_params(reference)
  step_b, state_b = _final_params(tmp_path)
  assert step_a == step_b == 30
  helpers.assert_trees_equal(state_a, state_b)
  # The same examples, in the same order, at every step (each step recorded once).
  ref_seen = [json.loads(l) for l in open(reference / "examples_seen.jsonl")]
  got_seen = [json.loads(l) for l in open(tmp_path / "examples_seen.jsonl")]
  assert [r["step"] for r in got_seen] == list(range(1, 31)), where
  assert got_seen == ref_seen, where
  # Metrics have one record per epoch, no duplicates from the replayed stretch, same values.
  ref = [json.loads(l) for l in open(reference / "metrics.jsonl")]
  got = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in got] == [10, 20, 30]
  for a, b in zip(ref, got):
    for key in ("train_loss", "train_acc_noisy", "train_acc_clean", "test_acc"):
      assert a[key] == b[key], key


@pytest.mark.parametrize("override, expected", [
    ("--config.dataset=imagenet_nope", "config.dataset='imagenet_nope' is unknown"),
    ("--config.model=resnet_9000", "config.model='resnet_9000' is unknown"),
    ("--config.noise_ratio=1.5", "config.noise_ratio=1.5 is out of range"),
    ("--config.noise_type=bursty", "config.noise_type='bursty' is unknown"),
    ("--config.optimizer=lion", "config.optimizer='lion' is unknown"),
    ("--config.seed=-1", "config.seed=-1 is out of range"),
    ("--config.batch_size=0", "config.batch_size=0 is out of range"),
    ("--config.dataset=cifar10", "TFDS dataset 'cifar10' is not prepared"),
    ("--config.mesh=batch:8", "config.mesh='batch:8' is malformed"),
    ("--config.distributed=explicit", "config.coordinator_address='' is not 'host:port'"),
])
def test_bad_config_one_line_nonzero_and_checkpoint_untouched(uninterrupted, override,
                                                              expected):
  workdir, _ = uninterrupted
  before = sorted(os.listdir(workdir / "checkpoints"))
  code, out = _run(workdir, override)
  assert code == 2
  errors = [l for l in out.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and expected in errors[0], out
  assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_workdir_that_cannot_be_created(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  code, out = _run(blocker / "run")
  assert code == 2
  assert "--workdir=" in out and "cannot be created" in out, out


def test_missing_data_file_names_the_fix(tmp_path):
  env_dir = tmp_path / "empty_fmnist"
  env_dir.mkdir()
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={FMNIST_SMOKE}",
         f"--workdir={tmp_path / 'run'}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", NMJAX_FASHION_MNIST_DIR=str(env_dir),
             NMJAX_DATA_DIR=str(tmp_path / "data"))
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, proc.stderr
  assert "train-images-idx3-ubyte.gz" in errors[0] and "apt-get install" in errors[0]
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_with_a_different_experiment_is_refused(uninterrupted):
  workdir, _ = uninterrupted
  code, out = _run(workdir, "--config.noise_ratio=0.3")
  assert code == 2 and "holds a checkpoint of a different run" in out, out


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_checkpoint(tmp_path):
  # A healthy start leaves a checkpoint at step 4; resuming with an absurd learning rate blows up.
  code, out = _run(tmp_path, "--config.num_train_steps=4")
  assert code == 0, out
  code, out = _run(tmp_path, "--config.learning_rate=1e30", "--config.num_train_steps=12",
                   "--config.allow_changes=learning_rate,num_train_steps")
  assert code == 2, out
  error = [l for l in out.splitlines() if l.startswith("error: ")]
  assert len(error) == 1, out
  assert "non-finite" in error[0] and "at step " in error[0], error[0]
  step = int(error[0].split("at step ")[1].split(";")[0])
  assert 5 <= step <= 12
  # The named checkpoint is the newest one on disk, saved before the failing step, and finite.
  good = int(error[0].split("(step ")[1].rstrip(")"))
  assert 4 <= good < step
  assert f"last good checkpoint: {tmp_path / 'checkpoints' / str(good)} (step {good})" in error[0]
  saved_step, state = _final_params(tmp_path)
  assert saved_step == good
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def _smoke_config(arg="dataset=digits,noise=0.2,smoke"):
  spec = importlib.util.spec_from_file_location(
      "pretrain_config", os.path.join(ROOT, "configs", "pretrain.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_job_validate_checks_crop_padding_of_the_default_pipeline():
  from nmjax.jobs import pretrain  # pylint: disable=g-import-not-at-top
  config = _smoke_config()
  plan = pretrain.validate(config)
  assert (plan.input_pipeline, plan.crop_padding, plan.eval_split) == ("default", 2, "test")
  config.crop_padding = -1
  with pytest.raises(ConfigError, match="config.crop_padding=-1 is out of range"):
    pretrain.validate(config)
