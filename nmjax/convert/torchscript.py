"""TorchScript archives (torch.jit.save; OpenAI's CLIP downloads) read as data: no torch, and
nothing in the file runs.

An archive is a zip whose top folder holds data.pkl, the module tree pickled as objects of
`__torch__.*` classes, each with the dict of its attributes (submodules, parameters, buffers,
plain values) as its state; a tensor in it is torch._utils._rebuild_tensor_v2 of a persistent id
('storage', storage type, key, location, numel) naming the bytes of data/<key>. code/ holds the
classes' TorchScript source; of it only the `class NAME(Module):` headers and their
`__parameters__` / `__buffers__` lists are read, as text (which attributes the state dict holds).

The unpickler here builds tensors (numpy arrays, read only when asked for), lists, dicts and
plain records of the `__torch__` objects' state, and refuses every other global. A module that
restores itself with its own __setstate__ (code in the archive, which torch.jit.load would run)
is refused with one line. read(path) gives what torch.jit.load(path).state_dict() gives: dotted
names (`visual.conv1.weight`, ...) and the arrays, and the modules' class names.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import re
import zipfile
from typing import Any

import numpy as np

from nmjax.errors import DataError

# torch's storage types -> numpy dtypes (bfloat16: its bits, widened to float32 on reading).
STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?"}
# torch.jit._pickle's typed containers: each returns its argument.
CONTAINERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")
TRUST_HINT = ("if you trust the file, --config.trust_pickle=true loads it with torch.jit.load"
              " (which runs its code)")


class Record:
  """A `__torch__` object of the archive: its class name and pickled state, nothing run."""
  qualname = ""
  state: Any = None

  def __setstate__(self, state: Any) -> None:
    self.state = state


@dataclasses.dataclass(frozen=True)
class Storage:
  """A storage of the archive: data/<key>, `numel` elements of `dtype`."""
  key: str
  dtype: str
  numel: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """A tensor of the archive: a strided view of a storage, read by Archive.array."""
  storage: Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, offset, size, stride, *unused) -> TensorRef:
  del unused  # requires_grad, backward hooks, metadata: nothing a state dict keeps.
  if not (isinstance(storage, Storage) and isinstance(offset, int)
          and all(isinstance(n, int) and n >= 0 for n in (*size, *stride, offset))
          and len(size) == len(stride)):
    raise pickle.UnpicklingError("a tensor with malformed arguments")
  return TensorRef(storage, offset, tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
  """Builds tensors, containers and Records; refuses every other global."""

  def __init__(self, file: Any) -> None:
    super().__init__(file)
    self.classes: dict[str, type] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "__torch__" or module.startswith("__torch__."):
      qualname = f"{module}.{name}"
      if qualname not in self.classes:
        self.classes[qualname] = type("Record", (Record,), {"qualname": qualname})
      return self.classes[qualname]
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch" and name in STORAGE_DTYPES:
      return name
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch.jit._pickle" and name in CONTAINERS:
      return lambda data: data
    if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
      return lambda value, unused_type: value
    raise pickle.UnpicklingError(f"it refers to {module}.{name}, which weights never need")

  def persistent_load(self, pid: Any) -> Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and pid[1] in STORAGE_DTYPES and isinstance(pid[2], str)
            and isinstance(pid[4], int) and pid[4] >= 0):
      raise pickle.UnpicklingError(f"a persistent id that is not a storage ({str(pid)[:60]})")
    return Storage(pid[2], STORAGE_DTYPES[pid[1]], pid[4])


@dataclasses.dataclass(frozen=True)
class ClassInfo:
  """What code/ says of a class: whether it is a Module, its parameter and buffer names, and
  whether it restores itself with its own __setstate__."""
  is_module: bool
  tensors: tuple[str, ...] = ()
  custom_setstate: bool = False


def _names(block: str, field: str) -> tuple[str, ...]:
  found = re.search(rf"^  {field} = \[(.*?)\]", block, re.M | re.S)
  return tuple(re.findall(r'"([^"]*)"', found.group(1))) if found else ()


class Archive:
  """An open TorchScript archive: its top folder, data.pkl's module tree, code/'s classes."""

  def __init__(self, path: str, archive: zipfile.ZipFile) -> None:
    self.path, self.zip = path, archive
    tops = sorted(n[:-len("/data.pkl")] for n in archive.namelist()
                  if n.count("/") == 1 and n.endswith("/data.pkl"))
    if not tops:
      raise DataError(f"checkpoint file {path} is a TorchScript archive without data.pkl (an old"
                      f" format nmjax does not read); {TRUST_HINT}")
    self.top = tops[0]
    names = set(archive.namelist())
    order = f"{self.top}/byteorder"
    self.byteorder = ">" if order in names and archive.read(order).strip() == b"big" else "<"
    self._code: dict[str, str] = {}
    self._data: dict[str, bytes] = {}

  def fail(self, why: str) -> DataError:
    return DataError(f"checkpoint file {self.path} is a TorchScript archive that nmjax does not"
                     f" read without running it: {why}; {TRUST_HINT}")

  def tree(self) -> Any:
    """data.pkl unpickled: the top module's Record (tensors as TensorRefs)."""
    try:
      with self.zip.open(f"{self.top}/data.pkl") as f:
        return _Unpickler(f).load()
    except pickle.UnpicklingError as e:
      raise self.fail(f"its data.pkl holds {e}") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            zipfile.BadZipFile, OSError) as e:
      raise DataError(f"checkpoint file {self.path} is a damaged TorchScript archive: its"
                      f" data.pkl cannot be read ({type(e).__name__}: {str(e)[:120]})") from None

  def class_info(self, qualname: str) -> ClassInfo:
    """ClassInfo of a `__torch__` class, from the text of its code/ file."""
    module, _, name = qualname.rpartition(".")
    source = f"{self.top}/code/{module.replace('.', '/')}.py"
    if source not in self._code:
      try:
        self._code[source] = self.zip.read(source).decode("utf-8", "replace")
      except KeyError:
        self._code[source] = ""
    text = self._code[source]
    header = re.search(rf"^class {re.escape(name)}\((\w+)\):$", text, re.M)
    if header is None:
      return ClassInfo(is_module=False)
    end = re.search(r"^\S", text[header.end() + 1:], re.M)
    block = text[header.end():header.end() + 1 + end.start()] if end else text[header.end():]
    return ClassInfo(header.group(1) == "Module",
                     _names(block, "__parameters__") + _names(block, "__buffers__"),
                     re.search(r"^  def __setstate__\(", block, re.M) is not None)

  def array(self, ref: TensorRef) -> np.ndarray:
    """The tensor's values (a copy), bounds-checked against its storage."""
    storage, key = ref.storage, f"{self.top}/data/{ref.storage.key}"
    if key not in self._data:
      try:
        self._data[key] = self.zip.read(key)
      except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise DataError(f"checkpoint file {self.path} is a damaged TorchScript archive: {key}"
                        f" cannot be read ({type(e).__name__})") from None
    dtype = np.dtype(storage.dtype).newbyteorder(self.byteorder)
    flat = np.frombuffer(self._data[key], dtype=dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if len(flat) < storage.numel or (0 not in ref.size and last >= storage.numel):
      raise DataError(f"checkpoint file {self.path} is a damaged TorchScript archive: {key}"
                      f" holds {len(flat)} values, its tensors need more")
    if 0 in ref.size:
      values = np.zeros(ref.size, dtype)
    else:
      values = np.lib.stride_tricks.as_strided(
          flat[ref.offset:], ref.size, [s * dtype.itemsize for s in ref.stride]).copy()
    values = values.astype(dtype.newbyteorder("="))
    if storage.dtype == "u2":  # bfloat16: the high half of a float32.
      return (values.astype(np.uint32) << 16).view(np.float32)
    return values


@dataclasses.dataclass
class _Walk:
  """The state dict and the module class names gathered from a module tree."""
  tensors: dict[str, TensorRef] = dataclasses.field(default_factory=dict)
  types: set[str] = dataclasses.field(default_factory=set)


def _visit(archive: Archive, record: Record, prefix: str, walk: _Walk, depth: int = 0) -> None:
  info = archive.class_info(record.qualname)
  where = f"module {prefix[:-1]}" if prefix else "its top module"
  if depth > 200:
    raise archive.fail(f"{where} nests modules more than 200 deep")
  kind = record.qualname.rsplit(".", 1)[-1]
  if info.custom_setstate:
    raise archive.fail(f"{where} ({kind}) restores itself with its own __setstate__, code in"
                       " the archive")
  if not isinstance(record.state, dict):
    raise archive.fail(f"{where} ({kind}) keeps its state as a"
                       f" {type(record.state).__name__}, not a dict of its attributes")
  walk.types.add(kind)
  for name in info.tensors:
    value = record.state.get(name)
    if isinstance(value, TensorRef):
      walk.tensors[prefix + name] = value
  for name, value in record.state.items():
    if isinstance(value, Record) and archive.class_info(value.qualname).is_module:
      _visit(archive, value, f"{prefix}{name}.", walk, depth + 1)


def _walk(archive: Archive) -> _Walk:
  top = archive.tree()
  if not isinstance(top, Record) or not archive.class_info(top.qualname).is_module:
    raise archive.fail("its data.pkl holds no module")
  walk = _Walk()
  _visit(archive, top, "", walk)
  return walk


def _open(path: str) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise DataError(f"checkpoint file {path} cannot be read as a zip archive"
                    f" ({type(e).__name__}: {str(e)[:120]})") from None


def check(path: str) -> None:
  """Fails with one line when the archive cannot be read as data (tensors are not read)."""
  with _open(path) as archive:
    _walk(Archive(path, archive))


def read(path: str) -> tuple[dict[str, np.ndarray], frozenset[str]]:
  """The archive's state dict ({dotted name: array}, as torch.jit.load(path).state_dict()) and
  the class names of its modules (as their `original_name`), nothing in it run."""
  with _open(path) as archive:
    opened = Archive(path, archive)
    walk = _walk(opened)
    return {name: opened.array(ref) for name, ref in walk.tensors.items()}, frozenset(walk.types)
