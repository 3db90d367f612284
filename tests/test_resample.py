"""nmjax.data.resample: Pillow's bilinear resize of a box, and a JPEG crop decoded and resized,
the same pixels as Pillow's, or no answer."""

import io

import numpy as np
import pytest
from PIL import Image

from nmjax.data import imagenet, resample

pytestmark = pytest.mark.skipif(not resample.available(),
                                reason="no C compiler or another Pillow: callers use Pillow")


def _pillow(image, box, size, mirror=False):
  out = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
  return np.asarray(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else out)


def _ours(image, box, size, mirror=False):
  out = np.full((size, size, 3), 7, np.uint8)
  assert resample.resize_into(image, box, size, out, mirror=mirror)
  return out


def test_pixels_equal_pillows_over_random_images_boxes_and_sizes():
  rng = np.random.default_rng(0)
  orders = set()
  for case in range(160):
    width, height = (int(v) for v in rng.integers(9, 420, 2))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    x0, y0 = rng.uniform(0, width - 1), rng.uniform(0, height - 1)
    box = (x0, y0, rng.uniform(x0 + 0.5, width), rng.uniform(y0 + 0.5, height))
    if case % 2:  # whole-pixel boxes, as crop_box draws them
      box = tuple(int(v) for v in box)
      box = (box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1))
    size = int(rng.integers(4, 260))  # shrinks and enlargements
    mirror = bool(case % 3 == 0)
    orders.add(resample.vertical_first(width, height, size, size))
    np.testing.assert_array_equal(_ours(image, box, size, mirror), _pillow(image, box, size, mirror),
                                  err_msg=f"{width}x{height} {box} -> {size}")
  assert orders == {True, False}  # both of Pillow's pass orders met


def test_edge_cases_whole_image_one_axis_and_rows_not_contiguous():
  rng = np.random.default_rng(1)
  image = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))
  # Nothing to resize, or only one axis (Pillow then skips the other pass).
  square = image.crop((0, 0, 40, 40))
  for box, size in (((0, 0, 40, 40), 40), ((0, 3, 40, 30), 40), ((5, 0, 30, 40), 40)):
    np.testing.assert_array_equal(_ours(square, box, size), _pillow(square, box, size))
    np.testing.assert_array_equal(_ours(square, box, size, True), _pillow(square, box, size, True))
  # An image in several of Pillow's memory blocks has no in-place export: copied, same pixels.
  big = Image.fromarray(np.tile(rng.integers(0, 256, (1, 2100, 3), dtype=np.uint8), (2200, 1, 1)))
  box = (100.5, 1000.25, 1900.0, 2150.0)
  np.testing.assert_array_equal(_ours(big, box, 224), _pillow(big, box, 224))


def test_no_answer_where_pillows_pixels_are_not_promised(monkeypatch):
  image = Image.fromarray(np.zeros((20, 20, 3), np.uint8))
  out = np.zeros((8, 8, 3), np.uint8)
  assert not resample.resize_into(image.convert("L"), (0, 0, 10, 10), 8, np.zeros((8, 8, 3),
                                                                                 np.uint8))
  assert not resample.resize_into(image, (0, 0, 30, 10), 8, out)       # beyond the image
  assert not resample.resize_into(image, (4, 0, 4, 10), 8, out)        # empty
  assert not resample.resize_into(image, (0, 0, 10, 10), 8, out[:, ::2])  # not contiguous
  assert not out.any()
  # Turned off, or another Pillow: no answer, and the crops (Pillow's) stay the same.
  image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (60, 90, 3), dtype=np.uint8))
  encoded = io.BytesIO()
  image.save(encoded, format="JPEG", quality=90)
  uniforms = np.full(imagenet.DRAWS_PER_EXAMPLE, 0.3)
  native = [imagenet.random_resized_crop(x, uniforms, 24) for x in (image, encoded.getvalue())]
  for env, version in (("0", None), ("1", "12.3.0")):
    monkeypatch.setenv("NMJAX_NATIVE_RESAMPLE", env)
    if version:
      monkeypatch.setattr(resample.PIL, "__version__", version)
    resample.library.cache_clear()
    resample.decoder.cache_clear()
    try:
      assert not resample.available() and resample.decoder() is None
      for x, expected in zip((image, encoded.getvalue()), native):
        np.testing.assert_array_equal(imagenet.random_resized_crop(x, uniforms, 24), expected)
    finally:
      resample.library.cache_clear()
      resample.decoder.cache_clear()
  monkeypatch.undo()
  assert resample.available()


def test_build_is_cached_per_source_and_compiler(tmp_path, monkeypatch):
  monkeypatch.setenv("NMJAX_CACHE_DIR", str(tmp_path))
  compiler = resample.find_compiler()
  first = resample.build(compiler)
  assert first.parent == tmp_path and first.exists()
  stamp = first.stat().st_mtime_ns
  assert resample.build(compiler) == first and first.stat().st_mtime_ns == stamp
  # No temporary left behind: the library and the sha256 recorded beside it.
  assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, first.name + ".sha256"]


def test_crop_decode_gives_the_pixels_of_pillows_whole_decode():
  # decode.c decodes only the columns and rows the resize reads (at 1/scale where asked) and
  # resizes them: the pixels of Pillow's whole decode at that scale, resized by Pillow.
  if resample.decoder() is None:
    pytest.skip("no libjpeg headers: crops decode with Pillow")
  from test_imagenet import _jpeg_kinds  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(4)
  checked = 0
  for name, jpeg in _jpeg_kinds(rng).items():
    frame = imagenet.jpeg_frame(jpeg)
    if frame is None:  # CMYK: Pillow's
      assert not resample.decode_resize_into(jpeg, 1, (0, 0, 8, 8), 8, np.zeros((8, 8, 3),
                                                                                np.uint8))
      continue
    for case in range(14):
      size = int(rng.choice([16, 32, 112, 224]))
      box = imagenet.crop_box(frame.width, frame.height, rng.random(imagenet.DRAWS_PER_EXAMPLE))
      scale = (1, 2, 4)[case % 3]
      reduced = imagenet.decode_rows(jpeg, frame, frame.height, scale)
      box = tuple(v / scale for v in box)
      mirror = bool(case % 2)
      out = np.zeros((size, size, 3), np.uint8)
      assert resample.decode_resize_into(jpeg, scale, box, size, out, mirror=mirror), name
      np.testing.assert_array_equal(out, _pillow(reduced, box, size, mirror),
                                    err_msg=f"{name} 1/{scale} {box} -> {size}")
      checked += 1
  assert checked == 7 * 14
  # Rows the crop reads cut off, damaged data, or a box beyond the image: no answer (Pillow
  # then says why). A cut file whose crop's rows are all there decodes, as with decode_rows.
  jpeg = _jpeg_kinds(rng)["4:2:0"]  # 321 x 243
  out = np.zeros((16, 16, 3), np.uint8)
  assert not resample.decode_resize_into(jpeg[:len(jpeg) // 2], 1, (0, 200, 300, 243), 16, out)
  assert not resample.decode_resize_into(b"\xff\xd8not a jpeg", 1, (0, 0, 10, 10), 16, out)
  assert not resample.decode_resize_into(jpeg, 1, (0, 0, 400, 100), 16, out)
  assert not out.any()
  assert resample.decode_resize_into(jpeg[:len(jpeg) // 2], 1, (0, 0, 100, 40), 16, out)
