"""The study's tune stage (part of the study job, nmjax/jobs/study.py): NMTune's regularizer
weights chosen once, on the r = 0 encoder, then frozen for every point of the sweep.

The stage reads the first seed's r = 0 pre-training and, on every distinct train split of the
study's tasks, trains the grid's configurations of NMTune (in one jitted program per split,
nmjax.nmtune.fit_grid_multi) on the study's train views with a seeded, stratified validation
split carved from that train split. The configuration with the best validation accuracy averaged
over the splits is chosen (nmjax.nmtune.choose); no test set is read. Its weights go into every
evaluation stage's plan, so each evaluation's identity includes them. Written to
WORKDIR/tune/stage.json: the grid, every configuration's validation accuracy per split and on
average, the chosen one. A changed plan (e.g. config.nmtune.epochs) runs the stage again.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from nmjax import evaluate, io as nmjax_io, nmtune
from nmjax.jobs import tuning
from nmjax.jobs.workdir import prepare_workdir
from nmjax.nmtune import grid as grid_lib, runs

STAGE_NAME = "tune"


def run_grid(plan: Any, tasks: list[Any], tune_dir: str,
             identity: dict[str, Any]) -> dict[str, Any]:
  """Runs the tune stage's plan (an nmtune plan with a grid) in tune_dir; returns (and
  writes) its record."""
  start = time.perf_counter()
  tune_dir = prepare_workdir(tune_dir)
  cache = tuning.open_cache(plan, tune_dir)
  splits = list(dict.fromkeys(t.train for t in tasks))
  members = grid_lib.expand(plan)  # Each configuration's grid values, in the grid's order.
  per_split, diverged = {}, [False] * len(members)
  for split in splits:
    plain = cache.get(split)
    train = plain
    if plan.views != "features":
      train = evaluate.augmented_views(cache, split, plan.views, num_views=plan.cached_views,
                                       seed=plan.seed, plain=plain.features)
    points = grid_lib.point_configs(tuning.method_config(
        plan, "nmtune", cache.info(split.dataset).num_classes))
    results = [r["train"] for r in nmtune.fit_grid_multi(train, {"train": plain}, points)]
    runs.refuse_total_divergence(results, train)  # Names the cause (the features' scale).
    per_split[str(split)] = [r.get("val_accuracy") for r in results]
    diverged = [d or bool(r.get("diverged")) for d, r in zip(diverged, results)]
    print(f"[study] tune on {split}: val " + " ".join(
        f"{v:.4f}" for v in per_split[str(split)]), flush=True)
  mean_val = [float(np.mean([per_split[s][i] for s in per_split])) for i in range(len(members))]
  chosen = grid_lib.choose(mean_val, diverged)
  record = {"plan": identity, "workdir": tune_dir, "grid": plan.grid,
            "val_fraction": plan.val_fraction, "members": [
                {"values": m, "val_accuracy": {s: per_split[s][i] for s in per_split},
                 "mean_val_accuracy": mean_val[i], "diverged": diverged[i]}
                for i, m in enumerate(members)],
            "chosen": chosen, "weights": members[chosen],
            "seconds": time.perf_counter() - start}
  nmjax_io.write_json(nmjax_io.join(tune_dir, "stage.json"), record)
  return record


def lines(record: dict[str, Any]) -> list[str]:
  """The tune stage's report lines: each configuration's mean validation accuracy, the chosen."""
  out = []
  for i, member in enumerate(record["members"]):
    values = " ".join(f"{k}={v:g}" for k, v in member["values"].items())
    note = " <- chosen" if i == record["chosen"] else ""
    out.append(f"{values}: mean val {member['mean_val_accuracy']:.4f}{note}")
  return out
