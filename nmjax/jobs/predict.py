"""The predict job, configs/predict.py: a saved head (nmjax.heads) applied to a features file, or
to a task's test images through the encoder it was fitted on; writes predictions.jsonl (or
predictions.npz) with each example's id (its row index) and predicted class, and predict.json
with the accuracy when labels are present (nmjax.heads.predicted_labels does the work)."""

from __future__ import annotations

import dataclasses
import time
import zipfile
from typing import Any

import ml_collections
import numpy as np

from nmjax import encoder as encoder_lib, features as features_lib, heads, tasks as tasks_lib
from nmjax import io as nmjax_io
from nmjax.config import check_choice, check_range
from nmjax.errors import ConfigError, DataError
from nmjax.jobs import plans
from nmjax.jobs.workdir import prepare_workdir, single_process
from nmjax.progress import format_seconds

NAME = "predict"
"""The job's name: config.job's value and its key in nmjax.jobs.JOBS."""
MODES = ("features", "checkpoint")  # a features file | a task's images through an encoder
OUTPUTS = ("jsonl", "npz")


@dataclasses.dataclass(frozen=True)
class PredictPlan:
  """A prediction run, resolved (configs/predict.py).

  Attributes:
    head: the saved head's folder (head.json + variables.npz).
    mode: MODES: "features" reads `features`; "checkpoint" encodes `task`'s test split(s) with
      the encoder of `checkpoint` (at `step`).
    output: OUTPUTS: predictions.jsonl or predictions.npz.
  The other fields are the config's, one for one.
  """
  head: str
  mode: str
  features: str = ""
  checkpoint: str = ""
  step: int = -1
  task: str = ""
  data_dir: str = ""
  output: str = "jsonl"
  batch_size: int = 512             # feature extraction (global)
  max_examples: int = -1            # > 0: at most this many examples per split


def _check_head(config: ml_collections.ConfigDict) -> None:
  """config.head names a folder holding a saved head."""
  if not config.head:
    raise ConfigError("config.head is empty; pass --config.head=DIR, a saved head's folder (a"
                      " job's WORKDIR/heads/<task>/<method>/ or head.save's directory)")
  if not nmjax_io.isfile(nmjax_io.join(config.head, heads.HEAD_FILE)):
    what = ("does not exist" if not nmjax_io.exists(config.head)
            else f"has no {heads.HEAD_FILE}")
    raise ConfigError(f"config.head={config.head}: {what}; pass a saved head's folder (a job's"
                      " WORKDIR/heads/<task>/<method>/ or head.save's directory)")


