"""ImageNet-style input: JPEG records decoded and augmented on the host in grain worker processes.

Records come from a TFDS dataset in the imagenet2012 format (image: JPEG-encoded Image feature,
label: ClassLabel, prepared as array_record) read with the image left encoded
(`jpeg_records`), so the decoding happens here, in the pipeline's workers, with Pillow:
  * train (`train_iterator`): Inception-style random-resized crop (area 8%-100% of the image,
    aspect ratio 3/4-4/3, up to 10 tries, else a central crop at the nearest allowed ratio)
    resized to image_size x image_size, then a random horizontal flip;
  * eval (`eval_batches`): the central square of side 0.875 * min(H, W) resized to image_size
    (at 224 this is the usual resize-to-256 + centre-crop-224, done in one resampling).
Images are decoded at full resolution (no JPEG draft-mode downscaling, which would change the
pixels depending on the crop) and resampled bilinearly with Pillow's antialiasing.

The stream has the semantics of nmjax.data.pipeline (whose helpers it uses): epoch e is a seeded
shuffle truncated to whole global batches, global batch k is stream positions [kB, (k+1)B),
process p of P takes positions kB + p, kB + p + P, ...; every random draw is keyed by the stream
position, so the data is a pure function of the seed whatever the process and worker counts. The
iterator state is the number of host batches consumed, and restoring it restarts the workers at
that batch, so a state saved with W workers resumes with any other count. Eval batches are padded
and masked (pipeline.eval_batches) so every process runs the same number of steps.

`write_synthetic` writes a small imagenet2012-format dataset of random JPEGs for tests and
benchmarks (never a download).
"""

from __future__ import annotations

import gc
import io
import math
import os
import pathlib
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from nmjax.data import pipeline, sources
from nmjax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]
INPUT_PIPELINES = ("default", "imagenet")
# Inception-style crop: tries per example, and the per-example uniform draws (4 per try, 1 flip).
_CROP_TRIES = 10
DRAWS_PER_EXAMPLE = 4 * _CROP_TRIES + 1
_MIN_AREA = 0.08
_ASPECT_RANGE = (3 / 4, 4 / 3)
# Eval: the central square covering this fraction of the short side (224 / 256).
_EVAL_CROP_FRACTION = 0.875


def _build_command(name: str, tfds_dir: pathlib.Path) -> str:
  return (f"download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org "
          f"into MANUAL_DIR, then: tfds build {name} --manual_dir=MANUAL_DIR "
          f"--data_dir={tfds_dir} --file_format=array_record")


class JpegRecords(Sequence):
  """Random-access {"image": JPEG bytes, "label": int64, "index": int64} of one TFDS split.

  index is the record position (imagenet2012 stores no other id), the key noisy labels use, as
  in sources.TfdsSource. Picklable, so grain can ship it to worker processes.
  """

  def __init__(self, data_source: Sequence[Any], image_key: str = "image",
               label_key: str = "label"):
    self._data_source = data_source
    self._image_key = image_key
    self._label_key = label_key

  def __len__(self) -> int:
    return len(self._data_source)

  def _convert(self, record: Mapping[str, Any], position: int) -> dict[str, Any]:
    return {"image": record[self._image_key], "label": np.int64(record[self._label_key]),
            "index": np.int64(position)}

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self._convert(self._data_source[int(i)], int(i))

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    indices = [int(i) for i in indices]
    return [self._convert(r, i)
            for r, i in zip(self._data_source.__getitems__(indices), indices)]


