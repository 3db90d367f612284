"""Fitted heads: what a probe, NMTune or zero-shot fit leaves behind, to keep, apply and ship.

Every method of the evaluation path returns, beside its metrics, result["head"]: a Head holding
the fitted variables (a pytree of arrays), the plain config that rebuilds its apply function, and
the label set (logits column j is class labels[j]).

    kind      methods               variables
    linear    lp, ridge, lp_aug     {"kernel": (D, C), "bias": (C,)}
    nmtune    nmtune, mlp           {"params": ..., "batch_stats": ...} of nmjax.nmtune.NMTuneHead
    zeroshot  zeroshot              {"weights": (C, E)} unit class embeddings (cosine logits)

On disk (Head.save, load): directory/head.json (format_version, kind, method, config, labels and
the variables' shapes and dtypes) and directory/variables.npz (one array per leaf, keyed by its
'/'-joined path in the pytree), each written atomically; a reloaded head predicts bitwise as the
saved one. export writes a serialized jax.export program (features -> logits, or images -> logits
with an encoder) with a symbolic batch dimension, which runs without nmjax:

    exported = jax.export.deserialize(open(path, "rb").read())
    logits = exported.call(features)

Examples:
    >>> import numpy as np, tempfile
    >>> from nmjax import heads, probe
    >>> x, y = np.eye(3, dtype=np.float32).repeat(4, axis=0), np.arange(12) // 4
    >>> head = probe.ridge_probe((x, y), (x, y))["head"]
    >>> directory = tempfile.mkdtemp()
    >>> head.save(directory)
    >>> bool((heads.load(directory).predict(x) == head.predict(x)).all())
    True
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import io as nmjax_io
from nmjax.errors import ConfigError, DataError
from nmjax.features import npz_arrays
from nmjax.io import atomic_path

__all__ = ["Encoding", "Head", "export", "load", "predict_features", "predicted_labels"]

FORMAT_VERSION = 1
KINDS = {"lp": "linear", "ridge": "linear", "lp_aug": "linear", "mlp": "nmtune",
         "nmtune": "nmtune", "zeroshot": "zeroshot"}
HEAD_FILE = "head.json"
VARIABLES_FILE = "variables.npz"
EVAL_CHUNK = 4096  # Rows per call of an NMTune head (as nmjax.nmtune.programs evaluates).


@jax.jit
def _linear_logits(variables: Mapping[str, jax.Array], features: jax.Array) -> jax.Array:
  """features @ kernel + bias (the probes' head_logits)."""
  return features.astype(jnp.float32) @ variables["kernel"] + variables["bias"]


@jax.jit
def _zeroshot_logits(variables: Mapping[str, jax.Array], features: jax.Array) -> jax.Array:
  """Cosine of each L2-normalized feature row with the unit class embeddings."""
  features = features.astype(jnp.float32)
  norms = jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
  return (features / norms) @ variables["weights"].T


def _nmtune_module(config: Mapping[str, Any]) -> Any:
  """The NMTuneHead that applies a head of kind nmtune (the residual scale is a variable)."""
  from nmjax.nmtune.head import NMTuneHead  # pylint: disable=g-import-not-at-top
  return NMTuneHead(num_classes=int(config["num_classes"]), mlp_ratio=float(config["mlp_ratio"]),
                    mlp_layers=int(config["mlp_layers"]), residual_scale_init=1.0)


def _nmtune_outputs(head: Head, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(logits, z) over every row in chunks of one shape, as NMTune's evaluation computes them."""
  from nmjax.nmtune.programs import predict_all  # pylint: disable=g-import-not-at-top
  variables = head.variables
  return predict_all(_nmtune_module(head.config), variables["params"],
                     variables.get("batch_stats", {}), features)


@dataclasses.dataclass(frozen=True, eq=False)
class Head:
  """A fitted head: its variables, the config that rebuilds its apply function, its labels.

  Attributes:
    kind: "linear" (lp, ridge, lp_aug), "nmtune" (nmtune, mlp) or "zeroshot".
    method: the method that fitted it (KINDS' keys).
    variables: the fitted arrays, a pytree of nested dicts (module docstring).
    config: plain values: feature_dim, num_classes, logit_subset (None or class indices the
      reported accuracy was scored over) and, for kind nmtune, mlp_ratio and mlp_layers.
    labels: the label set: logits column j is class labels[j].
  """
  kind: str
  method: str
  variables: Any
  config: dict[str, Any]
  labels: tuple[int, ...]

  def logits_fn(self) -> Callable[[jax.Array], jax.Array]:
    """The head's apply function with its variables bound (what export serializes).

    Returns:
      A pure, traceable function features (N, D) -> logits (N, C) float32.
    """
    variables = self.variables
    if self.kind == "linear":
      return functools.partial(_linear_logits, variables)
    if self.kind == "zeroshot":
      return functools.partial(_zeroshot_logits, variables)
    module = _nmtune_module(self.config)
    return lambda features: module.apply(variables, features.astype(jnp.float32), train=False)[0]

  def predict(self, features: Any) -> np.ndarray:
    """The head's logits.

    Args:
      features: (N, D) float32 features of the encoder the head was fitted on.

    Returns:
      (N, C) float32 logits (column j: class labels[j]; no logit_subset masking).

    Raises:
      DataError: features that are not (N, D) with the head's D.
    """
    features = self._checked(features)
    if self.kind == "nmtune":
      return _nmtune_outputs(self, features)[0]
    apply = _linear_logits if self.kind == "linear" else _zeroshot_logits
    return np.asarray(apply(self.variables, jnp.asarray(features)))

  def transform(self, features: Any) -> np.ndarray:
    """The repaired features z of an NMTune (or mlp) head: z = scale * MLP(f) + f.

    Args:
      features: (N, D) float32 features.

    Returns:
      (N, D) float32 repaired features.

    Raises:
      ConfigError: a head of another kind (it has no feature transform).
      DataError: features that are not (N, D) with the head's D.
    """
    if self.kind != "nmtune":
      raise ConfigError(f"head.transform: a {self.method!r} head has no feature transform; only"
                        " nmtune and mlp heads repair features")
    return _nmtune_outputs(self, self._checked(features))[1]

  def save(self, directory: str | os.PathLike) -> None:
    """Writes directory/head.json and directory/variables.npz, each atomically.

    Args:
      directory: the folder (made if missing), local or in a bucket (gs://...).

    Raises:
      OSError: the folder or a file could not be written.
    """
    directory = os.fspath(directory)
    nmjax_io.makedirs(directory)
    flat = _flatten(self.variables)
    header = {"format_version": FORMAT_VERSION, "kind": self.kind, "method": self.method,
              "config": self.config, "labels": list(self.labels),
              "shapes": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                         for k, v in flat.items()}}
    with atomic_path(nmjax_io.join(directory, VARIABLES_FILE)) as tmp, open(tmp, "wb") as f:
      np.savez(f, **flat)
    with atomic_path(nmjax_io.join(directory, HEAD_FILE)) as tmp, open(tmp, "w") as f:
      json.dump(header, f, indent=1, sort_keys=True)

  def _checked(self, features: Any) -> np.ndarray:
    features = np.asarray(features)
    dim = self.config["feature_dim"]
    if features.ndim != 2 or features.shape[1] != dim:
      raise DataError(f"head.predict: features must be (N, {dim}), got shape {features.shape}")
    return features.astype(np.float32, copy=False)


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """{'a/b/c': leaf} of a pytree of nested dicts, leaves as host numpy arrays."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, path + "/"))
    else:
      flat[path] = np.asarray(value)
  return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def make_head(method: str, variables: Any, config: Mapping[str, Any],
              num_classes: int) -> Head:
  """A Head of `method` with its variables moved to the host (exact copies) and labels 0..C-1.

  Args:
    method: a KINDS key.
    variables: the fitted pytree (module docstring's layout for the method's kind).
    config: plain values (Head.config); feature_dim and num_classes are filled in.
    num_classes: C.

  Returns:
    The Head.

  Raises:
    ConfigError: an unknown method.
  """
  if method not in KINDS:
    raise ConfigError(f"heads: method {method!r} is not allowed; allowed: {sorted(KINDS)}")
  host = jax.tree.map(np.asarray, variables)
  config = {**config, "num_classes": int(num_classes)}
  subset = config["logit_subset"]
  config["logit_subset"] = None if subset is None else [int(c) for c in subset]
  return Head(KINDS[method], method, host, config, tuple(range(int(num_classes))))


def load(directory: str | os.PathLike) -> Head:
  """The Head saved in `directory` by Head.save.

  Args:
    directory: the folder holding head.json and variables.npz, local or in a bucket.

  Returns:
    The Head; its predictions equal the saved head's bitwise.

  Raises:
    DataError: a missing or unreadable file, an unknown format version or kind, or variables that
      do not match the header's shapes.
  """
  directory = os.fspath(directory)
  try:
    header = json.loads(nmjax_io.read_text(nmjax_io.join(directory, HEAD_FILE)))
    flat = npz_arrays(nmjax_io.join(directory, VARIABLES_FILE))
  except (OSError, ValueError) as e:
    raise DataError(f"heads.load: {directory}: cannot read a saved head ({e})") from None
  if header["format_version"] != FORMAT_VERSION or header["kind"] not in KINDS.values():
    raise DataError(f"heads.load: {directory}: format {header['format_version']} kind"
                    f" {header['kind']!r} is not one this nmjax reads")
  shapes = {k: (list(v.shape), str(v.dtype)) for k, v in flat.items()}
  if shapes != {k: (v["shape"], v["dtype"]) for k, v in header["shapes"].items()}:
    raise DataError(f"heads.load: {directory}: variables.npz does not match head.json's shapes")
  return Head(header["kind"], header["method"], _unflatten(flat), header["config"],
              tuple(int(c) for c in header["labels"]))


def predict_features(head: Head, features: Any) -> np.ndarray:
  """The library's apply call: head.predict(features).

  Args:
    head: a fitted Head.
    features: (N, D) float32 features of the encoder the head was fitted on.

  Returns:
    (N, C) float32 logits.

  Raises:
    DataError: features that are not (N, D) with the head's D.
  """
  return head.predict(features)


def predicted_labels(head: Head, features: Any) -> np.ndarray:
  """Each row's predicted label: the argmax of the logits over config logit_subset's columns (all
  of them when None), mapped through head.labels. Scores as the fit's reported accuracy.

  Args:
    head: a fitted Head.
    features: (N, D) float32 features.

  Returns:
    (N,) int64 labels.

  Raises:
    DataError: features that are not (N, D) with the head's D.
  """
  logits = head.predict(features)
  subset = head.config["logit_subset"]
  if subset is not None:
    mask = np.full(logits.shape[-1], -np.inf, np.float32)
    mask[np.asarray(subset, np.int64)] = 0.0
    logits = logits + mask
  return np.asarray(head.labels, np.int64)[np.argmax(logits, axis=-1)]


class Encoding(NamedTuple):
  """An encoder for export: apply(variables, images) -> features (N, D), the variables, and the
  per-example input shape and dtype (e.g. (32, 32, 3), uint8)."""
  apply: Callable[[Any, jax.Array], jax.Array]
  variables: Any
  input_shape: Sequence[int]
  dtype: Any = np.float32


def export(head: Head, path: str | os.PathLike, *, encoder: Encoding | None = None) -> None:
  """Writes the serialized jax.export program of the head, with a symbolic batch dimension.

  Args:
    head: the fitted head.
    path: the file to write (atomically; local or in a bucket): jax.export.serialize's bytes.
    encoder: None: the program maps features (b, D) float32 -> logits (b, C); an Encoding: images
      (b, *input_shape) -> logits (the encoder and the head as one classifier).

  Raises:
    OSError: the file could not be written.
  """
  logits_fn = head.logits_fn()
  if encoder is None:
    fn = logits_fn
    shape = jax.export.symbolic_shape(f"b, {head.config['feature_dim']}")
    dtype = np.float32
  else:
    def fn(images):
      return logits_fn(encoder.apply(encoder.variables, images))
    dims = ", ".join(str(int(d)) for d in encoder.input_shape)
    shape, dtype = jax.export.symbolic_shape(f"b, {dims}"), encoder.dtype
  exported = jax.export.export(jax.jit(fn))(jax.ShapeDtypeStruct(shape, dtype))
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(exported.serialize())


def from_nmtune(method: str, model: Any, feature_dim: int, params: Any, batch_stats: Any,
                logit_subset: Any) -> Any:
  """The nmjax.heads.Head of a trained NMTune, mlp or lp_aug head.

  Args:
    method: "nmtune", "mlp" or "lp_aug" (its linear classifier alone: a head of kind linear).
    model: the trained module (its num_classes, mlp_ratio and mlp_layers).
    feature_dim: D.
    params: the trained parameters.
    batch_stats: BatchNorm's running statistics ({} without an MLP).
    logit_subset: None or the class indices the test accuracy was scored over.

  Returns:
    The Head (variables copied to the host).
  """
  config = {"feature_dim": int(feature_dim), "logit_subset": logit_subset}
  if method == "lp_aug":
    return make_head(method, params["head"], config, model.num_classes)
  config.update(mlp_ratio=float(model.mlp_ratio), mlp_layers=int(model.mlp_layers))
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  return make_head(method, variables, config, model.num_classes)
