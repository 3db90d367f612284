"""The study's report parts (part of the study job, nmjax/jobs/study.py): results.jsonl's
records from the finished stages, the report's description of the design and the progress lines
of the stages."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from nmjax import noise, stats
from nmjax.progress import Countdown, format_seconds


def records(plan: Any, stages: Mapping[Any, tuple[dict, dict]], hits_file: str
            ) -> list[dict[str, Any]]:
  """results.jsonl's records from the finished stages ({point: (pre-training record,
  evaluation record)}), with the paired deltas from each evaluation's hits file."""
  out = []
  for point in (p for p in plan.points if p in stages):
    pre, ev = stages[point]
    common = {"seed": point.seed, "noise_ratio": point.noise_ratio}
    out.append({"record": "pretrain", **common, **pre["result"],
                    "memorization_gap": noise.memorization_gap(pre["result"]),
                    "seconds": pre["seconds"], "workdir": pre["workdir"]})
    for row in ev["rows"]:
      out.append({"record": "task", **common, **{k: v for k, v in row.items()
                                                     if k not in ("seed", "noise_ratio")}})
    for task in plan.tasks:
      spectrum = ev["spectra"][task.name]
      out.append({"record": "spectrum", **common, "task": task.name, "kind": task.kind,
                      **spectrum})
  hits = {(p.seed, p.noise_ratio): stats.load_hits(os.path.join(stages[p][1]["workdir"],
                                                                 hits_file)) for p in stages}
  def hits_of(r):
    return hits[(r["seed"], r["noise_ratio"])].get(f"{r['task']}|{r['method']}")

  stats.add_deltas(out, hits_of)
  stats.add_gains(out, hits_of)
  return out


def noise_words(config: ml_collections.ConfigDict, clip: bool) -> str:
  if clip:
    return "caption noise r (exactly r of the pairs given another pair's caption)"
  return (f"{config.pretrain.noise_type} label noise r (exactly r of the labels of the images"
          " used changed)")


def _kind_counts(tasks: list[Any]) -> str:
  counts = {}
  for task in tasks:
    counts[task.kind] = counts.get(task.kind, 0) + 1
  return ", ".join(f"{n} {kind.upper() if kind in ('id', 'ood') else kind}"
                   for kind, n in counts.items())


def describe(config: ml_collections.ConfigDict, plan: Any, tune: dict[str, Any] | None) -> str:
  """The report's paragraph on the design: pre-training, the downstream tasks and methods."""
  pre = config.pretrain
  images = ("all" if pre.max_train_examples <= 0 else f"the first {pre.max_train_examples:,}")
  length = (f"{pre.num_train_steps} steps" if pre.num_train_steps > 0
            else f"{pre.num_epochs:g} epochs")
  augment = ""
  if "crop_padding" in pre:
    augment = (", no augmentation" if not pre.crop_padding and not pre.flip
               else f", crop padding {pre.crop_padding}, flip {bool(pre.flip)}")
  seeds = ", ".join(map(str, plan.seeds))
  views = config.nmtune.views + (f" ({config.nmtune.cached_views} augmented views per image)"
                                 if config.nmtune.views == "cached" else "")
  return (f"Pre-training: {pre.model} on {pre.dataset} ({images} training images, {length}, batch"
          f" {pre.batch_size}, {pre.optimizer}{augment}) with {noise_words(config, plan.clip)};"
          f" seed(s) {seeds}. Downstream: {', '.join(plan.methods)} over the frozen features on"
          f" {len(plan.tasks)} tasks ({_kind_counts(plan.tasks)}), {config.nmtune.epochs} epochs"
          f" on {views}; accuracy in % averaged over tasks; SVE averaged over ID tasks"
          " and LSVR over OOD tasks, of the frozen test features (row centering)."
          + (" Cells are mean ± sample std over seeds." if len(plan.seeds) > 1 else "")
          + grid_words(config.nmtune) + tune_words(tune))


def grid_words(nmtune_config: ml_collections.ConfigDict) -> str:
  """The NMTune grid's sentence of the description ('' without one)."""
  grid = nmtune_config.get("grid", "")
  if not grid:
    return ""
  return (f" NMTune's configuration is chosen per train split among the grid {grid} on a"
          f" {100 * nmtune_config.val_fraction:g}% stratified validation split of train (never"
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


def stage_line(index: int, num_stages: int, what: str, text: str, seconds: float | None,
               clock: Countdown) -> None:
  took = ", reused" if seconds is None else f" | {format_seconds(seconds)}"
  print(f"[study] stage {index}/{num_stages} {what}: {text}{took} | {clock.line()}", flush=True)


def pretrain_text(record: dict[str, Any]) -> str:
  if "test_i2t_acc" in record["result"]:
    result = record["result"]
    return (f"held-out pairs: image->text {result['test_i2t_acc']:.4f}, text->image"
            f" {result['test_t2i_acc']:.4f} (in-batch retrieval)")
  acc = record["result"].get("test_acc")
  if acc is None:
    return ""
  clean = record["result"].get("train_acc_clean", math.nan)
  gap = noise.memorization_gap(record["result"])
  return (f"test acc {acc:.4f} (train acc vs clean labels {clean:.4f}"
          + ("" if gap is None else f", memorization gap {gap:+.4f}") + ")")
