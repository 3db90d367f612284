"""The study's checks that run before its first stage (part of the study job, nmjax/jobs/study.py).

In validate: the evaluation and tune plans' messages named as the study's flags
(config.nmtune.*, config.tune_grid), and the fits' data-dependent fields checked against the
tasks' train labels and the encoder's feature width, which the plan already fixes (the model),
so a bad config.nmtune.batch_size is refused before any pre-training.

Before the run writes anything in its workdir (check_workdir): every point's pre-training stage
found there must be of this plan (as the sweep requires), and a job-array task (or the render)
must carry the flags the workdir's study recorded (plan.json) once a stage of it exists, so a
task with a changed flag is refused before it trains and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from nmjax import io as nmjax_io, models, tasks as tasks_lib
from nmjax.data import sources
from nmjax.errors import ConfigError, DataError
from nmjax.jobs import fit_checks, plans, study_stages, tuning
from nmjax.jobs.study_stages import Point

_STUDY_FIELDS = (("methods", "config.methods"), ("tasks", "config.tasks"))
EVAL_FIELDS = fit_checks.Fields("config.nmtune.", "config.nmtune.grid", _STUDY_FIELDS)
TUNE_FIELDS = fit_checks.Fields("config.nmtune.", "config.tune_grid",
                                _STUDY_FIELDS + (("val_fraction", "config.tune_val_fraction"),))
PRETRAIN_FIELDS = fit_checks.Fields("config.pretrain.")
# Fields of a child plan the study sets itself, for each point (from its own fields).
_PER_POINT = ("seed", "noise_ratio", "caption_noise", "checkpoint", "methods", "tasks", "mode",
              "job")
_SWEEP = (("pretrain_job", "pretrain_job"), ("ratios", "noise_ratios"), ("seeds", "seeds"),
          ("methods", "methods"), ("tasks", "tasks"), ("spectrum_tasks", "spectrum_tasks"))


@contextlib.contextmanager
def named(fields: fit_checks.Fields) -> Iterator[None]:
  """Re-raises a child job's one-line refusal with the study's names of its fields."""
  try:
    yield
  except (ConfigError, DataError) as e:
    raise type(e)(fields.rename(str(e))) from None


# ------------------------------------------------------------------------- the fits' data


def encoder_dim(pretrain_job: str, pre: Any) -> int:
  """D, the width of the features a point's encoder gives (fixed by its model)."""
  if pretrain_job == "pretrain_clip":
    from nmjax.train import clip_training  # pylint: disable=g-import-not-at-top
    return clip_training.build_model(pre).feature_dim
  return models.feature_dim(pre.model)


def check_fits(pretrain_job: str, pre: Any, tasks: list[tasks_lib.Task], evaluate: tuple[Any, ...],
               tune: Any) -> None:
  """Every evaluation's and the tune stage's NMTune fits against the tasks' train labels and the
  encoder's D (nmjax.jobs.fit_checks.check_data), before any stage runs.

  Raises:
    ConfigError, DataError: one line naming the study's field and the task.
  """
  dim = encoder_dim(pretrain_job, pre)
  children = [(e, EVAL_FIELDS) for e in {e.seed: e for e in evaluate}.values()]
  children += [(tune, TUNE_FIELDS)] if tune is not None else []
  labels: dict[tuple[Any, int], np.ndarray] = {}
  for split, where in fit_checks.train_splits(tasks).items():
    for child, fields in children:
      key = (split, child.max_examples)
      if key not in labels:
        labels[key] = fit_checks.split_labels(split, data_dir=child.data_dir,
                                              max_examples=child.max_examples)
      classes = sources.get_source(split.dataset, data_dir=child.data_dir or None
                                   ).info.num_classes
      fit_checks.check_data(tuning.nmtune_configs(child, classes), labels[key], dim,
                            two_view=tuning.two_view(child), where=where, fields=fields)


# ------------------------------------------------------------------ the workdir before a run


def check_workdir(plan: Any, workdir: str) -> None:
  """Reads the workdir (writes nothing) and refuses, with one line, a run its stages are not of.

  Args:
    plan: the study's plan.
    workdir: the study's folder (it may not exist yet).

  Raises:
    ConfigError: a point's pre-training stage (finished or started) of another plan; or, for a
      job-array task or the render, flags other than those the study recorded in plan.json
      while a stage of it exists.
  """
  if plan.stage != "render":
    points = list(plan.points)
    if plan.tune is not None and Point(plan.seeds[0], 0.0) not in points:
      points.append(Point(plan.seeds[0], 0.0))
    for point in points:
      study_stages.finished_pretrain(plan, point, workdir)
  if plan.stage:
    _check_recorded(plan, workdir)


def _read(path: str) -> dict[str, Any] | None:
  try:
    value = json.loads(nmjax_io.read_text(path))
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def has_stages(workdir: str) -> bool:
  """Whether any stage of a study was started in workdir (a record or a pre-training's
  config.json; an empty stage folder, or one holding only a lock, is none)."""
  if nmjax_io.exists(nmjax_io.join(workdir, "tune", study_stages.STAGE_FILE)):
    return True
  for kind in ("pretrain", "eval"):
    try:
      names = nmjax_io.listdir(nmjax_io.join(workdir, kind))
    except (FileNotFoundError, NotADirectoryError):
      continue
    for name in names:
      for record in (study_stages.STAGE_FILE, "config.json"):
        if nmjax_io.exists(nmjax_io.join(workdir, kind, name, record)):
          return True
  return False


def flags(study: dict[str, Any]) -> dict[str, Any]:
  """{the study's flag: its value} of a study plan's JSON form (plan.json): the sweep's fields and
  those every child plan shares (config.pretrain.*, config.nmtune.*, config.tune_*)."""
  out = {f"config.{name}": study[key] for key, name in _SWEEP if key in study}
  children = [((study.get("pretrain") or [{}])[0], PRETRAIN_FIELDS),
              ((study.get("evaluate") or [{}])[0], EVAL_FIELDS),
              (study.get("tune") or {"grid": ""}, TUNE_FIELDS)]
  for child, fields in children:
    for key, value in child.items():
      if key not in study_stages.NOT_IDENTITY and key not in _PER_POINT:
        out[fields.name(key)] = value
  return out


def _check_recorded(plan: Any, workdir: str) -> None:
  """A job-array task (or the render) against the study's recorded plan, once a stage exists."""
  saved = _read(nmjax_io.join(workdir, plans.PLAN_FILE))
  if saved is None or saved.get("job") != "study" or not has_stages(workdir):
    return
  old = flags(saved)
  now = flags(json.loads(plans.to_json(plan, "study")))
  changed = [k for k in sorted(set(old) & set(now)) if old[k] != now[k]]
  if not changed:
    return
  shown = "; ".join(f"{k}: recorded {old[k]!r} vs now {now[k]!r}" for k in changed[:3])
  shown += "; ..." if len(changed) > 3 else ""
  fix = ("use a new --workdir" if any(k.startswith(PRETRAIN_FIELDS.prefix) for k in changed)
         else "run the whole study (no --config.stage) to change them for every point, or use a"
         " new --workdir")
  raise ConfigError(f"--workdir={workdir} holds a study run with other flags ({shown});"
                    f" --config.stage={plan.stage} runs with its study's flags: pass the same"
                    f" --config.* flags to every task (plan.json there records them), {fix}")
