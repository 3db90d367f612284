"""Pillow's bilinear resize of an RGB box, the same pixels for less CPU time, and a JPEG crop
decoded (only what the resize reads) and resized in one call.

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

`decode_resize_into(jpeg, scale, box, size, out, mirror)` gives what Pillow's decode of the JPEG
at 1/scale, resized so, gives, decoding only the columns and rows the resize reads (decode.c:
libjpeg's jpeg_crop_scanline and jpeg_skip_scanlines, no row below the last one read, the rest
of the buffer laid out as the whole image so the resize runs as on a whole decode). It links
the libjpeg of Pillow's wheel (the decoder Pillow itself uses) against Debian's libjpeg-turbo
headers, or the system's libjpeg; where libjpeg reports anything about a file (an error or a
warning) it gives no answer and Pillow decodes, so Pillow's errors stay the errors.

The C files are compiled on first use into $NMJAX_CACHE_DIR (default ~/.cache/nmjax/native),
one library per source, compiler and CPU (-march=native), each with the sha256 of its bytes
beside it; a library whose bytes no longer match (a damaged disk or copy, which the dynamic
loader can die on with SIGBUS before any message) is compiled again, with one line on stderr,
before it is loaded. bootstrap builds them ahead.
NMJAX_NATIVE_RESAMPLE=0 turns both off.
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


def pillow_libjpeg() -> pathlib.Path | None:
  """The libjpeg that Pillow's wheel bundles (pillow.libs/), if it has one."""
  found = sorted((pathlib.Path(PIL.__file__).parent.parent / "pillow.libs").glob("libjpeg*.so*"))
  return found[0] if found else None


def build(compiler: str, source: pathlib.Path = _SOURCE,
          link: tuple[str, ...] = ()) -> pathlib.Path:
  """The compiled library of `source` for this compiler, CPU and `link` arguments, checked
  against the sha256 recorded beside it when it was compiled (`<name>.so.sha256`); compiled here
  where it is missing, unrecorded or damaged (a damaged one, which the loader could die on with
  SIGBUS, is said in one line). The files appear whole or not at all, so concurrent processes
  share them. Raises OSError or subprocess.CalledProcessError when compiling fails."""
  parts = [source.read_bytes(), compiler.encode(), platform.machine().encode(),
           _cpu_flags().encode(), *(a.encode() for a in link)]
  if source != _SOURCE:  # it includes resample.c
    parts.append(_SOURCE.read_bytes())
  key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
  target = cache_dir() / f"{source.stem}-{key}.so"
  recorded = target.with_name(target.name + ".sha256")
  if target.exists():
    if _intact(target, recorded):
      return target
    if recorded.exists():
      print(f"[nmjax] {target} is damaged (its sha256 is not the one recorded in {recorded.name}"
            " when it was compiled): compiling it again", file=sys.stderr, flush=True)
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = pathlib.Path(tmp) / target.name
    subprocess.run([compiler, "-O3", "-march=native", "-shared", "-fPIC", f"-I{_SOURCE.parent}",
                    "-o", str(built), str(source), *link, "-lm"],
                   check=True, capture_output=True, text=True)
    digest = pathlib.Path(tmp) / recorded.name
    digest.write_text(_sha256(built) + "\n")
    os.replace(digest, recorded)  # First: a library never stands beside another's digest.
    os.replace(built, target)
  return target


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(library_path: pathlib.Path, recorded: pathlib.Path) -> bool:
  """Whether the library's bytes are those whose sha256 was recorded when it was compiled."""
  try:
    return recorded.read_text().strip() == _sha256(library_path)
  except OSError:
    return False


