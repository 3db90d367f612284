"""Reading PyTorch-world checkpoint files into {name: numpy array}, torch only where it must be.

  .safetensors                 the safetensors package's numpy API: torch is never imported.
  .pth .pth.tar .pt .bin       torch.load (imported here, on first use), weights_only unless the
                               caller trusts the file: a training checkpoint's dict holding the
                               weights under `state_dict` (timm's train.py, open_clip) or `model`
                               (DeiT, torchvision's references), or the raw {name: tensor} dict.
  TorchScript archives         (torch.jit.save; OpenAI's released CLIP .pt files): read as data
                               by nmjax.convert.torchscript, without torch and without running
                               anything in the file (torch.jit.load would run a module's
                               __setstate__); trusted, torch.jit.load. The Python class names of
                               its modules come along (Checkpoint.module_types: "QuickGELU" or
                               "GELU" say which activation the model was built with).

Before any reading, check_path tells apart what is not a checkpoint (a FIFO, a device, a text
file, an empty or truncated file, a zip without data.pkl) with one line. Floating tensors become
float32 (bf16 and fp16 included); names lose the `module.` prefix of DataParallel/DDP training
checkpoints and the `_orig_mod.` of torch.compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import stat
import zipfile
from typing import Any

import numpy as np

from nmjax import io as nmjax_io
from nmjax.convert import torchscript
from nmjax.errors import DataError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin")
# Where training checkpoints keep the weights, in the order they are looked for.
STATE_DICT_KEYS = ("state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A file's weights ({name: array}, prefixes stripped) and, for a TorchScript archive, the
  Python class names of its modules (empty for every other kind of file)."""
  tensors: dict[str, np.ndarray]
  module_types: frozenset[str] = frozenset()


