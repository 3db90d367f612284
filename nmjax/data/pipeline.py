"""The one grain training stream (seeded, sharded, resumable) and padded eval batches.

Training stream (train_stream), for global batch size B over P processes (b = B // P each):
  * epoch e is a grain shuffle of all N examples (seed folded with e by grain), truncated to
    steps_per_epoch * B examples: the remainder N % B of each epoch is dropped, so a batch never
    mixes two epochs and every epoch has the same number of steps;
  * global batch k is the positions [k*B, (k+1)*B) of that stream; process p takes positions
    k*B + p, k*B + p + P, ... (grain slice p::P), so processes are disjoint and together cover
    the global batch;
  * each example gets uniform draws (its augmentation) from grain's per-element RNG, keyed by the
    pipeline seed and the stream position (so they differ per epoch, not per process count).
Everything is a pure function of (seed, data, batch size): because batch k means the same global
batch for any P, a state can also be restored with a different process count. `train_iterator`
reads whole host batches in prefetch threads and applies a random crop and flip
(transforms.py); the ImageNet pipeline (imagenet.py) wraps the same stream and reads it in
worker processes (WorkerBatches).

Images stay uint8 (the model normalises on device); labels and indices are int32.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from nmjax.config import steps_per_epoch
from nmjax.data import records, transforms
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


def _stack(examples: Sequence[Mapping[str, Any]]) -> Batch:
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

  A state records where the stream stands and the settings that define the stream (the
  fingerprint); restoring it into an iterator with different settings raises ConfigError instead
  of silently replaying or skipping data. start_state, if given, is restored at once.
  """

  def __init__(self, batches: grain.DatasetIterator, fingerprint: dict[str, Any],
               start_state: dict[str, Any] | None = None):
    super().__init__(batches)
    self._fingerprint = fingerprint
    if start_state is not None:
      self.set_state(start_state)

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


def _check_stream(num_examples: int, global_batch_size: int, seed: int, num_epochs: int | None,
                  num_steps: int | None, labels: np.ndarray) -> tuple[int, int | None]:
  """Validates a training stream's settings; returns (steps per epoch, epochs to repeat)."""
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


def train_stream(num_examples: int, labels: np.ndarray, *, global_batch_size: int, seed: int,
                 num_epochs: int | None, num_steps: int | None, process_index: int,
                 process_count: int, draws_per_example: int,
                 draws_after_repeat: bool = False) -> grain.MapDataset:
  """This process's host batches of the training stream (see the module docstring), validated.

  Each element is {"id": record positions int64 (b,), "uniforms": float64 (b, draws_per_example)
  in [0, 1)}; a caller maps it to images. num_epochs / num_steps: give at most one (neither means
  endless); num_steps repeats epochs as needed and stops after exactly num_steps batches.
  labels (the labels trained on, keyed by index) only has its shape checked here.

  draws_after_repeat: False draws the uniforms on the epoch (before it repeats), True on the
  repeated, truncated stream. Both key an example's draws by its stream position, but grain
  seeds a random map by its depth below .seed(), so each gives its own draws: train_iterator uses
  False and the ImageNet pipeline True, fixed so that saved runs and states reproduce bitwise.
  """
  host_batch = _host_batch_size(global_batch_size, process_count, process_index)
  epoch_steps, num_epochs = _check_stream(num_examples, global_batch_size, seed, num_epochs,
                                          num_steps, labels)

  def draw(dataset: grain.MapDataset) -> grain.MapDataset:
    return dataset.random_map(lambda record_id, rng: {
        "id": record_id, "uniforms": rng.random(draws_per_example)})

  dataset = (
      grain.MapDataset.range(num_examples)
      .seed(seed)
      .shuffle()  # grain folds the epoch into the seed: each epoch has its own order
      [:epoch_steps * global_batch_size]
  )
  if not draws_after_repeat:
    dataset = draw(dataset)
  dataset = dataset.repeat(num_epochs)
  if num_steps is not None:
    dataset = dataset[:num_steps * global_batch_size]
  if draws_after_repeat:
    dataset = draw(dataset)
  return dataset[process_index::process_count].batch(host_batch, drop_remainder=True)


