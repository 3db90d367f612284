"""The study job (configs/default.py, configs/study_clip.py): a sweep of ordinary jobs.

Its plan is a list of child plans, each validated once with the study: a pre-training plan (the
pretrain or pretrain_clip job) per (seed, r), an evaluation plan (the nmtune job over that
encoder) per (seed, r), and with config.tune_grid one tune plan (an nmtune grid on the first
seed's r = 0 encoder, whose chosen weights every evaluation takes). Each child runs as its job in
its own sub-workdir:
  pretrain/seed<S>_r<R>/   the pre-training job (label or caption noise r, seed S);
  eval/seed<S>_r<R>/       the nmtune job over that encoder: every method on every task, with
                           SVE/LSVR and spectra of the test features;
  tune/                    the tune stage (nmjax/jobs/study_tune.py);
and is reused when its own plan is unchanged (stage.json holds it): a changed downstream field
(config.nmtune.*, methods) runs the tune and evaluation stages again and never pre-training; a
changed pre-training field is refused (those checkpoints are another study's). Features are
cached with the encoder (nmjax.encoder), so an evaluation run again extracts nothing.
A point runs as its own process (a job-array task) on a shared workdir with --config.stage=NAME
or an index (list: the names), holding the point's lock; --config.stage=render runs the report
job (nmjax/jobs/report.py) on what is finished. Such a task takes the flags its study recorded
(plan.json) once a stage exists: one with other flags is refused before it trains, and writes
nothing (nmjax/jobs/study_checks.py, which also checks every fit's data-dependent fields in
validate, before the first pre-training). A killed pre-training stage resumes from its last
checkpoint bitwise; a killed evaluation or tune stage runs again on its cached features; every fit
is seeded. So a study killed anywhere and started again ends with the same numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from nmjax import evaluate, io as nmjax_io, tasks as tasks_lib
from nmjax.config import clip_run, parse_names, parse_numbers, pretrain_run, tuning_config
from nmjax.errors import ConfigError
from nmjax.jobs import plans, pretrain, pretrain_clip, report, study_checks, study_stages, tuning
from nmjax.jobs.study_stages import Point
from nmjax.jobs.workdir import prepare_workdir, use_compile_cache

NAME = "study"
"""The job's name: config.job's value and its key in nmjax.jobs.JOBS."""
STAGE_FILE = study_stages.STAGE_FILE
PRETRAIN_JOBS = ("pretrain", "pretrain_clip")  # Label noise (supervised) | caption noise (CLIP)
STAGE_MODES = ("", "list", "render")  # "": every stage, then the report (the default).


@dataclasses.dataclass(frozen=True)
class StudyPlan:
  """The sweep: its points and every child plan, checked once (configs/default.py,
  configs/study_clip.py).

  A point is one (seed, noise ratio); pretrain and evaluate hold one child plan per point, in
  the points' order (seeds outer, ratios inner).
  """
  pretrain_job: str                 # pretrain (label noise) | pretrain_clip (caption noise)
  ratios: tuple[float, ...]
  seeds: tuple[int, ...]
  methods: tuple[str, ...]
  tasks: tuple[str, ...]            # nmjax.tasks names, resolved
  spectrum_tasks: tuple[str, ...]
  stage: str                        # "", list, render, or the name of the point to run
  pretrain: tuple[Any, ...]         # one pre-training plan per point (points order)
  evaluate: tuple[Any, ...]         # one nmtune plan per point (checkpoint set when it runs)
  tune: Any = None                  # the tune stage's nmtune plan (a grid), or None
  tune_pretrain: Any = None         # the first seed's r = 0 pre-training plan (the tune's encoder)
  vmap_seeds: bool = True           # pending pre-training stages side by side in one program
  smoke: bool = False               # a smoke variant: its numbers test the plumbing only

  @property
  def points(self) -> list[Point]:
    return [Point(seed, ratio) for seed in self.seeds for ratio in self.ratios]

  @property
  def clip(self) -> bool:
    return self.pretrain_job == "pretrain_clip"

  def pretrain_of(self, point: Point) -> Any:
    if point in self.points:
      return self.pretrain[self.points.index(point)]
    return self.tune_pretrain

  def evaluate_of(self, point: Point) -> Any:
    return self.evaluate[self.points.index(point)]


def pretrain_config(config: ml_collections.ConfigDict, seed: int,
                    ratio: float) -> ml_collections.ConfigDict:
  """The pre-training job's config of one point (r: label or caption noise)."""
  if config.pretrain_job == "pretrain_clip":
    return clip_run(config.pretrain, caption_noise=ratio, seed=seed, data_dir=config.data_dir)
  return pretrain_run(config.pretrain, noise_ratio=ratio, seed=seed, data_dir=config.data_dir)


