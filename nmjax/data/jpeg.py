"""JPEG decoding for crops: the frame header read without Pillow, and only what a crop's resize
reads decoded (the rows down to it, at libjpeg's DCT scale where the crop allows), with Pillow's
libjpeg. nmjax.data.imagenet's module docstring describes the scheme; its tests are
tests/test_imagenet.py.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

from PIL import Image

from nmjax.data import resample

# A crop box (x0, y0, x1, y1) in pixel coordinates of the image it is cut from.
Box = tuple[float, float, float, float]
# The reductions of each side libjpeg decodes at through Pillow's draft, largest first.
_DCT_SCALES = (8, 4, 2)
# Frame (SOF) markers: Huffman-coded baseline, extended sequential and progressive, which
# decode_rows takes; lossless, hierarchical and arithmetic-coded ones, which Pillow opens.
_HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)
_OTHER_FRAMES = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
# Rows decoded past those a resize reads: the last row of a cut decode differs from a full one.
_CUT_MARGIN = 2


class ImageTooLarge(ValueError):
  """An image whose header claims more pixels than Pillow decodes (check_pixels)."""


# What decoding a damaged image raises (Pillow's plugins use all of these).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def check_pixels(width: int, height: int) -> None:
  """ImageTooLarge where width x height is over Pillow's decompression-bomb limit
  (Image.MAX_IMAGE_PIXELS, the one the conversion of webdataset shards applies too): a header
  that claims that many pixels is damaged or hostile, and decoding it takes seconds and
  gigabytes (a JPEG whose data stops early comes out grey)."""
  limit = Image.MAX_IMAGE_PIXELS
  if limit and width * height > limit:
    raise ImageTooLarge(f"its header claims {width}x{height} = {width * height:,} pixels, over"
                        f" Pillow's limit of {limit:,} (a decompression bomb)")


def open_image(data: bytes) -> Image.Image:
  """An encoded image opened (its header read) but not decoded: the crops below decode it.
  Raises ImageTooLarge for one over check_pixels' limit."""
  if jpeg_frame(data) is not None:  # Its size checked there: Pillow has nothing to warn of.
    return Image.open(io.BytesIO(data))
  try:
    with warnings.catch_warnings():  # Over the limit: refused below, in one line.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise ImageTooLarge(str(e)) from None
  check_pixels(*image.size)
  return image


def decode(jpeg: bytes) -> Image.Image:
  """Decodes an encoded image to RGB (greyscale and CMYK JPEGs are converted).

  An RGB JPEG is returned opened but not yet decoded, so the crops below can still decode it at
  a reduced scale.
  """
  image = open_image(jpeg)
  return image if image.mode == "RGB" else image.convert("RGB")


def dct_scale(box: Box, size: int) -> int:
  """The reduction s (8, 4, 2, else 1) to decode a JPEG at for resizing `box` to size x size.

  The largest s at which the box still spans at least `size` pixels each way, so that the
  resize from the 1/s decode shrinks (or keeps) the box, as the one from a full decode does.
  """
  side = min(box[2] - box[0], box[3] - box[1])
  return next((s for s in _DCT_SCALES if side >= s * size), 1)


class JpegFrame(NamedTuple):
  """What jpeg_frame reads from a JPEG's markers before its first scan."""
  width: int
  height: int
  height_offset: int  # byte offset of the 16-bit image height in the data
  one_scan: bool  # sequential with all components in one scan: its rows come in order


def jpeg_frame(data: bytes) -> JpegFrame | None:
  """The frame of a Huffman-coded (baseline, extended or progressive) greyscale or colour JPEG;
  None for anything else (CMYK, lossless, arithmetic-coded, not a JPEG), which Pillow opens.
  Raises ImageTooLarge where the frame claims more pixels than check_pixels allows."""
  if data[:2] != b"\xff\xd8":
    return None
  pos, frame = 2, None
  while pos + 10 <= len(data) and data[pos] == 0xFF:
    marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
    if marker == 0xFF:  # a fill byte before the marker
      pos += 1
      continue
    if marker in _HUFFMAN_FRAMES:
      if data[pos + 4] != 8:  # 12-bit samples: Pillow's libjpeg decodes 8-bit only
        return None
      height, width = int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(
          data[pos + 7:pos + 9], "big")
      frame = (width, height, pos + 5, marker != 0xC2, data[pos + 9])
    elif marker in _OTHER_FRAMES or marker < 0xC0 or 0xD0 <= marker <= 0xD9:
      return None  # another coding, or a marker without a length before the first scan
    elif marker == 0xDA:  # the first scan: frame known, or not a JPEG this path decodes
      if frame is None or frame[1] == 0 or frame[4] not in (1, 3):
        return None
      width, height, offset, sequential, components = frame
      check_pixels(width, height)
      return JpegFrame(width, height, offset, sequential and data[pos + 4] == components)
    pos += 2 + length
  return None


