"""ImageNet-style input: JPEG records decoded and augmented on the host in grain worker processes.

Records come from a TFDS dataset in the imagenet2012 format (image: JPEG-encoded Image feature,
label: ClassLabel, prepared as array_record) read with the image left encoded
(`jpeg_records`), so the decoding happens here, in the pipeline's workers, with Pillow:
  * train (`train_iterator`): Inception-style random-resized crop (area 8%-100% of the image,
    aspect ratio 3/4-4/3, up to 10 tries, else a central crop at the nearest allowed ratio)
    resized to image_size x image_size, then a random horizontal flip;
  * eval (`eval_batches`): the central square of side 0.875 * min(H, W) resized to image_size
    (at 224 this is the usual resize-to-256 + centre-crop-224, done in one resampling).
Resampling is bilinear with Pillow's antialiasing. The crop box is drawn from the image's size
(read from the JPEG header) before anything is decoded, and the JPEG is then decoded at the
smallest DCT scale (libjpeg's 1/2, 1/4 or 1/8, Pillow's `draft`) at which the box still spans at
least image_size pixels each way (`dct_scale`), so the resize never enlarges what a full decode
would have shrunk. The box is mapped into the reduced image exactly (pixel j of a 1/s decode
covers original pixels [j*s, (j+1)*s), so the box becomes box / s, a float box the resize takes
as it is) and covers the same region of the original. Crops too small for a reduced decode give
exactly the pixels of a full decode; reduced ones differ from them by resampling only, within
the tolerance tests/test_imagenet.py checks. reduced_decode=False decodes every JPEG at full size
(the previous pipeline, kept for comparison: benchmarks/input.py). At ImageNet's common sizes
(about 500x375) few crops allow a reduced decode (1/2 needs a box of at least 2 * image_size
pixels each way); it pays on larger JPEGs (about 1.3x the speed at 1024x768 and 800x600), and
the entropy decoding of the whole file, which no scale avoids, stays most of a decode's cost.

The stream is nmjax.data.pipeline's train_stream: a pure function of the seed whatever the
process and worker counts (every random draw is keyed by the stream position). The iterator
state is the number of host batches consumed (pipeline.WorkerBatches), so a state saved with W
workers resumes with any other count. Eval batches are padded and masked (pipeline.eval_batches)
so every process runs the same number of steps.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from nmjax.data import pipeline, records, sources
from nmjax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]
# A crop box (x0, y0, x1, y1) in pixel coordinates of the image it is cut from.
Box = tuple[float, float, float, float]
# Inception-style crop: tries per example, and the per-example uniform draws (4 per try, 1 flip).
_CROP_TRIES = 10
DRAWS_PER_EXAMPLE = 4 * _CROP_TRIES + 1
_MIN_AREA = 0.08
_ASPECT_RANGE = (3 / 4, 4 / 3)
# Eval: the central square covering this fraction of the short side (224 / 256).
_EVAL_CROP_FRACTION = 0.875
# The reductions of each side libjpeg decodes at through Pillow's draft, largest first.
_DCT_SCALES = (8, 4, 2)
_MANUAL_DOWNLOAD = ("download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
                    "image-net.org")


class _SingleReads(Sequence):
  """A TFDS data source read one record at a time.

  Without `__getitems__`, records.read_many reads record by record: array_record's batched read
  (a thread pool per call) cost 1.6-5x (typically 2.5x) the CPU per record of single reads on a
  2-core host (benchmarks/input.py, "profile"), and the pipeline's workers already read in
  parallel.
  """

  def __init__(self, data_source: Sequence[Any]):
    self._data_source = data_source

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, i: int) -> Any:
    return self._data_source[i]


def jpeg_records(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                 batched_reads: bool = False) -> records.TfdsRecords:
  """The split of a prepared TFDS dataset with JPEG images, images left encoded.

  Examples are {"image": JPEG bytes, "label": int64, "index": int64}; index is the record
  position (imagenet2012 stores no other id), the key noisy labels use, as in sources.TfdsSource.
  data_dir is the nmjax data root (the dataset lives under <data_dir>/tfds), as for
  sources.get_source. Records are read one at a time (see _SingleReads); batched_reads=True reads
  a host batch in one array_record call instead (the previous reader, kept for comparison).
  Raises DataError naming the command that prepares a missing dataset and ConfigError for an
  unknown split.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  unknown = ConfigError(f"config.dataset={name!r} is not a TFDS dataset; the imagenet input "
                        f"pipeline needs one with JPEG images (e.g. imagenet2012)")
  builder = sources.prepared_builder(name, sources.data_root(data_dir) / "tfds", unknown=unknown,
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


def open_image(data: bytes) -> Image.Image:
  """An encoded image opened (its header read) but not decoded: the crops below decode it."""
  return Image.open(io.BytesIO(data))


def decode(jpeg: bytes) -> Image.Image:
  """Decodes an encoded image to RGB (greyscale and CMYK JPEGs are converted).

  An RGB JPEG is returned opened but not yet decoded, so the crops below can still decode it at
  a reduced scale.
  """
  image = open_image(jpeg)
  return image if image.mode == "RGB" else image.convert("RGB")


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


def dct_scale(box: Box, size: int) -> int:
  """The reduction s (8, 4, 2, else 1) to decode a JPEG at for resizing `box` to size x size.

  The largest s at which the box still spans at least `size` pixels each way, so that the
  resize from the 1/s decode shrinks (or keeps) the box, as the one from a full decode does.
  """
  side = min(box[2] - box[0], box[3] - box[1])
  return next((s for s in _DCT_SCALES if side >= s * size), 1)


def decode_for_box(image: Image.Image, box: Box, size: int, *,
                   reduced_decode: bool = True) -> tuple[Image.Image, Box]:
  """`image` decoded to RGB for resizing `box` to size x size, and the box in its coordinates.

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


def random_resized_crop(image: Image.Image, uniforms: np.ndarray, size: int, *,
                        min_area: float = _MIN_AREA, flip: bool = True,
                        reduced_decode: bool = True) -> np.ndarray:
  """Inception-style crop of `image` resized to (size, size, 3) uint8, maybe mirrored.

  The box is crop_box(image size, uniforms, min_area); the last value of uniforms mirrors the
  result when flip and it is < 0.5. An image opened but not decoded (open_image, or decode of an
  RGB JPEG) is decoded at a reduced scale where the box allows (decode_for_box).
  """
  box = crop_box(*image.size, uniforms, min_area=min_area)
  decoded, box = decode_for_box(image, box, size, reduced_decode=reduced_decode)
  out = decoded.resize((size, size), Image.Resampling.BILINEAR, box=box)
  if flip and uniforms[-1] < 0.5:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out)


def center_crop(image: Image.Image, size: int, *, reduced_decode: bool = True) -> np.ndarray:
  """The central square of side 0.875 * min(H, W), resized to (size, size, 3) uint8 (decoded
  at a reduced scale where the square allows, as random_resized_crop)."""
  decoded, box = decode_for_box(image, center_box(*image.size), size,
                                reduced_decode=reduced_decode)
  return np.asarray(decoded.resize((size, size), Image.Resampling.BILINEAR, box=box))


def _crop_or_fail(example: Mapping[str, Any],
                  crop: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
  """crop(the example's opened image), naming the record if its image cannot be decoded."""
  try:
    return crop(open_image(example["image"]))
  except (OSError, ValueError) as e:
    raise DataError(f"record {int(example['index'])} holds an image that cannot be decoded "
                    f"({e}); fix: re-prepare the dataset with tfds build") from None


def _center_crop_example(example: Mapping[str, Any], image_size: int,
                         reduced_decode: bool) -> dict[str, Any]:
  crop = functools.partial(center_crop, size=image_size, reduced_decode=reduced_decode)
  return {"image": _crop_or_fail(example, crop), "label": example["label"],
          "index": example["index"]}


def _check_image_size(image_size: int) -> None:
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or (
      image_size < 8):
    raise ConfigError(f"image_size={image_size!r} must be an integer >= 8")


def _train_batch(batch: Batch, *, source_records: Sequence[Mapping[str, Any]],
                 labels: np.ndarray, image_size: int, min_area: float, flip: bool,
                 reduced_decode: bool) -> Batch:
  """One host batch of the stream ({"id", "uniforms"}) read, decoded and cropped."""
  examples = records.read_many(source_records, batch["id"])
  images = np.empty((len(examples), image_size, image_size, 3), dtype=np.uint8)
  for i, (example, uniforms) in enumerate(zip(examples, batch["uniforms"])):
    crop = functools.partial(random_resized_crop, uniforms=uniforms, size=image_size,
                             min_area=min_area, flip=flip, reduced_decode=reduced_decode)
    images[i] = _crop_or_fail(example, crop)
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
    reduced_decode: bool = True,
    start_state: dict[str, Any] | None = None,
) -> pipeline.TrainIterator:
  """Host-local training batches of random-resized crops (see the module docstring).

  Args:
    source_records: random-access {"image": JPEG bytes, "label", "index"} (jpeg_records).
    labels: the labels to train on (e.g. noisy), keyed by example index: labels[index].
    global_batch_size, seed, num_epochs, num_steps, process_index, process_count, start_state:
      as for nmjax.data.pipeline.train_iterator.
    image_size: side of the square crops.
    min_area: smallest crop area as a fraction of the image (0.08 is the usual recipe).
    flip: random horizontal flips.
    num_workers: grain worker processes that read, decode and augment whole batches (0: in this
      process); the batches do not depend on it.
    num_threads: prefetch threads per worker (or in this process when num_workers is 0).
    reduced_decode: decode JPEGs at a reduced DCT scale where the crop allows (module
      docstring); False decodes every one at full size. It changes only the resampling of the
      crops large enough for it, not which examples, crops and flips a batch holds, so (like
      the Pillow version) it is not part of the state's fingerprint.

  Yields dicts: image uint8 (b, image_size, image_size, 3), label int32 (from `labels`),
  clean_label int32, index int32, with b = global_batch_size // process_count.
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
                           flip=flip, reduced_decode=reduced_decode)
  batches = pipeline.WorkerBatches(stream.map(load), num_workers=num_workers,
                                   num_threads=num_threads)
  fingerprint = {
      "pipeline": "imagenet", "seed": int(seed), "global_batch_size": int(global_batch_size),
      "num_examples": int(len(source_records)), "image_size": int(image_size),
      "min_area": float(min_area), "flip": bool(flip),
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
    reduced_decode: bool = True,
) -> Iterator[Batch]:
  """Padded, masked eval batches of centre crops: nmjax.data.pipeline.eval_batches' semantics.

  Decoding runs in `num_threads` prefetch threads, each preparing whole batches (Pillow releases
  the GIL while it decodes and resizes, so threads overlap). reduced_decode: as for
  train_iterator.

  Yields dicts: image uint8 (b, image_size, image_size, 3), label int32 (clean), index int32,
  mask bool (b,), with b = batch_size // process_count.
  """
  _check_image_size(image_size)
  crops = records.MappedRecords(
      source_records, functools.partial(_center_crop_example, image_size=image_size,
                                        reduced_decode=reduced_decode))
  return pipeline.eval_batches(crops, batch_size=batch_size, process_index=process_index,
                               process_count=process_count, num_threads=num_threads)