def _load(source: pathlib.Path, link: tuple[str, ...], what: str) -> ctypes.CDLL | None:
  """build + load, or None (said once on stderr) where it is off or cannot be built."""
  if os.environ.get("NMJAX_NATIVE_RESAMPLE", "1") == "0":
    return None
  if PIL.__version__ not in CHECKED_PILLOW:
    print(f"[nmjax] Pillow {PIL.__version__} is not one whose resize nmjax's resampler was"
          f" checked against ({', '.join(CHECKED_PILLOW)}): {what} with Pillow (slower, the same"
          " pixels)", file=sys.stderr)
    return None
  compiler = find_compiler()
  if compiler is None:
    print(f"[nmjax] no C compiler (cc, gcc, clang or $CC): {what} with Pillow (slower, the same"
          " pixels)", file=sys.stderr)
    return None
  try:
    return ctypes.CDLL(str(build(compiler, source, link)))
  except (OSError, subprocess.CalledProcessError) as e:
    detail = getattr(e, "stderr", None) or e
    print(f"[nmjax] building {source.name} failed ({str(detail).strip()[:300]}): {what} with"
          " Pillow (slower, the same pixels)", file=sys.stderr)
    return None


_RESAMPLE_ARGS = [ctypes.c_float] * 4 + [ctypes.c_int] * 3


@functools.cache
def library() -> ctypes.CDLL | None:
  """The loaded resampler (resample.c), or None where it is off or cannot be built."""
  lib = _load(_SOURCE, (), "crops resize")
  if lib is not None:
    lib.nmjax_resample.restype = ctypes.c_int
    lib.nmjax_resample.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long,
                                   *_RESAMPLE_ARGS, ctypes.c_void_p, ctypes.c_int]
  return lib


@functools.cache
def decoder() -> ctypes.CDLL | None:
  """The loaded crop decoder (decode.c: libjpeg, Pillow's own where its wheel bundles one, and
  the resampler), or None where it is off or cannot be built (no libjpeg headers, say)."""
  if library() is None:
    return None
  bundled = pillow_libjpeg()
  link = (str(bundled), f"-Wl,-rpath,{bundled.parent}") if bundled else ("-ljpeg",)
  lib = _load(_SOURCE.with_name("decode.c"), link, "crops decode")
  if lib is not None:
    lib.nmjax_decode_resample.restype = ctypes.c_int
    lib.nmjax_decode_resample.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int,
                                          *_RESAMPLE_ARGS[:-1], ctypes.c_void_p]
  return lib


def available() -> bool:
  """Whether resize_into resizes (else it returns False and callers use Pillow)."""
  return library() is not None


def vertical_first(width: int, height: int, out_width: int, out_height: int) -> bool:
  """Whether Pillow 13 resizes a width x height image to out_width x out_height vertically
  first (measured on 13.0.0 over random sizes and boxes: the box does not enter; decode.c
  applies the same rule)."""
  return height - out_height > 2 * max(width - out_width, 0)


def _takes(out: np.ndarray, size: int) -> bool:
  """Whether the C code can write a size x size crop into `out`."""
  return out.shape == (size, size, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


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
  if (lib is None or image.mode != "RGB" or not _takes(out, size)
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


def decode_resize_into(jpeg: bytes, scale: int, box: tuple[float, float, float, float],
                       size: int, out: np.ndarray, *, mirror: bool = False) -> bool:
  """Writes what Pillow's decode of the JPEG at 1/scale (1, 2, 4 or 8; libjpeg's DCT scaling),
  resized as resize_into does, gives (box in the reduced image's pixels) into `out`, decoding
  only the columns and rows that resize reads (decode.c); False (nothing written) where the
  decoder is unavailable, the arguments are not ones it takes, or libjpeg reports anything
  about the file (the caller then decodes with Pillow, which says what is wrong)."""
  lib = decoder()
  x0, y0, x1, y1 = box
  if (lib is None or scale not in (1, 2, 4, 8) or not _takes(out, size)
      or not (x0 < x1 and y0 < y1)):
    return False
  rc = lib.nmjax_decode_resample(jpeg, len(jpeg), scale, *map(float, box), size, int(mirror),
                                 out.ctypes.data)
  if rc < 0:
    raise MemoryError("nmjax decode: out of memory")
  return rc == 0
