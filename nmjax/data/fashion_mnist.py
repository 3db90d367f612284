"""Fashion-MNIST as a TFDS dataset built from local gzipped IDX files, with no TensorFlow.

The Debian package dataset-fashion-mnist ships the four IDX files recompressed, so TFDS's own
fashion_mnist builder rejects their checksums. `NmjaxFashionMnist` reads them with gzip + numpy
instead and writes array_record files, which `builder.as_data_source()` reads without TensorFlow.

TFDS shuffles records when it writes them, so every example carries `index`: its position in the
IDX file of its split. Noisy labels are keyed by that index, never by record position.

`prepare(data_dir, raw_dir)` is the one entry point: it prepares on first use and is safe when
several processes start at once or a run is killed halfway (see its docstring).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from nmjax import io as nmjax_io
from nmjax.errors import DataError, os_error_in

CLASS_NAMES = (
  "t-shirt/top", "trouser", "pullover", "dress", "coat",
  "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# split -> (images file, labels file, number of examples)
RAW_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
FIX_COMMAND = "sudo apt-get install -y dataset-fashion-mnist (or bash scripts/bootstrap.sh)"
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_STALE_SECONDS = 3600


def _read_idx(path: pathlib.Path, magic: int, expected_shape: tuple[int, ...]) -> np.ndarray:
  """Reads one gzipped IDX file of unsigned bytes, checking its header against what we expect."""
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise DataError(f"missing Fashion-MNIST file {path}; fix: {FIX_COMMAND}") from None
  except (OSError, EOFError) as e:
    raise DataError(
        f"cannot read Fashion-MNIST file {path} ({e}); fix: reinstall with {FIX_COMMAND}") from None
  ndim = len(expected_shape)
  header = np.frombuffer(raw[:4 * (1 + ndim)], dtype=">u4") if len(raw) >= 4 * (1 + ndim) else None
  if header is None or header[0] != magic or tuple(header[1:]) != expected_shape:
    found = None if header is None else (int(header[0]), tuple(int(d) for d in header[1:]))
    raise DataError(
        f"malformed Fashion-MNIST file {path}: expected IDX magic {magic} and shape "
        f"{expected_shape}, found {found}; fix: reinstall with {FIX_COMMAND}")
  body = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
  if body.size != int(np.prod(expected_shape)):
    raise DataError(f"truncated Fashion-MNIST file {path}; fix: reinstall with {FIX_COMMAND}")
  return body.reshape(expected_shape)


def read_split(raw_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 (N, 28, 28, 1), labels int64 (N,)) of one split, in IDX file order."""
  images_file, labels_file, n = RAW_FILES[split]
  raw_dir = pathlib.Path(raw_dir)
  images = _read_idx(raw_dir / images_file, _IDX_IMAGES_MAGIC, (n, 28, 28))
  labels = _read_idx(raw_dir / labels_file, _IDX_LABELS_MAGIC, (n,))
  if labels.max() >= len(CLASS_NAMES):
    raise DataError(
        f"malformed Fashion-MNIST file {raw_dir / labels_file}: label {labels.max()} is not in "
        f"0..9; fix: reinstall with {FIX_COMMAND}")
  return images[..., None], labels.astype(np.int64)


def check_raw_files(raw_dir: str | os.PathLike) -> None:
  """Raises DataError naming the first missing raw file, before any preparation work starts."""
  for images_file, labels_file, _ in RAW_FILES.values():
    for name in (images_file, labels_file):
      path = pathlib.Path(raw_dir) / name
      if not path.is_file():
        raise DataError(
            f"missing Fashion-MNIST file {path}; fix: {FIX_COMMAND} "
            f"(or point NMJAX_FASHION_MNIST_DIR at a folder holding the four IDX .gz files)")


class NmjaxFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from the local IDX files; registered in TFDS as 'nmjax_fashion_mnist'."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Built from the gzipped IDX files of dataset-fashion-mnist."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
      f"t10k-labels-idx1-ubyte.gz in the manual dir: {FIX_COMMAND}.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST (Xiao et al. 2017) from local IDX files; `index` is the "
                    "example's position in its split's IDX file.",
        features=tfds.features.FeaturesDict({
            # Tensor, not Image: the Image feature's PNG codec needs TensorFlow or Pillow.
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    raw_dir = dl_manager.manual_dir
    check_raw_files(raw_dir)
    return {split: self._generate_examples(raw_dir, split) for split in RAW_FILES}

  def _generate_examples(self, raw_dir: Any, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    images, labels = read_split(raw_dir, split)
    for i in range(len(labels)):
      yield i, {"image": images[i], "label": int(labels[i]), "index": i}


@contextlib.contextmanager
def _writable(data_dir: pathlib.Path) -> Iterator[None]:
  """Turns a read-only or forbidden data folder into one line naming the variable to set."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    cause = os_error_in(e, (errno.EROFS, errno.EACCES, errno.EPERM))
    if cause is None:
      raise
    raise DataError(f"the data folder {data_dir} cannot be written ({cause.strerror}:"
                    f" {cause.filename or data_dir}), and Fashion-MNIST is prepared there on first"
                    " use; set NMJAX_DATA_DIR (or --config.data_dir) to a writable folder"
                    ) from None


def _remove_stale_incomplete_dirs(dataset_dir: pathlib.Path) -> None:
  """Deletes TFDS tmp folders left by killed runs (older than an hour, so never a live one)."""
  for folder in dataset_dir.glob("incomplete.*"):
    if folder.is_dir() and time.time() - folder.stat().st_mtime > _STALE_SECONDS:
      shutil.rmtree(folder, ignore_errors=True)


def prepare(data_dir: str | os.PathLike, raw_dir: str | os.PathLike) -> NmjaxFashionMnist:
  """Returns the builder over data_dir, preparing the array_record files first if needed.

  Safe against concurrent and killed runs: TFDS writes into a randomly named `incomplete.*`
  folder and renames it to <data_dir>/nmjax_fashion_mnist/1.0.0 only when every file is written,
  so a killed run leaves no folder that a later run would trust, only an orphan incomplete.*
  folder, which a later preparer deletes once it is an hour old (no live preparation takes
  that long). An flock serialises preparers on one machine, so the second process waits and then
  reuses the first one's result instead of failing on the rename.
  """
  data_dir = pathlib.Path(data_dir)
  builder = NmjaxFashionMnist(data_dir=os.fspath(data_dir), file_format="array_record")
  if builder.is_prepared():
    return builder
  check_raw_files(raw_dir)
  with _writable(data_dir), nmjax_io.exclusive(data_dir / f".{builder.name}.lock"):
    # Another process may have finished while we waited for the lock.
    builder = NmjaxFashionMnist(data_dir=os.fspath(data_dir), file_format="array_record")
    if not builder.is_prepared():
      _remove_stale_incomplete_dirs(pathlib.Path(builder.data_dir).parent)
      # TFDS announces the preparation on stdout; it is progress, so stderr (a job's stdout,
      # e.g. the study's --config.stage=list, stays its own).
      with contextlib.redirect_stdout(sys.stderr):
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(raw_dir),
                # The GCS probe would reach for the network (and hang offline) first.
                try_download_gcs=False,
            ),
        )
  return builder
