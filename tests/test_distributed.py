"""Two processes on 127.0.0.1 (jax.distributed, gloo, 2 fake CPU devices each) train the small
ResNet through main.py, match one process with 4 devices, and on a SIGTERM to one of them both
save at the same step and exit 0; after a SIGKILL of both, the same two commands resume and end
bitwise equal to an uninterrupted two-process run."""

import pytest
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from nmjax.train import checkpoint

# Minutes of processes and training: the full tier (`-m "not slow"` leaves them out).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 160 examples / batch 32: 5 steps per epoch, so the run evaluates at step 5 and 10.
CONFIG = ("--config=configs/pretrain.py:dataset=fashion_mnist,noise=0.2,smoke",
          "--config.num_train_steps=10", "--config.max_test_examples=80",
          "--config.log_every_steps=1", "--config.record_examples=true")


def _free_ports(count: int = 1) -> list[int]:
  """Distinct free ports (all bound at once, so no two are the same)."""
  sockets = [socket.socket() for _ in range(count)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def _start(workdir, devices, *extra, config=CONFIG, env=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {}))
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), *config, f"--workdir={workdir}", *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _start_pair(workdir, address, config=CONFIG, env=None):
  """Processes 0 and 1 of a two-process run coordinated at `address`, 2 fake devices each."""
  return [_start(workdir, 2, "--config.distributed=explicit",
                 f"--config.coordinator_address={address}", "--config.num_processes=2",
                 f"--config.process_id={i}", config=config, env=env) for i in range(2)]


def _seen(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "examples_seen.jsonl"))]


def test_two_processes_match_one_process_and_save_together_on_sigterm(tmp_path):
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  procs = _start_pair(multi, f"127.0.0.1:{_free_ports()[0]}")
  # The reference keeps a checkpoint of every step, to compare at whatever step the pair stops.
  procs.append(_start(single, 4, "--config.checkpoint_every_steps=1", "--config.max_to_keep=20"))
  try:
    head = []
    for line in procs[0].stdout:
      head.append(line)
      if line.startswith("[pretrain] epoch 1:"):
        # Preempt one process only: jax's preemption service tells the other, and both must
        # save at the same step and exit cleanly.
        procs[1].send_signal(signal.SIGTERM)
        break
    outs = [p.communicate(timeout=400)[0] for p in procs]
    outs[0] = "".join(head) + outs[0]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  assert "on 4 device(s) in 2 process(es)" in outs[0]
  assert "on 4 device(s) in 1 process(es)" in outs[2]
  stopped = re.search(r"preempted: saved .*/checkpoints/(\d+) \(step (\d+)\)", outs[0])
  assert stopped, outs[0]
  saved = int(stopped.group(2))
  assert 5 <= saved < 10, outs[0]
  # Process 0 logs and writes metrics; process 1 trains silently.
  assert "[pretrain] step 5/10" in outs[0] and "[pretrain]" not in outs[1], outs[1]
  records = [json.loads(line) for line in open(multi / "metrics.jsonl")]
  assert [r["step"] for r in records] == [5] and records[0]["test_count"] == 80

  # Checkpoints were written collectively; both restore onto one device.
  step_multi, state_multi = checkpoint.load_state(str(multi))
  step_single, state_single = checkpoint.load_state(str(single), step=saved)
  assert step_multi == step_single == saved
  gap = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree.leaves(state_multi["params"]), jax.tree.leaves(state_single["params"])))
  # Float32 sums in another order (two processes' halves, then the cross-process reduction)
  # drift with the step the pair stopped at (SGD, lr 0.1): 1.2e-3 seen at step 9 with reductions
  # on XLA's own emitter (batching.compiler_options), 1.8e-5 with YNNPACK's: equal to float
  # drift, not bitwise.
  assert gap < 5e-3, (gap, saved)

  # The same examples at every step. Within a global batch the order differs: process p holds
  # stream positions p, p + 2, ... of each batch, and the global array is process 0's half, then
  # process 1's.
  seen_multi, seen_single = _seen(multi), _seen(single)
  assert [r["step"] for r in seen_multi] == list(range(1, saved + 1))
  assert [r["step"] for r in seen_single] == list(range(1, 11))
  for a, b in zip(seen_multi, seen_single):
    assert len(a["index"]) == 32
    assert sorted(a["index"]) == sorted(b["index"])
    assert a["index"] == b["index"][0::2] + b["index"][1::2]


