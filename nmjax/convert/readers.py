"""Reading PyTorch-world checkpoint files into {name: numpy array}, torch only where it must be.

  .safetensors                 the safetensors package's numpy API: torch is never imported.
  .pth .pth.tar .pt .bin       torch.load (imported here, on first use), weights_only unless the
                               caller trusts the file: a training checkpoint's dict holding the
                               weights under `state_dict` (timm's train.py, open_clip) or `model`
                               (DeiT, torchvision's references), or the raw {name: tensor} dict.
  TorchScript archives         (torch.jit.save; OpenAI's released CLIP .pt files): torch.jit.load,
                               then the module's state_dict. TorchScript is not pickle: loading
                               compiles the archive's TorchScript code and unpickles only tensors
                               and constants with torch's restricted unpickler; nothing here runs
                               the module. The Python class names of its submodules come along
                               (Checkpoint.module_types: "QuickGELU" or "GELU" say which
                               activation the model was built with).

Floating tensors become float32 (bf16 and fp16 included); names lose the `module.` prefix of
DataParallel/DDP training checkpoints and the `_orig_mod.` of torch.compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import zipfile
from typing import Any

import numpy as np

from nmjax import io as nmjax_io
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


def check_path(path: str) -> None:
  """Fails with one line when `path` is not a readable checkpoint file of a known kind."""
  if not path:
    raise DataError("no checkpoint file given; pass --config.source=FILE (.safetensors, .pth,"
                    " .pth.tar, .pt or .bin)")
  if not nmjax_io.isfile(path):
    raise DataError(f"checkpoint file {path} does not exist (or is not a file)")
  if not path.endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES):
    raise DataError(f"checkpoint file {path} has an unknown suffix; allowed:"
                    f" {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}")


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
    hint = ("" if trust_pickle else "; if you trust this file, --config.trust_pickle=true lets"
            " torch unpickle arbitrary objects")
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


def read_torchscript(path: str) -> Checkpoint:
  """The state dict and module class names of a TorchScript archive (torch.jit.load)."""
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
  check_path(path)
  path = nmjax_io.local_mirror(path)  # A file in a bucket: its local copy (the readers' input).
  if path.endswith(SAFETENSORS_SUFFIXES):
    return Checkpoint(strip_prefixes(read_safetensors(path)))
  if is_torchscript(path):
    checkpoint = read_torchscript(path)
    return Checkpoint(strip_prefixes(checkpoint.tensors), checkpoint.module_types)
  return Checkpoint(strip_prefixes(read_torch(path, trust_pickle=trust_pickle)))


def read_tensors(path: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """{name: array} of a checkpoint file (see the module docstring), prefixes stripped."""
  return read_checkpoint(path, trust_pickle=trust_pickle).tensors
