"""Two processes on 127.0.0.1 (jax.distributed, gloo, 2 fake CPU devices each) train the small
ResNet through main.py, match one process with 4 devices, and on a SIGTERM to one of them both
save at the same step and exit 0."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np

from nmjax.train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 160 examples / batch 32: 5 steps per epoch, so the run evaluates at step 5 and 10.
CONFIG = ("--config=configs/pretrain.py:dataset=fashion_mnist,noise=0.2,smoke",
          "--config.num_train_steps=10", "--config.max_test_examples=80",
          "--config.log_every_steps=1", "--config.record_examples=true")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, devices, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), *CONFIG, f"--workdir={workdir}", *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _seen(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "examples_seen.jsonl"))]


def test_two_processes_match_one_process_and_save_together_on_sigterm(tmp_path):
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  address = f"127.0.0.1:{_free_port()}"
  procs = [_start(multi, 2, "--config.distributed=explicit",
                  f"--config.coordinator_address={address}", "--config.num_processes=2",
                  f"--config.process_id={i}") for i in range(2)]
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
  assert gap < 1e-5, gap

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
