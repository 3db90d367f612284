"""ImageNet-style input: JPEG records decoded and augmented on the host in grain worker processes.

Records come from a TFDS dataset in the imagenet2012 format (image: JPEG-encoded Image feature,
label: ClassLabel, prepared as array_record) read with the image left encoded
(`jpeg_records`), so the decoding happens here, in the pipeline's workers, with Pillow:
  * train (`train_iterator`): Inception-style random-resized crop (area 8%-100% of the image,
    aspect ratio 3/4-4/3, up to 10 tries, else a central crop at the nearest allowed ratio)
    resized to image_size x image_size, then a random horizontal flip;
  * eval (`eval_batches`): the central square of side 0.875 * min(H, W) resized to image_size
    (at 224 this is the usual resize-to-256 + centre-crop-224, done in one resampling).
Resampling is bilinear with Pillow's antialiasing. The crop box is drawn from the image's size,
read from the JPEG's frame header (`jpeg_frame`), before anything is decoded; then only what
the crop needs is decoded (`resized_crop`):
  * the rows: libjpeg is told the image ends just below the rows the resize reads
    (`resize_rows`, `decode_rows`) and leaves the rest of the file undecoded, which gives the
    same pixels as a full decode (most of the rows, on average, at 224);
  * the scale: where the box spans at least 2, 4 or 8 x image_size pixels each way, the JPEG is
    decoded at libjpeg's DCT scale 1/2, 1/4 or 1/8 (`dct_scale`) and the box mapped into the
    reduced image exactly (pixel j of a 1/s decode covers original pixels [j*s, (j+1)*s), so
    the box becomes box / s), covering the same region of the original; these crops differ
    from full-decode ones by resampling only, within the tolerance tests/test_imagenet.py
    checks. At ImageNet's common sizes (about 500x375) almost no crop allows it.
Where nmjax.data.resample is built (a C compiler, libjpeg's headers) a JPEG crop is decoded and
resized there in one call: libjpeg decodes only the columns and rows the resize reads (at the
same DCT scale), and the resize, Pillow's arithmetic, writes and mirrors straight into the batch:
the same pixels as Pillow's decode and resize, for less CPU; anything else (and any file
libjpeg reports on) is decoded by Pillow as above. decode_less=False opens and decodes every JPEG
whole with Pillow and resizes with Pillow (the reference path of tests/test_imagenet.py and
benchmarks/input.py).

The stream is nmjax.data.pipeline's train_stream: a pure function of the seed whatever the
process and worker counts (every random draw is keyed by the stream position). The iterator
state is the number of host batches consumed (pipeline.WorkerBatches), so a state saved with W
workers resumes with any other count. Eval batches are padded and masked (pipeline.eval_batches)
so every process runs the same number of steps.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from nmjax.data import locations, pipeline, records, resample
# The JPEG steps, named here too (this module's callers and tests use them as imagenet.*).
from nmjax.data.jpeg import (DECODE_ERRORS, Box, JpegFrame, dct_scale, decode,  # noqa: F401
                             decode_crop, decode_for_box, decode_for_scaled_box, decode_rows,
                             jpeg_frame, open_image, resize_rows, scaled_box)
from nmjax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]
# Inception-style crop: tries per example, and the per-example uniform draws (4 per try, 1 flip).
_CROP_TRIES = 10
DRAWS_PER_EXAMPLE = 4 * _CROP_TRIES + 1
_MIN_AREA = 0.08
_ASPECT_RANGE = (3 / 4, 4 / 3)
# Eval: the central square covering this fraction of the short side (224 / 256).
_EVAL_CROP_FRACTION = 0.875
_MANUAL_DOWNLOAD = ("download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
                    "image-net.org")


class _SingleReads(Sequence):
  """A TFDS data source of tf.train.Examples read one record at a time: {"image", "label"}.

  Without `__getitems__`, records.read_many reads record by record: array_record's batched read
  (a thread pool per call) costs more CPU per record than single reads (benchmarks/input.py,
  "profile"), and the pipeline's workers already read in parallel. Each record is parsed with
  TFDS's own Example proto and only the encoded image and the label are taken out of it, for
  about half the CPU per record of TFDS's generic parser; the records are those TFDS reads
  (tests/test_imagenet.py).
  """

  def __init__(self, data_source: Any):
    self._serialized = data_source.data_source  # the array_record source under TFDS's

  def __len__(self) -> int:
    return len(self._serialized)

  def __getitem__(self, i: int) -> dict[str, Any]:
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
    feature = tf_example_pb2.Example.FromString(self._serialized[i]).features.feature
    return {"image": feature["image"].bytes_list.value[0],
            "label": feature["label"].int64_list.value[0]}


def jpeg_records(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                 batched_reads: bool = False) -> records.TfdsRecords:
  """The split of a prepared TFDS dataset with JPEG images, images left encoded.

  Examples are {"image": JPEG bytes, "label": int64, "index": int64}; index is the record
  position (imagenet2012 stores no other id), the key noisy labels use, as in sources.TfdsSource.
  data_dir is the nmjax data root (the dataset lives under <data_dir>/tfds), local or in a
  bucket, as for sources.get_source. Records are read one at a time (see _SingleReads);
  batched_reads=True reads a host batch in one array_record call instead (for comparison,
  benchmarks/input.py).
  Raises DataError naming the command that prepares a missing dataset and ConfigError for an
  unknown split.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  unknown = ConfigError(f"config.dataset={name!r} is not a TFDS dataset; the imagenet input "
                        f"pipeline needs one with JPEG images (e.g. imagenet2012)")
  tfds_dir = locations.under(locations.data_root(data_dir), "tfds")
  builder = locations.prepared_builder(name, tfds_dir, unknown=unknown,
                                       manual_download=_MANUAL_DOWNLOAD)
  features = builder.info.features
  if ("image" not in features or not isinstance(features["image"], tfds.features.Image)
      or "label" not in features):
    raise DataError(f"TFDS dataset {name!r} in {builder.data_dir} has no Image feature 'image' "
                    f"and label 'label'; the imagenet input pipeline needs both")
  if split not in builder.info.splits:
    raise ConfigError(f"split={split!r} is not a split of {name!r}; splits: "
                      f"{', '.join(builder.info.splits)}")
  source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  return records.TfdsRecords(source if batched_reads else _SingleReads(source), encoded=True)


