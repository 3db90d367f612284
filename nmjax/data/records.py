"""Record adapters: random-access sequences of examples, and the one batched read over them.

An example is {"image", "label": int64, "index": int64}; `index` is the key noisy labels use.
Every adapter has `__len__`, `__getitem__` and the batched `__getitems__`; `read_many` reads
through any random-access sequence, batched where it can be.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Example = dict[str, Any]


def read_many(records: Sequence[Any], indices: Iterable[int]) -> list[Any]:
  """records[i] for each i, in order; one `__getitems__` call when the records have it."""
  indices = [int(i) for i in indices]
  getitems = getattr(records, "__getitems__", None)
  return getitems(indices) if getitems else [records[i] for i in indices]


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
    return read_many(self._records, (self._positions[int(i)] for i in indices))


class MappedRecords(Sequence):
  """Random-access examples with `fn(example)` applied to each one as it is read.

  Positions outside 0..len-1 raise IndexError whatever the records below raise, so iterating
  stops at the end (TFDS data sources raise ValueError there).
  """

  def __init__(self, records: Sequence[Example], fn: Callable[[Example], Example]):
    self._records = records
    self._fn = fn

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> Example:
    if not 0 <= i < len(self):
      raise IndexError(i)
    return self._fn(self._records[int(i)])

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    return [self._fn(e) for e in read_many(self._records, indices)]


class TfdsRecords(Sequence):
  """Random-access examples over a TFDS data source, in nmjax's example format.

  index_key None: the dataset stores no original position, so the record position is the index.
  encoded: the image is passed on as stored (e.g. JPEG bytes, decoded later in the pipeline's
  workers) instead of as a uint8 (H, W, C) array. Picklable, so grain can ship it to workers.
  """

  def __init__(self, data_source: Sequence[Any], image_key: str = "image",
               label_key: str = "label", index_key: str | None = None, *,
               encoded: bool = False):
    self._data_source = data_source
    self._image_key = image_key
    self._label_key = label_key
    self._index_key = index_key
    self._encoded = encoded

  def __len__(self) -> int:
    return len(self._data_source)

  def _convert(self, record: Mapping[str, Any], position: int) -> Example:
    image = record[self._image_key]
    if not self._encoded:
      image = np.asarray(image, dtype=np.uint8)
      if image.ndim == 2:
        image = image[..., None]
    index = position if self._index_key is None else record[self._index_key]
    return {"image": image, "label": np.int64(record[self._label_key]), "index": np.int64(index)}

  def __getitem__(self, i: int) -> Example:
    return self._convert(self._data_source[int(i)], int(i))

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    indices = [int(i) for i in indices]
    return [self._convert(r, i) for r, i in zip(read_many(self._data_source, indices), indices)]
