"""Checkpoint files that are not what they claim, each answered with one line and exit 2 before
anything is written: a TorchScript archive whose __setstate__ has side effects (never run: the
archive is read as data), a pickle that names a function, text and truncated files, a FIFO and a
device given as the file; and OpenAI's RN50 TorchScript layout, read torch-free, still imports."""

import importlib
import os
import pickle
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save_file

from nmjax import convert, errors, jobs
from nmjax.convert import clip_layouts, readers, torchscript
from nmjax.errors import DataError
from nmjax.models.clip_model import CLIP, ResNetVisionConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import_config = importlib.import_module("configs.import")  # `import` is a keyword.
from test_convert_clip import (  # pylint: disable=wrong-import-position
    SMALL_RN, SMALL_TEXT, check_against_torch, inputs, randomize, torch_clip, torch_outputs)

MARKER = "SETSTATE-RAN"


def _one_line_exit(capture, run):
  """Runs `run` under errors.one_line_errors: exit 2 and the one `error: ` line on stderr
  (`capture`: capsys or capfd)."""
  capture.readouterr()
  with pytest.raises(SystemExit) as exited:
    with errors.one_line_errors():
      run()
  assert exited.value.code == 2
  lines = capture.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def _import_job(source, tmp_path, arch="resnet18", **fields):
  config = import_config.get_config(f"source={source},arch={arch}")
  for key, value in fields.items():
    config[key] = value
  return lambda: jobs.run(config, str(tmp_path / "workdir"))


# ------------------------------------------------------------------ TorchScript, never run

def evil_archive(torch, path, created, victim):
  """A scripted module whose submodule's __setstate__ prints MARKER, creates `created`,
  rewrites the first bytes of `victim` (torch.from_file, shared) and sets its weight to 7s."""
  nn = torch.nn

  class Evil(nn.Module):
    def __init__(self):
      super().__init__()
      self.w = nn.Parameter(torch.ones(2))
      self.created, self.victim = created, victim

    def forward(self, x):
      return x * self.w.sum()

    @torch.jit.export
    def __getstate__(self):
      return (self.w, self.created, self.victim, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, str, bool]):
      print("SETSTATE-RAN")
      made = torch.from_file(state[1], shared=True, size=4, dtype=torch.uint8).fill_(65)
      hit = torch.from_file(state[2], shared=True, size=4, dtype=torch.uint8).fill_(66)
      self.w = state[0] * 0 + 7 + (made[0] + hit[0]).float() * 0  # Used: never left out.
      self.created, self.victim, self.training = state[1], state[2], state[3]

  class Top(nn.Module):
    def __init__(self):
      super().__init__()
      self.fc = nn.Linear(2, 2)
      self.evil = Evil()

    def forward(self, x):
      return self.evil(self.fc(x))

  torch.jit.script(Top()).save(str(path))


def test_a_torchscript_setstate_never_runs_on_import(tmp_path, capfd):
  torch = pytest.importorskip("torch")
  path, created, victim = tmp_path / "RN50.pt", tmp_path / "created.bin", tmp_path / "victim.bin"
  evil_archive(torch, path, str(created), str(victim))
  victim.write_bytes(b"keep this")
  capfd.readouterr()

  with pytest.raises(DataError, match=r"module evil \(Evil\) restores itself with its own"
                                      r" __setstate__.*--config.trust_pickle=true"):
    convert.load(str(path), "resnet18")
  line = _one_line_exit(capfd, _import_job(path, tmp_path))
  assert str(path) in line and "__setstate__" in line
  # What the archive pickled, read as data: the weight is ones (its __setstate__ makes 7s).
  with zipfile.ZipFile(path) as opened:
    archive = torchscript.Archive(str(path), opened)
    pickled = archive.tree().state["evil"].state
    np.testing.assert_array_equal(archive.array(pickled[0]), np.ones(2, np.float32))
  assert MARKER not in capfd.readouterr().out
  assert not created.exists() and victim.read_bytes() == b"keep this"
  assert not (tmp_path / "workdir").exists()  # Refused while validating: nothing written.

  # Trusted, torch.jit.load runs it (what the untrusted reads above did not do).
  tensors = readers.read_tensors(str(path), trust_pickle=True)
  np.testing.assert_array_equal(tensors["evil.w"], np.full(2, 7, np.float32))
  assert MARKER in capfd.readouterr().out and created.exists()
  assert victim.read_bytes() == b"BBBB this"


class _Calls:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_an_archive_pickle_naming_a_function_is_refused_unrun(tmp_path, capsys):
  marker = tmp_path / "ran"
  path = tmp_path / "model.pt"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("model/data.pkl", pickle.dumps(_Calls(marker), protocol=2))
    archive.writestr("model/constants.pkl", pickle.dumps((), protocol=2))
  with pytest.raises(DataError, match=r"data.pkl holds it refers to (posix|os)\.system"):
    readers.read_checkpoint(str(path))
  line = _one_line_exit(capsys, _import_job(path, tmp_path))
  assert "which weights never need" in line
  assert not marker.exists() and not (tmp_path / "workdir").exists()