def crop_box(width: int, height: int, uniforms: np.ndarray, *,
             min_area: float = _MIN_AREA) -> tuple[int, int, int, int]:
  """The Inception-style crop box of a width x height image, in whole pixels.

  uniforms holds DRAWS_PER_EXAMPLE values in [0, 1): try t uses [4t, 4t+4) for the area
  (min_area..1 of the image), the log aspect ratio (3/4..4/3) and the x and y offsets; the first
  try whose box fits the image wins; if none fits, the central box at the allowed aspect ratio
  nearest the image's is used.
  """
  area = width * height
  log_low, log_high = math.log(_ASPECT_RANGE[0]), math.log(_ASPECT_RANGE[1])
  for t in range(_CROP_TRIES):
    u_area, u_ratio, u_x, u_y = uniforms[4 * t:4 * t + 4]
    target = area * (min_area + u_area * (1.0 - min_area))
    aspect = math.exp(log_low + u_ratio * (log_high - log_low))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      x0 = int(u_x * (width - w + 1))
      y0 = int(u_y * (height - h + 1))
      return x0, y0, x0 + w, y0 + h
  aspect = min(max(width / height, _ASPECT_RANGE[0]), _ASPECT_RANGE[1])
  w, h = (width, round(width / aspect)) if width / height <= aspect else (
      round(height * aspect), height)
  x0, y0 = (width - w) // 2, (height - h) // 2
  return x0, y0, x0 + w, y0 + h


def center_box(width: int, height: int) -> Box:
  """The central square of side 0.875 * min(width, height), in (fractional) pixels."""
  side = _EVAL_CROP_FRACTION * min(width, height)
  x0, y0 = (width - side) / 2, (height - side) / 2
  return x0, y0, x0 + side, y0 + side


def resized_crop(image: Image.Image | bytes, box_of: Callable[[int, int], Box], size: int, *,
                 decode_less: bool = True) -> Image.Image:
  """box_of(width, height) of `image` resized to size x size (bilinear, antialiased), RGB, by
  Pillow, decoded as decode_crop decodes it."""
  decoded, box = decode_crop(image, box_of, size, decode_less=decode_less)
  return decoded.resize((size, size), Image.Resampling.BILINEAR, box=box)


