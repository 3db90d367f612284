"""Faults a researcher will meet around checkpoints: a second Ctrl-C during pre-training stops at
once (the first one's save, exit 130 and bitwise resume are in tests/test_pretrain.py's
interrupted-run test) and a damaged checkpoint
folder (an empty foreign step, a truncated array file, a deleted _METADATA), which resume and the
transfer job skip for the newest good step."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers

from nmjax import encoder as encoder_lib, jobs
from nmjax.errors import DataError
from nmjax.train import checkpoint as checkpoint_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import pretrain as pretrain_config  # pylint: disable=wrong-import-position
from configs import transfer as transfer_config  # pylint: disable=wrong-import-position

# conftest's `checkpoint` fixture: 12 smoke steps, checkpoints at steps 8, 10 and 12.
FIXTURE_ARG = "dataset=digits,noise=0.1,smoke"
# All 1,442 training images of digits in batches of 32: 45 steps an epoch, so the only save
# before step 45 is Ctrl-C's.
LONG = ("--config=configs/pretrain.py:dataset=digits,noise=0.2,smoke",
        "--config.num_train_steps=60", "--config.max_train_examples=1600",
        "--config.checkpoint_every_steps=1000", "--config.log_every_steps=1",
        "--config.record_examples=true")


def _start(workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *LONG,
                           f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _ctrl_c(workdir, at_step, *, twice=False):
  """A LONG run sent SIGINT once the progress line of `at_step` shows (and, with `twice`, again
  once it has said it is saving); returns (exit code, output)."""
  proc = _start(workdir)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if f"step {at_step}/60 " in line:
      proc.send_signal(signal.SIGINT)
      if not twice:
        break
    if twice and "Ctrl-C: saving" in line:
      proc.send_signal(signal.SIGINT)
      break
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, "".join(lines) + out


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_second_ctrl_c_stops_at_once_leaving_only_committed_checkpoints(tmp_path):
  for attempt in range(3):  # The second Ctrl-C can come after the save has already finished.
    workdir = tmp_path / f"attempt{attempt}"
    code, out = _ctrl_c(workdir, 5, twice=True)
    assert code == 130, out
    assert "Traceback" not in out, out
    if "[pretrain] interrupted again (Ctrl-C): stopped at once" in out:
      break
  else:
    pytest.fail(f"the second Ctrl-C never came before the save had finished: {out}")
  # Whatever the save in flight had written is either committed or an orbax temporary folder,
  # which is never a step; every listed step restores.
  for step in checkpoint_lib.saved_steps(str(workdir)):
    assert checkpoint_lib.load_state(str(workdir), step=step)[0] == step


# ----------------------------------------------------------------------------------------------
# Damaged checkpoint folders: (damage, the damaged step, the newest good step).


def _empty_foreign_step(checkpoints):
  os.mkdir(os.path.join(checkpoints, "99"))


def _truncated_array_file(checkpoints):
  state = os.path.join(checkpoints, "12", "state")
  files = [os.path.join(parent, name) for parent, _, names in os.walk(state)
           if os.path.basename(parent) == "d" for name in names]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 3)


def _deleted_metadata(checkpoints):
  os.remove(os.path.join(checkpoints, "12", "state", "_METADATA"))


CASES = {"empty_foreign_step": (_empty_foreign_step, 99, 12),
         "truncated_array_file": (_truncated_array_file, 12, 10),
         "deleted_metadata": (_deleted_metadata, 12, 10)}


def _damaged_copy(checkpoint, tmp_path, damage):
  workdir = tmp_path / "pretrain"
  shutil.copytree(checkpoint, workdir)
  damage(str(workdir / "checkpoints"))
  return workdir


def _warnings(err):
  return [l for l in err.splitlines() if l.startswith("[checkpoint] warning: ")]


@pytest.mark.parametrize("case", CASES)
def test_resume_skips_a_damaged_newest_step_and_moves_it_aside(checkpoint, tmp_path, capfd,
                                                                case):
  damage, bad, good = CASES[case]
  workdir = _damaged_copy(checkpoint, tmp_path, damage)
  capfd.readouterr()
  result = jobs.run(pretrain_config.get_config(FIXTURE_ARG), str(workdir))
  out, err = capfd.readouterr()
  assert "Traceback" not in out + err
  checkpoints = workdir / "checkpoints"
  moved = [n for n in os.listdir(checkpoints) if n.startswith(f"{bad}.bad-")]
  assert len(moved) == 1, os.listdir(checkpoints)
  warnings = _warnings(err)
  assert len(warnings) == 1, err
  assert warnings[0].startswith(f"[checkpoint] warning: skipping {checkpoints / str(bad)}: ")
  assert warnings[0].endswith(f"; moved it to {checkpoints / moved[0]}; using step {good}")
  assert f"resumed from {checkpoints / str(good)} (step {good})" in out, out
  # It went on from the good step and, the run being exact, ended where the undamaged run did.
  assert result["step"] == 12
  assert checkpoint_lib.saved_steps(str(workdir)) == [12, 10, 8]
  step, state = checkpoint_lib.load_state(str(workdir))
  ref_step, ref = checkpoint_lib.load_state(checkpoint)
  assert step == ref_step == 12
  helpers.assert_trees_equal(state, ref)


@pytest.mark.parametrize("case", CASES)
def test_transfer_uses_the_newest_good_step_and_leaves_the_workdir_alone(checkpoint, tmp_path,
                                                                         capfd, case):
  damage, bad, good = CASES[case]
  workdir = _damaged_copy(checkpoint, tmp_path, damage)
  config = transfer_config.get_config("smoke,methods=ridge")
  config.tasks = "digits"
  config.checkpoint = str(workdir)
  capfd.readouterr()
  jobs.run(config, str(tmp_path / "transfer"))
  out, err = capfd.readouterr()
  assert "Traceback" not in out + err
  folder = workdir / "checkpoints" / str(bad)
  warnings = _warnings(err)
  assert len(warnings) == 1, err
  assert warnings[0].startswith(f"[checkpoint] warning: skipping {folder}: ")
  assert warnings[0].endswith(f"; left it in place; using step {good}")
  assert os.path.exists(folder)
  rows = _jsonl(tmp_path / "transfer" / "results.jsonl")
  assert rows and all(r["step"] == good for r in rows)


def test_a_requested_damaged_step_is_refused_naming_it(checkpoint, tmp_path):
  workdir = _damaged_copy(checkpoint, tmp_path, _deleted_metadata)
  folder = workdir / "checkpoints" / "12"
  with pytest.raises(DataError, match=f"checkpoint {folder} \\(step 12\\) cannot be used:"
                                      " state/_METADATA is missing; other saved steps: 10, 8"):
    encoder_lib.load(str(workdir), step=12)
  assert encoder_lib.load(str(workdir), step=10).step == 10


def _no_loop_state(checkpoints):
  for step in (8, 10, 12):
    os.remove(os.path.join(checkpoints, str(step), "loop", "metadata"))


def test_no_usable_step_is_one_line_listing_them_and_nothing_moves(checkpoint, tmp_path):
  workdir = _damaged_copy(checkpoint, tmp_path, _no_loop_state)
  listed = ", ".join(f"{workdir / 'checkpoints' / str(s)} (loop/metadata is missing)"
                     for s in (12, 10, 8))
  with pytest.raises(DataError, match="resume or redo") as reading:
    encoder_lib.load(str(workdir))
  with pytest.raises(DataError, match="move the damaged folders away") as resuming:
    jobs.run(pretrain_config.get_config(FIXTURE_ARG), str(workdir))
  for error in (reading.value, resuming.value):
    assert f"no usable checkpoint in {workdir / 'checkpoints'}: found {listed}; " in str(error)
    assert "\n" not in str(error)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "12", "8"]


def test_a_step_of_another_train_state_is_not_restored(checkpoint, tmp_path):
  workdir = tmp_path / "pretrain"
  shutil.copytree(checkpoint, workdir)
  _, state = checkpoint_lib.load_state(str(workdir))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          state)
  step, restored, loop_state = checkpoint_lib.restore_latest(str(workdir), abstract)
  assert step == 12 and "data" in loop_state
  helpers.assert_trees_equal(restored, state)
  # The same tree with one array in another dtype: orbax would cast it; every step is refused.
  abstract["params"]["head"]["kernel"] = jax.ShapeDtypeStruct(
      state["params"]["head"]["kernel"].shape, np.float16, sharding=device)
  with pytest.raises(DataError, match="holds another train state \\(params/head/kernel:"
                                      " float32\\[64, 10\\], expected float16\\[64, 10\\]\\)"):
    checkpoint_lib.restore_latest(str(workdir), abstract)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "12", "8"]