# digits: no Fashion-MNIST loading at every start. 15 steps = 3 epochs of 5; a checkpoint every
# 2 steps and at every epoch's end (5, 10, 15).
RESUME_STEPS = 15
RESUME_CONFIG = ("--config=configs/pretrain.py:dataset=digits,noise=0.2,smoke",
                 f"--config.num_train_steps={RESUME_STEPS}", "--config.checkpoint_every_steps=2",
                 "--config.max_test_examples=80", "--config.log_every_steps=1",
                 "--config.record_examples=true")
# Wall-clock fields of a metrics record; every other field must match to the bit.
TIMING_FIELDS = ("examples_per_sec", "eval_seconds")


def _committed_steps(workdir) -> list[int]:
  """Steps orbax has committed: a step's folder gets its plain name only once it is complete."""
  folder = workdir / "checkpoints"
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if folder.is_dir() else []


def _metrics(workdir) -> list[dict]:
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def _finish(procs) -> list[str]:
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  return outs


def test_two_processes_killed_together_resume_bitwise_equal_to_an_uninterrupted_pair(tmp_path):
  reference, resumed = tmp_path / "uninterrupted", tmp_path / "killed"
  # A compilation cache of this test's own: the restart loads what the first pairs compiled
  # (the same programs give the same executables, so the comparison is unchanged).
  env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
  # The reference pair runs beside the killed pair and its restart (its own coordinator).
  ref_port, port = _free_ports(2)
  ref_procs = _start_pair(reference, f"127.0.0.1:{ref_port}", RESUME_CONFIG, env)
  address = f"127.0.0.1:{port}"
  procs = _start_pair(resumed, address, RESUME_CONFIG, env)
  try:
    # Kill once a checkpoint past the first epoch's end (step 5: evaluation, a metrics record)
    # is committed, so the restart restores mid-epoch sums and keeps that record once.
    deadline = time.monotonic() + 300
    while (not [s for s in _committed_steps(resumed) if s >= 6]
           and all(p.poll() is None for p in procs) and time.monotonic() < deadline):
      time.sleep(0.02)
    for p in procs:
      p.kill()
    killed_outs = [p.communicate(timeout=60)[0] for p in procs]
    for p, out in zip(procs, killed_outs):
      assert p.returncode == -signal.SIGKILL, out
    committed = _committed_steps(resumed)
    assert committed and 6 <= committed[-1] < RESUME_STEPS, (committed, killed_outs[0])

    # The same two commands, the same coordinator address.
    procs = _start_pair(resumed, address, RESUME_CONFIG, env)
    outs = _finish(procs)
    ref_outs = _finish(ref_procs)
  finally:
    for p in procs + ref_procs:
      if p.poll() is None:
        p.kill()
  restored_from = committed[-1]
  assert (f"resumed from {resumed / 'checkpoints' / str(restored_from)} (step {restored_from})"
          in outs[0]), outs[0]
  assert "on 4 device(s) in 2 process(es)" in outs[0] and "[pretrain]" not in outs[1], outs[1]
  assert "resumed from" not in ref_outs[0], ref_outs[0]

  step_ref, state_ref = checkpoint.load_state(str(reference))
  step_got, state_got = checkpoint.load_state(str(resumed))
  assert step_ref == step_got == RESUME_STEPS
  leaves_ref, tree_ref = jax.tree.flatten(state_ref)
  leaves_got, tree_got = jax.tree.flatten(state_got)
  assert tree_ref == tree_got
  for a, b in zip(leaves_ref, leaves_got):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # One record per epoch, none duplicated by the replayed stretch, equal but for wall-clock.
  metrics_ref, metrics_got = _metrics(reference), _metrics(resumed)
  assert [r["step"] for r in metrics_got] == [5, 10, 15]
  assert metrics_got == metrics_ref
  # The same examples in the same order at every step, each step recorded once.
  assert [r["step"] for r in _seen(resumed)] == list(range(1, RESUME_STEPS + 1))
  assert _seen(resumed) == _seen(reference)