def _crop_array(image: Image.Image | bytes, box_of: Callable[[int, int], Box], size: int,
                decode_less: bool, mirror: bool, out: np.ndarray | None) -> np.ndarray:
  """resized_crop (mirrored when `mirror`) as a (size, size, 3) uint8 array, written into `out`
  when given. With decode_less, JPEG bytes are decoded and resized in one call of
  nmjax.data.resample (only the columns and rows the resize reads decoded) and anything else is
  resized there (Pillow's pixels either way); where it does not take them, or without
  decode_less, Pillow decodes (decode_crop) and resizes."""
  out = np.empty((size, size, 3), np.uint8) if out is None else out
  frame = jpeg_frame(image) if decode_less and isinstance(image, bytes) else None
  if frame is None:
    decoded, box = decode_crop(image, box_of, size, decode_less=decode_less)
  else:
    scale, box = scaled_box(frame, box_of, size)
    if resample.decode_resize_into(image, scale, box, size, out, mirror=mirror):
      return out
    decoded = decode_for_scaled_box(image, frame, scale, box, size)
  if decode_less and resample.resize_into(decoded, box, size, out, mirror=mirror):
    return out
  crop = decoded.resize((size, size), Image.Resampling.BILINEAR, box=box)
  if mirror:  # Pillow's mirror costs 1/8 of numpy's reversed-view copy
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  out[...] = np.asarray(crop)
  return out


def random_resized_crop(image: Image.Image | bytes, uniforms: np.ndarray, size: int, *,
                        min_area: float = _MIN_AREA, flip: bool = True,
                        decode_less: bool = True, out: np.ndarray | None = None) -> np.ndarray:
  """Inception-style crop of `image` (Pillow, or encoded) resized to (size, size, 3) uint8 as
  resized_crop does: box crop_box(image size, uniforms, min_area), mirrored when flip and the
  last uniform is < 0.5; written into `out` when given."""
  return _crop_array(image, functools.partial(crop_box, uniforms=uniforms, min_area=min_area),
                     size, decode_less, bool(flip and uniforms[-1] < 0.5), out)


def center_crop(image: Image.Image | bytes, size: int, *, decode_less: bool = True) -> np.ndarray:
  """The central square of side 0.875 * min(H, W), resized to (size, size, 3) uint8 (decoded as
  resized_crop does)."""
  return _crop_array(image, center_box, size, decode_less, False, None)


def _crop_or_fail(example: Mapping[str, Any],
                  crop: Callable[[bytes], np.ndarray]) -> np.ndarray:
  """crop(the example's encoded image), naming the record if its image cannot be decoded (a
  truncated file, a header claiming more pixels than jpeg.check_pixels allows): the run stops
  there, as the same record comes at the same point of every rerun."""
  try:
    return crop(example["image"])
  except DECODE_ERRORS as e:
    raise DataError(f"record {int(example['index'])} holds an image that cannot be decoded "
                    f"({type(e).__name__}: {e}); fix: re-prepare the dataset with tfds build"
                    ) from None


def _center_crop_example(example: Mapping[str, Any], image_size: int,
                         decode_less: bool) -> dict[str, Any]:
  crop = functools.partial(center_crop, size=image_size, decode_less=decode_less)
  return {"image": _crop_or_fail(example, crop), "label": example["label"],
          "index": example["index"]}


def _check_image_size(image_size: int) -> None:
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or (
      image_size < 8):
    raise ConfigError(f"image_size={image_size!r} must be an integer >= 8")


def _train_batch(batch: Batch, *, source_records: Sequence[Mapping[str, Any]],
                 labels: np.ndarray, image_size: int, min_area: float, flip: bool,
                 decode_less: bool) -> Batch:
  """One host batch of the stream ({"id", "uniforms"}) read, decoded and cropped."""
  examples = records.read_many(source_records, batch["id"])
  images = np.empty((len(examples), image_size, image_size, 3), dtype=np.uint8)
  for i, (example, uniforms) in enumerate(zip(examples, batch["uniforms"])):
    crop = functools.partial(random_resized_crop, uniforms=uniforms, size=image_size,
                             min_area=min_area, flip=flip, decode_less=decode_less, out=images[i])
    _crop_or_fail(example, crop)
  index = np.fromiter((e["index"] for e in examples), np.int64, len(examples))
  return {
      "image": images,
      "label": labels[index].astype(np.int32),
      "clean_label": np.fromiter((e["label"] for e in examples), np.int32, len(examples)),
      "index": index.astype(np.int32),
  }


