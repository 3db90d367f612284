"""The ImageNet config, the JPEG input pipeline on a tiny synthetic imagenet2012 (its reduced-scale
decoding checked against full decodes), and the first train step of the ImageNet job on CPU at a
reduced image size."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import synthetic_data
from PIL import Image

from nmjax.data import imagenet, pipeline, sources
from nmjax.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = os.path.join(ROOT, "configs", "pretrain_imagenet.py")
# Small JPEGs of several shapes (landscape, portrait, one thinner than any allowed aspect ratio,
# one large enough for crops to 32 pixels decoded at half scale).
_SIZES = ((64, 48), (48, 64), (80, 60), (90, 30), (160, 120))
# A reduced-scale decode resizes from a DCT-downscaled image instead of the full one: each crop
# must stay within this mean absolute difference (grey levels of 255) of the full-decode crop.
# These photo-like JPEGs stay below it with a margin; benchmarks/input.py reports the difference
# at 224 pixels on its ImageNet-size textures.
_REDUCED_TOLERANCE = 4.0
_SPLITS = {"train": 48, "validation": 20, "test": 4}


def _get_config(arg=None):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("pretrain_imagenet", _CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet_data")
  synthetic_data.write_imagenet(root, splits=_SPLITS, sizes=_SIZES, seed=1)
  return root


@pytest.fixture(scope="module")
def train_records(data_dir):
  return imagenet.jpeg_records("imagenet2012", "train", data_dir=data_dir)


def _stream(records, n, **kw):
  kw = dict(labels=np.arange(len(records)) % 5 + 100, global_batch_size=8, seed=7, num_steps=10,
            image_size=32) | kw
  iterator = imagenet.train_iterator(records, **kw)
  batches = [next(iterator) for _ in range(n)]
  return batches, iterator


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_config_builds_with_the_standard_recipe():
  config = _get_config("noise=0.2")
  assert (config.model, config.dataset, config.input_pipeline) == (
      "resnet50", "imagenet2012", "imagenet")
  assert (config.image_size, config.batch_size, config.num_epochs) == (224, 1024, 90.0)
  assert config.learning_rate == pytest.approx(0.4)  # 0.1 x 1024 / 256
  assert (config.optimizer, config.momentum, config.weight_decay, config.warmup_epochs) == (
      "sgd", 0.9, 1e-4, 5.0)
  assert (config.noise_ratio, config.eval_split, config.dtype) == (0.2, "validation", "bfloat16")
  assert _get_config("batch=512,label_smoothing=0.1,nesterov").learning_rate == pytest.approx(0.2)
  vit = _get_config("model=vit_s16")
  assert (vit.optimizer, vit.learning_rate, vit.label_smoothing) == ("adamw", 1e-3, 0.1)
  smoke = _get_config("smoke,model=vit_s16")
  assert (smoke.image_size, smoke.dtype, smoke.data_workers) == (32, "float32", 0)
  with pytest.raises(ConfigError, match="model='vgg' is unknown; allowed: resnet50, vit_s16"):
    _get_config("model=vgg")


def test_job_validation_accepts_the_config_and_names_bad_fields(data_dir):
  from nmjax.jobs import pretrain  # pylint: disable=g-import-not-at-top
  config = _get_config("smoke")
  config.data_dir = str(data_dir)
  pretrain.validate(config)
  config.image_size = 4
  with pytest.raises(ConfigError, match=r"config.image_size=4 is out of range"):
    pretrain.validate(config)
  config.image_size, config.input_pipeline = 32, "tf.data"
  with pytest.raises(ConfigError, match=r"input_pipeline='tf.data' is unknown; allowed: default"):
    pretrain.validate(config)


def test_synthetic_dataset_reads_like_imagenet2012(data_dir, train_records):
  source = sources.get_source("imagenet2012", data_dir=data_dir)
  assert source.info.num_classes == 1000
  assert source.info.image_shape == (None, None, 3)
  assert dict(source.info.splits) == _SPLITS
  assert len(train_records) == 48
  example = train_records[3]
  assert isinstance(example["image"], bytes) and example["image"][:2] == b"\xff\xd8"  # JPEG
  assert example["index"] == 3
  # Labels read without decoding (the noise's input) match the records, position by position.
  np.testing.assert_array_equal(source.labels("train"),
                                [train_records[i]["label"] for i in range(48)])
  assert {imagenet.decode(train_records[i]["image"]).size for i in range(8)} <= set(_SIZES)
  batched = imagenet.jpeg_records("imagenet2012", "train", data_dir=data_dir, batched_reads=True)
  for a, b in zip(batched.__getitems__([5, 0, 47]), train_records.__getitems__([5, 0, 47])):
    assert a["image"] == b["image"] and (a["label"], a["index"]) == (b["label"], b["index"])
  with pytest.raises(DataError, match="tfds build imagenet2012 --manual_dir="):
    imagenet.jpeg_records("imagenet2012", "train", data_dir=data_dir / "elsewhere")


def test_decode_turns_greyscale_and_cmyk_into_rgb():
  for mode in ("L", "CMYK"):
    buffer = io.BytesIO()
    Image.new(mode, (20, 10)).save(buffer, format="JPEG")
    image = imagenet.decode(buffer.getvalue())
    assert image.mode == "RGB" and np.asarray(image).shape == (10, 20, 3)


def test_random_resized_crop_geometry():
  image = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3)))
  # Whole image at aspect 2 is outside 3/4..4/3: every try fails, the central 4/3 box is used.
  never_fits = np.ones(imagenet.DRAWS_PER_EXAMPLE) * 0.999
  never_fits[-1] = 0.9  # no flip
  crop = imagenet.random_resized_crop(image, never_fits, 16, min_area=1.0)
  assert crop.shape == (16, 16, 3) and crop.dtype == np.uint8
  # The central 133x100 box spans columns 33..166: mean column value about 100.
  assert abs(crop[..., 0].mean() - 99.5) < 2
  flipped = never_fits.copy()
  flipped[-1] = 0.1
  np.testing.assert_array_equal(imagenet.random_resized_crop(image, flipped, 16, min_area=1.0),
                                crop[:, ::-1])
  # A small area at the far left: low column values only.
  left = np.zeros(imagenet.DRAWS_PER_EXAMPLE)
  left[1] = 0.5  # aspect 1
  small = imagenet.random_resized_crop(image, left, 16, min_area=0.08)
  assert small[..., 0].max() < 45
  centre = imagenet.center_crop(image, 16)
  assert abs(centre[..., 0].mean() - 99.5) < 2


def _jpeg(pixels: np.ndarray | Image.Image, quality: int = 95, **options) -> bytes:
  buffer = io.BytesIO()
  image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
  image.save(buffer, format="JPEG", quality=quality, **options)
  return buffer.getvalue()


def _photo(rng, width: int, height: int, mode: str = "RGB", **options) -> bytes:
  """A photo-like JPEG (synthetic_data's texture) of the given mode and Pillow save options."""
  image = Image.open(io.BytesIO(synthetic_data.synthetic_jpeg(rng, width, height)))
  return _jpeg(image.convert(mode), quality=90, **options)


def _jpeg_kinds(rng) -> dict[str, bytes]:
  """JPEGs of the kinds the decoder meets: chroma subsamplings, greyscale, progressive, restart
  markers, odd sizes, a portrait that Pillow resizes vertically first, and CMYK (opened by
  Pillow)."""
  return {
      "4:2:0": _photo(rng, 321, 243), "4:4:4": _photo(rng, 240, 320, subsampling=0),
      "4:2:2": _photo(rng, 250, 190, subsampling=1), "grey": _photo(rng, 300, 225, "L"),
      "progressive": _photo(rng, 320, 240, progressive=True),
      "restarts": _photo(rng, 270, 200, restart_marker_rows=2),
      "portrait": _photo(rng, 130, 330), "cmyk": _photo(rng, 200, 150, "CMYK"),
  }


def _centroid(image) -> np.ndarray:
  """Centre (x, y) of an image's brightness above its minimum; pixel i spans [i, i + 1)."""
  grey = np.asarray(image, dtype=np.float64).mean(-1)
  grey -= grey.min()
  ys, xs = np.mgrid[:grey.shape[0], :grey.shape[1]] + 0.5
  return np.array([(xs * grey).sum(), (ys * grey).sum()]) / grey.sum()


def test_jpeg_frame_reads_the_header_and_leaves_other_images_to_pillow():
  kinds = _jpeg_kinds(np.random.default_rng(0))
  for name, jpeg in kinds.items():
    frame = imagenet.jpeg_frame(jpeg)
    if name == "cmyk":
      assert frame is None
      continue
    assert (frame.width, frame.height) == imagenet.open_image(jpeg).size, name
    assert jpeg[frame.height_offset:frame.height_offset + 2] == frame.height.to_bytes(2, "big")
    assert frame.one_scan == (name != "progressive"), name
  png = io.BytesIO()
  Image.new("RGB", (8, 8)).save(png, format="PNG")
  for other in (png.getvalue(), kinds["4:2:0"][:40], b"", b"\xff\xd8\xff"):
    assert imagenet.jpeg_frame(other) is None


def test_resize_rows_give_the_pixels_of_the_whole_image():
  # Pillow's resize of a box from the image's first resize_rows rows alone equals the one from
  # the whole image, for boxes and images of every shape (incl. the vertical-first ones).
  rng = np.random.default_rng(4)
  pixels = rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)
  cut = 0
  for _ in range(300):
    width, height = (int(v) for v in rng.integers(20, 400, 2))
    size = int(rng.choice([16, 32, 112, 224]))
    w, h = int(rng.integers(1, width + 1)), int(rng.integers(1, height + 1))
    x0, y0 = rng.random(2) * (width - w, height - h)
    box = (x0, y0, x0 + w, y0 + h)
    rows = imagenet.resize_rows(width, height, box, size)
    image = Image.fromarray(pixels[:height, :width])
    np.testing.assert_array_equal(
        np.asarray(image.crop((0, 0, width, rows)).resize((size, size), box=box,
                                                          resample=Image.Resampling.BILINEAR)),
        np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box)))
    cut += rows < height
  assert cut > 150


