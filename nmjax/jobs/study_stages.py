"""The study's stages (part of the study job, nmjax/jobs/study.py): each child plan run as its
ordinary job in its sub-workdir, or reused when the stage.json there holds the same plan.

A stage that finishes writes plan.json (the child's plan, as the job writes it) and stage.json
(the plan's identity and the stage's results) atomically; stage.json is written last, so a stage
killed before it runs again (a pre-training stage resumes from its last checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from typing import Any

import numpy as np

from nmjax import io as nmjax_io, tasks as tasks_lib
from nmjax.errors import ConfigError
from nmjax.jobs import plans, pretrain, pretrain_clip, report, study_tune, tuning
from nmjax.jobs.workdir import prepare_workdir
from nmjax.progress import Countdown, format_seconds
from nmjax.train import side_by_side

STAGE_FILE = report.STAGE_FILE
HITS_FILE = report.HITS_FILE
# Fields that cannot change a stage's numbers: a finished stage is reused whatever they are.
NOT_IDENTITY = ("log_every_steps", "checkpoint_every_steps", "max_to_keep", "data_dir",
                "checkpoint", "allow_changes", "history", "job", "distributed",
                "coordinator_address", "num_processes", "process_id")
# What a pre-training stage's record keeps of the job's result.
PRETRAIN_FIELDS = ("step", "epoch", "test_acc", "test_loss", "test_count", "train_loss",
                   "train_acc_noisy", "train_acc_clean", "examples_per_sec", "test_i2t_acc",
                   "test_t2i_acc", "train_i2t_acc", "train_t2i_acc", "noise_rate_train",
                   "num_classes")


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


class Preempted(Exception):
  """A pre-training stage stopped on SIGTERM after saving."""


def identity(plan: Any) -> dict[str, Any]:
  """What must match for a finished stage to be reused (JSON-normalized)."""
  return plans.identity(plan, NOT_IDENTITY)


def check_held_out(pretrain_plan: Any, tasks: list[tasks_lib.Task]) -> None:
  """Fails with one line when a task probes held-out images (nmjax.tasks part "held_out") of
  the pre-training dataset that the pre-training reads (it reads the first max_train_examples)."""
  from nmjax.data import sources  # pylint: disable=g-import-not-at-top
  for task in tasks:
    if task.train.part == "held_out" and task.train.dataset == pretrain_plan.dataset:
      size = pretrain_plan.max_train_examples
      info = sources.get_source(pretrain_plan.dataset,
                                data_dir=pretrain_plan.data_dir or None).info
      limit = info.splits["train"] - tasks_lib.HELD_OUT
      if size <= 0 or size > limit:
        raise ConfigError(f"config.pretrain.max_train_examples={size} reads images the task"
                          f" {task.name} probes as never pre-trained on (the last"
                          f" {tasks_lib.HELD_OUT:,}); allowed: 1..{limit}")


def read_json(path: str) -> dict[str, Any] | None:
  """A finished stage's record; None when absent or torn (the stage then runs again)."""
  try:
    return json.loads(nmjax_io.read_text(path))
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    print(f"[study] {path} is unreadable; running its stage again", flush=True)
    return None


def differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
  diff = [f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}"
          for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  return "; ".join(diff[:3]) + ("; ..." if len(diff) > 3 else "")


def _refuse_other(saved: dict[str, Any], current: dict[str, Any], what: str,
                  workdir: str) -> None:
  if saved != current:
    raise ConfigError(f"--workdir={workdir} holds {what} of a different study ("
                      f"{differences(saved, current)}); use a new --workdir or the same config")


# ------------------------------------------------------------------------------ pre-training


def pretrain_dir(workdir: str, point: Any) -> str:
  return nmjax_io.join(workdir, "pretrain", point.name)


def finished_pretrain(plan: Any, point: Any, workdir: str) -> dict[str, Any] | None:
  """A point's finished pre-training record, or None; another study's is refused (its
  checkpoints are not this study's encoder), a run started and killed included."""
  stage_dir = pretrain_dir(workdir, point)
  child = plan.pretrain_of(point)
  what = f"the pre-training stage {point.name}"
  saved = read_json(nmjax_io.join(stage_dir, STAGE_FILE))
  if saved is not None:
    _refuse_other(saved["plan"], identity(child), what, workdir)
    saved["workdir"] = nmjax_io.absolute(stage_dir)  # Where it is now: a workdir may have moved.
    return saved
  started = read_json(nmjax_io.join(stage_dir, "config.json"))
  if started is not None:  # Killed mid-way: the pre-training job resumes from its checkpoint.
    _refuse_other(plans.identity(started, NOT_IDENTITY), identity(child),
                  f"a pre-training run {point.name}", workdir)
  return None