def file_sha256(path: str) -> str:
  """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with nmjax_io.open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


# What the file system may hold at a path instead of a regular file.
NOT_FILES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
ZIP_STARTS = (b"PK\x03\x04", b"PK\x05\x06")
# What torch.load says of a file that ends too soon.
TRUNCATED = ("truncated", "Ran out of input", "unexpected EOF")
PICKLE_START = b"\x80"  # Pickle protocol 2 and later: torch.save's format before zip files.


def not_a_file(path: str) -> str | None:
  """Why `path` is not a regular file ("does not exist", "is a FIFO (named pipe)", ...), or None;
  asked of the file system, never by opening the path (a FIFO would block)."""
  if nmjax_io.is_cloud(path):
    if nmjax_io.isfile(path):
      return None
    return "is a directory" if nmjax_io.isdir(path) else "does not exist"
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    if os.path.islink(path):
      return f"points to {os.readlink(path)}, which does not exist (a broken symbolic link)"
    return "does not exist"
  except OSError as e:
    return f"cannot be examined ({e.strerror})"
  if stat.S_ISREG(mode):
    return None
  return next((f"is {what}" for test, what in NOT_FILES if test(mode)),
              "is not a regular file")


def _text_start(head: bytes) -> str | None:
  """The first line of `head` when it reads as text (UTF-8, no control bytes), else None."""
  for cut in range(4):  # The 64 bytes may end inside a character.
    try:
      text = head[:len(head) - cut].decode("utf-8")
      break
    except UnicodeDecodeError:
      continue
  else:
    return None
  if any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
    return None
  line = (text.strip().splitlines() or [""])[0]
  return line[:40] + ("..." if len(line) > 40 else "")


def _not_torch(size: int, head: bytes, f: Any) -> str | None:
  """Why the bytes of a torch-suffixed file are no torch checkpoint, or None."""
  if head.startswith(ZIP_STARTS):
    if not zipfile.is_zipfile(f):
      return (f"is truncated or damaged ({size:,} bytes): a zip archive (torch.save's format)"
              " without its end record; copy or download it again")
    try:
      names = zipfile.ZipFile(f).namelist()
    except (OSError, zipfile.BadZipFile) as e:
      return f"is a damaged zip archive ({type(e).__name__}: {str(e)[:100]})"
    if not any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names):
      if any(n.endswith(("/model.json", "/constants.pkl")) for n in names):
        return ("is a TorchScript archive of an old format (no data.pkl) that nmjax does not"
                " read; load it with torch and torch.save(model.state_dict(), FILE)")
      return "is a zip archive without data.pkl, not a PyTorch checkpoint"
    return None
  if head.startswith(PICKLE_START):
    return None
  if head.startswith(b"version https://git-lfs"):
    return f"is a Git LFS pointer ({size:,} bytes), not the checkpoint; fetch it (git lfs pull)"
  text = _text_start(head)
  if text is not None:
    return f"is a text file ({size:,} bytes), not a PyTorch checkpoint; it begins {text!r}"
  return (f"is not a PyTorch checkpoint: neither a zip archive (torch.save's format) nor a"
          f" pickle; it begins {head[:8]!r}")


def _not_safetensors(size: int, head: bytes) -> str | None:
  """Why the bytes of a .safetensors file are no safetensors file, or None."""
  header = int.from_bytes(head[:8], "little")
  if size > 8 and head[8:9] == b"{":
    if header <= size - 8:
      return None
    return f"is truncated ({size:,} bytes): its header alone is {header:,} bytes long"
  text = _text_start(head)
  if text is not None:
    return f"is a text file ({size:,} bytes), not a safetensors file; it begins {text!r}"
  return f"is not a safetensors file ({size:,} bytes); it begins {head[:8]!r}"


def check_content(path: str) -> None:
  """Fails with one line when a checkpoint file's first bytes (and a zip's end record) say it
  is empty, truncated, text or another kind of file."""
  try:
    size = nmjax_io.getsize(path)
    with nmjax_io.open(path, "rb") as f:
      head = f.read(64)
      why = (_not_safetensors(size, head) if path.endswith(SAFETENSORS_SUFFIXES)
             else _not_torch(size, head, f))
  except OSError as e:
    raise DataError(f"checkpoint file {path} cannot be read ({e.strerror or e})") from None
  if size == 0:
    why = "is empty (0 bytes), not a checkpoint"
  if why:
    raise DataError(f"checkpoint file {path} {why}")


def check_path(path: str, *, trust_pickle: bool = False) -> None:
  """Fails with one line when `path` is not a readable checkpoint file of a known kind: missing,
  not a regular file, an unknown suffix, bytes of another kind (check_content), or (untrusted)
  a TorchScript archive that cannot be read without running it."""
  if not path:
    raise DataError("no checkpoint file given; pass --config.source=FILE (.safetensors, .pth,"
                    " .pth.tar, .pt or .bin)")
  why = not_a_file(path)
  if why:
    fix = ", not a checkpoint file" if why.startswith("is ") else ""
    raise DataError(f"checkpoint file {path} {why}{fix}")
  if not path.endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES):
    raise DataError(f"checkpoint file {path} has an unknown suffix; allowed:"
                    f" {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}")
  check_content(path)
  if not trust_pickle and not nmjax_io.is_cloud(path) and is_torchscript(path):
    torchscript.check(path)  # Its module tree only: no tensor is read.


def _as_float32(array: np.ndarray) -> np.ndarray:
  if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16":
    return np.asarray(array, np.float32)
  return array


def strip_prefixes(tensors: dict[str, Any]) -> dict[str, Any]:
  """The names without a prefix that every one of them carries (`module.`, `_orig_mod.`)."""
  changed = True
  while changed and tensors:
    changed = False
    for prefix in PREFIXES:
      if all(name.startswith(prefix) for name in tensors):
        tensors = {name[len(prefix):]: value for name, value in tensors.items()}
        changed = True
  return tensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    loaded = load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"checkpoint file {path} cannot be read as safetensors"
                    f" ({type(e).__name__}: {str(e)[:160]})") from None
  return {name: _as_float32(array) for name, array in loaded.items()}


def import_torch(path: str) -> Any:
  """The torch module, or one line saying that reading `path` needs it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(f"checkpoint file {path} is a torch file and torch does not import here;"
                    " install torch (the CPU wheel is enough) or save the weights as"
                    " .safetensors") from None
  return torch