def train_iterator(
    source_records: Sequence[Mapping[str, Any]],
    *,
    labels: np.ndarray,
    global_batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    num_steps: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    image_size: int = 224,
    min_area: float = _MIN_AREA,
    flip: bool = True,
    num_workers: int = 0,
    num_threads: int = 1,
    decode_less: bool = True,
    start_state: dict[str, Any] | None = None,
) -> pipeline.TrainIterator:
  """Host-local training batches of random-resized crops (see the module docstring).

  global_batch_size, seed, num_epochs, num_steps, process_index, process_count and start_state
  are as for nmjax.data.pipeline.train_iterator.

  Args:
    source_records: random-access {"image": JPEG bytes, "label", "index"} (jpeg_records).
    labels: the labels to train on (e.g. noisy), keyed by example index: labels[index].
    image_size: side of the square crops.
    min_area: smallest crop area as a fraction of the image (0.08 is the usual recipe).
    flip: random horizontal flips.
    num_workers: grain processes that read, decode and augment (0: this one); same batches.
    num_threads: prefetch threads per worker (or in this process when num_workers is 0).
    decode_less: decode each JPEG only down to the rows its crop needs, at a reduced DCT scale
      where the crop allows (resized_crop); False decodes each whole with Pillow (the reference
      path). It changes the pixels of reduced-scale crops, not the examples: it is in the state's
      fingerprint.

  Returns:
    An iterator of dicts: image uint8 (b, image_size, image_size, 3), label int32 (from
    `labels`), clean_label int32, index int32, with b = global_batch_size // process_count.
  """
  _check_image_size(image_size)
  if not 0 < min_area <= 1:
    raise ConfigError(f"min_area={min_area} is out of range; allowed: 0 < min_area <= 1")
  if num_workers < 0 or num_threads < 0:
    raise ConfigError(f"num_workers={num_workers} and num_threads={num_threads} must be >= 0")
  stream = pipeline.train_stream(
      len(source_records), labels, global_batch_size=global_batch_size, seed=seed,
      num_epochs=num_epochs, num_steps=num_steps, process_index=process_index,
      process_count=process_count, draws_per_example=DRAWS_PER_EXAMPLE, draws_after_repeat=True)
  load = functools.partial(_train_batch, source_records=source_records,
                           labels=np.asarray(labels), image_size=image_size, min_area=min_area,
                           flip=flip, decode_less=decode_less)
  batches = pipeline.WorkerBatches(stream.map(load), num_workers=num_workers,
                                   num_threads=num_threads)
  fingerprint = {
      "pipeline": "imagenet", "seed": int(seed), "global_batch_size": int(global_batch_size),
      "num_examples": int(len(source_records)), "image_size": int(image_size),
      "min_area": float(min_area), "flip": bool(flip), "decode_less": bool(decode_less),
  }
  return pipeline.TrainIterator(batches, fingerprint, start_state)


def eval_batches(
    source_records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    image_size: int = 224,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 1,
    decode_less: bool = True,
) -> Iterator[Batch]:
  """Padded, masked eval batches of centre crops: nmjax.data.pipeline.eval_batches' semantics.

  Decoding runs in `num_threads` prefetch threads, each preparing whole batches (Pillow releases
  the GIL while it decodes and resizes, so threads overlap). decode_less: as for
  train_iterator.

  Yields dicts: image uint8 (b, image_size, image_size, 3), label int32 (clean), index int32,
  mask bool (b,), with b = batch_size // process_count.
  """
  _check_image_size(image_size)
  crops = records.MappedRecords(
      source_records, functools.partial(_center_crop_example, image_size=image_size,
                                        decode_less=decode_less))
  return pipeline.eval_batches(crops, batch_size=batch_size, process_index=process_index,
                               process_count=process_count, num_threads=num_threads)