def jpeg_records(name: str, split: str, *,
                 data_dir: str | os.PathLike | None = None) -> JpegRecords:
  """The split of a prepared TFDS dataset with JPEG images, images left encoded.

  data_dir is the nmjax data root (the dataset lives under <data_dir>/tfds), as for
  sources.get_source. Raises DataError naming the command that prepares a missing dataset and
  ConfigError for an unknown split.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(data_dir).expanduser() if data_dir else sources.default_data_dir()
  tfds_dir = root / "tfds"
  try:
    builder = tfds.builder(name, data_dir=os.fspath(tfds_dir))
  except tfds.core.DatasetNotFoundError:
    raise ConfigError(f"config.dataset={name!r} is not a TFDS dataset; the imagenet input "
                      f"pipeline needs one with JPEG images (e.g. imagenet2012)") from None
  if not builder.is_prepared():
    raise DataError(f"TFDS dataset {name!r} is not prepared in {tfds_dir} (no "
                    f"{builder.data_dir}); {_build_command(name, tfds_dir)}")
  if tfds.core.FileFormat.ARRAY_RECORD not in builder.info.available_file_formats():
    raise DataError(
        f"TFDS dataset {name!r} in {builder.data_dir} is not stored as array_record (no random "
        f"access); fix: tfds convert_format --dataset_version_dir={builder.data_dir} "
        f"--out_file_format=array_record")
  features = builder.info.features
  if ("image" not in features or not isinstance(features["image"], tfds.features.Image)
      or "label" not in features):
    raise DataError(f"TFDS dataset {name!r} in {builder.data_dir} has no Image feature 'image' "
                    f"and label 'label'; the imagenet input pipeline needs both")
  if split not in builder.info.splits:
    raise ConfigError(f"split={split!r} is not a split of {name!r}; splits: "
                      f"{', '.join(builder.info.splits)}")
  source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  return JpegRecords(source)


def decode(jpeg: bytes) -> Image.Image:
  """Decodes an encoded image to RGB (greyscale and CMYK JPEGs are converted)."""
  image = Image.open(io.BytesIO(jpeg))
  return image if image.mode == "RGB" else image.convert("RGB")


def random_resized_crop(image: Image.Image, uniforms: np.ndarray, size: int, *,
                        min_area: float = _MIN_AREA, flip: bool = True) -> np.ndarray:
  """Inception-style crop of `image` resized to (size, size, 3) uint8, maybe mirrored.

  uniforms holds DRAWS_PER_EXAMPLE values in [0, 1): try t uses [4t, 4t+4) for the area
  (min_area..1 of the image), the log aspect ratio (3/4..4/3) and the x and y offsets; the first
  try whose box fits the image wins; if none fits, the central box at the allowed aspect ratio
  nearest the image's is used. The last value mirrors the result when flip and it is < 0.5.
  """
  width, height = image.size
  area = width * height
  log_low, log_high = math.log(_ASPECT_RANGE[0]), math.log(_ASPECT_RANGE[1])
  box = None
  for t in range(_CROP_TRIES):
    u_area, u_ratio, u_x, u_y = uniforms[4 * t:4 * t + 4]
    target = area * (min_area + u_area * (1.0 - min_area))
    aspect = math.exp(log_low + u_ratio * (log_high - log_low))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      x0 = int(u_x * (width - w + 1))
      y0 = int(u_y * (height - h + 1))
      box = (x0, y0, x0 + w, y0 + h)
      break
  if box is None:
    aspect = min(max(width / height, _ASPECT_RANGE[0]), _ASPECT_RANGE[1])
    w, h = (width, round(width / aspect)) if width / height <= aspect else (
        round(height * aspect), height)
    x0, y0 = (width - w) // 2, (height - h) // 2
    box = (x0, y0, x0 + w, y0 + h)
  out = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
  if flip and uniforms[-1] < 0.5:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out)


def center_crop(image: Image.Image, size: int) -> np.ndarray:
  """The central square of side 0.875 * min(H, W), resized to (size, size, 3) uint8."""
  width, height = image.size
  side = _EVAL_CROP_FRACTION * min(width, height)
  x0, y0 = (width - side) / 2, (height - side) / 2
  out = image.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
  return np.asarray(out)


def _records_at(records: Sequence[Mapping[str, Any]], ids: Sequence[int]) -> list:
  getitems = getattr(records, "__getitems__", None)
  return getitems(list(ids)) if getitems else [records[int(i)] for i in ids]


def _decode_or_fail(example: Mapping[str, Any]) -> Image.Image:
  try:
    return decode(example["image"])
  except (OSError, ValueError) as e:
    raise DataError(f"record {int(example['index'])} holds an image that cannot be decoded "
                    f"({e}); fix: re-prepare the dataset with tfds build") from None


class CenterCropRecords(Sequence):
  """Eval view of JPEG records: each image decoded and centre-cropped to (size, size, 3)."""

  def __init__(self, records: Sequence[Mapping[str, Any]], image_size: int):
    self._records = records
    self._size = image_size

  def __len__(self) -> int:
    return len(self._records)

  def _convert(self, example: Mapping[str, Any]) -> dict[str, Any]:
    return {"image": center_crop(_decode_or_fail(example), self._size),
            "label": example["label"], "index": example["index"]}

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not 0 <= i < len(self):
      raise IndexError(i)
    return self._convert(self._records[int(i)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self._convert(e) for e in _records_at(self._records, indices)]


def _close_and_release(holder: list) -> None:
  """Closes the grain iterator in `holder` and lets it be freed now, while modules are alive."""
  for batches in holder:
    batches.close()
  holder.clear()
  gc.collect()  # grain's iterators clean up in __del__, which fails at interpreter teardown.


class _RestartableBatches(grain.DatasetIterator):
  """Batches from `make(start)`; the state is the next batch number, restored by restarting.

  Worker processes own grain's per-worker positions, so a state in grain's own format would tie
  a checkpoint to the worker count; counting batches here keeps it independent of it.
  """

  def __init__(self, make: Callable[[int], grain.IterDataset]):
    super().__init__()
    self._make = make
    self._next_batch = 0
    # The running grain iterator, if any (started lazily, after any set_state). It lives only
    # in this list so that closing can also free it.
    self._running: list[grain.DatasetIterator] = []
    self._finalizer: weakref.finalize | None = None

  def __next__(self) -> Batch:
    if not self._running:
      self._running.append(iter(self._make(self._next_batch)))
      # Callers (the train loop) may never close us: stop the workers and free their shared
      # memory at exit at the latest, before the interpreter tears down grain's modules.
      self._finalizer = weakref.finalize(self, _close_and_release, self._running)
    batch = next(self._running[0])
    self._next_batch += 1
    # Workers hand over batches in shared memory that grain unlinks when the array dies; a copy
    # (a few ms per batch) frees it now, so batches kept by callers stay plain numpy arrays.
    return {key: np.array(value) for key, value in batch.items()}

  def get_state(self) -> dict[str, Any]:
    return {"next_batch": self._next_batch}

  def set_state(self, state: dict[str, Any]) -> None:
    self.close_workers()
    self._next_batch = int(state["next_batch"])

  def close_workers(self) -> None:
    if self._finalizer is not None:
      self._finalizer()  # runs _close_and_release once
      self._finalizer = None

  def close(self) -> None:
    self.close_workers()
    super().close()


def _use_flag_defaults_unless_parsed() -> None:
  # grain reads absl flags when it starts workers; outside an absl app (tests, benchmarks, a
  # notebook) nothing has parsed them, so take their defaults instead of failing.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _check_image_size(image_size: int) -> None:
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or (
      image_size < 8):
    raise ConfigError(f"image_size={image_size!r} must be an integer >= 8")


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

  Yields dicts: image uint8 (b, image_size, image_size, 3), label int32 (from `labels`),
  clean_label int32, index int32, with b = global_batch_size // process_count.
  """
  num_examples = len(source_records)
  # pipeline's own helpers, shared rather than copied.
  # pylint: disable=protected-access
  host_batch = pipeline._host_batch_size(global_batch_size, process_count, process_index)
  _check_image_size(image_size)
  if not 0 < min_area <= 1:
    raise ConfigError(f"min_area={min_area} is out of range; allowed: 0 < min_area <= 1")
  if num_workers < 0 or num_threads < 0:
    raise ConfigError(f"num_workers={num_workers} and num_threads={num_threads} must be >= 0")
  epoch_steps, num_epochs = pipeline.check_stream(num_examples, global_batch_size, seed,
                                                  num_epochs, num_steps, labels)
  labels = np.asarray(labels)
  dataset = (
      grain.MapDataset.range(num_examples)
      .seed(seed)
      .shuffle()  # grain folds the epoch into the seed: each epoch has its own order
      [:epoch_steps * global_batch_size]
      .repeat(num_epochs)
  )
  if num_steps is not None:
    dataset = dataset[:num_steps * global_batch_size]
  # Draws keyed by the global stream position: the same crop whatever the process count.
  dataset = dataset.random_map(lambda record_id, rng: {
      "id": record_id, "uniforms": rng.random(DRAWS_PER_EXAMPLE)})
  dataset = dataset[process_index::process_count].batch(host_batch, drop_remainder=True)

  def load(batch: Batch) -> Batch:
    examples = _records_at(source_records, batch["id"].tolist())
    images = np.empty((len(examples), image_size, image_size, 3), dtype=np.uint8)
    for i, (example, uniforms) in enumerate(zip(examples, batch["uniforms"])):
      images[i] = random_resized_crop(_decode_or_fail(example), uniforms, image_size,
                                      min_area=min_area, flip=flip)
    index = np.fromiter((e["index"] for e in examples), np.int64, len(examples))
    return {
        "image": images,
        "label": labels[index].astype(np.int32),
        "clean_label": np.fromiter((e["label"] for e in examples), np.int32, len(examples)),
        "index": index.astype(np.int32),
    }

  batches = dataset.map(load)

  def make(start: int) -> grain.IterDataset:
    if num_workers:
      _use_flag_defaults_unless_parsed()
    # Slicing before the workers start keeps worker w on batches start + w, start + w + W, ...
    read_options = pipeline._read_options(num_threads)
    return batches[start:].to_iter_dataset(read_options).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))

  fingerprint = {
      "pipeline": "imagenet", "seed": int(seed), "global_batch_size": int(global_batch_size),
      "num_examples": int(num_examples), "image_size": int(image_size),
      "min_area": float(min_area), "flip": bool(flip),
  }
  iterator = pipeline.TrainIterator(_RestartableBatches(make), fingerprint)
  if start_state is not None:
    iterator.set_state(start_state)
  return iterator


