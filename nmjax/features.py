"""Frozen-encoder features: jitted extraction over a device mesh, and features files.

A features file is an .npz holding

    features      float32 (N, D)
    labels        int64 (N,)
    clean_labels  int64 (N,)   optional (labels before any noise)
    domain        str          optional (where the examples come from, e.g. "mnist/test")

from any source, a black-box API included: the probes and NMTune read these. `load` and
`as_feature_set` refuse a file (or array pair) with a non-finite value, a wrong dimension or labels
outside [0, C) with one line naming the file and the problem.

`extract` runs an encoder in inference mode over padded, masked batches (nmjax.data.pipeline's
eval_batches) and returns the features of every example exactly once, in batch order, on any mesh.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from nmjax import parallel
from nmjax import report
from nmjax.errors import DataError

Array = np.ndarray
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
                 what: str = "labels") -> Array:
  """`values` as int64 (num_examples,) class indices in [0, num_classes) (in [0, C) when None),
  or a DataError naming `name`. Shared by features files and NMTune's train views."""
  values = np.asarray(values)
  if values.shape != (num_examples,):
    raise DataError(f"{name}: {what} must have shape ({num_examples},) to match the"
                    f" features, got {values.shape}")
  if not np.issubdtype(values.dtype, np.integer):
    if not (np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values))):
      raise DataError(f"{name}: {what} must be integers, got dtype {values.dtype}")
  values = values.astype(np.int64)
  if values.min() < 0 or (num_classes is not None and values.max() >= num_classes):
    bound = f"[0, {num_classes})" if num_classes is not None else "[0, C)"
    raise DataError(f"{name}: {what} outside {bound}: min {values.min()}, max {values.max()}")
  return values


def _check(name: str, features: Any, labels: Any, clean_labels: Any, *,
           num_classes: int | None, feature_dim: int | None) -> tuple[Array, Array, Array | None]:
  """Returns (features float32, labels int64, clean_labels int64|None) or raises DataError."""
  features = check_matrix(name, features)
  if feature_dim is not None and features.shape[1] != feature_dim:
    raise DataError(f"{name}: feature dimension {features.shape[1]} != expected {feature_dim}")

  def as_labels(what: str, values: Any) -> Array:
    return check_labels(name, values, features.shape[0], num_classes, what=what)

  labels = as_labels("labels", labels)
  if clean_labels is not None:
    clean_labels = as_labels("clean_labels", clean_labels)
  return features, labels, clean_labels


def load(path: str | os.PathLike, *, num_classes: int | None = None,
         feature_dim: int | None = None) -> FeatureSet:
  """Reads and validates a features file (.npz); raises DataError naming the file."""
  name = os.fspath(path)
  if not os.path.isfile(name):
    raise DataError(f"features file {name} does not exist")
  try:
    with np.load(name, allow_pickle=False) as data:
      contents = {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise DataError(f"features file {name} cannot be read as .npz ({e})") from None
  missing = [k for k in ("features", "labels") if k not in contents]
  if missing:
    raise DataError(f"features file {name} has no {' or '.join(missing)} array (it holds:"
                    f" {', '.join(sorted(contents)) or 'nothing'})")
  features, labels, clean = _check(
      f"features file {name}", contents["features"], contents["labels"],
      contents.get("clean_labels"), num_classes=num_classes, feature_dim=feature_dim)
  domain = contents.get("domain")
  return FeatureSet(features, labels, clean, None if domain is None else str(domain), name)


def as_feature_set(x: FeaturesLike, *, name: str, num_classes: int | None = None,
                   feature_dim: int | None = None) -> FeatureSet:
  """A FeatureSet from a FeatureSet, a features-file path or a (features, labels) pair."""
  if isinstance(x, (str, os.PathLike)):
    return load(x, num_classes=num_classes, feature_dim=feature_dim)
  if isinstance(x, FeatureSet):
    where = f"features file {x.path}" if x.path else name
    features, labels, clean = _check(where, x.features, x.labels, x.clean_labels,
                                     num_classes=num_classes, feature_dim=feature_dim)
    return dataclasses.replace(x, features=features, labels=labels, clean_labels=clean)
  if isinstance(x, (tuple, list)) and len(x) == 2:
    features, labels, _ = _check(name, x[0], x[1], None, num_classes=num_classes,
                                 feature_dim=feature_dim)
    return FeatureSet(features, labels)
  raise DataError(f"{name}: expected a features file path, a FeatureSet or a (features, labels)"
                  f" pair, got {type(x).__name__}")


def save(path: str | os.PathLike, features: Array, labels: Array, *,
         clean_labels: Array | None = None, domain: str | None = None,
         extra: Mapping[str, Any] | None = None) -> str:
  """Writes a features file atomically (temporary name, then rename); returns its path."""
  path = os.fspath(path)
  features, labels, clean_labels = _check(path, features, labels, clean_labels,
                                          num_classes=None, feature_dim=None)
  arrays = {"features": features, "labels": labels}
  if clean_labels is not None:
    arrays["clean_labels"] = clean_labels
  if domain is not None:
    arrays["domain"] = np.asarray(domain)
  for key, value in (extra or {}).items():
    arrays[key] = np.asarray(value)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with report.atomic_path(path) as tmp:
    np.savez(tmp, **arrays)
  return path


def extract(apply_fn: Callable[[Any, jax.Array], jax.Array], variables: Any,
            batches: Iterable[Mapping[str, np.ndarray]], *,
            mesh: jax.sharding.Mesh | None = None) -> tuple[Array, Array]:
  """Features and labels of every unmasked example, once each, in batch order.

  apply_fn(variables, images) -> (n, D) features, e.g. a frozen encoder in inference mode
  (BatchNorm running statistics). batches: this process's slices of the global batches, dicts
  with "image", "label" and "mask" (padding rows have mask False), as from
  nmjax.data.pipeline.eval_batches. The batch is split over the mesh's 'data' axis and the
  variables are replicated; the result is gathered so every process gets all features.
  Returns (features float32 (N, D), labels int64 (N,)).
  """
  mesh = mesh or parallel.make_mesh()
  replicated = parallel.replicated(mesh)

  def features_of(variables, batch):
    return apply_fn(variables, batch["image"]).astype(np.float32), batch["label"], batch["mask"]

  jitted = jax.jit(features_of, in_shardings=(replicated, parallel.data_sharded(mesh)),
                   out_shardings=replicated)
  variables = jax.device_put(variables, replicated)
  chunks: list[tuple[Array, Array]] = []
  pending = None

  def collect(outputs) -> None:
    features, labels, mask = parallel.to_host(outputs)
    chunks.append((features[mask], labels[mask].astype(np.int64)))

  for batch in batches:
    batch = parallel.host_to_global(
        {k: batch[k] for k in ("image", "label", "mask")}, mesh)
    outputs = jitted(variables, batch)
    if pending is not None:  # Copy the previous batch out while this one computes.
      collect(pending)
    pending = outputs
  if pending is not None:
    collect(pending)
  if not chunks:
    raise DataError("extract: no batches (the dataset split is empty)")
  return (np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]))
