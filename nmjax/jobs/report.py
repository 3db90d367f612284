"""The report job: renders finished study workdirs (the study's own, or a user's list) into
results.jsonl, results.md, three plots and tb/ (TensorBoard).

  main.py --config configs/report.py --config.workdirs=runs/study_a,runs/study_b --workdir OUT

A study workdir holds plan.json (the study's plan: its points, methods, tasks) and a stage.json
per finished stage (pretrain/seed<S>_r<R>/, eval/seed<S>_r<R>/, tune/). A point counts when its
pre-training and its evaluation on that encoder are finished; a noise ratio is shown when every
seed has it. Records: "pretrain" (with memorization_gap), "task" (with delta and delta_ci95 for
r > 0, nmjax.stats), "spectrum", and the "tune" record.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
from typing import Any

import ml_collections
import numpy as np

from nmjax import features as features_lib, io as nmjax_io, noise, stats, tasks as tasks_lib
from nmjax.config import parse_numbers
from nmjax.errors import ConfigError
from nmjax.jobs import claims, figures, plans, tables
from nmjax.jobs.workdir import single_process
from nmjax.progress import Countdown, format_seconds

NAME = "report"
"""The job's name: config.job's value and its key in nmjax.jobs.JOBS."""
HITS_FILE = "correct.npz"  # An evaluation stage's per-example hits: "task|method" -> (N,) bool
STAGE_FILE = "stage.json"
STUDY_FILES = tables.STUDY_FILES
CLIP_SWEEP = {"noise": "caption", "pretrain_field": "test_i2t_acc"}


@dataclasses.dataclass(frozen=True)
class ReportPlan:
  """A checked report (configs/report.py).

  Attributes:
    workdirs: the study workdirs to render together (each holding a study's plan.json).
    seeds: the seeds to render (empty: every seed the workdirs hold).
  """
  workdirs: tuple[str, ...]
  seeds: tuple[int, ...] = ()


def validate(config: ml_collections.ConfigDict) -> ReportPlan:
  """Checks a report config once, before any work.

  Args:
    config: a complete report config (configs/report.py).

  Returns:
    The report's ReportPlan.

  Raises:
    ConfigError: no workdirs, one that holds no study (no plan.json), or a seed none of them
      holds.
  """
  seeds = (parse_numbers(config, "seeds", int, lambda s: s >= 0, "seeds of the studies,"
                         " comma-separated, e.g. 0,1,2,3 (empty: all)")
           if str(config.seeds).strip() else [])
  plan = plans.from_config(ReportPlan, config, job=NAME, seeds=tuple(seeds))
  if not plan.workdirs:
    raise ConfigError("config.workdirs is empty; pass study workdirs, comma-separated")
  held = []
  for workdir in plan.workdirs:
    study = _read(nmjax_io.join(workdir, plans.PLAN_FILE))
    if study is None:
      raise ConfigError(f"config.workdirs entry {workdir!r} holds no study ({plans.PLAN_FILE}"
                        " is missing); pass the --workdir of a study")
    held += [s for s in study["seeds"] if s not in held]
  for seed in plan.seeds:
    if seed not in held:
      raise ConfigError(f"config.seeds entry {seed} is not a seed of the studies; allowed:"
                        f" {', '.join(map(str, held))} (empty: all)")
  return plan


lock_index = single_process  # One process: lock file 0.


def run(plan: ReportPlan, workdir: str) -> dict[str, Any]:
  """Renders what is finished in plan.workdirs into `workdir`.

  Writes results.jsonl, results.md, the plots and tb/ (TensorBoard); a point counts once its
  pre-training and evaluation are both finished.

  Args:
    plan: the report's plan (validate).
    workdir: where the report goes (made if needed).

  Returns:
    The rendered report's summary (render_study's).
  """
  return render_study(workdir, sources=plan.workdirs, partial=True, seeds=plan.seeds)


# ----------------------------------------------------------------------------- reading stages


def _read(path: str) -> dict[str, Any] | None:
  try:
    return json.loads(nmjax_io.read_text(path))
  except (OSError, ValueError):
    return None


def load_hits(path: str) -> dict[str, np.ndarray]:
  """An evaluation stage's hits file (nmjax.stats.load_hits, for a bucket stage too); {} when
  it was not kept."""
  if not nmjax_io.is_cloud(path):
    return stats.load_hits(path)
  return features_lib.npz_arrays(path) if nmjax_io.exists(path) else {}


def _point_name(seed: int, ratio: float) -> str:
  return f"seed{seed}_r{ratio:g}"


def finished_points(workdir: str, seeds: list[int], ratios: list[float]
                    ) -> dict[tuple[int, float], tuple[dict, dict]]:
  """{(seed, r): (pre-training record, evaluation record)} of the points finished in workdir."""
  found = {}
  for seed in seeds:
    for ratio in ratios:
      name = _point_name(seed, ratio)
      pre = _read(nmjax_io.join(workdir, "pretrain", name, STAGE_FILE))
      ev = _read(nmjax_io.join(workdir, "eval", name, STAGE_FILE))
      if pre is None or ev is None or ev["plan"].get("encoder") != pre["plan"]:
        continue
      pre["workdir"] = nmjax_io.absolute(nmjax_io.join(workdir, "pretrain", name))
      ev["workdir"] = nmjax_io.absolute(nmjax_io.join(workdir, "eval", name))
      found[(seed, ratio)] = (pre, ev)
  return found


def records(points: dict[tuple[int, float], tuple[dict, dict]], tasks: list[Any]
            ) -> list[dict[str, Any]]:
  """results.jsonl's records from the finished points, with the paired deltas and gains from
  each evaluation's hits file."""
  out = []
  for (seed, ratio), (pre, ev) in points.items():
    common = {"seed": seed, "noise_ratio": ratio}
    out.append({"record": "pretrain", **common, **pre["result"],
                "memorization_gap": noise.memorization_gap(pre["result"]),
                "seconds": pre["seconds"], "workdir": pre["workdir"]})
    for row in ev["rows"]:
      out.append({"record": "task", **common, **{k: v for k, v in row.items()
                                                 if k not in ("seed", "noise_ratio")}})
    for task in tasks:
      out.append({"record": "spectrum", **common, "task": task.name, "kind": task.kind,
                  **ev["spectra"][task.name]})
  hits = {key: load_hits(nmjax_io.join(ev["workdir"], HITS_FILE))
          for key, (_, ev) in points.items()}

  def hits_of(r):
    return hits[(r["seed"], r["noise_ratio"])].get(f"{r['task']}|{r['method']}")

  stats.add_deltas(out, hits_of)
  stats.add_gains(out, hits_of)
  stats.add_spectral_deltas(out)
  return out


