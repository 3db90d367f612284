"""The embedded study (configs/default.py): pre-train with label noise r, then measure downstream.

For each seed and noise ratio r of the sweep, two stages run in the workdir:
  pretrain/seed<S>_r<R>/   pre-training (nmjax.train.pretrain) with noise r and seed S;
  eval/seed<S>_r<R>/       the NMTune evaluation (nmjax.evaluate): every method on every task
                           over the frozen encoder, with SVE/LSVR and spectra of the test features;
and, with config.tune_grid, one tune/ stage (nmjax/jobs/study_tune.py) on the first seed's r = 0
encoder, whose chosen NMTune weights every evaluation stage uses (it runs when the first
evaluation needs it, under a lock other processes wait on).
A point runs as its own process (a job-array task) on a shared workdir with --config.stage=NAME
or an index (list: the names), holding the point's lock (a second process is refused, one line);
--config.stage=render builds the report from the finished points and names the missing ones.
A stage that finishes writes stage.json (its config and results) atomically and is reused when
its config is the same. A killed pre-training stage resumes from its last checkpoint bitwise
(nmjax/train/loop.py); a killed evaluation or tune stage runs again on its cached features; every
fit is seeded. So a study killed anywhere and started again ends with the same numbers.

The report (nmjax.report.write_study), rendered from the stages' stage.json files: results.jsonl
("pretrain" records with memorization_gap, "task" records with delta and delta_ci95 for r > 0
(nmjax.stats), "spectrum" records, the "tune" record), results.md, three plots and tb/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import ml_collections
import numpy as np

from nmjax import evaluate, lock, report, tasks as tasks_lib
from nmjax.config import (check_choice, clip_run, parse_names, parse_numbers, pretrain_run,
                          tuning_config)
from nmjax.errors import ConfigError
from nmjax.jobs import prepare_workdir, study_report, study_tune, use_compile_cache
from nmjax.progress import Countdown, format_seconds
from nmjax.train import pretrain, pretrain_clip

# Fields that cannot change a stage's numbers (allow_changes only lets a resume go on; history
# is config.json's record): a finished stage is reused whatever they are.
_NOT_IDENTITY = ("log_every_steps", "checkpoint_every_steps", "max_to_keep", "data_dir",
                 "checkpoint", "allow_changes", "history")
STAGE_FILE = "stage.json"
HITS_FILE = "correct.npz"  # An evaluation stage's per-example hits: "task|method" -> (N,) bool


@dataclasses.dataclass(frozen=True)
class Point:
  """One point of the sweep: a seed and a noise ratio."""
  seed: int
  noise_ratio: float

  @property
  def name(self) -> str:
    return f"seed{self.seed}_r{self.noise_ratio:g}"

  def __str__(self) -> str:
    return f"seed {self.seed} r={self.noise_ratio:g}"


@dataclasses.dataclass(frozen=True)
class Plan:
  points: list[Point]
  ratios: list[float]
  seeds: list[int]
  methods: list[str]
  tasks: list[tasks_lib.Task]
  spectrum_tasks: list[str]
  clip: bool = False  # CLIP pre-training with caption noise (config.pretrain_job)


CLIP_SWEEP = {"noise": "caption", "pretrain_field": "test_i2t_acc"}
PRETRAIN_JOBS = ("pretrain", "pretrain_clip")  # Label noise (supervised) | caption noise (CLIP)


def is_clip(config: ml_collections.ConfigDict) -> bool:
  return config.get("pretrain_job", "pretrain") == "pretrain_clip"


def pretrain_config(config: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  """The pre-training config of one point of the sweep (r: label or caption noise)."""
  if is_clip(config):
    return clip_run(config.pretrain, caption_noise=point.noise_ratio, seed=point.seed,
                    data_dir=config.data_dir)
  return pretrain_run(config.pretrain, noise_ratio=point.noise_ratio, seed=point.seed,
                      data_dir=config.data_dir)


def _pretrainer(config: ml_collections.ConfigDict) -> Any:
  """The pre-training library of the study's kind (nmjax.train.pretrain or pretrain_clip)."""
  return pretrain_clip if is_clip(config) else pretrain


