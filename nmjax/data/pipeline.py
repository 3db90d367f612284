"""grain input pipelines: a seeded, sharded, resumable training stream and padded eval batches.

Training stream (train_iterator), for global batch size B over P processes (b = B // P each):
  * epoch e is a grain shuffle of all N examples (seed folded with e by grain), truncated to
    steps_per_epoch * B examples: the remainder N % B of each epoch is dropped, so a batch never
    mixes two epochs and every epoch has the same number of steps;
  * global batch k is the positions [k*B, (k+1)*B) of that stream; process p takes positions
    k*B + p, k*B + p + P, ... (grain slice p::P), so processes are disjoint and together cover
    the global batch;
  * each example gets a random crop (zero padding) and optional horizontal flip from grain's
    per-element RNG, keyed by the pipeline seed and the stream position (so it differs per epoch);
  * records are read a whole host batch at a time, in prefetch threads.
Everything is a pure function of (seed, data, batch size): the state is just the number of host
batches consumed, and because batch k means the same global batch for any P, a state can also be
restored with a different process count.

Images stay uint8 (the model normalises on device); labels and indices are int32.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from nmjax.data import transforms
from nmjax.config import steps_per_epoch
from nmjax.errors import ConfigError

Batch = dict[str, np.ndarray]
_STATE_VERSION = 1


def num_eval_steps(num_examples: int, batch_size: int) -> int:
  """Eval steps covering every example once; the last batch is padded and masked."""
  return math.ceil(num_examples / batch_size)


def _host_batch_size(global_batch_size: int, process_count: int, process_index: int) -> int:
  if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size <= 0:
    raise ConfigError(f"batch_size={global_batch_size!r} must be a positive integer")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ConfigError(
        f"process_index={process_index} must be in 0..process_count-1 (process_count="
        f"{process_count})")
  if global_batch_size % process_count:
    raise ConfigError(
        f"batch_size={global_batch_size} must be divisible by the process count "
        f"{process_count}")
  return global_batch_size // process_count


def _read(records: Sequence[Mapping[str, Any]], ids: np.ndarray) -> Batch:
  """Reads examples `ids` and stacks them; uses the source's batched read when it has one."""
  getitems = getattr(records, "__getitems__", None)
  examples = getitems(ids.tolist()) if getitems else [records[int(i)] for i in ids]
  return {
      "image": np.stack([e["image"] for e in examples]),
      "label": np.fromiter((e["label"] for e in examples), np.int64, len(examples)),
      "index": np.fromiter((e["index"] for e in examples), np.int64, len(examples)),
  }


def _read_options(num_threads: int) -> grain.ReadOptions:
  # Each prefetched element is a whole host batch, so a few batches ahead is plenty.
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, 2 * num_threads))