# ----------------------------------------------------------------------------------- rendering


def render_study(workdir: str, *, sources: tuple[str, ...] = (), partial: bool = False,
                 seeds: tuple[int, ...] = ()) -> dict[str, Any]:
  """Writes the report of the studies in `sources` (default: workdir itself) into workdir and
  prints its tables; partial: of what is finished (naming what is missing), else all of it;
  seeds: those seeds only (default: all)."""
  sources = tuple(sources) or (workdir,)
  study = _read(nmjax_io.join(sources[0], plans.PLAN_FILE))
  held, ratios = list(study["seeds"]), list(study["ratios"])
  tasks = tasks_lib.resolve(",".join(study["tasks"]))
  points: dict[tuple[int, float], tuple[dict, dict]] = {}
  for source in sources:
    other = _read(nmjax_io.join(source, plans.PLAN_FILE)) or study
    held += [s for s in other["seeds"] if s not in held]
    points.update(finished_points(source, list(other["seeds"]), list(other["ratios"])))
  seeds = list(seeds) or held
  missing = [_point_name(s, r) for s in seeds for r in ratios if (s, r) not in points]
  shown = [r for r in ratios if all((s, r) in points for s in seeds)]
  if not shown:
    raise ConfigError(f"--workdir={sources[0]} holds no noise ratio finished for every seed; run"
                      " the missing stages first (--config.stage=list names them)")
  points = {(s, r): points[(s, r)] for s in seeds for r in shown}
  out = records(points, tasks)
  plumbing = ("a smoke run" if study.get("smoke", False)
              else "one seed" if len(seeds) < 2 else "")
  if not plumbing:
    claims.add_claims(out, shown, seeds)
  tune = _read(nmjax_io.join(sources[0], "tune", STAGE_FILE)) if study["tune"] else None
  if tune:  # The weights' record: chosen on the study's first seed's r = 0 encoder.
    out.append({"record": "tune", "seed": study["seeds"][0], "noise_ratio": 0.0, **{
        k: tune[k] for k in ("grid", "val_fraction", "members", "chosen", "weights")}})
  sweep = tables.Sweep(shown, seeds, list(study["methods"]), {t.name: t.kind for t in tasks},
                       list(study["spectrum_tasks"]), plumbing=plumbing,
                       **(CLIP_SWEEP if study["pretrain_job"] == "pretrain_clip" else {}))
  pre = study["pretrain"][0]
  title = f"{pre['model']} pre-trained on {pre['dataset']} with {noise_words(study)}"
  header = "\n\n".join([describe(study, seeds, tasks, tune), run_line(points, seeds)]
                        + ([] if plumbing else [claims_section(out)]))
  table = figures.write_study(out, sweep, workdir, header=header, title=title)
  print("\n" + "\n\n".join(filter(None, [tables.plumbing_line(sweep), header,
                                         tables.format_summary(table)])), flush=True)
  if partial:
    print(f"[study] report in {workdir} from {len(points)} of {len(seeds) * len(ratios)} stage(s)"
          + (f"; missing: {', '.join(missing)}" if missing else ""), flush=True)
  return {"records": table.records, "missing": missing, "workdir": workdir}