def test_decode_rows_gives_the_rows_of_a_full_decode():
  for name, jpeg in _jpeg_kinds(np.random.default_rng(1)).items():
    frame = imagenet.jpeg_frame(jpeg)
    if frame is None:
      continue
    full = np.asarray(imagenet.decode(jpeg))
    for rows in (1, 17, 100, frame.height - 1):
      top = np.asarray(imagenet.decode_rows(jpeg, frame, rows))
      assert top.shape == (rows if frame.one_scan else frame.height, frame.width, 3), name
      np.testing.assert_array_equal(top[:rows - 1], full[:rows - 1], err_msg=name)


def test_reduced_decodes_map_the_box_onto_the_same_region_of_the_original():
  # A bright rectangle on black, in a JPEG whose sides are not multiples of 8.
  pixels = np.zeros((389, 517, 3), np.uint8)
  pixels[101:190, 203:330] = (255, 200, 180)
  jpeg = _jpeg(pixels)
  full, frame = imagenet.decode(jpeg), imagenet.jpeg_frame(jpeg)
  box = (150, 60, 470, 380)  # 320 x 320, holding the rectangle
  for size, scale in ((200, 1), (160, 2), (80, 4), (40, 8)):
    assert imagenet.dct_scale(box, size) == scale
    image = imagenet.decode_rows(jpeg, frame, frame.height, scale)
    assert image.size == (-(-517 // scale), -(-389 // scale))
    # Pillow's draft (decode_for_box, for Pillow images) decodes the same pixels, same box.
    drafted, mapped = imagenet.decode_for_box(imagenet.open_image(jpeg), box, size)
    np.testing.assert_array_equal(np.asarray(drafted), np.asarray(image))
    assert mapped == tuple(v / scale for v in box)
    # Pixel j of a 1/s decode covers original pixels [j*s, (j+1)*s): the rectangle is where it
    # is in the full decode, to a tenth of an original pixel.
    np.testing.assert_allclose(_centroid(image) * scale, _centroid(full), atol=0.1)
    # So the crops show it at the same place: within one original pixel (size / 320 of theirs).
    crop = imagenet.resized_crop(jpeg, lambda w, h: box, size)
    full_crop = full.resize((size, size), Image.Resampling.BILINEAR, box=box)
    np.testing.assert_allclose(_centroid(crop), _centroid(full_crop), atol=size / 320)
  # Decoded already, not a JPEG, or reduced_decode=False: full size, the box unchanged.
  png = io.BytesIO()
  Image.fromarray(pixels).save(png, format="PNG")
  for image, reduced in ((full, True), (imagenet.open_image(png.getvalue()), True),
                         (imagenet.open_image(jpeg), False)):
    decoded, mapped = imagenet.decode_for_box(image, box, 40, reduced_decode=reduced)
    assert decoded.size == (517, 389) and mapped == box


def test_crops_equal_full_decodes_unless_reduced_and_stay_close_when_reduced():
  # decode_less (the default) against Pillow's whole decode (the pipeline before), on every kind
  # of JPEG: the same pixels unless dct_scale reduces the decode, close to them where it does.
  rng = np.random.default_rng(3)
  scales, cut = [], 0
  for name, jpeg in _jpeg_kinds(rng).items():
    width, height = imagenet.open_image(jpeg).size
    # At 112 most crops are too small for a reduced decode, at 32 all are (1/2 or 1/4).
    for size in (112, 32):
      for _ in range(12):
        uniforms = rng.random(imagenet.DRAWS_PER_EXAMPLE)
        box = imagenet.crop_box(width, height, uniforms)
        scale = imagenet.dct_scale(box, size)
        new = imagenet.random_resized_crop(jpeg, uniforms, size)
        old = imagenet.random_resized_crop(jpeg, uniforms, size, decode_less=False)
        if scale == 1:
          np.testing.assert_array_equal(new, old, err_msg=f"{name} {box} -> {size}")
          cut += imagenet.resize_rows(width, height, box, size) < height
        else:
          assert np.abs(new.astype(np.int16) - old).mean() < _REDUCED_TOLERANCE, name
        scales.append(scale)
      # Eval's centre square, likewise.
      scale = imagenet.dct_scale(imagenet.center_box(width, height), size)
      new = imagenet.center_crop(jpeg, size)
      old = imagenet.center_crop(jpeg, size, decode_less=False)
      if scale == 1:
        np.testing.assert_array_equal(new, old, err_msg=name)
      else:
        assert np.abs(new.astype(np.int16) - old).mean() < _REDUCED_TOLERANCE, name
  assert {1, 2, 4} <= set(scales) and cut > 40
  # decode_less=False is Pillow's full decode resized (and flipped) as before.
  jpeg, uniforms = _jpeg_kinds(rng)["4:2:0"], np.full(imagenet.DRAWS_PER_EXAMPLE, 0.7)
  full = imagenet.decode(jpeg).resize((32, 32), Image.Resampling.BILINEAR,
                                      box=imagenet.crop_box(321, 243, uniforms))
  np.testing.assert_array_equal(
      imagenet.random_resized_crop(jpeg, uniforms, 32, decode_less=False), full)


def test_undecodable_records_are_named():
  good = _jpeg(np.full((48, 64, 3), 9, np.uint8))
  records = [{"image": good, "label": np.int64(0), "index": np.int64(i)} for i in range(4)]
  records[2] = {"image": good[:len(good) // 2], "label": np.int64(0), "index": np.int64(2)}
  iterator = imagenet.train_iterator(records, labels=np.zeros(4), global_batch_size=4, seed=0,
                                     num_steps=1, image_size=16)
  with pytest.raises(DataError, match="record 2 holds an image that cannot be decoded"):
    next(iterator)


def test_train_images_are_the_crops_of_the_stream_draws(train_records):
  # A pure function of (seed, position): record id's crop with the stream's draws for that
  # position, decoded at the scale dct_scale picks (half scale for some crops here).
  batches, _ = _stream(train_records, 6)
  stream = pipeline.train_stream(
      48, np.zeros(48), global_batch_size=8, seed=7, num_epochs=None, num_steps=10,
      process_index=0, process_count=1, draws_per_example=imagenet.DRAWS_PER_EXAMPLE,
      draws_after_repeat=True)
  scales = set()
  for k, batch in enumerate(batches):
    element = stream[k]
    np.testing.assert_array_equal(batch["index"], element["id"])  # index = record position
    for image, i, uniforms in zip(batch["image"], element["id"], element["uniforms"]):
      jpeg = train_records[int(i)]["image"]
      scales.add(imagenet.dct_scale(imagenet.crop_box(*imagenet.open_image(jpeg).size,
                                                      uniforms), 32))
      np.testing.assert_array_equal(image, imagenet.random_resized_crop(jpeg, uniforms, 32))
  assert scales == {1, 2}


def test_train_stream_shapes_labels_and_determinism(train_records):
  labels = np.arange(len(train_records)) % 5 + 100
  batches, _ = _stream(train_records, 6)
  for batch in batches:
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == batch["clean_label"].dtype == batch["index"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
    np.testing.assert_array_equal(
        batch["clean_label"], [train_records[int(i)]["label"] for i in batch["index"]])
  # 48 examples / batch 8 = 6 steps per epoch: the first epoch sees every example once.
  assert sorted(np.concatenate([b["index"] for b in batches])) == list(range(48))
  _assert_batches_equal(batches, _stream(train_records, 6)[0])
  other_seed, _ = _stream(train_records, 1, seed=8)
  assert not np.array_equal(other_seed[0]["index"], batches[0]["index"])


def test_processes_split_each_global_batch_and_resume_from_state(train_records):
  whole, _ = _stream(train_records, 10)
  halves = [_stream(train_records, 10, process_index=p, process_count=2)[0] for p in range(2)]
  for k, batch in enumerate(whole):
    # Process p holds positions p, p + 2, ...: the same examples with the same crops.
    for p in range(2):
      for key in batch:
        np.testing.assert_array_equal(halves[p][k][key], batch[key][p::2])
  # A state taken after 4 batches resumes with batch 5 (and the stream runs out after 10).
  first, iterator = _stream(train_records, 4)
  state = iterator.get_state()
  iterator.close()
  resumed = imagenet.train_iterator(
      train_records, labels=np.arange(48) % 5 + 100, global_batch_size=8, seed=7, num_steps=10,
      image_size=32, start_state=state)
  _assert_batches_equal(first + list(resumed), whole)
  with pytest.raises(ConfigError, match="image_size=32 -> 64"):
    imagenet.train_iterator(train_records, labels=np.zeros(48), global_batch_size=8, seed=7,
                            num_steps=10, image_size=64, start_state=state)
  # Reduced-scale crops differ with decode_less: a state does not move between the two.
  with pytest.raises(ConfigError, match="decode_less=True -> False"):
    imagenet.train_iterator(train_records, labels=np.zeros(48), global_batch_size=8, seed=7,
                            num_steps=10, image_size=32, decode_less=False, start_state=state)


def test_worker_processes_give_the_same_batches(train_records):
  in_process, _ = _stream(train_records, 4)
  workers, iterator = _stream(train_records, 4, num_workers=2)
  state = iterator.get_state()
  iterator.close()
  _assert_batches_equal(workers, in_process)
  assert state["grain"] == {"next_batch": 4}  # independent of the worker count


def test_eval_batches_are_padded_masked_and_cover_each_example_once(data_dir):
  records = imagenet.jpeg_records("imagenet2012", "validation", data_dir=data_dir)
  seen = []
  for p in range(2):
    batches = list(imagenet.eval_batches(records, batch_size=8, image_size=32, process_index=p,
                                         process_count=2, num_threads=2))
    assert len(batches) == 3  # ceil(20 / 8) on every process
    for batch in batches:
      assert batch["image"].shape == (4, 32, 32, 3)
      assert not batch["image"][~batch["mask"]].any()
      seen.extend(batch["index"][batch["mask"]].tolist())
      for image, index in zip(batch["image"][batch["mask"]], batch["index"][batch["mask"]]):
        expected = imagenet.center_crop(records[int(index)]["image"], 32)
        np.testing.assert_array_equal(image, expected)
  assert sorted(seen) == list(range(20))


@pytest.mark.slow
def test_first_train_steps_of_the_imagenet_job_run_on_cpu(data_dir, tmp_path):
  # ResNet-50 through main.py and the project's jitted train step, at 32x32 on 64 -> 48 images.
  cmd = [sys.executable, os.path.join(ROOT, "main.py"),
         "--config=configs/pretrain_imagenet.py:smoke,noise=0.5",
         f"--config.data_dir={data_dir}", f"--workdir={tmp_path}", "--config.num_train_steps=1",
         "--config.max_test_examples=8", "--config.eval_batch_size=8"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out
  assert "resnet50 on imagenet2012: 48 train / 8 test examples" in out
  assert "1 steps of batch 16" in out
  import json  # pylint: disable=g-import-not-at-top
  record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert record["step"] == 1 and record["test_count"] == 8
  assert np.isfinite(record["train_loss"]) and record["train_loss"] > 5  # ~ln(1000) at the start