def run_pretrain(plan: Any, point: Any, workdir: str) -> dict[str, Any]:
  """Runs (or, after a kill, resumes) a point's pre-training job; returns its record. The
  point's evaluation stage is cleared: nothing it left is valid for the new encoder."""
  child, stage_dir = plan.pretrain_of(point), prepare_workdir(pretrain_dir(workdir, point))
  job = _pretrain_job(plan)
  start = time.perf_counter()
  plans.write(child, job.NAME, stage_dir)
  result = job.run(child, stage_dir)
  if result.get("preempted"):
    raise Preempted(f"pre-training {point}")
  record = _pretrain_record(child, stage_dir, result, time.perf_counter() - start)
  nmjax_io.write_json(nmjax_io.join(stage_dir, STAGE_FILE), record)
  nmjax_io.rmtree(nmjax_io.join(workdir, "eval", point.name))
  return record


def _pretrain_job(plan: Any) -> Any:
  return pretrain_clip if plan.clip else pretrain


SIDE_BY_SIDE = "side_by_side-"  # pretrain/side_by_side-<members' hash>/: a group's checkpoints


def side_by_side_ok(plan: Any) -> bool:
  """Whether plan.vmap_seeds can apply: supervised pre-training from in-memory images (CLIP and
  JPEG-decoding runs train one after another)."""
  return (plan.vmap_seeds and not plan.clip
          and getattr(plan.pretrain[0], "input_pipeline", "default") == "default")


def _pretrain_record(child: Any, stage_dir: str, result: dict[str, Any],
                     seconds: float) -> dict[str, Any]:
  return {"plan": identity(child), "workdir": stage_dir,
          "result": {k: result[k] for k in PRETRAIN_FIELDS if k in result}, "seconds": seconds,
          **stamp()}


def stamp() -> dict[str, Any]:
  """When and where a stage finished (UTC; CPU and device), for the report's run line."""
  return {"finished": report.utc_now(), "machine": report.machine()}


def run_pretrain_side_by_side(plan: Any, points: list[Any], workdir: str
                              ) -> dict[Any, dict[str, Any]]:
  """The pre-training stages of `points`, trained side by side in one program (nmjax.train.
  side_by_side), holding every point's lock; returns their records. A killed group resumes
  from its own checkpoints (pretrain/side_by_side-*), removed once every record is kept."""
  children = [plan.pretrain_of(p) for p in points]
  key = hashlib.sha1(",".join(p.name for p in points).encode()).hexdigest()[:10]
  group_dir = nmjax_io.join(workdir, "pretrain", SIDE_BY_SIDE + key)
  start = time.perf_counter()
  with contextlib.ExitStack() as locks:
    stage_dirs = []
    for point, child in zip(points, children):
      stage_dir = prepare_workdir(pretrain_dir(workdir, point))
      locks.enter_context(nmjax_io.hold(stage_dir, f"study stage {point.name}"))
      plans.write(child, pretrain.NAME, stage_dir)
      stage_dirs.append(stage_dir)
    results = side_by_side.run(children, stage_dirs, prepare_workdir(group_dir))
    if results[0].get("preempted"):
      raise Preempted(f"pre-training of {len(points)} runs side by side")
    seconds = (time.perf_counter() - start) / len(points)
    records = {}
    for point, child, stage_dir, result in zip(points, children, stage_dirs, results):
      record = _pretrain_record(child, stage_dir, result, seconds)
      record["side_by_side"] = len(points)
      nmjax_io.write_json(nmjax_io.join(stage_dir, STAGE_FILE), record)
      nmjax_io.rmtree(nmjax_io.join(workdir, "eval", point.name))
      records[point] = {**record, "together": len(points)}  # Not in stage.json: this run's.
  nmjax_io.rmtree(group_dir)
  return records


# -------------------------------------------------------------------------------- evaluation


def eval_plan(plan: Any, point: Any, pre: dict[str, Any], tune: dict[str, Any] | None) -> Any:
  """A point's nmtune plan over its encoder, with the tune stage's weights."""
  return dataclasses.replace(plan.evaluate_of(point), checkpoint=pre["workdir"],
                             **(tune["weights"] if tune else {}))


def eval_identity(child: Any, pre: dict[str, Any]) -> dict[str, Any]:
  """The evaluation's plan and the encoder it reads (its pre-training stage's plan)."""
  return {**identity(child), "encoder": pre["plan"]}