def eval_config(config: ml_collections.ConfigDict, point: Point, checkpoint: str,
                weights: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The NMTune evaluation config (checkpoint mode) of one point of the sweep; weights: the
  tune stage's choice (NMTune fields), set over config.nmtune's."""
  cfg = tuning_config(config.nmtune, method=config.methods, tasks=config.tasks)
  cfg.checkpoint = checkpoint
  cfg.seed = int(point.seed)
  cfg.data_dir = config.data_dir
  for field, value in (weights or {}).items():
    cfg[field] = value
  return cfg


def validate(config: ml_collections.ConfigDict) -> Plan:
  """Checks the whole study's config, every stage's included, before any work."""
  ratios = parse_numbers(config, "noise_ratios", float, lambda r: 0 <= r < 1,
                    "numbers 0 <= r < 1, comma-separated, e.g. 0,0.05,0.1,0.2,0.3")
  seeds = parse_numbers(config, "seeds", int, lambda s: 0 <= s < 2**32,
                   "integers 0 <= seed < 2**32, comma-separated, e.g. 0,1,2")
  methods = parse_names(config, "methods", evaluate.TUNING_METHODS)
  chosen = tasks_lib.resolve(config.tasks)
  names = [t.name for t in chosen]
  spectrum_tasks = parse_names(config, "spectrum_tasks", names)
  points = [Point(seed, ratio) for seed in seeds for ratio in ratios]
  if "pretrain_job" in config:
    check_choice(config, "pretrain_job", PRETRAIN_JOBS)
  _pretrainer(config).validate(pretrain_config(config, points[0]))
  evaluate.check_tuning(eval_config(config, points[0], checkpoint="<pretrain stage>"))
  study_tune.check(config)
  study_tune.check_held_out(config, chosen)
  plan = Plan(points, ratios, seeds, methods, chosen, spectrum_tasks, is_clip(config))
  chosen_stage(config, plan)  # A stage the sweep does not have fails before any work.
  return plan


STAGE_MODES = ("", "list", "render")  # "": every stage, then the report (the default).


def chosen_stage(config: ml_collections.ConfigDict, plan: Plan) -> str | Point:
  """config.stage: a mode of STAGE_MODES, or the point it names (its name, as --config.stage=list
  prints it, or its index in that list): a job-array task runs that point's two stages."""
  stage = str(config.get("stage", "")).strip()
  if stage in STAGE_MODES:
    return stage
  names = [p.name for p in plan.points]
  if stage in names:
    return plan.points[names.index(stage)]
  if stage.isdigit() and int(stage) < len(names):
    return plan.points[int(stage)]
  raise ConfigError(f"config.stage={stage!r} is not a stage of this study; allowed: list,"
                    f" render, a name ({', '.join(names)}) or an index 0..{len(names) - 1}")


# ----------------------------------------------------------------------------------------------
# Stages.


def _identity(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """What must match for a finished stage to be reused (JSON-normalized)."""
  fields = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IDENTITY}
  return json.loads(json.dumps(fields, default=str))


def _check_same(saved: dict[str, Any], current: dict[str, Any], what: str, workdir: str) -> None:
  diff = [f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}"
          for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  if diff:
    raise ConfigError(f"--workdir={workdir} holds {what} of a different study ("
                      + "; ".join(diff[:3]) + ("; ..." if len(diff) > 3 else "")
                      + "); use a new --workdir or the same config")


def _read_json(path: str) -> dict[str, Any] | None:
  """A finished stage's record; None when absent or torn (the stage then runs again)."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    print(f"[study] {path} is unreadable; running its stage again", flush=True)
    return None


class _Preempted(Exception):
  pass


def _finished(stage_dir: str, cfg: ml_collections.ConfigDict, what: str,
              workdir: str) -> dict[str, Any] | None:
  """A finished stage's record (its config checked against `cfg`), or None."""
  saved = _read_json(os.path.join(stage_dir, STAGE_FILE))
  if saved is not None:
    _check_same(saved["config"], _identity(cfg), what, workdir)
    saved["workdir"] = os.path.abspath(stage_dir)  # Where it is now: a workdir may have moved.
  return saved


def _run_pretrain(config: ml_collections.ConfigDict, point: Point, workdir: str) -> dict[str, Any]:
  """Runs (or, after a kill, resumes) a point's pre-training stage; returns its record. The
  point's evaluation stage is cleared: nothing it left is valid for the new encoder."""
  cfg, stage_dir = pretrain_config(config, point), os.path.join(workdir, "pretrain", point.name)
  started = _read_json(os.path.join(stage_dir, "config.json"))
  if started is not None:  # Killed mid-way: the pre-training job resumes from its checkpoint.
    _check_same(_identity(ml_collections.ConfigDict(started)), _identity(cfg),
                f"a pre-training run {point.name}", workdir)
  start = time.perf_counter()
  result = _pretrainer(config).run(cfg, prepare_workdir(stage_dir))
  if result.get("preempted"):
    raise _Preempted(f"pre-training {point}")
  keep = ("step", "epoch", "test_acc", "test_loss", "test_count", "train_loss", "train_acc_noisy",
          "train_acc_clean", "examples_per_sec", "test_i2t_acc", "test_t2i_acc", "train_i2t_acc",
          "train_t2i_acc", "noise_rate_train", "num_classes")
  record = {"config": _identity(cfg), "workdir": os.path.abspath(stage_dir),
            "result": {k: result[k] for k in keep if k in result},
            "seconds": time.perf_counter() - start}
  report.write_json(os.path.join(stage_dir, STAGE_FILE), record)
  shutil.rmtree(os.path.join(workdir, "eval", point.name), ignore_errors=True)
  return record


def _run_eval(cfg: ml_collections.ConfigDict, plan: Plan, stage_dir: str) -> dict[str, Any]:
  """Runs an evaluation stage (reusing the features it cached before a kill); its record."""
  start = time.perf_counter()
  stage_dir = prepare_workdir(stage_dir)
  cache = evaluate.open_cache(cfg, stage_dir, batch_size=cfg.extract_batch_size,
                              batch_field="extract_batch_size")
  out = evaluate.run(cache, evaluate.tuning_request(cfg, plan.methods, plan.tasks))
  report.write_tuning(out.rows, cache.encoder, cfg, plan.methods, stage_dir)
  np.savez_compressed(os.path.join(stage_dir, HITS_FILE), **out.correct)  # Before stage.json.
  record = {"config": _identity(cfg), "workdir": stage_dir, "rows": out.rows,
            "spectra": out.spectra, "seconds": time.perf_counter() - start}
  report.write_json(os.path.join(stage_dir, STAGE_FILE), record)
  return record


def _first_pretrain(config: ml_collections.ConfigDict, plan: Plan, workdir: str) -> dict:
  """The first seed's r = 0 pre-training record (what the tune stage reads): found finished,
  run here (taking its point's lock) or, while another process runs it, waited for."""
  point = Point(plan.seeds[0], 0.0)
  pre_dir = prepare_workdir(os.path.join(workdir, "pretrain", point.name))
  what, said = f"the pre-training stage {point.name}", False
  while True:
    pre = _finished(pre_dir, pretrain_config(config, point), what, workdir)
    if pre is not None:
      return pre
    try:
      with lock.hold(pre_dir, f"study stage {point.name}"):
        pre = _finished(pre_dir, pretrain_config(config, point), what, workdir)
        if pre is None:
          print(f"[study] the tune stage needs {what}: running it here", flush=True)
          pre = _run_pretrain(config, point, workdir)
        return pre
    except lock.InUse:
      if not said:
        print(f"[study] the tune stage waits for {what} (another process runs it)", flush=True)
        said = True
      time.sleep(2.0)


def _tune_identity(config: ml_collections.ConfigDict, plan: Plan) -> tuple[dict, Any]:
  cfg = study_tune.config_of(config, plan.seeds[0], "<pretrain stage>")
  pretrain = {f"pretrain.{k}": v for k, v in _identity(pretrain_config(
      config, Point(plan.seeds[0], 0.0))).items()}
  return {**_identity(cfg), **pretrain}, cfg


def tuned(config: ml_collections.ConfigDict, plan: Plan, workdir: str, *,
          run: bool = True) -> dict[str, Any] | None:
  """The tune stage's record (nmjax/jobs/study_tune.py): reused when finished, else (run=True)
  run under its lock, which a second process waits on; None without config.tune_grid, or
  when unfinished and run=False."""
  if not study_tune.enabled(config):
    return None
  tune_dir = os.path.join(workdir, study_tune.STAGE_NAME)
  identity, cfg = _tune_identity(config, plan)

  def finished() -> dict[str, Any] | None:
    saved = _read_json(os.path.join(tune_dir, STAGE_FILE))
    if saved is not None:
      _check_same(saved["config"], identity, "the tune stage", workdir)
    return saved

  record = finished()
  if record is not None or not run:
    return record
  pre = _first_pretrain(config, plan, workdir)
  cfg.checkpoint = pre["workdir"]
  with lock.hold(prepare_workdir(tune_dir), "study tune stage", wait=True):
    record = finished()  # Another process may have finished it while this one waited.
    if record is None:
      record = study_tune.run(cfg, plan.tasks, tune_dir, identity)
      print(f"[study] tune stage done in {format_seconds(record['seconds'])}: "
            + "; ".join(study_tune.lines(record)), flush=True)
  return record


def sweep_of(plan: Plan) -> report.Sweep:
  return report.Sweep(plan.ratios, plan.seeds, plan.methods, {t.name: t.kind for t in plan.tasks},
                      plan.spectrum_tasks, **(CLIP_SWEEP if plan.clip else {}))


def render(config: ml_collections.ConfigDict, plan: Plan, stages: dict[Point, tuple[dict, dict]],
           workdir: str, tune: dict[str, Any] | None) -> report.Table:
  """Writes the report (report.STUDY_FILES and tb/) and prints its table; returns it. tune: the
  tune stage's record (None without one)."""
  title = (f"{config.pretrain.model} pre-trained on {config.pretrain.dataset} with"
           f" {study_report.noise_words(config, is_clip(config))}")
  records = study_report.records(plan, stages, HITS_FILE)
  if tune:  # The weights' record: chosen on the first seed's r = 0 encoder.
    records.append({"record": "tune", "seed": plan.seeds[0], "noise_ratio": 0.0, **{
        k: tune[k] for k in ("grid", "val_fraction", "members", "chosen", "weights")}})
  header = study_report.describe(config, plan, tune)
  table = report.write_study(records, sweep_of(plan), workdir, header=header, title=title)
  print("\n" + header + "\n\n" + report.format_summary(table), flush=True)
  return table


def _run_point(config: ml_collections.ConfigDict, plan: Plan, point: Point, workdir: str,
               done: dict | None, clock: Countdown, index: int) -> tuple[dict, dict, int]:
  """The two stages of one point (each run or reused); returns their records and how many ran."""
  pre_dir = prepare_workdir(os.path.join(workdir, "pretrain", point.name))
  with lock.hold(pre_dir, f"study stage {point.name}"):  # One process per point: others refused.
    return _run_locked_point(config, plan, point, workdir, done, clock, index)


def _run_locked_point(config: ml_collections.ConfigDict, plan: Plan, point: Point, workdir: str,
                      done: dict | None, clock: Countdown, index: int) -> tuple[dict, dict, int]:
  num_stages = 2 * len(plan.points)
  pre_dir = os.path.join(workdir, "pretrain", point.name)
  eval_dir = os.path.join(workdir, "eval", point.name)
  if done is None:  # Another process may have finished it since the sweep looked.
    done = _finished(pre_dir, pretrain_config(config, point), f"the pre-training stage"
                     f" {point.name}", workdir)
  start, pre, ran = time.perf_counter(), done, 0
  if pre is None:
    pre = _run_pretrain(config, point, workdir)
    ran += 1
  seconds = clock.done("pretrain", time.perf_counter() - start) if ran else None
  study_report.stage_line(index + 1, num_stages, f"pretrain {point}",
                          study_report.pretrain_text(pre), seconds, clock)

  tune = tuned(config, plan, workdir)
  start = time.perf_counter()
  eval_cfg = eval_config(config, point, pre_dir, tune and tune["weights"])
  ev = _finished(eval_dir, eval_cfg, f"the evaluation stage {point.name}", workdir)
  seconds = None
  if ev is None:
    ev = _run_eval(eval_cfg, plan, eval_dir)
    seconds = clock.done("eval", time.perf_counter() - start)
    ran += 1
  study_report.stage_line(index + 2, num_stages, f"eval {point}",
              evaluate.averages_line(ev["rows"], plan.methods), seconds, clock)
  return pre, ev, ran


def _render_finished(config: ml_collections.ConfigDict, plan: Plan, workdir: str
                     ) -> dict[str, Any]:
  """--config.stage=render: the report of the ratios whose stages every seed has finished."""
  stages = {}
  tune = tuned(config, plan, workdir, run=False)
  for point in plan.points:
    pre = _finished(os.path.join(workdir, "pretrain", point.name), pretrain_config(config, point),
                    f"the pre-training stage {point.name}", workdir)
    ev = pre and _finished(os.path.join(workdir, "eval", point.name), eval_config(
        config, point, pre["workdir"], tune and tune["weights"]),
        f"the evaluation stage {point.name}", workdir)
    if ev:
      stages[point] = (pre, ev)
  missing = [p.name for p in plan.points if p not in stages]
  ratios = [r for r in plan.ratios if all(Point(s, r) in stages for s in plan.seeds)]
  if not ratios:
    raise ConfigError(f"--workdir={workdir} holds no noise ratio finished for every seed; run the"
                      " missing stages first (--config.stage=list names them)")
  shown = dataclasses.replace(plan, ratios=ratios, points=[
      p for p in plan.points if p.noise_ratio in ratios])
  table = render(config, shown, stages, workdir, tune)
  print(f"[study] report in {workdir} from {len(shown.points)} of {len(plan.points)} stage(s)"
        + (f"; missing: {', '.join(missing)}" if missing else ""), flush=True)
  return {"records": table.records, "missing": missing, "workdir": workdir}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The sweep (config.stage empty), one point of it (a job-array task: its two stages, no
  report), the stage names (list: one per line on stdout, nothing else) or the report of what
  is finished (render)."""
  plan = validate(config)
  stage = chosen_stage(config, plan)
  if stage == "list":
    print("\n".join(p.name for p in plan.points), flush=True)
    return {"stages": [p.name for p in plan.points]}
  workdir = prepare_workdir(workdir)
  use_compile_cache(workdir)
  if stage == "render":
    return _render_finished(config, plan, workdir)
  if isinstance(stage, Point):
    _, _, ran = _run_point(config, plan, stage, workdir, None, Countdown(
        {"pretrain": 1, "eval": 1}), 2 * plan.points.index(stage))
    print(f"[study] stage {stage.name} done ({ran} of its 2 parts run); when every stage is"
          " done, --config.stage=render builds the report", flush=True)
    return {"stage": stage.name, "stages_run": ran, "workdir": workdir}
  num_stages = 2 * len(plan.points)
  # Finished pre-training stages (another study's fails here, before any work); the ETA: the rest.
  done = {p: _finished(os.path.join(workdir, "pretrain", p.name), pretrain_config(config, p),
                       f"the pre-training stage {p.name}", workdir) for p in plan.points}
  pending = {"pretrain": sum(done[p] is None for p in plan.points),
             "eval": sum(done[p] is None or not os.path.exists(
                 os.path.join(workdir, "eval", p.name, STAGE_FILE)) for p in plan.points)}
  print(f"[study] {len(plan.ratios)} noise ratio(s) x {len(plan.seeds)} seed(s): {num_stages}"
        f" stages ({pending['pretrain'] + pending['eval']} to run, the others done); tasks"
        f" {', '.join(t.name for t in plan.tasks)}; methods {', '.join(plan.methods)}; workdir"
        f" {workdir}", flush=True)
  clock = Countdown(pending)
  stages: dict[Point, tuple[dict, dict]] = {}
  ran = 0
  try:
    for i, point in enumerate(plan.points):
      pre, ev, point_ran = _run_point(config, plan, point, workdir, done[point], clock, 2 * i)
      stages[point] = (pre, ev)
      ran += point_ran
  except _Preempted as e:
    print(f"[study] preempted during {e}; the finished stages are saved: run the same command"
          " to continue", flush=True)
    return {"preempted": True, "stages_run": ran}

  table = render(config, plan, stages, workdir, tuned(config, plan, workdir, run=False))
  print(f"[study] done in {format_seconds(clock.elapsed())} ({ran} stage(s) run,"
        f" {num_stages - ran} reused). Report in {workdir}: " + ", ".join(report.STUDY_FILES)
        + ", tb/ (tensorboard --logdir " + os.path.join(workdir, "tb")
        + "); per-task curves in eval/*/curves.png", flush=True)
  return {"records": table.records, "stages_run": ran, "workdir": workdir}
