"""Pillow's bilinear resize of an RGB box, the same pixels at about a third of its CPU time.

`resize_into(image, box, size, out, mirror)` writes what
`image.resize((size, size), Image.Resampling.BILINEAR, box=box)` gives (mirrored left-right when
`mirror`) into `out`, a (size, size, 3) uint8 array, and returns True; or returns False where it
cannot promise Pillow's exact pixels (a Pillow other than the one it was checked against, an
image not in mode RGB, no C compiler), and the caller resizes with Pillow itself.

The arithmetic is Pillow 13's two-pass resampler (src/libImaging/Resample.c): per output pixel,
double-precision triangle weights over a support scaled by the shrink factor, normalized and
rounded to 22-bit fixed point, accumulated in int32 from a half unit, shifted and clamped after
each pass; the horizontal pass first unless the image's height exceeds the output's by more than
twice what its width does (`vertical_first`, measured on Pillow 13.0.0). resample.c does it with
vector instructions (AVX2 where the compiler targets it) and reads Pillow's pixels in place
through its Arrow export. tests/test_resample.py checks the pixels against Pillow's on random
images, boxes and sizes.

The C file is compiled on first use into $NMJAX_CACHE_DIR (default ~/.cache/nmjax/native), one
library per source, compiler and CPU (-march=native); bootstrap builds it ahead.
NMJAX_NATIVE_RESAMPLE=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import PIL
from PIL import Image

# The Pillow releases whose resize this reproduces (their pass order was measured, their
# arithmetic read); with any other the callers use Pillow's own resize.
CHECKED_PILLOW = ("13.0.0",)
_SOURCE = pathlib.Path(__file__).with_name("resample.c")


class _ArrowArray(ctypes.Structure):
  """The Arrow C data interface's ArrowArray struct (Pillow's image export); children holds
  the addresses of the child ArrowArrays."""
  _fields_ = [
      ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
      ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64),
      ("buffers", ctypes.POINTER(ctypes.c_void_p)), ("children", ctypes.POINTER(ctypes.c_void_p)),
      ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p),
      ("private_data", ctypes.c_void_p)]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def cache_dir() -> pathlib.Path:
  """Where compiled libraries live: $NMJAX_CACHE_DIR, else ~/.cache/nmjax/native."""
  return pathlib.Path(os.environ.get("NMJAX_CACHE_DIR") or "~/.cache/nmjax/native").expanduser()


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    return ""


def find_compiler() -> str | None:
  """$CC, else the first of cc, gcc, clang on PATH; None if none is."""
  return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)),
              None)


def build(compiler: str) -> pathlib.Path:
  """The compiled library for this source, compiler and CPU (compiled now if missing; the file
  appears whole or not at all, so concurrent processes share it). Raises OSError or
  subprocess.CalledProcessError when compiling fails."""
  key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), compiler.encode(),
                                   platform.machine().encode(), _cpu_flags().encode()]))
  target = cache_dir() / f"resample-{key.hexdigest()[:16]}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = pathlib.Path(tmp) / target.name
    subprocess.run([compiler, "-O3", "-march=native", "-shared", "-fPIC", "-o", str(built),
                    str(_SOURCE), "-lm"], check=True, capture_output=True, text=True)
    os.replace(built, target)
  return target


@functools.cache
def library() -> ctypes.CDLL | None:
  """The loaded resampler, or None where it is off or cannot be built (said once on stderr)."""
  if os.environ.get("NMJAX_NATIVE_RESAMPLE", "1") == "0":
    return None
  if PIL.__version__ not in CHECKED_PILLOW:
    print(f"[nmjax] Pillow {PIL.__version__} is not one whose resize nmjax's resampler was"
          f" checked against ({', '.join(CHECKED_PILLOW)}): crops resize with Pillow's"
          " (slower, same pipeline)", file=sys.stderr)
    return None
  compiler = find_compiler()
  if compiler is None:
    print("[nmjax] no C compiler (cc, gcc, clang or $CC): crops resize with Pillow's resize"
          " (about 3x the CPU per crop)", file=sys.stderr)
    return None
  try:
    lib = ctypes.CDLL(str(build(compiler)))
  except (OSError, subprocess.CalledProcessError) as e:
    detail = getattr(e, "stderr", None) or e
    print(f"[nmjax] building {_SOURCE.name} failed ({str(detail).strip()[:300]}): crops resize"
          " with Pillow's resize", file=sys.stderr)
    return None
  lib.nmjax_resample.restype = ctypes.c_int
  lib.nmjax_resample.argtypes = [
      ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_float,
      ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int,
      ctypes.c_void_p, ctypes.c_int]
  return lib


def available() -> bool:
  """Whether resize_into resizes (else it returns False and callers use Pillow)."""
  return library() is not None


def vertical_first(width: int, height: int, out_width: int, out_height: int) -> bool:
  """Whether Pillow 13 resizes a width x height image to out_width x out_height vertically
  first (measured on 13.0.0 over random sizes and boxes: the box does not enter)."""
  return height - out_height > 2 * max(width - out_width, 0)


def _pixels(image: Image.Image) -> tuple[int, object]:
  """(address of the image's RGBX rows, what keeps it alive): Pillow's own memory through its
  Arrow export (one contiguous block), else a copy."""
  try:
    _, array = image.__arrow_c_array__()
    child = _ArrowArray.from_address(
        _ArrowArray.from_address(_capsule_pointer(array, b"arrow_array")).children[0])
    return child.buffers[1] + 4 * child.offset, array
  except (AttributeError, ValueError, TypeError):
    data = np.frombuffer(image.tobytes("raw", "RGBX"), np.uint8)
    return data.ctypes.data, data


def resize_into(image: Image.Image, box: tuple[float, float, float, float], size: int,
                out: np.ndarray, *, mirror: bool = False) -> bool:
  """Writes Pillow's bilinear resize of `box` of `image` to size x size (mirrored when `mirror`)
  into `out` ((size, size, 3) uint8, C-contiguous); False (nothing written) where it cannot
  promise Pillow's pixels. See the module docstring."""
  lib = library()
  width, height = image.size
  x0, y0, x1, y1 = box
  if (lib is None or image.mode != "RGB" or out.shape != (size, size, 3)
      or out.dtype != np.uint8 or not out.flags.c_contiguous
      or not 0 <= x0 < x1 <= width or not 0 <= y0 < y1 <= height):
    return False  # Pillow's resize then also says what is wrong with the box
  image.load()
  address, keep = _pixels(image)
  rc = lib.nmjax_resample(address, width, height, 4 * width, *map(float, box), size, size,
                          int(vertical_first(width, height, size, size)), out.ctypes.data,
                          int(mirror))
  del keep
  if rc:
    raise MemoryError("nmjax resample: out of memory")
  return True