def finished_eval(workdir: str, point: Any, child: Any,
                  pre: dict[str, Any]) -> dict[str, Any] | None:
  """A point's finished evaluation record for this plan and encoder, or None (then it runs:
  a changed downstream field runs the evaluation again, never the pre-training)."""
  stage_dir = nmjax_io.join(workdir, "eval", point.name)
  saved = read_json(nmjax_io.join(stage_dir, STAGE_FILE))
  if saved is None or saved["plan"] != eval_identity(child, pre):
    return None
  saved["workdir"] = nmjax_io.absolute(stage_dir)
  return saved


def run_eval(workdir: str, point: Any, child: Any, pre: dict[str, Any]) -> dict[str, Any]:
  """Runs a point's nmtune job (reusing the features cached with its encoder); its record."""
  start = time.perf_counter()
  stage_dir = prepare_workdir(nmjax_io.join(workdir, "eval", point.name))
  stage_file = nmjax_io.join(stage_dir, STAGE_FILE)
  if nmjax_io.exists(stage_file):
    nmjax_io.remove(stage_file)  # Another plan's: it runs again.
  plans.write(child, tuning.NAME, stage_dir)
  out, _ = tuning.evaluate_checkpoint(child, stage_dir)  # Its files; the study prints its line.
  with nmjax_io.atomic_path(nmjax_io.join(stage_dir, HITS_FILE)) as tmp, open(tmp, "wb") as f:
    np.savez_compressed(f, **out.correct)  # Before stage.json.
  record = {"plan": eval_identity(child, pre), "workdir": stage_dir, "rows": out.rows,
            "spectra": out.spectra, "features_extracted": out.features_extracted,
            "seconds": time.perf_counter() - start, **stamp()}
  nmjax_io.write_json(stage_file, record)
  return record


# ------------------------------------------------------------------------------- the tune stage


def _tune_identity(plan: Any) -> dict[str, Any]:
  """The tune stage's plan and the encoder it reads (the first seed's r = 0 pre-training; a
  finished one's plan equals it, or finished_pretrain refused it)."""
  return {**identity(plan.tune), "encoder": identity(plan.tune_pretrain)}


def _finished_tune(plan: Any, tune_dir: str) -> dict[str, Any] | None:
  saved = read_json(nmjax_io.join(tune_dir, STAGE_FILE))
  if saved is None or saved["plan"] != _tune_identity(plan):
    return None
  return saved


def _first_pretrain(plan: Any, workdir: str) -> dict[str, Any]:
  """The first seed's r = 0 pre-training record (what the tune stage reads): found finished,
  run here (taking its point's lock) or, while another process runs it, waited for."""
  point = Point(plan.seeds[0], 0.0)
  pre_dir = prepare_workdir(pretrain_dir(workdir, point))
  what, said = f"the pre-training stage {point.name}", False
  while True:
    pre = finished_pretrain(plan, point, workdir)
    if pre is not None:
      return pre
    try:
      with nmjax_io.hold(pre_dir, f"study stage {point.name}"):
        pre = finished_pretrain(plan, point, workdir)
        if pre is None:
          print(f"[study] the tune stage needs {what}: running it here", flush=True)
          pre = run_pretrain(plan, point, workdir)
        return pre
    except nmjax_io.InUse:
      if not said:
        print(f"[study] the tune stage waits for {what} (another process runs it)", flush=True)
        said = True
      time.sleep(2.0)


def tuned(plan: Any, workdir: str, *, run: bool = True) -> dict[str, Any] | None:
  """The tune stage's record: reused when finished with this plan, else (run=True) run under
  its lock, which a second process waits on; None without a grid, or when unfinished and
  run=False."""
  if plan.tune is None:
    return None
  tune_dir = nmjax_io.join(workdir, study_tune.STAGE_NAME)
  record = _finished_tune(plan, tune_dir)
  if record is not None or not run:
    return record
  pre = _first_pretrain(plan, workdir)
  with nmjax_io.hold(prepare_workdir(tune_dir), "study tune stage", wait=True):
    record = _finished_tune(plan, tune_dir)  # Another process may have finished it while waiting.
    if record is None:
      child = dataclasses.replace(plan.tune, checkpoint=pre["workdir"])
      record = study_tune.run_grid(child, tasks_lib.resolve(",".join(plan.tasks)), tune_dir,
                        _tune_identity(plan))
      print(f"[study] tune stage done in {format_seconds(record['seconds'])}: "
            + "; ".join(study_tune.lines(record)), flush=True)
  return record


# -------------------------------------------------------------------------------- the sweep


