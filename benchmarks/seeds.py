r"""Seeds side by side against one run after another, printed as one JSON object.

Two sections, measured in one process, side by side, on the study's pre-training (configs/
default.py: resnet_small on the first 2,500 Fashion-MNIST images, batch 128, SGD):

  runs   K whole pre-training runs (nmjax.train.supervised.run, each in a fresh workdir: data
         stream, steps, checkpoints, the final test evaluation) against the same K runs trained
         side by side in one program (nmjax.train.side_by_side.run); speed_up = the runs' total
         seconds / the side-by-side seconds, both counting their compilation; and the largest
         parameter difference between a member and its separate run after the last step.
  step   the train step alone: K plain steps one after another against one vmapped step over K
         stacked states, with the convolution's batching rule unrolled (the CPU's default) and
         grouped (NMJAX_SEED_CONV=group: XLA's grouped convolution, the accelerators' default),
         compiled as the runs compile them (nmjax.models.batching.compiler_options); and the
         plain and unrolled steps again with XLA's default options (xla_defaults), to show what
         the bitwise equality costs.

Sizes: --seeds S and --ratios give K = S x len(ratios) runs; --steps the length of each run
(0, the default: the study's whole pre-training stage, 20 epochs of 19 steps).

    .venv/bin/python benchmarks/seeds.py                         # 3 seeds x 3 ratios, 380 steps
    .venv/bin/python benchmarks/seeds.py --seeds 2 --ratios 0,0.3 --steps 20 --sections step

The JSON goes, with the command, commit, date and machine, to docs/benchmarks/seeds-<device>.json
(--out to choose).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

import provenance  # benchmarks/provenance.py

sys.path.insert(0, provenance.REPO)  # configs/ of this checkout
from configs import default as default_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from nmjax.jobs import pretrain, study  # pylint: disable=g-import-not-at-top,wrong-import-position
from nmjax.models import batching  # pylint: disable=g-import-not-at-top,wrong-import-position
from nmjax.train import checkpoint, side_by_side, supervised  # pylint: disable=g-import-not-at-top,wrong-import-position

SECTIONS = ("runs", "step")


def _plans(seeds: int, ratios: list[float], steps: int) -> list:
  config = default_config.get_config()
  if steps:
    config.pretrain.num_train_steps = steps
    config.pretrain.checkpoint_every_steps = steps
    config.pretrain.log_every_steps = steps
  return [pretrain.validate(study.pretrain_config(config, s, r))
          for s in range(seeds) for r in ratios]


def _quietly(fn, *args):
  """fn(*args) with its progress lines sent to stderr (stdout carries the JSON)."""
  stdout, sys.stdout = sys.stdout, sys.stderr
  try:
    return fn(*args)
  finally:
    sys.stdout = stdout


def _difference(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def measure_runs(plans: list) -> dict:
  with tempfile.TemporaryDirectory(prefix="nmjax-seeds-") as root:
    start = time.perf_counter()
    separate = []
    for i, plan in enumerate(plans):
      workdir = os.path.join(root, f"alone{i}")
      os.makedirs(workdir)
      separate.append(_quietly(supervised.run, plan, workdir))
    separate_s = time.perf_counter() - start
    workdirs = [os.path.join(root, f"member{i}") for i in range(len(plans))]
    for workdir in workdirs + [os.path.join(root, "group")]:
      os.makedirs(workdir)
    start = time.perf_counter()
    together = _quietly(side_by_side.run, plans, workdirs, os.path.join(root, "group"))
    together_s = time.perf_counter() - start
    differences = [_difference(checkpoint.load_state(os.path.join(root, f"alone{i}"))[1]["params"],
                               checkpoint.load_state(workdirs[i])[1]["params"])
                   for i in range(len(plans))]
  return {"runs": len(plans), "steps": together[0]["step"],
          "batch": plans[0].batch_size, "separate_s": round(separate_s, 2),
          "side_by_side_s": round(together_s, 2), "speed_up": round(separate_s / together_s, 3),
          "max_param_difference": max(differences),
          "test_acc_separate": [round(r["test_acc"], 4) for r in separate],
          "test_acc_side_by_side": [round(r["test_acc"], 4) for r in together]}


def _median_seconds(fn, state, batch, repeats: int):
  state, metrics = fn(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times), state


def measure_step(plans: list, repeats: int) -> dict:
  """Median step seconds: K plain steps, and one vmapped step (unrolled and grouped rules)."""
  plan = plans[0]
  length = max(plan.num_train_steps, 1)  # The schedule's length: the step costs the same.
  spec_of = lambda p: supervised.loop_spec(p, info, (None, None), 1, length)
  from nmjax.data import sources  # pylint: disable=import-outside-toplevel
  info = sources.get_source(plan.dataset).info
  specs = [spec_of(p) for p in plans]
  k, batch_size = len(plans), plan.batch_size
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 255, (k, batch_size, *info.image_shape), dtype=np.uint8),
           "label": rng.integers(0, info.num_classes, (k, batch_size)).astype(np.int32),
           "clean_label": rng.integers(0, info.num_classes, (k, batch_size)).astype(np.int32)}
  step = specs[0].objective.train_step
  options = batching.compiler_options()  # As the runs compile their steps.
  plain = jax.jit(step, donate_argnums=0, compiler_options=options)
  states = [jax.jit(s.init_state)() for s in specs]

  def plain_steps(fn) -> float:
    """Seconds of K plain steps of fn, one run after another (each run's median)."""
    total = 0.0
    for i in range(k):
      seconds, states[i] = _median_seconds(fn, states[i], {key: v[i] for key, v in batch.items()},
                                           repeats)
      total += seconds
    return total

  def vmapped_step(rule: str, **jit_options) -> float:
    """Seconds of one vmapped step over the K stacked states, convolutions batched by `rule`."""
    os.environ["NMJAX_SEED_CONV"] = rule
    try:
      stacked = side_by_side.stack([jax.jit(s.init_state)() for s in specs])
      vmapped = jax.jit(jax.vmap(step), donate_argnums=0, **jit_options)
      return _median_seconds(vmapped, stacked, batch, repeats)[0]
    finally:
      del os.environ["NMJAX_SEED_CONV"]

  plain_s = plain_steps(plain)
  figures = {"runs": k, "batch": batch_size, "plain_steps_s": round(plain_s, 4)}
  # What the runs' compiler options cost: both steps again with XLA's defaults (on the CPU,
  # YNNPACK reductions, whose order changes with the stack: no longer bitwise).
  defaults_s = plain_steps(jax.jit(step, donate_argnums=0))
  figures["xla_defaults"] = {"plain_steps_s": round(defaults_s, 4),
                             "vmapped_unroll_s": round(vmapped_step("unroll"), 4)}
  figures["compiler_options"] = options
  for rule in ("unroll", "group"):
    seconds = vmapped_step(rule, compiler_options=options)
    figures[f"vmapped_{rule}_s"] = round(seconds, 4)
    figures[f"speed_up_{rule}"] = round(plain_s / seconds, 3)
  return figures


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--ratios", default="0,0.1,0.3")
  parser.add_argument("--steps", type=int, default=0,
                      help="train steps of each run (0: the study's whole stage)")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps in the step section")
  parser.add_argument("--sections", default=",".join(SECTIONS))
  provenance.add_out_flag(parser)
  args = parser.parse_args()
  plans = _plans(args.seeds, [float(r) for r in args.ratios.split(",")], args.steps)
  figures = {}
  for section in args.sections.split(","):
    if section == "runs":
      figures["runs"] = measure_runs(plans)
    elif section == "step":
      figures["step"] = measure_step(plans, args.repeats)
    else:
      parser.error(f"--sections entry {section!r} is unknown; allowed: {', '.join(SECTIONS)}")
    provenance.write("seeds", figures, args.out, complete=False)
  print(json.dumps(figures, indent=1))
  provenance.write("seeds", figures, args.out)


if __name__ == "__main__":
  main()
