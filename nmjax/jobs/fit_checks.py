"""Checks of the NMTune fits a job will run, made before the first of them: what the fit configs
alone decide (in validate), then what needs the train data's sizes (right after they are known).

nmjax.nmtune checks the same rules when a fit starts (nmjax.nmtune.runs.prepare); a job checks
them for every method and grid member first, so that a refusal comes before any method has run
and nothing (no row, no head, no stage) is written by a run that is refused.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import ml_collections
import numpy as np

from nmjax import encoder as encoder_lib, tasks as tasks_lib
from nmjax.clip import zeroshot
from nmjax.data import sources
from nmjax.errors import ConfigError, DataError
from nmjax.nmtune import grid as grid_lib, runs

NMTUNE_METHODS = ("nmtune", "mlp", "lp_aug")  # The methods nmjax.nmtune trains.
MethodConfigs = Mapping[str, ml_collections.ConfigDict]  # method -> its resolved fit config


@dataclasses.dataclass(frozen=True)
class Fields:
  """Where a job's user sets the fit's fields: `prefix` + field (config.batch_size in the nmtune
  job, config.nmtune.batch_size in the study), the grid's field, and fields set elsewhere."""
  prefix: str = "config."
  grid: str = "config.grid"
  renamed: tuple[tuple[str, str], ...] = ()

  def name(self, field: str) -> str:
    """The flag that sets `field` (e.g. config.nmtune.svd_topk)."""
    return dict(self.renamed).get(field, self.grid if field == "grid" else self.prefix + field)

  def value(self, member: ml_collections.ConfigDict, field: str, grid: set[str]) -> str:
    """`field`'s value in a grid member, named where it was set (the grid or the field)."""
    if field in grid:
      return f"{self.grid} value {field}={member[field]}"
    return f"{self.name(field)}={member[field]}"

  def rename(self, message: str) -> str:
    """A message of a job that names its fields config.FIELD, with this job's names."""
    return re.sub(r"\bconfig\.(\w+)", lambda m: self.name(m.group(1)), message)


JOB_FIELDS = Fields()  # The nmtune job's own config.


def _members(config: ml_collections.ConfigDict) -> tuple[set[str], list[ml_collections.ConfigDict]]:
  """(the grid's fields, every member the fit trains: the grid's points, or the config)."""
  grid = {field for field, _ in grid_lib.parse_grid(config.grid)}
  return grid, grid_lib.point_configs(config) or [config]


def check_templates(name: str) -> None:
  """Fails with one line (config.zeroshot_templates) unless `name` is a zero-shot prompt set
  (nmjax.clip.zeroshot)."""
  zeroshot.templates_named(name)


def check_batches(configs: MethodConfigs, *, two_view: bool, fields: Fields = JOB_FIELDS) -> None:
  """What the configs alone decide, for every method and grid member: rows per step even with
  two views per image, and svd_topk at most the rows of a step.

  Raises:
    ConfigError: one line naming the field (or the grid value) and the allowed values.
  """
  for config in configs.values():
    grid, members = _members(config)
    for member in members:
      rows = member.batch_size
      if two_view and rows % 2:
        raise ConfigError(f"{fields.value(member, 'batch_size', grid)} must be even with two"
                          " augmented views per image (it counts rows: 2 views x batch_size / 2"
                          " images)")
      if member.svd_topk > rows:
        raise ConfigError(f"{fields.value(member, 'svd_topk', grid)} is not allowed; allowed:"
                          f" 1 <= svd_topk <= batch_size = {rows} (NMTune's loss takes the top"
                          f" svd_topk singular values of each step's {rows} rows)")


def check_data(configs: MethodConfigs, labels: np.ndarray, feature_dim: int, *, two_view: bool,
               where: str, fields: Fields = JOB_FIELDS) -> None:
  """What the train data's sizes decide, for every method and grid member: at least 2 classes,
  a step's examples within the train set (less its validation split), svd_topk at most D.

  Args:
    configs: each NMTune method's resolved fit config (num_classes set where known).
    labels: the train labels the fits will read, (N,).
    feature_dim: D, the width of the features.
    two_view: whether the fits train on augmented views (a step: batch_size / 2 images).
    where: the train data, as messages name it.
    fields: where the user sets the fields.

  Raises:
    ConfigError, DataError: one line naming the data and the field.
  """
  for config in configs.values():
    grid, members = _members(config)
    for member in members:
      if (member.num_classes or int(labels.max(initial=0)) + 1) < 2:
        raise DataError(f"{where}: every label is 0; a classifier needs at least 2 classes")
      rows = member.batch_size
      images = rows // 2 if two_view else rows
      try:
        examples, held = runs.validation_split(labels, member.val_fraction, member.seed,
                                               name=where)
      except DataError as e:
        raise DataError(fields.rename(str(e))) from None
      if images > len(examples):
        after = (f" after the validation split ({len(held)} held out,"
                 f" {fields.value(member, 'val_fraction', grid)})" if len(held) else "")
        raise DataError(f"{where}: {fields.value(member, 'batch_size', grid)} needs {images}"
                        f" train examples per step but the train set has {len(examples)}{after};"
                        f" lower {fields.name('batch_size')}")
      if member.svd_topk > min(rows, feature_dim):
        raise ConfigError(f"{fields.value(member, 'svd_topk', grid)} is not allowed; allowed:"
                          f" 1 <= svd_topk <= min(batch_size, D) = {min(rows, feature_dim)}"
                          f" (D = {feature_dim}, the feature dimension of {where})")


def split_labels(split: tasks_lib.Split, *, data_dir: str, max_examples: int) -> np.ndarray:
  """The labels of the rows an encoder's feature cache holds for `split` (nmjax.encoder: its part,
  at most max_examples spread evenly), read without encoding an image."""
  labels = np.asarray(sources.get_source(split.dataset, data_dir=data_dir or None)
                      .labels(split.split))
  if split.part is not None:
    labels = labels[tasks_lib.part_indices(labels, split.part)]
  rows = encoder_lib.evenly_spaced(np.arange(len(labels)), max_examples)
  return labels[np.fromiter(rows, np.int64, len(rows))]


def train_splits(tasks: list[tasks_lib.Task]) -> dict[tasks_lib.Split, str]:
  """{train split: how messages name it} of the tasks, each split once (one fit serves all the
  tasks that train on it)."""
  users: dict[tasks_lib.Split, list[str]] = {}
  for task in tasks:
    users.setdefault(task.train, []).append(task.name)
  return {split: f"train split {split} (task {', '.join(names)})"
          for split, names in users.items()}
