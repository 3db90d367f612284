"""Frozen-encoder features: jitted extraction over a device mesh, and features files.

A features file is an .npz holding

    features      float32 (N, D)
    labels        int64 (N,)
    clean_labels  int64 (N,)   optional (labels before any noise)
    domain        str          optional (where the examples come from, e.g. "mnist/test")

from any source, a black-box API included: the probes and NMTune read these. `load` and
`as_feature_set` refuse, with one line naming the file and the problem, what is not such an .npz
(a .npy, a truncated or foreign file, a directory, FIFO or device, pickled object arrays), a
non-finite value, a wrong dimension, labels outside [0, C) or a stray label that would size a huge
head (check_labels). Huge (past HUGE_FEATURE) and constant features get a warning line, once per
array and process. `extract` encodes padded, masked batches: every example once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import stat
import sys
import weakref
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from nmjax import parallel
from nmjax import io as nmjax_io
from nmjax.errors import DataError

__all__ = ["extract"]

Array = np.ndarray
# The most classes a head may have (ImageNet-21k, the largest label set in common use, has 21,843).
MAX_CLASSES = 100_000
# Labels that size a head (C = max + 1) may span at most this many times the distinct labels.
CLASS_GAP_FACTOR = 2
# Finite features past this in absolute value get a warning (no encoder output comes near it).
HUGE_FEATURE = 1e8
FeaturesLike = Any  # FeatureSet | str | os.PathLike | tuple[features, labels]


@dataclasses.dataclass(frozen=True)
class FeatureSet:
  """Features of one dataset split with their labels (validated on construction by the helpers)."""
  features: Array                   # float32 (N, D)
  labels: Array                     # int64 (N,)
  clean_labels: Array | None = None  # int64 (N,)
  domain: str | None = None
  path: str | None = None           # where it was read from, for messages

  @property
  def num_examples(self) -> int:
    return int(self.features.shape[0])

  @property
  def feature_dim(self) -> int:
    return int(self.features.shape[1])

  def where(self, name: str) -> str:
    """How messages name these features: their file, else `name`."""
    return f"features file {self.path}" if self.path else name


def check_matrix(name: str, values: Any) -> Array:
  """`values` as a float32 (N, D) array with N, D > 0 and every entry finite, or a DataError
  naming `name`. Shared by everything that reads features (features files, spectral metrics)."""
  values = np.asarray(values)
  if values.ndim != 2:
    raise DataError(f"{name}: features must be 2-D (N, D), got shape {values.shape}")
  if values.shape[0] == 0 or values.shape[1] == 0:
    raise DataError(f"{name}: features are empty (shape {values.shape})")
  if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
    raise DataError(f"{name}: features must be real numbers, got dtype {values.dtype}")
  values = values.astype(np.float32, copy=False)
  bad = ~np.isfinite(values)
  if bad.any():
    row = int(np.argwhere(bad)[0][0])
    raise DataError(f"{name}: features hold {int(bad.sum())} non-finite values (NaN/inf), first"
                    f" in row {row}")
  return values


def check_labels(name: str, values: Any, num_examples: int, num_classes: int | None, *,
                 what: str = "labels", note: str = "") -> Array:
  """`values` as int64 (num_examples,) class indices, or a DataError naming `name` and the row.

  num_classes: the labels must lie in [0, num_classes) (`note` says where that bound comes from,
  e.g. the classes inferred from a train split). None: these labels size a head of max + 1
  classes, which must stay at most CLASS_GAP_FACTOR x the distinct labels present and at most
  MAX_CLASSES. To validate labels that size nothing (a test split, a file being saved), pass
  MAX_CLASSES. Shared by features files, the probes, NMTune's train views and the NMTune job.
  """
  values = np.asarray(values)
  if values.shape != (num_examples,):
    raise DataError(f"{name}: {what} must be 1-D with shape ({num_examples},) to match the"
                    f" features, got {values.shape}")
  if not np.issubdtype(values.dtype, np.integer):
    if not (np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values))):
      raise DataError(f"{name}: {what} must be integers, got dtype {values.dtype}")
    if np.abs(values).max() >= 2.0 ** 62:
      raise DataError(f"{name}: {what} must be class indices, got {np.abs(values).max():g}")
  values = values.astype(np.int64)
  if num_classes is None and values.min() >= 0:
    _check_gaps(name, values, what)
  bound = MAX_CLASSES if num_classes is None else num_classes
  bad = (values < 0) | (values >= bound)
  if bad.any():
    row = int(np.flatnonzero(bad)[0])
    label = f"{what[:-1]} {values[row]} in row {row}"
    if bound >= MAX_CLASSES and values[row] >= 0:
      raise DataError(f"{name}: {label} is past nmjax's limit of {MAX_CLASSES:,} classes;"
                      f" {what} must be class indices 0..C-1")
    shown = "C" if num_classes is None else bound
    raise DataError(f"{name}: {what} outside [0, {shown}): {label}{note}")
  return values


def _check_gaps(name: str, values: Array, what: str) -> None:
  """Refuses labels whose max + 1 is far more than the classes present (a stray label)."""
  present = np.unique(values)
  size = int(present[-1]) + 1
  if size <= max(2, CLASS_GAP_FACTOR * len(present)):
    return
  row = int(np.flatnonzero(values == present[-1])[0])
  below = int(present[-2]) if len(present) > 1 else None
  others = f"the next largest is {below}" if below is not None else "it is the only label"
  raise DataError(
      f"{name}: {what[:-1]} {present[-1]} in row {row} is far past the others ({others};"
      f" {len(present)} distinct {what}), so the head would have {size:,} classes; {what} must be"
      f" class indices 0..C-1 with C at most {CLASS_GAP_FACTOR} x the distinct {what} (pass"
      " config.num_classes to size the head yourself)")


def inferred_classes_note(num_classes: int) -> str:
  """check_labels' note for test labels checked against classes inferred from train labels."""
  return (f" is outside the {num_classes} classes inferred from the train labels (max train"
          " label + 1), so the head could never predict it; pass config.num_classes if the train"
          " split lacks the top classes")