INTERVAL_SENTENCE = (
    "Each interval is 95% and two-level: the spread of the per-seed values enters through a t"
    " distribution with n - 1 degrees of freedom (a bootstrap over so few seeds is too narrow),"
    " the sampling of the test examples, which all seeds share, through a paired bootstrap (one"
    " resample for both fits and every seed) scaled to the part of the examples' variance the"
    f" seeds have in common, the two added draw by draw over {stats.RESAMPLES} draws; the"
    " spectral metrics' changes get t intervals over seeds (nmjax.stats).")
VERDICT_SENTENCE = (
    "A claim is reproduced where its interval excludes 0 in the paper's direction, contradicted"
    " where it excludes 0 the other way, and undetermined where it holds 0.")


def claims_section(out: list[dict[str, Any]]) -> str:
  """results.md's claims: how the intervals and verdicts are read, then the table."""
  return "\n\n".join(["## The paper's claims", f"{INTERVAL_SENTENCE} {VERDICT_SENTENCE}",
                       claims.format_claims(out).rstrip("\n") or "(No claim is measured by"
                       " this study's tasks and methods.)"])


def utc_now() -> str:
  """The time now, UTC, to the second: '2026-02-01T10:22:05Z'."""
  now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
  return now.isoformat().replace("+00:00", "Z")


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
  """This host as a stage records it: CPU model and cores, jax's device kind and count."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
          "device_kind": devices[0].device_kind, "device_count": len(devices)}


def machine_words(host: dict[str, Any]) -> str:
  """'AMD EPYC 7B13 (2 cores)', with the accelerator where there is one."""
  words = f"{host['cpu_model']} ({host['cpu_cores']} cores)"
  if host.get("device_kind", "cpu").lower() != "cpu":
    words += f", {host['device_count']} x {host['device_kind']}"
  return words


def run_line(points: dict[tuple[int, float], tuple[dict, dict]], seeds: list[int]) -> str:
  """The run's date (the last stage's, UTC), machine(s) and seeds, as the stages recorded
  them."""
  stages = [stage for pair in points.values() for stage in pair]
  dates = sorted(s["finished"] for s in stages if s.get("finished"))
  hosts = list(dict.fromkeys(machine_words(s["machine"]) for s in stages if s.get("machine")))
  when = f"finished {dates[-1].replace('T', ' ').replace('Z', ' UTC')}" if dates else (
      "date not recorded by its stages")
  where = f"on {'; '.join(hosts)}" if hosts else "machine not recorded by its stages"
  return (f"Run: {when}, {where}; seeds {', '.join(map(str, seeds))} ({len(seeds)}"
          f" seed{'s' if len(seeds) != 1 else ''}).")


def noise_words(study: dict[str, Any]) -> str:
  if study["pretrain_job"] == "pretrain_clip":
    return "caption noise r (exactly r of the pairs given another pair's caption)"
  return (f"{study['pretrain'][0]['noise_type']} label noise r (exactly r of the labels of the"
          " images used changed)")


def _kind_counts(tasks: list[Any]) -> str:
  counts = {}
  for task in tasks:
    counts[task.kind] = counts.get(task.kind, 0) + 1
  return ", ".join(f"{n} {kind.upper() if kind in ('id', 'ood') else kind}"
                   for kind, n in counts.items())


def describe(study: dict[str, Any], seeds: list[int], tasks: list[Any],
             tune: dict[str, Any] | None) -> str:
  """The report's paragraph on the design: pre-training, the downstream tasks and methods."""
  pre, tuning = study["pretrain"][0], study["evaluate"][0]
  images = ("all" if pre["max_train_examples"] <= 0
            else f"the first {pre['max_train_examples']:,}")
  length = (f"{pre['num_train_steps']} steps" if pre["num_train_steps"] > 0
            else f"{pre['num_epochs']:g} epochs")
  augment = (", no augmentation" if not pre["crop_padding"] and not pre["flip"]
             else f", crop padding {pre['crop_padding']}, flip {bool(pre['flip'])}")
  views = tuning["views"] + (f" ({tuning['cached_views']} augmented views per image)"
                             if tuning["views"] == "cached" else "")
  return (f"Pre-training: {pre['model']} on {pre['dataset']} ({images} training images, {length},"
          f" batch {pre['batch_size']}, {pre['optimizer']}{augment}) with {noise_words(study)};"
          f" seed(s) {', '.join(map(str, seeds))}. Downstream: {', '.join(study['methods'])} over"
          f" the frozen features on {len(tasks)} tasks ({_kind_counts(tasks)}),"
          f" {tuning['epochs']} epochs on {views}; accuracy in % averaged over tasks; SVE averaged"
          " over ID tasks and LSVR over OOD tasks, of the frozen test features (row centering)."
          + (" Cells are mean ± sample std over seeds." if len(seeds) > 1 else "")
          + grid_words(tuning) + tune_words(tune))


