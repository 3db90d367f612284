"""--config.profile_steps=N,M: a jax.profiler trace of pre-training steps N to M in
WORKDIR/profile that TensorBoard's profile plugin can read, and the field's one-line refusals."""

import glob
import gzip
import json
import os
import subprocess
import sys

import pytest

from nmjax import jobs
from nmjax.errors import ConfigError
from nmjax.train import profiling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import pretrain as pretrain_config  # pylint: disable=wrong-import-position
from configs import pretrain_clip as clip_config  # pylint: disable=wrong-import-position

SMOKE = "dataset=digits,noise=0.1,smoke"


def _varint(buf, i):
  shift = value = 0
  while True:
    byte = buf[i]
    i += 1
    value |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return value, i
    shift += 7


def _fields(buf):
  """(field number, value) of a protobuf message, decoded from the wire format alone."""
  i = 0
  while i < len(buf):
    key, i = _varint(buf, i)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _varint(buf, i)
    elif wire == 1:
      value, i = buf[i:i + 8], i + 8
    elif wire == 2:
      size, i = _varint(buf, i)
      value, i = buf[i:i + size], i + size
    elif wire == 5:
      value, i = buf[i:i + 4], i + 4
    else:
      raise ValueError(f"wire type {wire} at byte {i}")
    yield number, value


def _plane_names(data):
  """The XPlane names of an XSpace (XSpace field 1: repeated XPlane; XPlane field 2: name)."""
  return [value.decode() for number, plane in _fields(data) if number == 1
          for n, value in _fields(plane) if n == 2]


def test_profile_steps_writes_a_readable_trace(tmp_path, capfd):
  config = pretrain_config.get_config(SMOKE)
  config.profile_steps = "2,4"
  result = jobs.run(config, str(tmp_path))
  assert result["step"] == 12
  out = capfd.readouterr().out
  dest = tmp_path / "profile"
  lines = [l for l in out.splitlines() if "profile of steps" in l]
  assert lines == [f"[pretrain] profile of steps 2-4 in {dest} (tensorboard --logdir {dest}:"
                   " Profile tab)"], out
  # TensorBoard's profile plugin layout: plugins/profile/<run>/<host>.xplane.pb.
  found = glob.glob(str(dest / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(found) == 1, list(dest.rglob("*"))
  with open(found[0], "rb") as f:
    names = _plane_names(f.read())
  assert "/host:CPU" in names, names
  for trace in glob.glob(str(dest / "plugins" / "profile" / "*" / "*.trace.json.gz")):
    with gzip.open(trace, "rt") as f:
      assert "traceEvents" in json.load(f)


@pytest.mark.parametrize("value", ["3", "5,2", "a,b", "-1,2", "0,2", "1,2,3"])
def test_a_bad_profile_steps_is_one_line(value):
  for config in (pretrain_config.get_config(SMOKE), clip_config.get_config("smoke")):
    config.profile_steps = value
    with pytest.raises(ConfigError) as error:
      jobs.validate(config)
    assert str(error.value).startswith(f"config.profile_steps={value!r} is not a step range;")
    assert "\n" not in str(error.value)


def test_profile_window_reads_the_field():
  assert profiling.profile_window("") is None
  assert profiling.profile_window(" 2, 4 ") == (2, 4)
  assert profiling.profile_window("3,3") == (3, 3)


def test_main_refuses_a_bad_profile_steps_with_exit_2(tmp_path):
  out = subprocess.run(
      [sys.executable, "main.py", f"--config=configs/pretrain.py:{SMOKE}",
       "--config.profile_steps=5,2", f"--workdir={tmp_path / 'w'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().count("\n") == 0, out.stderr
  assert "config.profile_steps='5,2' is not a step range" in out.stderr
  assert not (tmp_path / "w").exists()