# (id of an array, the line said of it) -> a weak reference to that array: each warning once per
# array, however many methods read it (the NMTune job runs every method on the same arrays).
_WARNED: dict[tuple[int, str], weakref.ref] = {}


def _warn_once(features: Array, line: str) -> None:
  """Prints `warning: line` unless that very line was already said of this very array."""
  key = (id(features), line)
  known = _WARNED.get(key)
  if known is not None and known() is features:
    return
  with contextlib.suppress(TypeError):  # An array that is not weakly referable: every time.
    _WARNED[key] = weakref.ref(features, lambda _, key=key: _WARNED.pop(key, None))
  print(f"warning: {line}", file=sys.stderr, flush=True)


def peak_value(features: Array) -> float:
  """The largest absolute value of `features` (0 when empty), from the two extremes: no copy."""
  return float(max(np.max(features), -np.min(features))) if np.size(features) else 0.0


def warn_if_huge(name: str, features: Array) -> None:
  """Prints one warning line when features exceed HUGE_FEATURE in absolute value (finite, but
  their float32 products overflow: a probe on them scores at chance level)."""
  peak = peak_value(features)
  if peak > HUGE_FEATURE:
    _warn_once(features, f"{name}: features reach {peak:.3g} in absolute value (over"
               f" {HUGE_FEATURE:g}); float32 products of such values overflow, so the results may"
               " be at chance level; rescale the features (e.g. divide by their standard"
               " deviation)")


def warn_if_constant(name: str, features: Array) -> None:
  """Prints one warning line when every row of (N, D) features, N >= 2, is the same (each
  feature has zero variance): no head can tell the classes apart, so accuracies are at chance."""
  if features.ndim != 2 or features.shape[0] < 2:
    return
  low, high = np.min(features, axis=0), np.max(features, axis=0)
  if np.all(low == high):
    zero = ", all zero" if not np.any(low) else ""
    _warn_once(features, f"{name}: features are constant (zero variance: all"
               f" {features.shape[0]} rows are identical{zero}), so no head can tell the classes"
               " apart and accuracies will be at chance level; check how they were extracted")