def run_point(plan: Any, point: Any, workdir: str, done: dict | None, clock: Countdown,
              index: int) -> tuple[dict, dict, int]:
  """The two stages of one point (each run or reused), holding the point's lock (a second
  process on the same point is refused); returns their records and how many ran."""
  pre_dir = prepare_workdir(pretrain_dir(workdir, point))
  with nmjax_io.hold(pre_dir, f"study stage {point.name}"):
    num_stages = 2 * len(plan.points)
    start, ran = time.perf_counter(), 0
    pre = done if done is not None else finished_pretrain(plan, point, workdir)
    if pre is None:
      pre, ran = run_pretrain(plan, point, workdir), 1
    seconds = clock.done("pretrain", time.perf_counter() - start) if ran else None
    text = report.pretrain_text(pre)
    if pre.get("together"):  # Trained side by side in this run: its share of the group's time.
      seconds, text = pre["seconds"], f"{text} (one of {pre['together']} side by side)"
    report.stage_line(index + 1, num_stages, f"pretrain {point}", text, seconds, clock)
    tune = tuned(plan, workdir)
    start, seconds = time.perf_counter(), None
    child = eval_plan(plan, point, pre, tune)
    ev = finished_eval(workdir, point, child, pre)
    if ev is None:
      ev = run_eval(workdir, point, child, pre)
      seconds = clock.done("eval", time.perf_counter() - start)
      ran += 1
    report.stage_line(index + 2, num_stages, f"eval {point}",
                      report.averages_line(ev["rows"], list(plan.methods)), seconds, clock)
    return pre, ev, ran


def run_one_point(plan: Any, point: Any, workdir: str) -> dict[str, Any]:
  """A job-array task: one point's stages, no report."""
  _, _, ran = run_point(plan, point, workdir, None, Countdown({"pretrain": 1, "eval": 1}),
                        2 * plan.points.index(point))
  print(f"[study] stage {point.name} done ({ran} of its 2 parts run); when every stage is"
        " done, --config.stage=render builds the report", flush=True)
  return {"stage": point.name, "stages_run": ran, "workdir": workdir}


def run_sweep(plan: Any, workdir: str) -> dict[str, Any]:
  """Every point's stages in turn, then the report job over the workdir."""
  num_stages = 2 * len(plan.points)
  # Finished pre-training stages (another study's fails here, before any work); the ETA: the rest.
  done = {p: finished_pretrain(plan, p, workdir) for p in plan.points}
  tune = tuned(plan, workdir, run=False)
  pending = {"pretrain": sum(done[p] is None for p in plan.points),
             "eval": sum(done[p] is None or (plan.tune is not None and tune is None)
                         or finished_eval(workdir, p, eval_plan(plan, p, done[p], tune),
                                          done[p]) is None for p in plan.points)}
  print(f"[study] {len(plan.ratios)} noise ratio(s) x {len(plan.seeds)} seed(s): {num_stages}"
        f" stages ({pending['pretrain'] + pending['eval']} to run, the others done); tasks"
        f" {', '.join(plan.tasks)}; methods {', '.join(plan.methods)}; workdir"
        f" {workdir}", flush=True)
  clock, ran = Countdown(pending), 0
  try:
    waiting = [p for p in plan.points if done[p] is None]
    if len(waiting) > 1 and side_by_side_ok(plan):
      print(f"[study] pre-training {len(waiting)} stages side by side in one program"
            " (--config.vmap_seeds=false: one after another)", flush=True)
      done.update(run_pretrain_side_by_side(plan, waiting, workdir))
      for point in waiting:
        clock.done("pretrain", done[point]["seconds"])
      ran += len(waiting)
    elif len(waiting) > 1 and plan.vmap_seeds:
      print("[study] vmap_seeds: CLIP and JPEG pre-training run one after another", flush=True)
    for i, point in enumerate(plan.points):
      ran += run_point(plan, point, workdir, done[point], clock, 2 * i)[2]
  except Preempted as e:
    print(f"[study] preempted during {e}; the finished stages are saved: run the same command"
          " to continue", flush=True)
    return {"preempted": True, "stages_run": ran}
  result = report.render_study(workdir)
  print(f"[study] done in {format_seconds(clock.elapsed())} ({ran} stage(s) run,"
        f" {num_stages - ran} reused). Report in {workdir}: " + ", ".join(report.STUDY_FILES)
        + ", tb/ (tensorboard --logdir " + nmjax_io.join(workdir, "tb")
        + "); per-task curves in eval/*/curves.png", flush=True)
  return {**result, "stages_run": ran}