def eval_config(config: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  """The nmtune job's config of one point: its checkpoint is the point's pre-training stage
  (relative to the study's workdir; the stage runs with the absolute path)."""
  cfg = tuning_config(config.nmtune, methods=config.methods, tasks=config.tasks)
  cfg.checkpoint = nmjax_io.join("pretrain", point.name)
  cfg.seed = int(point.seed)
  cfg.data_dir = config.data_dir
  return cfg


def tune_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """The tune stage's nmtune config: the study's, with the grid and its validation split."""
  cfg = tuning_config(config.nmtune, methods="nmtune", tasks=config.tasks)
  cfg.checkpoint = nmjax_io.join("pretrain", Point(seed, 0.0).name)
  cfg.seed = int(seed)
  cfg.data_dir = config.data_dir
  cfg.grid = config.tune_grid
  cfg.val_fraction = float(config.tune_val_fraction)
  return cfg


def _pretrain_job(config: ml_collections.ConfigDict) -> Any:
  if config.pretrain_job not in PRETRAIN_JOBS:
    raise ConfigError(f"config.pretrain_job={config.pretrain_job!r} is unknown; allowed:"
                      f" {', '.join(PRETRAIN_JOBS)}")
  return pretrain_clip if config.pretrain_job == "pretrain_clip" else pretrain


def _chosen_stage(stage: str, points: list[Point]) -> str:
  """config.stage: a mode of STAGE_MODES, or the name of the point it names (by name, as
  --config.stage=list prints it, or by its index in that list)."""
  stage = stage.strip()
  names = [p.name for p in points]
  if stage in STAGE_MODES or stage in names:
    return stage
  if stage.isdigit() and int(stage) < len(names):
    return names[int(stage)]
  raise ConfigError(f"config.stage={stage!r} is not a stage of this study; allowed: list,"
                    f" render, a name ({', '.join(names)}) or an index 0..{len(names) - 1}")


def _spectrum_tasks(value: str, names: list[str]) -> list[str]:
  """config.spectrum_tasks: tasks of the study (a task's old name is accepted for it)."""
  chosen = []
  for entry in (e.strip() for e in value.replace("+", ",").split(",")):
    if not entry:
      continue
    name = tasks_lib.canonical(entry)
    if name not in names:
      raise ConfigError(f"config.spectrum_tasks entry {entry!r} is unknown; allowed:"
                        f" {', '.join(names)}")
    chosen.append(name)
  if not chosen:
    raise ConfigError(f"config.spectrum_tasks is empty; allowed: {', '.join(names)}")
  return list(dict.fromkeys(chosen))


def validate(config: ml_collections.ConfigDict) -> StudyPlan:
  """Checks the whole study's config once, every child plan's included.

  Args:
    config: a complete study config (configs/default.py, configs/study_clip.py).

  Returns:
    The study's StudyPlan, each child plan validated by its own job.

  Raises:
    ConfigError: with one line naming the field and the allowed values.
    DataError: an unknown or unprepared dataset (naming the command that prepares it).
  """
  ratios = parse_numbers(config, "noise_ratios", float, lambda r: 0 <= r < 1,
                         "numbers 0 <= r < 1, comma-separated, e.g. 0,0.05,0.1,0.2,0.3")
  seeds = parse_numbers(config, "seeds", int, lambda s: 0 <= s < 2**32,
                        "integers 0 <= seed < 2**32, comma-separated, e.g. 0,1,2")
  methods = parse_names(config, "methods", evaluate.TUNING_METHODS)
  chosen = tasks_lib.resolve(config.tasks)
  names = [t.name for t in chosen]
  spectrum_tasks = _spectrum_tasks(str(config.spectrum_tasks), names)
  job = _pretrain_job(config)
  points = [Point(seed, ratio) for seed in seeds for ratio in ratios]
  stage = _chosen_stage(str(config.stage), points)
  if "zeroshot" in methods and config.pretrain_job != "pretrain_clip":
    raise ConfigError("config.methods entry 'zeroshot' needs a CLIP encoder's text tower; this"
                      f" study pre-trains with config.pretrain_job={config.pretrain_job!r}"
                      " (use configs/study_clip.py, or drop zeroshot)")
  pretrain_plans = tuple(job.validate(pretrain_config(config, p.seed, p.noise_ratio))
                         for p in points)
  study_stages.check_held_out(pretrain_plans[0], chosen)
  with study_checks.named(study_checks.EVAL_FIELDS):
    evaluate_plans = tuple(tuning.validate(eval_config(config, p)) for p in points)
  tune = tune_pretrain = None
  if str(config.tune_grid).strip():
    tune, tune_pretrain = _tune_plans(config, job, pretrain_plans, points)
  if stage not in ("list", "render"):  # Runs that train: the fits' sizes, before any stage.
    study_checks.check_fits(config.pretrain_job, pretrain_plans[0], chosen, evaluate_plans, tune)
  return StudyPlan(config.pretrain_job, tuple(ratios), tuple(seeds), tuple(methods),
                   tuple(names), tuple(spectrum_tasks), stage, pretrain_plans, evaluate_plans,
                   tune, tune_pretrain, _check_flag(config, "vmap_seeds", True),
                   _check_flag(config, "smoke", False))


def _check_flag(config: ml_collections.ConfigDict, name: str, default: bool) -> bool:
  """A boolean field (absent: its default); true/false only."""
  value = config.get(name, default)
  if not isinstance(value, (bool, np.bool_)):
    raise ConfigError(f"config.{name}={value!r} is not a boolean; allowed: true, false")
  return bool(value)


def _tune_plans(config: ml_collections.ConfigDict, job: Any, pretrain_plans: tuple[Any, ...],
                points: list[Point]) -> tuple[Any, Any]:
  """The tune stage's nmtune plan and the first seed's r = 0 pre-training plan it reads."""
  if not 0 < float(config.tune_val_fraction) < 1:
    raise ConfigError(f"config.tune_val_fraction={config.tune_val_fraction} is out of range;"
                      " allowed: 0 < tune_val_fraction < 1")
  seed = points[0].seed
  with study_checks.named(study_checks.TUNE_FIELDS):
    tune = tuning.validate(tune_config(config, seed))
  first = Point(seed, 0.0)
  return tune, (pretrain_plans[points.index(first)] if first in points else
                job.validate(pretrain_config(config, seed, 0.0)))


def lock_index(plan: StudyPlan) -> int | None:
  """The index of this process's lock file, or None where the job locks what it writes.

  Args:
    plan: the study's plan.

  Returns:
    0 for the whole sweep (it locks its workdir); None for a job-array task (plan.stage), which
    locks the point it runs itself.
  """
  return None if plan.stage else 0


def check_workdir(plan: StudyPlan, workdir: str) -> None:
  """What the workdir already holds, read before the run writes anything there (the runner
  calls it first): a pre-training stage of another plan, or a job-array task's flags other than
  its study's, is refused and leaves the workdir as it was (nmjax/jobs/study_checks.py).

  Args:
    plan: the study's plan.
    workdir: the study's folder (it may not exist yet).

  Raises:
    ConfigError: one line naming the stage or the flag that differs.
  """
  if plan.stage != "list":
    study_checks.check_workdir(plan, workdir)


def run(plan: StudyPlan, workdir: str) -> dict[str, Any]:
  """Runs the sweep, one point of it, or its report, as plan.stage says.

  stage "": every point's stages, then the report; a point's name: that point's stages (a
  job-array task, no report); "list": prints the points' names, one per line on stdout, and
  nothing else; "render": the report of what is finished.

  Args:
    plan: the study's plan (validate).
    workdir: the study's folder (made if needed), shared by every stage and point.

  Returns:
    {"stages": the names} for "list"; otherwise the stages' records and the report's summary.

  Raises:
    ConfigError: a workdir holding another study's pre-training (a changed pre-training field),
      or a point locked by another process.
    DataError: a dataset that is missing or malformed.
    TrainingError: a non-finite loss in a pre-training stage.
  """
  if plan.stage == "list":
    print("\n".join(p.name for p in plan.points), flush=True)
    return {"stages": [p.name for p in plan.points]}
  workdir = prepare_workdir(workdir)
  plans.write(dataclasses.replace(plan, stage=""), NAME, workdir)  # What the report reads.
  use_compile_cache(workdir)
  if plan.stage == "render":
    return report.render_study(workdir, partial=True)
  if plan.stage:
    point = next(p for p in plan.points if p.name == plan.stage)
    return study_stages.run_one_point(plan, point, workdir)
  return study_stages.run_sweep(plan, workdir)