def _close_and_release(holder: list) -> None:
  """Closes the grain iterator in `holder` and lets it be freed now, while modules are alive."""
  for batches in holder:
    batches.close()
  holder.clear()
  gc.collect()  # grain's iterators clean up in __del__, which fails at interpreter teardown.


def _use_flag_defaults_unless_parsed() -> None:
  # grain reads absl flags when it starts workers; outside an absl app (tests, benchmarks, a
  # notebook) nothing has parsed them, so take their defaults instead of failing.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class WorkerBatches(grain.DatasetIterator):
  """The elements of `batches` made by `num_workers` worker processes (0: in this process), each
  with `num_threads` prefetch threads; the state is the next batch number, restored by restarting.

  Worker processes own grain's per-worker positions, so a state in grain's own format would tie
  a checkpoint to the worker count; counting batches here keeps it independent of it.
  """

  def __init__(self, batches: grain.MapDataset, *, num_workers: int, num_threads: int):
    super().__init__()
    self._batches = batches
    self._num_workers = num_workers
    self._num_threads = num_threads
    self._next_batch = 0
    # The running grain iterator, if any (started lazily, after any set_state). It lives only
    # in this list so that closing can also free it.
    self._running: list[grain.DatasetIterator] = []
    self._finalizer: weakref.finalize | None = None

  def _start(self) -> grain.DatasetIterator:
    if self._num_workers:
      _use_flag_defaults_unless_parsed()
    # Slicing before the workers start keeps worker w on batches start + w, start + w + W, ...
    batches = self._batches[self._next_batch:].to_iter_dataset(_read_options(self._num_threads))
    return iter(batches.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=self._num_workers, per_worker_buffer_size=2)))

  def __next__(self) -> Batch:
    if not self._running:
      self._running.append(self._start())
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
    num_epochs: the stream's length in epochs (give at most one of the two; neither: endless).
    num_steps: its length in batches (epochs repeat as needed; exactly num_steps batches).
    process_index: this process's index: it takes its shard of each global batch.
    process_count: how many processes share each global batch.
    crop_padding: zero padding of the random crop (0 disables cropping).
    flip: random horizontal flips (only where SourceInfo.flip_ok).
    num_threads: prefetch threads, each preparing whole batches (0: read on demand).
    start_state: a state from get_state() to resume from.

  Returns:
    An iterator of dicts: image uint8 (b, H, W, C), label int32 (from `labels`), clean_label
    int32 (from the records), index int32, with b = global_batch_size // process_count.
  """
  if crop_padding < 0:
    raise ConfigError(f"crop_padding={crop_padding} must be >= 0")
  stream = train_stream(
      len(source_records), labels, global_batch_size=global_batch_size, seed=seed,
      num_epochs=num_epochs, num_steps=num_steps, process_index=process_index,
      process_count=process_count, draws_per_example=transforms.DRAWS_PER_EXAMPLE)
  labels = np.asarray(labels)

  def load(batch: Batch) -> Batch:
    examples = _stack(records.read_many(source_records, batch["id"]))
    return {
        "image": transforms.random_crop_flip(
            examples["image"], batch["uniforms"], crop_padding, flip),
        "label": labels[examples["index"]].astype(np.int32),
        "clean_label": examples["label"].astype(np.int32),
        "index": examples["index"].astype(np.int32),
    }

  batches = iter(stream.map(load).to_iter_dataset(_read_options(num_threads)))
  fingerprint = {
      "seed": int(seed), "global_batch_size": int(global_batch_size),
      "num_examples": int(len(source_records)), "crop_padding": int(crop_padding),
      "flip": bool(flip),
  }
  return TrainIterator(batches, fingerprint, start_state)


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
      examples = _stack(records.read_many(source_records, positions[mask]))
      batch["image"][mask] = examples["image"]
      batch["label"][mask] = examples["label"]
      batch["index"][mask] = examples["index"]
    return batch

  dataset = (grain.MapDataset.range(steps * host_batch).map(position)
             .batch(host_batch).map(load))
  return iter(dataset.to_iter_dataset(_read_options(num_threads)))