class TrainIterator(grain.DatasetIterator):
  """Iterator over host-local training batches; get_state()/set_state() take JSON dicts.

  A state records where the stream stands and the settings that define the stream; restoring it
  into an iterator with different settings raises ConfigError instead of silently replaying or
  skipping data.
  """

  def __init__(self, batches: grain.DatasetIterator, fingerprint: dict[str, Any]):
    super().__init__(batches)
    self._fingerprint = fingerprint

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {"version": _STATE_VERSION, "stream": self._fingerprint,
            "grain": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("version") != _STATE_VERSION:
      raise ConfigError(
          f"data iterator state has version {state.get('version')!r}; this nmjax reads version "
          f"{_STATE_VERSION} (start the run afresh in a new workdir)")
    saved = state["stream"]
    changed = [f"{k}={saved.get(k)!r} -> {v!r}" for k, v in self._fingerprint.items()
               if saved.get(k) != v]
    if changed:
      raise ConfigError(
          f"data iterator state was saved for a different stream ({'; '.join(changed)}); "
          f"restore with the saved settings or start in a new workdir")
    self._parent.set_state(state["grain"])


def check_stream(num_examples: int, global_batch_size: int, seed: int, num_epochs: int | None,
                 num_steps: int | None, labels: np.ndarray) -> tuple[int, int | None]:
  """Validates a training stream's settings; returns (steps per epoch, epochs to repeat).

  Shared by every training pipeline (this module's and the ImageNet one).
  """
  epoch_steps = steps_per_epoch(num_examples, global_batch_size)
  if epoch_steps == 0:
    raise ConfigError(
        f"batch_size={global_batch_size} is larger than the dataset ({num_examples} examples)")
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ConfigError(f"seed={seed!r} must be an integer in 0..2**32-1")
  if num_epochs is not None and num_steps is not None:
    raise ConfigError(f"give num_epochs={num_epochs} or num_steps={num_steps}, not both")
  for name, value in (("num_epochs", num_epochs), ("num_steps", num_steps)):
    if value is not None and value <= 0:
      raise ConfigError(f"{name}={value} must be positive")
  labels = np.asarray(labels)
  if labels.ndim != 1 or len(labels) < num_examples:
    raise ValueError(
        f"labels has shape {labels.shape}; expected a 1-D array with a label for every example "
        f"index of the {num_examples} source records")
  if num_steps is not None:
    num_epochs = math.ceil(num_steps / epoch_steps)
  return epoch_steps, num_epochs


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
    crop_padding: int = 2,
    flip: bool = False,
    num_threads: int = 1,
    start_state: dict[str, Any] | None = None,
) -> TrainIterator:
  """Returns an iterator of host-local training batches (see the module docstring).

  Args:
    source_records: random-access examples {"image", "label", "index"} (Source.data_source).
    labels: the labels to train on (e.g. noisy), keyed by example index: labels[index].
    global_batch_size: examples per step over all processes; divisible by process_count.
    seed: integer in 0..2**32-1; the whole stream is a pure function of it.
    num_epochs / num_steps: length of the stream (give at most one; neither means endless).
      num_steps repeats epochs as needed and stops after exactly num_steps batches.
    process_index, process_count: this process's shard of each global batch.
    crop_padding: zero padding of the random crop (0 disables cropping).
    flip: random horizontal flips (only where SourceInfo.flip_ok).
    num_threads: prefetch threads, each preparing whole batches (0: read on demand).
    start_state: a state from get_state() to resume from.

  Yields dicts: image uint8 (b, H, W, C), label int32 (from `labels`), clean_label int32 (from
  the records), index int32, with b = global_batch_size // process_count.
  """
  num_examples = len(source_records)
  host_batch = _host_batch_size(global_batch_size, process_count, process_index)
  if crop_padding < 0:
    raise ConfigError(f"crop_padding={crop_padding} must be >= 0")
  epoch_steps, num_epochs = check_stream(num_examples, global_batch_size, seed, num_epochs,
                                         num_steps, labels)
  labels = np.asarray(labels)
  dataset = (
      grain.MapDataset.range(num_examples)
      .seed(seed)
      .shuffle()  # grain folds the epoch into the seed: each epoch has its own order
      [:epoch_steps * global_batch_size]
      .random_map(lambda record_id, rng: {
          "id": record_id, "uniforms": rng.random(transforms.DRAWS_PER_EXAMPLE)})
      .repeat(num_epochs)
  )
  if num_steps is not None:
    dataset = dataset[:num_steps * global_batch_size]
  dataset = dataset[process_index::process_count].batch(host_batch, drop_remainder=True)

  def load(batch: Batch) -> Batch:
    examples = _read(source_records, batch["id"])
    return {
        "image": transforms.random_crop_flip(
            examples["image"], batch["uniforms"], crop_padding, flip),
        "label": labels[examples["index"]].astype(np.int32),
        "clean_label": examples["label"].astype(np.int32),
        "index": examples["index"].astype(np.int32),
    }

  batches = iter(dataset.map(load).to_iter_dataset(_read_options(num_threads)))
  fingerprint = {
      "seed": int(seed), "global_batch_size": int(global_batch_size),
      "num_examples": int(num_examples), "crop_padding": int(crop_padding), "flip": bool(flip),
  }
  iterator = TrainIterator(batches, fingerprint)
  if start_state is not None:
    iterator.set_state(start_state)
  return iterator


def eval_batches(
    source_records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 1,
) -> Iterator[Batch]:
  """Yields this process's eval batches, in order, every process yielding the same number.

  Global batch k holds positions [k*batch_size, (k+1)*batch_size); process p takes the
  contiguous slice [p*b, (p+1)*b) of it (b = batch_size // process_count). Positions past the
  end are padding: zero image, label and index, mask False. Over all processes every example
  appears exactly once with mask True.

  Yields dicts: image uint8 (b, H, W, C), label int32 (clean), index int32, mask bool (b,).
  """
  num_examples = len(source_records)
  host_batch = _host_batch_size(batch_size, process_count, process_index)
  steps = num_eval_steps(num_examples, batch_size)
  if steps == 0:
    return iter(())

  def position(k: int) -> int:
    step, offset = divmod(k, host_batch)
    pos = step * batch_size + process_index * host_batch + offset
    return pos if pos < num_examples else -1

  # Padding needs the image shape even when a process's whole batch is padding.
  image_shape = np.shape(source_records[0]["image"])

  def load(positions: np.ndarray) -> Batch:
    mask = positions >= 0
    batch = {
        "image": np.zeros((host_batch, *image_shape), dtype=np.uint8),
        "label": np.zeros(host_batch, dtype=np.int32),
        "index": np.zeros(host_batch, dtype=np.int32),
        "mask": mask,
    }
    if mask.any():
      examples = _read(source_records, positions[mask])
      batch["image"][mask] = examples["image"]
      batch["label"][mask] = examples["label"]
      batch["index"][mask] = examples["index"]
    return batch

  dataset = (grain.MapDataset.range(steps * host_batch).map(position)
             .batch(host_batch).map(load))
  return iter(dataset.to_iter_dataset(_read_options(num_threads)))
