"""Name maps from PyTorch state dicts to nmjax variables, and the one checked assignment.

A layout (nmjax.convert.layouts) lists, for every PyTorch name it expects, the nmjax variables it
fills and how: `{torch name: [(path, convert), ...]}`, where a path is a tuple of keys into the
variables (`("params", "stem_conv", "kernel")`) and `convert` turns the PyTorch array into the
nmjax one. One name may fill several variables (a fused q/k/v projection fills query, key and
value). `assign` checks the file's names against the layout and each converted array against the
model's own shapes, and refuses the file with one line listing every missing, unexpected and
mis-shaped name; it never fills in or drops a weight silently.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from nmjax.errors import DataError

Path = tuple[str, ...]
Convert = Callable[[np.ndarray], np.ndarray]
Layout = dict[str, list[tuple[Path, Convert]]]
# PyTorch buffers that nmjax has no use for: BatchNorm's step counter.
IGNORED_SUFFIXES = (".num_batches_tracked",)


def same(array: np.ndarray) -> np.ndarray:
  """Unchanged (biases, LayerNorm and BatchNorm vectors, tokens, position tables)."""
  return array


def conv_kernel(array: np.ndarray) -> np.ndarray:
  """PyTorch's Conv2d weight (O, I, kh, kw) -> Flax's Conv kernel (kh, kw, I, O)."""
  return np.transpose(array, (2, 3, 1, 0))


def dense_kernel(array: np.ndarray) -> np.ndarray:
  """PyTorch's Linear weight (out, in) -> Flax's Dense kernel (in, out)."""
  return np.transpose(array)


def rows(start: int, stop: int, then: Convert = same) -> Convert:
  """Rows start:stop of the first axis (one of q/k/v of a fused projection), then `then`."""
  return lambda array: then(array[start:stop])


def heads_in(num_heads: int) -> Convert:
  """A q/k/v Linear weight (width, in) -> Flax attention kernel (in, heads, head_dim); a bias
  (width,) -> (heads, head_dim). PyTorch lays the heads out head-major along `width`."""
  def convert(array: np.ndarray) -> np.ndarray:
    if array.ndim == 1:
      return array.reshape(num_heads, -1)
    return array.T.reshape(array.shape[1], num_heads, -1)
  return convert


def heads_out(num_heads: int) -> Convert:
  """The attention output Linear weight (out, width) -> Flax kernel (heads, head_dim, out)."""
  return lambda array: array.T.reshape(num_heads, -1, array.shape[0])


def batch_norm(torch_name: str, flax_name: Path) -> Layout:
  """A BatchNorm2d's weight, bias and running statistics -> Flax's scale, bias, mean, var."""
  return {f"{torch_name}.weight": [(("params", *flax_name, "scale"), same)],
          f"{torch_name}.bias": [(("params", *flax_name, "bias"), same)],
          f"{torch_name}.running_mean": [(("batch_stats", *flax_name, "mean"), same)],
          f"{torch_name}.running_var": [(("batch_stats", *flax_name, "var"), same)]}


def layer_norm(torch_name: str, flax_name: Path) -> Layout:
  """A LayerNorm's weight and bias -> Flax's scale and bias."""
  return {f"{torch_name}.weight": [(("params", *flax_name, "scale"), same)],
          f"{torch_name}.bias": [(("params", *flax_name, "bias"), same)]}


def linear(torch_name: str, flax_name: Path, *, bias: bool = True) -> Layout:
  """A Linear -> a Flax Dense."""
  layout = {f"{torch_name}.weight": [(("params", *flax_name, "kernel"), dense_kernel)]}
  if bias:
    layout[f"{torch_name}.bias"] = [(("params", *flax_name, "bias"), same)]
  return layout


def conv(torch_name: str, flax_name: Path, *, bias: bool = False) -> Layout:
  """A Conv2d -> a Flax Conv."""
  layout = {f"{torch_name}.weight": [(("params", *flax_name, "kernel"), conv_kernel)]}
  if bias:
    layout[f"{torch_name}.bias"] = [(("params", *flax_name, "bias"), same)]
  return layout


def flatten(tree: Any, prefix: Path = ()) -> dict[Path, Any]:
  """{path: leaf} of a nested dict (leaves: arrays or ShapeDtypeStructs)."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    out: dict[Path, Any] = {}
    for key, value in tree.items():
      out.update(flatten(value, (*prefix, str(key))))
    return out
  return {prefix: tree}


def unflatten(leaves: dict[Path, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, leaf in leaves.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


def _shape(array: Any) -> str:
  return "x".join(map(str, array.shape)) or "scalar"


def _listed(items: list[str], limit: int | None) -> str:
  """The names, or the first `limit` of them and how many more."""
  if limit is None or len(items) <= limit:
    return ", ".join(items)
  return f"{', '.join(items[:limit])} and {len(items) - limit} more"


def assign(tensors: dict[str, np.ndarray], layout: Layout, template: Any, *,
           what: str, limit: int | None = None) -> dict[str, Any]:
  """The model's variables (the nested dicts of `template`, an abstract or real variable tree)
  filled from `tensors` by `layout`, as float32 numpy arrays.

  Raises DataError with one line naming `what` (the file and layout) and listing the missing
  names (the layout's, not in the file), the unexpected ones (the file's, not in the layout) and
  the mis-shaped ones (with the file's shape and the one the model needs), each with its count;
  `limit`: at most that many names of each kind (None: all).
  """
  expected = flatten(template)
  names = {n for n in tensors if not n.endswith(IGNORED_SUFFIXES)}
  missing = sorted(set(layout) - names)
  unexpected = sorted(names - set(layout))
  misshaped, filled = [], {}
  for name in sorted(set(layout) & names):
    for path, convert in layout[name]:
      value = None
      try:
        value = np.asarray(convert(tensors[name]), np.float32)
      except ValueError:  # A reshape that cannot be done: the tensor is the wrong size.
        pass
      target = expected.get(path)
      if target is None:
        raise AssertionError(f"layout of {what} names {'/'.join(path)}, which the model lacks")
      if value is None or tuple(value.shape) != tuple(target.shape):
        misshaped.append(f"{name} ({_shape(tensors[name])}; the model needs"
                         f" {_shape(target)} for {'/'.join(path)})")
        break
      filled[path] = value
  if missing or unexpected or misshaped:
    parts = [f"{label} {len(items)}: {_listed(items, limit)}" for label, items in (
        ("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
    raise DataError(f"{what}: the names do not match; " + "; ".join(parts))
  unfilled = sorted("/".join(p) for p in set(expected) - set(filled))
  if unfilled:
    raise AssertionError(f"layout of {what} leaves {', '.join(unfilled)} unfilled")
  return unflatten(filled)