def _check_mode(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """Features file or checkpoint + task: the mode and the task's registry name ("" for files)."""
  if config.features and config.checkpoint:
    raise ConfigError("pass either config.features (a features file) or config.checkpoint with"
                      " config.task, not both")
  if config.features:
    if not nmjax_io.isfile(config.features):
      raise ConfigError(f"config.features={config.features}: no such file; pass a features file"
                        " (.npz: features (N, D), labels (N,) optional)")
    return "features", ""
  if not config.checkpoint:
    raise ConfigError("nothing to predict: pass --config.features=FILE.npz, or"
                      " --config.checkpoint=PRETRAIN_DIR with --config.task=NAME")
  if not config.task:
    raise ConfigError("config.task is empty; with config.checkpoint, name the task whose test"
                      " split is predicted (e.g. --config.task=digits)")
  names = tasks_lib.names(config.task)
  if len(names) != 1:
    raise ConfigError(f"config.task={config.task!r} names {len(names)} tasks; pass one")
  check_range(config, "batch_size", low=1, integer=True)
  check_range(config, "max_examples", integer=True)
  check_range(config, "step", integer=True)
  return "checkpoint", names[0]


def validate(config: ml_collections.ConfigDict) -> PredictPlan:
  """Checks every field of a predict config once, before any work.

  Args:
    config: a complete predict config (configs/predict.py).

  Returns:
    The run's PredictPlan.

  Raises:
    ConfigError: with one line naming the field and what it should be.
  """
  _check_head(config)
  mode, task = _check_mode(config)
  check_choice(config, "output", OUTPUTS)
  return plans.from_config(PredictPlan, config, job=NAME, mode=mode, task=task)


lock_index = single_process  # One process: lock file 0.


def read_features(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """A features file's features (N, D) float32 and its labels (N,) int64, or None without them.

  Args:
    path: an .npz file holding `features` and, optionally, `labels`.

  Returns:
    (features, labels or None).

  Raises:
    DataError: a file that cannot be read or holds no valid features (one line, naming it).
  """
  name = f"features file {path}"
  try:
    contents = features_lib.npz_arrays(path)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f"{name} cannot be read as .npz ({type(e).__name__}); write it with"
                    " np.savez(path, features=..., labels=...)") from None
  if "features" not in contents:
    raise DataError(f"{name} has no features array (it holds:"
                    f" {', '.join(sorted(contents)) or 'nothing'})")
  features = features_lib.check_matrix(name, contents["features"])
  if "labels" not in contents:
    return features, None
  return features, features_lib.check_labels(name, contents["labels"], len(features),
                                             features_lib.MAX_CLASSES)


def _inputs(plan: PredictPlan, workdir: str) -> tuple[np.ndarray, np.ndarray | None, str]:
  """The features to predict, their labels (None when unknown) and where they come from."""
  if plan.mode == "features":
    features, labels = read_features(plan.features)
    return features, labels, nmjax_io.absolute(plan.features)
  cache = encoder_lib.open_cache(plan.checkpoint, workdir, step=plan.step,
                                 batch_size=plan.batch_size, batch_field="batch_size",
                                 max_examples=plan.max_examples, data_dir=plan.data_dir)
  (task,) = tasks_lib.resolve(plan.task)
  test, _ = cache.test_set(task)
  print(f"[predict] {cache.encoder.describe()}: task {task.name}, test {test.domain}",
        flush=True)
  return (test.features, test.labels,
          f"{nmjax_io.absolute(plan.checkpoint)}:{task.name}:{test.domain}")


def _check_dim(plan: PredictPlan, head: heads.Head, features: np.ndarray, source: str) -> None:
  """A one-line ConfigError when the features are not the head's D."""
  dim = int(head.config["feature_dim"])
  if features.shape[1] != dim:
    raise ConfigError(f"config.head={plan.head} was fitted on {dim}-dimensional features;"
                      f" {source} has {features.shape[1]}: pass the features (or the encoder)"
                      " the head was fitted on")


def _write(plan: PredictPlan, workdir: str, predicted: np.ndarray, labels: np.ndarray | None,
           logits: np.ndarray) -> str:
  """predictions.jsonl (or .npz) in workdir; returns its path."""
  ids = np.arange(len(predicted), dtype=np.int64)
  path = nmjax_io.join(workdir, f"predictions.{plan.output}")
  if plan.output == "npz":
    arrays = {"ids": ids, "predicted": predicted, "logits": logits}
    if labels is not None:
      arrays["labels"] = labels
    with nmjax_io.atomic_path(path) as tmp, open(tmp, "wb") as f:
      np.savez(f, **arrays)
    return path
  rows = [{"id": int(i), "predicted": int(p)} for i, p in zip(ids, predicted)]
  if labels is not None:
    for row, label in zip(rows, labels):
      row["label"] = int(label)
  nmjax_io.write_jsonl(path, rows)
  return path


def run(plan: PredictPlan, workdir: str) -> dict[str, Any]:
  """Applies the saved head to the plan's features; writes the predictions and predict.json.

  Args:
    plan: the run's plan (validate).
    workdir: where the predictions go (made if needed).

  Returns:
    {"predicted": (N,) int64 classes, "ids": (N,) row indices, "accuracy": float or None (no
    labels), "num_examples", "path": the predictions file}.

  Raises:
    ConfigError: features whose dimension is not the head's.
    DataError: an unreadable head or features file, or a task's dataset that is missing.
  """
  start = time.perf_counter()
  workdir = prepare_workdir(workdir)
  head = heads.load(plan.head)
  features, labels, source = _inputs(plan, workdir)
  _check_dim(plan, head, features, source)
  logits = heads.predict_features(head, features)
  predicted = heads.predicted_labels(head, features)
  accuracy = None if labels is None else float(np.mean(predicted == labels))
  path = _write(plan, workdir, predicted, labels, logits)
  nmjax_io.write_json(nmjax_io.join(workdir, "predict.json"), {
      "head": nmjax_io.absolute(plan.head), "method": head.method, "source": source,
      "num_examples": int(len(predicted)), "accuracy": accuracy, "predictions": path})
  score = "no labels" if accuracy is None else f"accuracy {accuracy:.4f}"
  print(f"[predict] {head.method} head on {len(predicted)} examples: {score} | predictions in"
        f" {path} | {format_seconds(time.perf_counter() - start)}", flush=True)
  return {"predicted": predicted, "ids": np.arange(len(predicted)), "accuracy": accuracy,
          "num_examples": int(len(predicted)), "path": path}