def resize_rows(width: int, height: int, box: Box, size: int) -> int:
  """How many of a width x height image's first rows Pillow's bilinear resize of `box` to
  size x size needs: the resize of that many rows alone gives the same pixels.

  The filter reaches `support` rows (the vertical shrink factor, at least 1) past the box. Pillow
  13 resizes vertically first where the height shrinks by more than twice what the width does
  (resample.vertical_first); the rows kept keep that order, which changes the rounding.
  _CUT_MARGIN covers the last row of a cut decode (see decode_rows).
  """
  support = max((box[3] - box[1]) / size, 1.0)
  rows = math.ceil(box[3] + support) + _CUT_MARGIN
  if resample.vertical_first(width, height, size, size):
    # The fewest rows that keep that order: the smallest height vertical_first holds for.
    rows = max(rows, size + 2 * max(width - size, 0) + 1)
  return min(rows, height)


def decode_rows(data: bytes, frame: JpegFrame, rows: int, scale: int = 1) -> Image.Image:
  """The JPEG decoded to RGB at 1/scale (1, 2, 4 or 8: libjpeg's DCT scaling) from its top down
  to original row `rows` (all rows unless frame.one_scan).

  The frame header is given `rows` as the image height, so libjpeg stops there and skips the
  rest of the file: the rows are those of a full decode but for the last one (chroma upsampling
  replicates the last chroma row at an image's bottom edge).
  """
  if rows < frame.height and frame.one_scan:
    offset = frame.height_offset
    data = b"".join((data[:offset], rows.to_bytes(2, "big"), data[offset + 2:]))
  else:
    rows = frame.height
  # libjpeg's 1/s decode is ceil(width / s) x ceil(height / s) pixels.
  shape = (-(-frame.width // scale), -(-rows // scale))
  return Image.frombytes("RGB", shape, data, "jpeg", "RGB", "", scale, 0)


def decode_for_box(image: Image.Image, box: Box, size: int, *,
                   reduced_decode: bool = True) -> tuple[Image.Image, Box]:
  """`image` (Pillow) decoded to RGB for resizing `box` to size x size, and the box in its
  coordinates.

  A JPEG opened but not yet decoded (open_image) is decoded at scale 1/dct_scale(box, size)
  when reduced_decode; the scale is read back from Pillow's draft (it can only pick 1/8, 1/4,
  1/2 or 1) and the box divided by it. Anything else (decoded already, not a JPEG, too small a
  box) is decoded at full size and keeps its box.
  """
  scale = dct_scale(box, size) if reduced_decode else 1
  if scale > 1:
    width, height = image.size
    drafted = image.draft("RGB", (width // scale, height // scale))
    if drafted is not None:  # draft's box is the full image in the reduced one's pixels
      reduction = width / drafted[1][2]
      box = tuple(v / reduction for v in box)
  return (image if image.mode == "RGB" else image.convert("RGB")), box


def scaled_box(frame: JpegFrame, box_of: Callable[[int, int], Box], size: int
               ) -> tuple[int, Box]:
  """(s, the box in the 1/s decode's pixels) for resizing box_of(width, height) of the frame's
  image to size x size, s = dct_scale(box, size)."""
  box = box_of(frame.width, frame.height)
  scale = dct_scale(box, size)
  return scale, tuple(v / scale for v in box)


def decode_for_scaled_box(data: bytes, frame: JpegFrame, scale: int, box: Box,
                          size: int) -> Image.Image:
  """The JPEG decoded at 1/scale down to the rows resizing `box` (in the reduced image's pixels)
  to size x size reads (resize_rows, decode_rows)."""
  rows = resize_rows(-(-frame.width // scale), -(-frame.height // scale), box, size) * scale
  return decode_rows(data, frame, rows, scale)


def decode_crop(image: Image.Image | bytes, box_of: Callable[[int, int], Box], size: int, *,
                decode_less: bool = True) -> tuple[Image.Image, Box]:
  """(`image` decoded to RGB for resizing box_of(width, height) to size x size, the box in its
  pixels). JPEG bytes (jpeg_frame) with decode_less are decoded down to the rows the resize
  reads at scale 1/dct_scale(box, size), the box divided by that scale (scaled_box,
  decode_for_scaled_box); other bytes are opened with Pillow and decoded as a Pillow image is,
  by decode_for_box."""
  frame = jpeg_frame(image) if decode_less and isinstance(image, bytes) else None
  if frame is None:
    opened = open_image(image) if isinstance(image, bytes) else image
    return decode_for_box(opened, box_of(*opened.size), size, reduced_decode=decode_less)
  scale, box = scaled_box(frame, box_of, size)
  return decode_for_scaled_box(image, frame, scale, box, size), box