def eval_batches(
    source_records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    image_size: int = 224,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 1,
) -> Iterator[Batch]:
  """Padded, masked eval batches of centre crops: nmjax.data.pipeline.eval_batches' semantics.

  Decoding runs in `num_threads` prefetch threads, each preparing whole batches (Pillow releases
  the GIL while it decodes and resizes, so threads overlap).

  Yields dicts: image uint8 (b, image_size, image_size, 3), label int32 (clean), index int32,
  mask bool (b,), with b = batch_size // process_count.
  """
  _check_image_size(image_size)
  return pipeline.eval_batches(
      CenterCropRecords(source_records, image_size), batch_size=batch_size,
      process_index=process_index, process_count=process_count, num_threads=num_threads)


def check_config(config: Any) -> None:
  """Validates the input-pipeline fields of a pre-training config (ConfigError, one line)."""
  choice = config.get("input_pipeline", "default")
  if choice not in INPUT_PIPELINES:
    raise ConfigError(f"config.input_pipeline={choice!r} is unknown; allowed: "
                      f"{', '.join(INPUT_PIPELINES)}")
  if choice != "imagenet":
    return
  size = config.get("image_size")
  if isinstance(size, bool) or not isinstance(size, int) or size < 8:
    raise ConfigError(f"config.image_size={size!r} is out of range; allowed: integer >= 8")
  workers = config.get("data_workers", 0)
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
    raise ConfigError(f"config.data_workers={workers!r} is out of range; allowed: integer >= 0")
  if not isinstance(config.get("eval_split"), str) or not config.get("eval_split"):
    raise ConfigError(f"config.eval_split={config.get('eval_split')!r} must name a split "
                      f"(imagenet2012: validation)")