def warn_if_degenerate(name: str, features: Array) -> None:
  """warn_if_huge and warn_if_constant: what every reader of features says of them."""
  warn_if_huge(name, features)
  warn_if_constant(name, features)


def _check(name: str, features: Any, labels: Any, clean_labels: Any, *,
           num_classes: int | None, feature_dim: int | None,
           note: str = "") -> tuple[Array, Array, Array | None]:
  """Returns (features float32, labels int64, clean_labels int64|None) or raises DataError."""
  features = check_matrix(name, features)
  if feature_dim is not None and features.shape[1] != feature_dim:
    raise DataError(f"{name}: feature dimension {features.shape[1]} != expected {feature_dim}")

  def as_labels(what: str, values: Any, classes: int | None) -> Array:
    return check_labels(name, values, features.shape[0], classes, what=what, note=note)

  labels = as_labels("labels", labels, num_classes)
  if clean_labels is not None:
    # Clean labels size nothing: the noisy labels (what a head trains on) do.
    clean_labels = as_labels("clean_labels", clean_labels, num_classes or MAX_CLASSES)
  return features, labels, clean_labels


class PickledArrays(ValueError):
  """An .npz holding object arrays (pickled Python objects), which nmjax never unpickles."""

  def __init__(self, names: list[str]):
    self.names = names
    super().__init__(f"holds object arrays ({', '.join(names)}: pickled Python objects), which"
                     " nmjax does not load")


def npz_arrays(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, Array]:
  """{name: array} of an .npz file, local or in a bucket (a cloud file is read whole into memory);
  allow_pickle is np.load's. Raises PickledArrays (a ValueError whose `names` lists them) for
  object arrays unless allow_pickle, else what np.load raises (OSError, ValueError, EOFError,
  zipfile.BadZipFile)."""
  path = os.fspath(path)
  source = io.BytesIO(nmjax_io.read_bytes(path)) if nmjax_io.is_cloud(path) else path
  arrays, pickled = {}, []
  with np.load(source, allow_pickle=allow_pickle) as data:
    for key in data.files:
      try:
        arrays[key] = data[key]
      except ValueError as e:
        if "allow_pickle" not in str(e):
          raise
        pickled.append(key)
  if pickled:
    raise PickledArrays(pickled)
  return arrays