def test_openai_rn50_torchscript_layout_imports_without_torch(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  torch.manual_seed(3)
  module = randomize(torch, torch_clip(torch, vision=SMALL_RN, embed_dim=24, quick_gelu=True,
                                       openai_extras=True, **SMALL_TEXT), seed=3)
  images, tokens = inputs(5, 2, (3, 64, 64), SMALL_TEXT["context_length"],
                          SMALL_TEXT["vocab_size"])
  path = tmp_path / "RN50.pt"  # OpenAI's RN50.pt is a traced archive of this layout.
  torch.jit.trace(module, (torch.from_numpy(images), torch.from_numpy(tokens)),
                  check_trace=False).save(str(path))
  loaded = torch.jit.load(str(path))
  expected = {k: v.float().numpy() for k, v in loaded.state_dict().items()}
  names = {m.original_name for _, m in loaded.named_modules()}

  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails from here on.
  checkpoint = readers.read_checkpoint(str(path))
  monkeypatch.undo()
  assert set(checkpoint.tensors) == set(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(checkpoint.tensors[name], value, err_msg=name)
  assert checkpoint.module_types == names and "QuickGELU" in names
  assert clip_layouts.stated_quick_gelu(checkpoint.module_types) is True

  vision = ResNetVisionConfig(layers=SMALL_RN["layers"], width=SMALL_RN["width"],
                              head_width=SMALL_RN["width"] * 32 // SMALL_RN["heads"],
                              image_size=SMALL_RN["image_size"])
  model = CLIP(embed_dim=24, vision=vision, quick_gelu=True, **SMALL_TEXT)
  variables = clip_layouts.import_clip(checkpoint.tensors, model, what=str(path))
  check_against_torch(model, variables, images, tokens,
                      torch_outputs(torch, module, images, tokens))


# ------------------------------------------------------------- files that are no checkpoint

def _truncated_torch_files(tmp_path):
  """A torch.save zip and a legacy (pre-zip) torch.save file, each cut in half."""
  torch = pytest.importorskip("torch")
  made = {}
  for name, zipped in (("half.pth", True), ("legacy.pth.tar", False)):
    whole = tmp_path / f"whole_{name}"
    torch.save({"w": torch.ones(256)}, whole, _use_new_zipfile_serialization=zipped)
    data = whole.read_bytes()
    (tmp_path / name).write_bytes(data[:len(data) // 2])
    made[name] = len(data) // 2
  return made


def test_text_empty_and_truncated_files_say_what_they_are(tmp_path):
  sizes = _truncated_torch_files(tmp_path)
  (tmp_path / "notes.pth").write_text("epoch 32: loss 0.41, see the wandb run\n")
  (tmp_path / "empty.pt").write_bytes(b"")
  np.savez(tmp_path / "acts.npz", x=np.zeros(3))
  os.replace(tmp_path / "acts.npz", tmp_path / "acts.pt")
  (tmp_path / "model.bin").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\n")
  (tmp_path / "blob.pth").write_bytes(bytes(range(200, 256)) * 4)
  save_file({"w": np.ones(64, np.float32)}, str(tmp_path / "whole.safetensors"))
  data = (tmp_path / "whole.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[:20])
  (tmp_path / "readme.safetensors").write_text("Download the weights from the hub.\n")
  expected = {
      "notes.pth": "is a text file (39 bytes), not a PyTorch checkpoint; it begins 'epoch 32:"
                   " loss 0.41, see the wandb run'",
      "empty.pt": "is empty (0 bytes), not a checkpoint",
      "half.pth": f"is truncated or damaged ({sizes['half.pth']:,} bytes): a zip archive"
                  " (torch.save's format) without its end record",
      "legacy.pth.tar": f"is truncated ({sizes['legacy.pth.tar']:,} bytes): torch.load ran out"
                        " of data",
      "acts.pt": "is a zip archive without data.pkl, not a PyTorch checkpoint",
      "model.bin": "is a Git LFS pointer (57 bytes), not the checkpoint; fetch it",
      "blob.pth": "is not a PyTorch checkpoint: neither a zip archive (torch.save's format) nor"
                  " a pickle; it begins b'\\xc8",
      "cut.safetensors": "is truncated (20 bytes): its header alone is",
      "readme.safetensors": "is a text file (35 bytes), not a safetensors file; it begins"
                            " 'Download the weights from the hub.'",
  }
  for name, says in expected.items():
    for trust in (False, True):
      with pytest.raises(DataError) as refused:
        convert.read(str(tmp_path / name), "resnet18", trust_pickle=trust)
      message = str(refused.value)
      assert f"checkpoint file {tmp_path / name} {says}" in message, message
      assert "trust_pickle" not in message and "\n" not in message, message


def test_the_import_job_refuses_them_before_writing(tmp_path, capsys):
  _truncated_torch_files(tmp_path)
  (tmp_path / "notes.pth").write_text("not a checkpoint\n")
  for name, says in (("notes.pth", "is a text file"), ("half.pth", "is truncated or damaged")):
    line = _one_line_exit(capsys, _import_job(tmp_path / name, tmp_path))
    assert f"checkpoint file {tmp_path / name} {says}" in line, line
  # The legacy file is refused while reading (torch's own read): the workdir holds no import.
  line = _one_line_exit(capsys, _import_job(tmp_path / "legacy.pth.tar", tmp_path))
  assert "is truncated" in line and "trust_pickle" not in line
  assert not (tmp_path / "workdir" / "config.json").exists()
  assert not (tmp_path / "workdir" / "checkpoints").exists()


# ------------------------------------------------------------------ FIFOs and devices

@pytest.fixture
def no_hang():
  """Fails a test that blocks (on opening a FIFO) instead of hanging the suite."""
  def hung(*unused):
    raise AssertionError("blocked on the FIFO")
  previous = signal.signal(signal.SIGALRM, hung)
  signal.alarm(20)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, previous)


def test_a_fifo_or_a_device_is_named_for_what_it_is(tmp_path, capsys, no_hang):
  del no_hang
  fifo = tmp_path / "model.pth"
  os.mkfifo(fifo)
  os.symlink(tmp_path / "gone.pth", tmp_path / "link.pth")
  cases = {str(fifo): "is a FIFO (named pipe), not a checkpoint file",
           os.devnull: "is a character device, not a checkpoint file",
           str(tmp_path): "is a directory, not a checkpoint file",
           str(tmp_path / "link.pth"): f"points to {tmp_path / 'gone.pth'}, which does not"
                                       " exist (a broken symbolic link)"}
  for source, says in cases.items():
    with pytest.raises(DataError, match="^checkpoint file .*") as refused:
      convert.load(source, "resnet18")
    assert str(refused.value) == f"checkpoint file {source} {says}"
  line = _one_line_exit(capsys, _import_job(fifo, tmp_path))
  assert line == f"error: checkpoint file {fifo} is a FIFO (named pipe), not a checkpoint file"
  source = tmp_path / "ok.safetensors"
  save_file({"w": np.ones(2, np.float32)}, str(source))
  line = _one_line_exit(capsys, _import_job(source, tmp_path, reference=str(fifo)))
  assert line.startswith(f"error: config.reference={fifo} is a FIFO (named pipe); pass an .npz")
  assert sorted(os.listdir(tmp_path)) == ["link.pth", "model.pth", "ok.safetensors"]


def test_main_answers_a_fifo_source_with_one_line(tmp_path):
  fifo = tmp_path / "RN50.pt"
  os.mkfifo(fifo)
  done = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/import.py", f"--config.source={fifo}",
       "--config.arch=clip_rn50_quickgelu", f"--workdir={tmp_path / 'out'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
  assert lines[0] == f"error: checkpoint file {fifo} is a FIFO (named pipe), not a checkpoint file"
  assert os.listdir(tmp_path) == ["RN50.pt"]


def test_archive_tensors_of_every_kind_read_as_torch_gives_them(tmp_path):
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class Kinds(nn.Module):
    def __init__(self):
      super().__init__()
      base = torch.randn(6, 5)
      self.strided = nn.Parameter(base.t())             # A transposed view: strides (1, 5).
      self.register_buffer("offset", base[2:4, 1:3])    # A view into the same storage.
      self.fp16 = nn.Linear(3, 2).half()
      self.bf16 = nn.Linear(3, 2).to(torch.bfloat16)
      self.register_buffer("steps", torch.arange(7))
      self.register_buffer("mask", torch.rand(3) > 0.5)
      self.register_buffer("empty", torch.zeros(0, 4))
      self.plain = torch.ones(2)                        # An attribute, not a buffer.

    def forward(self, x):
      return x @ self.strided + self.offset.sum() + self.steps.sum()

  path = tmp_path / "kinds.pt"
  torch.jit.script(Kinds()).save(str(path))
  expected = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
              for k, v in torch.jit.load(str(path)).state_dict().items()}
  tensors = readers.read_tensors(str(path))
  assert set(tensors) == set(expected) and "plain" not in tensors
  for name, value in expected.items():
    assert tensors[name].dtype == value.dtype and tensors[name].shape == value.shape, name
    np.testing.assert_array_equal(tensors[name], value, err_msg=name)
