"""The study's tune stage (part of the study job, nmjax/jobs/study.py): NMTune's regularizer
weights chosen once, on the r = 0 encoder, then frozen for every point of the sweep.

The stage reads the first seed's r = 0 pre-training and, on every distinct train split of the
study's tasks, trains config.tune_grid's configurations of NMTune (in one jitted program per
split, nmjax.nmtune.fit_grid_multi) on the study's train views with a seeded, stratified
validation split of config.tune_val_fraction carved from that train split. The configuration
with the best validation accuracy averaged over the splits is chosen (nmjax.nmtune.choose); no
test set is read (the programs are scored only on their own train features). Its weights go
into every evaluation stage's NMTune config, so each evaluation's identity includes them.
Written to WORKDIR/tune/stage.json: the grid, every configuration's validation accuracy per
split and on average, the chosen one.
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections
import numpy as np

from nmjax import evaluate, nmtune, report, tasks as tasks_lib
from nmjax.config import tuning_config
from nmjax.data import sources
from nmjax.errors import ConfigError
from nmjax.jobs import prepare_workdir
from nmjax.nmtune import grid as grid_lib

STAGE_NAME = "tune"


def config_of(config: ml_collections.ConfigDict, seed: int,
              checkpoint: str) -> ml_collections.ConfigDict:
  """The tune stage's NMTune config: the study's, with the grid and its validation split."""
  cfg = tuning_config(config.nmtune, method="nmtune", tasks=config.tasks)
  cfg.checkpoint = checkpoint
  cfg.seed = int(seed)
  cfg.data_dir = config.data_dir
  cfg.grid = config.tune_grid
  cfg.val_fraction = float(config.tune_val_fraction)
  return cfg


def enabled(config: ml_collections.ConfigDict) -> bool:
  return bool(str(config.get("tune_grid", "")).strip())


def check(config: ml_collections.ConfigDict) -> None:
  """Fails with one line when the grid or its validation fraction is malformed. (The stage
  pre-trains the first seed's r = 0 encoder itself when the sweep has no r = 0.)"""
  if not enabled(config):
    return
  if not 0 < float(config.tune_val_fraction) < 1:
    raise ConfigError(f"config.tune_val_fraction={config.tune_val_fraction} is out of range;"
                      " allowed: 0 < tune_val_fraction < 1")
  fields = [f for f, _ in nmtune.parse_grid(config.tune_grid)]
  if not fields:
    raise ConfigError("config.tune_grid is empty after parsing; e.g. svd_weight=0.001,0.01")


def check_held_out(config: ml_collections.ConfigDict, tasks: list[Any]) -> None:
  """Fails with one line when a task probes held-out images (nmjax.tasks part "held_out") of
  the pre-training dataset that the pre-training reads (it reads the first max_train_examples)."""
  pretrain = config.pretrain
  for task in tasks:
    if task.train.part == "held_out" and task.train.dataset == pretrain.dataset:
      size = pretrain.get("max_train_examples", -1)
      info = sources.get_source(pretrain.dataset, data_dir=config.data_dir or None).info
      limit = info.splits["train"] - tasks_lib.HELD_OUT
      if size <= 0 or size > limit:
        raise ConfigError(f"config.pretrain.max_train_examples={size} reads images the task"
                          f" {task.name} probes as never pre-trained on (the last"
                          f" {tasks_lib.HELD_OUT:,}); allowed: 1..{limit}")


def run(cfg: ml_collections.ConfigDict, tasks: list[Any], tune_dir: str,
        identity: dict[str, Any]) -> dict[str, Any]:
  """Runs the tune stage in tune_dir; returns (and writes) its record."""
  start = time.perf_counter()
  tune_dir = prepare_workdir(tune_dir)
  cache = evaluate.open_cache(cfg, tune_dir, batch_size=cfg.extract_batch_size,
                              batch_field="extract_batch_size")
  splits = list(dict.fromkeys(t.train for t in tasks))
  members = grid_lib.expand(cfg)  # Each configuration's grid-field values, in the grid's order.
  per_split, diverged = {}, [False] * len(members)
  for split in splits:
    plain = cache.get(split)
    train = plain
    if cfg.views != "features":
      train = evaluate.augmented_views(cache, split, cfg.views, num_views=cfg.cached_views,
                                       seed=cfg.seed, plain=plain.features)
    points = nmtune.point_configs(evaluate.method_config(
        cfg, "nmtune", cache.info(split.dataset).num_classes))
    results = [r["train"] for r in nmtune.fit_grid_multi(train, {"train": plain}, points)]
    per_split[str(split)] = [r.get("val_accuracy") for r in results]
    diverged = [d or bool(r.get("diverged")) for d, r in zip(diverged, results)]
    print(f"[study] tune on {split}: val " + " ".join(
        f"{v:.4f}" for v in per_split[str(split)]), flush=True)
  mean_val = [float(np.mean([per_split[s][i] for s in per_split])) for i in range(len(members))]
  chosen = nmtune.choose(mean_val, diverged)
  record = {"config": identity, "workdir": tune_dir, "grid": cfg.grid,
            "val_fraction": cfg.val_fraction, "members": [
                {"values": m, "val_accuracy": {s: per_split[s][i] for s in per_split},
                 "mean_val_accuracy": mean_val[i], "diverged": diverged[i]}
                for i, m in enumerate(members)],
            "chosen": chosen, "weights": members[chosen],
            "seconds": time.perf_counter() - start}
  report.write_json(f"{tune_dir}/stage.json", record)
  return record


def lines(record: dict[str, Any]) -> list[str]:
  """The tune stage's report lines: each configuration's mean validation accuracy, the chosen."""
  out = []
  for i, member in enumerate(record["members"]):
    values = " ".join(f"{k}={v:g}" for k, v in member["values"].items())
    note = " <- chosen" if i == record["chosen"] else ""
    out.append(f"{values}: mean val {member['mean_val_accuracy']:.4f}{note}")
  return out