def _special_file(name: str) -> str | None:
  """What a local path is when it is neither a regular file nor a folder (a FIFO, a device, a
  socket), from os.stat alone: opening a FIFO would wait for a writer."""
  try:
    mode = 0 if nmjax_io.is_cloud(name) else os.stat(name).st_mode
  except OSError:
    return None
  kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
           (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
  return next((what for test, what in kinds if test(mode)), None)


def _read_npz(name: str) -> dict[str, Array]:
  """Every array of the .npz file `name`, or a DataError saying what the file is instead."""
  if special := _special_file(name):
    raise DataError(f"features file {name} is {special}, not a features file; pass an .npz file"
                    " written by np.savez(path, features=..., labels=...)")
  if nmjax_io.isdir(name):
    raise DataError(f"features file {name} is a directory, not an .npz file")
  if not nmjax_io.isfile(name):
    raise DataError(f"features file {name} does not exist")
  with nmjax_io.open(name, "rb") as f:
    magic = f.read(6)
  if magic == b"\x93NUMPY":
    raise DataError(f"features file {name} is a single .npy array; a features file is an .npz"
                    " holding `features` (N, D) and `labels` (N,): np.savez(path, features=...,"
                    " labels=...)")
  if not magic.startswith(b"PK"):
    raise DataError(f"features file {name} cannot be read: it is not an .npz file (no zip"
                    " header); write one with np.savez(path, features=..., labels=...) or"
                    " nmjax.features.save")
  try:
    return npz_arrays(name)
  except PickledArrays as e:
    raise DataError(f"features file {name} {e}; save numeric arrays: np.savez(path,"
                    " features=np.asarray(features, np.float32), labels=np.asarray(labels,"
                    " np.int64))") from None
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
    # numpy's own text may advise loading "unsafely" with allow_pickle: never useful here.
    raise DataError(f"features file {name} cannot be read as .npz (truncated or damaged:"
                    f" {type(e).__name__}); write it again") from None


def load(path: str | os.PathLike, *, num_classes: int | None = None,
         feature_dim: int | None = None, note: str = "") -> FeatureSet:
  """Reads and validates a features file (.npz); raises DataError naming the file (num_classes
  and note: as check_labels takes them)."""
  name = os.fspath(path)
  contents = _read_npz(name)
  missing = [k for k in ("features", "labels") if k not in contents]
  if missing:
    raise DataError(f"features file {name} has no {' or '.join(missing)} array (it holds:"
                    f" {', '.join(sorted(contents)) or 'nothing'})")
  features, labels, clean = _check(
      f"features file {name}", contents["features"], contents["labels"],
      contents.get("clean_labels"), num_classes=num_classes, feature_dim=feature_dim, note=note)
  domain = contents.get("domain")
  return FeatureSet(features, labels, clean, None if domain is None else str(domain), name)


def as_feature_set(x: FeaturesLike, *, name: str, num_classes: int | None = None,
                   feature_dim: int | None = None, note: str = "") -> FeatureSet:
  """A FeatureSet from a FeatureSet, a features-file path or a (features, labels) pair, checked:
  the coercion point of the probes and NMTune.

  Args:
    x: the features: a FeatureSet, a features-file path or a (features, labels) pair.
    name: how messages name them (a file is named by its path).
    num_classes: the labels must lie in [0, num_classes); None: they size a head (check_labels).
    feature_dim: the features' required width D (None: any).
    note: appended to a label-range message (check_labels).

  Returns:
    The FeatureSet: float32 (N, D) finite features, int64 (N,) labels.

  Raises:
    DataError: one line naming `name` (or the file) and the problem: features that are not 2-D
      (N, D) real numbers (the shape named), labels that are not 1-D integers of length N or lie
      outside the classes, or an `x` of none of the three forms.
  """
  if isinstance(x, (str, os.PathLike)):
    return load(x, num_classes=num_classes, feature_dim=feature_dim, note=note)
  if isinstance(x, FeatureSet):
    features, labels, clean = _check(x.where(name), x.features, x.labels, x.clean_labels,
                                     num_classes=num_classes, feature_dim=feature_dim, note=note)
    return dataclasses.replace(x, features=features, labels=labels, clean_labels=clean)
  if isinstance(x, (tuple, list)) and len(x) == 2:
    features, labels, _ = _check(name, x[0], x[1], None, num_classes=num_classes,
                                 feature_dim=feature_dim, note=note)
    return FeatureSet(features, labels)
  raise DataError(f"{name}: expected a features file path, a FeatureSet or a (features, labels)"
                  f" pair, got {_describe(x)}")


def _describe(x: Any) -> str:
  """How a message names a value that is not features: its type, and its shape or length."""
  shape = getattr(x, "shape", None)
  if shape is not None:
    return f"{type(x).__name__} of shape {tuple(shape)}"
  if isinstance(x, (tuple, list)):
    return f"{type(x).__name__} of {len(x)} items"
  return type(x).__name__


def save(path: str | os.PathLike, features: Array, labels: Array, *,
         clean_labels: Array | None = None, domain: str | None = None,
         extra: Mapping[str, Any] | None = None) -> str:
  """Writes a features file atomically (nmjax.io.atomic_path: a local file renamed into place,
  a cloud file uploaded whole); returns its path."""
  path = os.fspath(path)
  features, labels, clean_labels = _check(path, features, labels, clean_labels,
                                          num_classes=MAX_CLASSES, feature_dim=None)
  arrays = {"features": features, "labels": labels}
  if clean_labels is not None:
    arrays["clean_labels"] = clean_labels
  if domain is not None:
    arrays["domain"] = np.asarray(domain)
  for key, value in (extra or {}).items():
    arrays[key] = np.asarray(value)
  nmjax_io.makedirs(os.path.dirname(nmjax_io.absolute(path)))
  with nmjax_io.atomic_path(path) as tmp:
    np.savez(tmp, **arrays)
  return path


# apply_fn -> {(inputs, mesh): its jitted step}, one per encoder function, not per split encoded.
_JITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _feature_step(apply_fn: Callable[..., jax.Array], inputs: tuple[str, ...],
                  mesh: jax.sharding.Mesh) -> Callable[..., Any]:
  try:  # A weak reference in the step: a strong one would keep its own key alive for ever.
    steps, fn = _JITTED.setdefault(apply_fn, {}), weakref.ref(apply_fn)
  except TypeError:  # Not weakly referable or not hashable: a step for this call alone.
    steps, fn = {}, lambda: apply_fn
  if (inputs, mesh) not in steps:

    def features_of(variables, batch):
      values = fn()(variables, *(batch[k] for k in inputs)).astype(np.float32)
      return values, batch["label"], batch["mask"]

    replicated = parallel.replicated(mesh)
    steps[inputs, mesh] = jax.jit(features_of, out_shardings=replicated,
                                  in_shardings=(replicated, parallel.data_sharded(mesh)))
  return steps[inputs, mesh]


def extract(apply_fn: Callable[..., jax.Array], variables: Any,
            batches: Iterable[Mapping[str, np.ndarray]], *, mesh: jax.sharding.Mesh | None = None,
            inputs: tuple[str, ...] = ("image",)) -> tuple[Array, Array]:
  """Features and labels of every unmasked example, once each, in batch order.

  The batch is split over the mesh's 'data' axis, the variables are replicated and the result is
  gathered to every process; one batch is copied out while the next computes. The jitted step is
  made once per apply_fn (a function object: define it once, not per call).

  Args:
    apply_fn: apply_fn(variables, *inputs) -> (n, D) features (an encoder in inference mode).
    variables: the encoder's variables.
    batches: this process's slices of the global batches: the inputs, "label" and "mask" (False
      on padding rows), as nmjax.data.pipeline.eval_batches gives them.
    mesh: the device mesh (None: nmjax.parallel.make_mesh(), every device on 'data').
    inputs: the batch arrays apply_fn takes, in order (a text encoder's: token ids and masks).

  Returns:
    (features float32 (N, D), labels int64 (N,)), N the unmasked examples.

  Raises:
    DataError: no batches at all.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from nmjax import features
    >>> apply_fn = lambda w, images: images.reshape(len(images), -1) @ w
    >>> batch = {"image": np.ones((8, 2, 2, 1), np.float32), "label": np.arange(8),
    ...          "mask": np.arange(8) < 5}  # Three padding rows.
    >>> feats, labels = features.extract(apply_fn, jnp.ones((4, 3)), [batch])
    >>> feats.shape, labels.tolist()
    ((5, 3), [0, 1, 2, 3, 4])
  """
  mesh = mesh or parallel.make_mesh()
  replicated = parallel.replicated(mesh)
  jitted = _feature_step(apply_fn, tuple(inputs), mesh)
  variables = jax.device_put(variables, replicated)
  chunks: list[tuple[Array, Array]] = []
  pending = None

  def collect(outputs) -> None:
    features, labels, mask = parallel.to_host(outputs)
    chunks.append((features[mask], labels[mask].astype(np.int64)))

  for batch in batches:
    batch = parallel.host_to_global({k: batch[k] for k in (*inputs, "label", "mask")}, mesh)
    outputs = jitted(variables, batch)
    if pending is not None:  # Copy the previous batch out while this one computes.
      collect(pending)
    pending = outputs
  if pending is not None:
    collect(pending)
  if not chunks:
    raise DataError("extract: no batches (the dataset split is empty)")
  return (np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]))