# ----------------------------------------------------------------------------------------------
# A synthetic imagenet2012-format dataset (tests and benchmarks).

def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
  """A random but photo-like JPEG: smooth colour fields, mid-scale blobs, fine texture, noise.

  Pure noise compresses far worse and flat colour far better than photographs; this mix gives
  JPEG sizes in the range of ImageNet's (roughly 50-200 KB at 500x375).
  """
  def field(cells_x: int, cells_y: int, scale: float) -> np.ndarray:
    coarse = rng.uniform(-scale, scale, (cells_y, cells_x, 3)).astype(np.float32)
    channels = [np.asarray(Image.fromarray(coarse[..., c], mode="F").resize(
        (width, height), Image.Resampling.BICUBIC)) for c in range(3)]
    return np.stack(channels, axis=-1)
  pixels = (rng.uniform(60, 190, 3).astype(np.float32) + field(4, 3, 70.0)
            + field(24, 18, 35.0) + field(width // 4, height // 4, 30.0)
            + rng.normal(0, 10, (height, width, 3)).astype(np.float32))
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
      buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def write_synthetic(data_dir: str | os.PathLike, *, splits: Mapping[str, int],
                    sizes: Sequence[tuple[int, int]] = ((500, 375), (375, 500), (500, 333)),
                    num_classes: int = 1000, seed: int = 0, name: str = "imagenet2012",
                    version: str = "5.1.0") -> pathlib.Path:
  """Writes a TFDS dataset with imagenet2012's features under <data_dir>/tfds; returns its dir.

  Features: image Image(JPEG), label ClassLabel(num_classes), file_name Text, as TFDS's own
  imagenet2012; array_record files, so jpeg_records and sources.get_source read it like the
  real one. splits maps split name -> number of images (sizes cycle through `sizes`, labels are
  drawn uniformly; a split named "test" gets label -1 as in imagenet2012). Nothing is downloaded.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def examples(split: str, count: int) -> Iterator[tuple[str, dict[str, Any]]]:
    rng = np.random.default_rng([seed, sorted(splits).index(split)])
    for i in range(count):
      width, height = sizes[i % len(sizes)]
      label = -1 if split == "test" else int(rng.integers(num_classes))
      file_name = f"synthetic_{split}_{i:06d}.JPEG"
      yield file_name, {"image": synthetic_jpeg(rng, width, height), "label": label,
                        "file_name": file_name}

  with tfds.core.registered.skip_registration():
    class SyntheticImagenet(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
      VERSION = tfds.core.Version(version)

      def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Synthetic JPEGs in the imagenet2012 format.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=num_classes),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"))

      def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager
        return {split: self._generate_examples(split, count) for split, count in splits.items()}

      def _generate_examples(self, split: str, count: int
                             ) -> Iterator[tuple[str, dict[str, Any]]]:
        return examples(split, count)

    SyntheticImagenet.name = name
    tfds_dir = pathlib.Path(data_dir) / "tfds"
    builder = SyntheticImagenet(data_dir=os.fspath(tfds_dir), file_format="array_record")
    tfds.disable_progress_bar()  # A few dozen images: the bars are only noise in test logs.
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return pathlib.Path(builder.data_dir)