def _torch_load(path: str, trust_pickle: bool) -> Any:
  torch = import_torch(path)
  try:
    # timm's train.py saves its argparse Namespace beside the weights: a plain attribute bag.
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0][:200]
    if isinstance(e, EOFError) or any(s in first for s in TRUNCATED):
      detail = f"{type(e).__name__}: {first}" if first else type(e).__name__
      raise DataError(f"checkpoint file {path} is truncated ({nmjax_io.getsize(path):,} bytes):"
                      f" torch.load ran out of data ({detail}); copy or download it again"
                      ) from None
    hint = ("; if you trust this file, --config.trust_pickle=true lets torch unpickle arbitrary"
            " objects" if not trust_pickle and "Weights only load failed" in first else "")
    raise DataError(f"checkpoint file {path} cannot be loaded by torch ({type(e).__name__}:"
                    f" {first}){hint}") from None


def is_torchscript(path: str) -> bool:
  """Whether `path` is a TorchScript archive: a zip whose top folder holds constants.pkl (what
  torch.load itself looks for; torch.save's zips have no such record)."""
  if not zipfile.is_zipfile(path):
    return False
  try:
    with zipfile.ZipFile(path) as archive:
      return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
  except (OSError, zipfile.BadZipFile):
    return False


def read_torchscript_data(path: str) -> Checkpoint:
  """The state dict and module class names of a TorchScript archive, read as data without torch
  (nmjax.convert.torchscript): nothing in the file runs."""
  tensors, types = torchscript.read(path)
  if not tensors:
    raise DataError(f"checkpoint file {path} is a TorchScript archive whose modules hold no"
                    " parameters or buffers")
  return Checkpoint({name: _as_float32(value) for name, value in tensors.items()}, types)


def read_torchscript(path: str) -> Checkpoint:
  """The state dict and module class names of a TorchScript archive by torch.jit.load, which
  runs the archive's code (a module's __setstate__): for trusted files only."""
  torch = import_torch(path)
  try:
    module = torch.jit.load(path, map_location="cpu")
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise DataError(f"checkpoint file {path} is a TorchScript archive that torch.jit.load cannot"
                    f" read ({type(e).__name__}: {first}); load it where it was made and"
                    " torch.save(model.state_dict(), FILE) instead") from None
  types = frozenset(str(getattr(m, "original_name", "")) for _, m in module.named_modules())
  return Checkpoint(_numpy_tensors(module.state_dict(), path), types - {""})


def _numpy_tensors(loaded: dict[Any, Any], path: str) -> dict[str, np.ndarray]:
  torch = import_torch(path)
  tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
  if not tensors:
    raise DataError(f"checkpoint file {path} holds no tensors (its keys:"
                    f" {', '.join(map(str, list(loaded)[:12]))})")
  return {name: _as_float32(value.detach().cpu().float().numpy()
                            if value.is_floating_point() else value.detach().cpu().numpy())
          for name, value in tensors.items()}


def read_torch(path: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """The weights of a torch pickle file: its state dict, found as the module docstring says."""
  loaded = _torch_load(path, trust_pickle)
  if isinstance(loaded, dict):
    for key in STATE_DICT_KEYS:
      if isinstance(loaded.get(key), dict):
        loaded = loaded[key]
        break
  if not isinstance(loaded, dict):
    raise DataError(f"checkpoint file {path} holds a {type(loaded).__name__}, not a state dict"
                    f" (a dict of tensors, or a dict with {' or '.join(STATE_DICT_KEYS)})")
  return _numpy_tensors(loaded, path)


def read_checkpoint(path: str, *, trust_pickle: bool = False) -> Checkpoint:
  """The weights of a checkpoint file (see the module docstring), prefixes stripped, and what a
  TorchScript archive says about its modules."""
  check_path(path, trust_pickle=trust_pickle)
  path = nmjax_io.local_mirror(path)  # A file in a bucket: its local copy (the readers' input).
  if path.endswith(SAFETENSORS_SUFFIXES):
    return Checkpoint(strip_prefixes(read_safetensors(path)))
  if is_torchscript(path):
    checkpoint = read_torchscript(path) if trust_pickle else read_torchscript_data(path)
    return Checkpoint(strip_prefixes(checkpoint.tensors), checkpoint.module_types)
  return Checkpoint(strip_prefixes(read_torch(path, trust_pickle=trust_pickle)))


def read_tensors(path: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """{name: array} of a checkpoint file (see the module docstring), prefixes stripped."""
  return read_checkpoint(path, trust_pickle=trust_pickle).tensors