def grid_words(tuning: dict[str, Any]) -> str:
  """The NMTune grid's sentence of the description ('' without one)."""
  if not tuning["grid"]:
    return ""
  return (f" NMTune's configuration is chosen per train split among the grid {tuning['grid']}"
          f" on a {100 * tuning['val_fraction']:g}% stratified validation split of train (never"
          " a test set); every configuration's accuracies are in results.jsonl (grid_results).")


def tune_words(tune: dict[str, Any] | None) -> str:
  """The tune stage's sentence of the description ('' without one)."""
  if tune is None:
    return ""
  weights = ", ".join(f"{k}={v:g}" for k, v in tune["weights"].items())
  best = tune["members"][tune["chosen"]]["mean_val_accuracy"]
  return (f" NMTune's weights ({weights}) were chosen once among the grid {tune['grid']} on a"
          f" {100 * tune['val_fraction']:g}% stratified validation split of the r = 0 encoder's"
          f" train features (mean validation accuracy {100 * best:.2f}%), then frozen for every r"
          " (results.jsonl: the \"tune\" record).")


# ------------------------------------------------------------------------- the study's progress


def stage_line(index: int, num_stages: int, what: str, text: str, seconds: float | None,
               clock: Countdown) -> None:
  took = ", reused" if seconds is None else f" | {format_seconds(seconds)}"
  print(f"[study] stage {index}/{num_stages} {what}: {text}{took} | {clock.line()}", flush=True)


def pretrain_text(record: dict[str, Any]) -> str:
  """A pre-training stage's line: held-out retrieval (CLIP) or test accuracy and the gap."""
  result = record["result"]
  if result.get("test_i2t_acc") is not None:
    return (f"held-out pairs: image->text {result['test_i2t_acc']:.4f}, text->image"
            f" {result['test_t2i_acc']:.4f} (in-batch retrieval)")
  if result.get("test_acc") is None:
    return ""
  clean = result.get("train_acc_clean", math.nan)
  gap = noise.memorization_gap(result)
  return (f"test acc {result['test_acc']:.4f} (train acc vs clean labels {clean:.4f}"
          + ("" if gap is None else f", memorization gap {gap:+.4f}") + ")")


def averages_line(rows: list[dict[str, Any]], methods: list[str]) -> str:
  """'ID lp 82.74 mlp 91.57 | OOD ...': each method's average accuracy (%) per kind."""
  parts = []
  for kind in tasks_lib.KINDS:
    cells = [(m, np.mean(a)) for m in methods if (a := [
        r["accuracy"] for r in rows if r["method"] == m and r["kind"] == kind])]
    if cells:
      parts.append(f"{tasks_lib.KIND_LABELS[kind]} "
                   + " ".join(f"{m} {100 * float(v):.2f}" for m, v in cells))
  return " | ".join(parts)
