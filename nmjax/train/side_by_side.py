"""Seeds side by side: supervised pre-training runs that differ only in their seed and noise
ratio, trained in one jitted program by vmapping the train step over a stacked model axis.

The K members' parameters, BatchNorm statistics and optimizer states are stacked on a leading
axis, and so is each step's batch: member k's batch is the one its own run would read (its own
grain stream, keyed by its seed, with its own noisy labels), so the data order and the noise are
exactly those of K separate runs. One program computes the K steps (`jax.vmap` of the
supervised step; the convolutions' batching rule is nmjax/models/batching.py's), and one eval
program scores the K models on the shared test split.

While it runs, the group's own checkpoints (the stacked state, each member's data position and
epoch sums) live in `group_dir`, so a killed group resumes bitwise like one run. Each member's
workdir gets its config.json and metrics.jsonl as it goes and, at the end, a checkpoint of its
own state at the last step (what a separate run leaves), so everything downstream (transfer,
NMTune, a resume, the study's stages) reads it as a separate run. The results are bitwise the
separate runs': every member's convolutions are plain ones (the batching rule), and the steps of
both compile with batching.compiler_options, under which XLA:CPU sums each reduction in an order
that does not depend on how many models are stacked (tests/test_side_by_side.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from nmjax import io as nmjax_io, noise, parallel
from nmjax.config import total_steps
from nmjax.data import sources
from nmjax.errors import ConfigError, Interrupted, TrainingError
from nmjax.models import batching
from nmjax.progress import Progress, format_seconds
from nmjax.train import checkpoint, loop, supervised
from nmjax.writers import MetricWriter

# What members of one group may differ in; every other field must be equal.
MEMBER_FIELDS = ("seed", "noise_ratio")
# Fields that do not change what a run computes (where it logs, keeps checkpoints, ...).
_FREE = supervised.FREE_FIELDS


def check_members(plans: Sequence[Any]) -> None:
  """Refuses plans that cannot share one program (one line naming the field).

  Args:
    plans: pre-training plans (the pretrain job's PretrainPlan).

  Raises:
    ConfigError: fewer than two plans, a field other than seed and noise_ratio that differs, or
      an input pipeline other than the in-memory one.
  """
  if len(plans) < 2:
    raise ConfigError("seeds side by side need at least two runs")
  first = dataclasses.asdict(plans[0])
  for plan in plans[1:]:
    other = dataclasses.asdict(plan)
    for key in first:
      if key not in MEMBER_FIELDS + _FREE and first[key] != other[key]:
        raise ConfigError(f"runs trained side by side differ in {key} ({first[key]!r} vs"
                          f" {other[key]!r}); allowed to differ: {', '.join(MEMBER_FIELDS)}")
  if plans[0].input_pipeline != "default":
    raise ConfigError(f"config.input_pipeline={plans[0].input_pipeline!r} cannot train seeds"
                      " side by side; allowed: default (use vmap_seeds=false)")


def stack(trees: Sequence[Any]) -> Any:
  """The trees' leaves stacked on a new leading axis, in the first tree's structure (train
  states: each member's apply_fn and optimizer are equal but distinct objects)."""
  leaves = [jax.tree.leaves(tree) for tree in trees]
  return jax.tree.unflatten(jax.tree.structure(trees[0]),
                            [jnp.stack(column) for column in zip(*leaves)])


def _member(tree: Any, k: int) -> Any:
  return jax.tree.map(lambda x: x[k], tree)


@dataclasses.dataclass
class _Member:
  """One run of the group: its plan, workdir, loop spec, data stream and records."""
  plan: Any
  workdir: str
  spec: Any
  changed: float  # The fraction of its train labels the noise changed.
  writer: MetricWriter
  iterator: Any = None
  sums: dict[str, float] = dataclasses.field(default_factory=dict)
  record: dict[str, Any] | None = None


def _members(plans: Sequence[Any], workdirs: Sequence[str]) -> tuple[list[_Member], Any]:
  """Each member's spec (the same model, schedule and objective; its own data and noise)."""
  first = plans[0]
  source = sources.get_source(first.dataset, data_dir=first.data_dir or None)
  info = source.info
  train_records, test_records = supervised.split_records(first, source)
  clean = source.labels("train")[:len(train_records)]
  epoch_steps, num_steps = total_steps(
      num_examples=len(train_records), global_batch_size=first.batch_size,
      num_epochs=first.num_epochs, num_train_steps=first.num_train_steps)
  members = []
  for plan, workdir in zip(plans, workdirs):
    supervised.record_config(plan, workdir)  # Refuses another run's workdir before any work.
    noisy = noise.apply_label_noise(clean, plan.noise_ratio, info.num_classes, plan.seed,
                                    plan.noise_type)
    inputs = supervised.input_fns(plan, info, train_records, test_records, noisy, num_steps)
    spec = supervised.loop_spec(plan, info, inputs, epoch_steps, num_steps)
    members.append(_Member(plan, workdir, spec, float(np.mean(noisy != clean)),
                           MetricWriter(workdir)))
  return members, info


def _zero(spec: Any) -> dict[str, float]:
  return {k: 0.0 for k in ("loss", "count", *spec.objective.train_fields)} | {"seconds": 0.0}


class _Group:
  """The stacked run: jitted programs, the group's checkpoints and the members."""

  def __init__(self, members: list[_Member], group_dir: str, mesh: jax.sharding.Mesh):
    self.members = members
    self.spec = members[0].spec
    self.mesh = mesh
    self.group_dir = group_dir
    objective = self.spec.objective
    shape = jax.eval_shape(self._init)
    self.state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), shape)
    self.batch_sharding = NamedSharding(mesh, P(None, parallel.DATA_AXIS))
    replicated = parallel.replicated(mesh)
    options = batching.compiler_options()  # Each member's numbers are its separate run's.
    self.train_fn = jax.jit(jax.vmap(objective.train_step),
                            in_shardings=(self.state_sharding, self.batch_sharding),
                            out_shardings=(self.state_sharding, replicated), donate_argnums=0,
                            compiler_options=options)
    self.eval_fn = jax.jit(jax.vmap(objective.eval_step, in_axes=(0, None)),
                           in_shardings=(self.state_sharding, parallel.data_sharded(mesh)),
                           out_shardings=replicated, compiler_options=options)
    self.shape = shape

  def _init(self) -> Any:
    return stack([m.spec.init_state() for m in self.members])

  def restore_or_init(self) -> tuple[int, Any]:
    abstract = checkpoint.abstract_with_sharding(self.shape, self.state_sharding)
    found = checkpoint.restore_latest(self.group_dir, abstract)
    if found is None:
      for m in self.members:
        m.sums, m.iterator = _zero(m.spec), m.spec.train_iterator(None)
      return 0, jax.jit(self._init, out_shardings=self.state_sharding)()
    step, state, saved = found
    for k, m in enumerate(self.members):
      m.sums, m.record = dict(saved["epoch_sums"][k]), saved["last_record"][k]
      m.iterator = m.spec.train_iterator(saved["data"][k])
    _say(f"[pretrain x{len(self.members)}] resumed the side-by-side runs from"
         f" {checkpoint.directory(self.group_dir)} (step {step})")
    return step, state

  def batch(self) -> dict[str, jax.Array]:
    host = [next(m.iterator) for m in self.members]
    stacked = {key: np.stack([b[key] for b in host]) for key in host[0]}
    ways = jax.process_count()
    return {key: jax.make_array_from_process_local_data(
        self.batch_sharding, value, (value.shape[0], value.shape[1] * ways, *value.shape[2:]))
            for key, value in stacked.items()}

  def evaluate(self, state: Any) -> list[dict[str, float]]:
    fields = dict(self.spec.objective.eval_fields)
    totals = None
    for batch in self.spec.eval_batches():
      sums = self.eval_fn(state, parallel.host_to_global(batch, self.mesh))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = parallel.to_host(totals)
    results = []
    for k in range(len(self.members)):
      count = float(totals["count"][k])
      results.append({name: float(totals[key][k]) / count for key, name in fields.items()}
                     | {"test_loss": float(totals["loss_sum"][k]) / count,
                        "test_count": int(count)})
    return results


def _say(text: str) -> None:
  if parallel.is_main_process():
    print(text, flush=True)


def _fold(group: _Group, window: list[tuple[int, dict]], mngr: Any) -> None:
  """Adds the window's per-member metrics into the epoch sums; stops at a non-finite loss."""
  fetched = jax.device_get([metrics for _, metrics in window])
  counters = group.spec.objective.train_fields
  for (step, _), metrics in zip(window, fetched):
    for k, m in enumerate(group.members):
      loss = float(metrics["loss"][k])
      if not math.isfinite(loss):
        mngr.wait_until_finished()
        good = mngr.latest_step()
        raise TrainingError(
            f"the loss ({loss}) of the run seed {m.plan.seed} r={m.plan.noise_ratio:g} (side by"
            f" side) became non-finite at step {step}; training stopped; last good checkpoint:"
            f" {'none' if good is None else f'{mngr.directory / str(good)} (step {good})'}")
      m.sums["loss"] += loss * float(metrics["count"][k])
      for key in ("count", *counters):
        m.sums[key] += float(metrics[key][k])


def _line(group: _Group, progress: Progress, done: int, seconds: float) -> None:
  spec, objective = group.spec, group.spec.objective
  for m in group.members:
    m.sums["seconds"] += seconds
  mean = lambda key: np.mean([m.sums[key] / max(m.sums["count"], 1.0) for m in group.members])
  counters = "".join(f" {objective.labels[name]} {mean(key):.4f}"
                     for key, name in objective.train_fields.items())
  rate = progress.steps_per_second(done)
  batch = group.members[0].plan.batch_size * len(group.members)
  speed = "" if rate is None else f" | {rate * batch:.0f} img/s"
  epochs = math.ceil(spec.total_steps / spec.steps_per_epoch)
  progress.line(done, f"epoch {(done - 1) // spec.steps_per_epoch + 1}/{epochs} loss"
                f" {mean('loss'):.4f}{counters} (mean of {len(group.members)}){speed}")


def _end_epoch(group: _Group, state: Any, done: int, progress: Progress) -> None:
  spec = group.spec
  objective = spec.objective
  epoch = (done - 1) // spec.steps_per_epoch + 1
  every = spec.eval_every_epochs
  tests = None
  if (every > 0 and epoch % every == 0) or done == spec.total_steps:
    progress.pause()
    start = time.perf_counter()
    tests = group.evaluate(state)
    seconds = (time.perf_counter() - start) / len(group.members)
    progress.resume()
  for k, m in enumerate(group.members):
    count = max(m.sums["count"], 1.0)
    record = {"epoch": epoch, "train_loss": m.sums["loss"] / count}
    record.update({name: m.sums[key] / count for key, name in objective.train_fields.items()})
    record["examples_per_sec"] = m.sums["count"] / max(m.sums["seconds"], 1e-9)
    if tests is not None:
      record.update(tests[k], eval_seconds=seconds)
    m.writer.write(done, record)
    m.record, m.sums = record, _zero(m.spec)
  if tests is not None:
    accs = " ".join(f"{t[objective.headline]:.4f}" for t in tests)
    _say(f"[pretrain x{len(group.members)}] epoch {epoch}:"
         f" {objective.labels[objective.headline]} {accs}")


def _loop_state(group: _Group) -> dict[str, Any]:
  return {"data": [m.iterator.get_state() for m in group.members],
          "epoch_sums": [dict(m.sums) for m in group.members],
          "last_record": [m.record for m in group.members]}


def _save(group: _Group, mngr: Any, state: Any, done: int) -> None:
  if not bool(loop.all_finite((state.params, state.batch_stats))):
    mngr.wait_until_finished()
    raise TrainingError(f"the parameters of the side-by-side runs became non-finite at step"
                        f" {done}; training stopped; last good checkpoint: step"
                        f" {mngr.latest_step()}")
  for m in group.members:
    m.writer.flush()
  checkpoint.save(mngr, done, state, _loop_state(group))


def _hand_over(group: _Group, state: Any, done: int) -> None:
  """Each member's own checkpoint of the last step, as its separate run would leave it."""
  loop_state = _loop_state(group)
  for k, m in enumerate(group.members):
    mngr = checkpoint.manager(m.workdir, max_to_keep=m.plan.max_to_keep)
    checkpoint.save(mngr, done, _member(state, k),
                    {"data": loop_state["data"][k], "epoch_sums": loop_state["epoch_sums"][k],
                     "last_record": loop_state["last_record"][k]})
    mngr.wait_until_finished()
    mngr.close()
    m.writer.close()


def _steps(group: _Group, mngr: Any, watch: Any, progress: Progress, state: Any,
           start_step: int) -> tuple[Any, int, bool]:
  """The steps from start_step to the end or a preemption: (state, last step done, preempted)."""
  spec = group.spec
  window: list[tuple[int, dict]] = []
  clock, done, preempted = time.perf_counter(), start_step, False
  for step in range(start_step, spec.total_steps):
    state, metrics = group.train_fn(state, group.batch())
    done = step + 1
    window.append((done, metrics))
    preempted = watch.reached(done) and done < spec.total_steps
    if step == start_step:
      jax.block_until_ready(metrics)  # Compile time stays out of the rate and the ETA.
      progress.started(done)
      clock = time.perf_counter()
    end_of_epoch = done % spec.steps_per_epoch == 0 or done == spec.total_steps
    save_now = done % spec.checkpoint_every_steps == 0 or end_of_epoch or preempted
    if done % spec.log_every_steps == 0 or save_now:
      _fold(group, window, mngr)
      window = []
      now = time.perf_counter()
      _line(group, progress, done, now - clock)
      clock = now
    if end_of_epoch:
      _end_epoch(group, state, done, progress)
      clock = time.perf_counter()
    if save_now:
      _save(group, mngr, state, done)
    if preempted:
      break
  return state, done, preempted


def run(plans: Sequence[Any], workdirs: Sequence[str], group_dir: str) -> list[dict[str, Any]]:
  """Trains (or resumes) the runs of `plans` side by side in one program.

  Args:
    plans: pre-training plans that differ only in seed and noise_ratio (check_members).
    workdirs: each run's workdir (existing, writable): its config.json, metrics.jsonl and, at
      the end, its checkpoint.
    group_dir: the group's own folder (existing): its stacked checkpoints while it runs
      (remove it once every member's result is kept).

  Returns:
    Each run's result as nmjax.train.supervised.run returns it (the last epoch's record, step,
    noise_rate_train, num_classes), in the order of `plans`; [{"preempted": True, ...}] * K when
    a SIGTERM stopped the group after saving.

  Raises:
    ConfigError: plans that cannot share a program, or a workdir of another run.
    TrainingError: a non-finite loss (naming the run and the last good checkpoint).
  """
  check_members(plans)
  parallel.maybe_initialize_distributed(plans[0])
  mesh = parallel.make_mesh(spec=plans[0].mesh)
  parallel.check_batch_size(plans[0].batch_size, mesh)
  parallel.check_batch_size(plans[0].eval_batch_size, mesh, "eval_batch_size")
  members, info = _members(plans, workdirs)
  group = _Group(members, group_dir, mesh)
  spec = group.spec
  start_step, state = group.restore_or_init()
  for m in members:
    m.writer.truncate_after(start_step)
  _say(f"[pretrain x{len(members)}] {plans[0].model} on {plans[0].dataset}: {len(members)} runs"
       f" side by side in one program (seeds {', '.join(str(p.seed) for p in plans)}; noise"
       f" {', '.join(f'{p.noise_ratio:g}' for p in plans)}), {spec.total_steps} steps of batch"
       f" {plans[0].batch_size} each")
  mngr = checkpoint.manager(group_dir, max_to_keep=1)
  with checkpoint.disk_faults(mngr), loop.PreemptionWatch(mngr, "pretrain") as watch:
    progress = Progress(spec.total_steps, start=start_step,
                        prefix=f"[pretrain x{len(members)}] ",
                        active=parallel.is_main_process())
    state, done, preempted = _steps(group, mngr, watch, progress, state, start_step)
    mngr.wait_until_finished()
  mngr.close()
  if watch.interrupted or preempted:
    for m in members:
      m.writer.close()
    where = nmjax_io.join(checkpoint.directory(group_dir), str(done))
    if watch.interrupted:
      raise Interrupted(f"interrupted (Ctrl-C) at step {done} of {spec.total_steps}: checkpoint"
                        f" saved in {where}; run the same command to resume")
    _say(f"[pretrain x{len(members)}] preempted: saved {where} (step {done}) and stopped;"
         " run the same command to resume")
    return [{"step": done, "preempted": True}] * len(members)
  _hand_over(group, state, done)
  _say(f"[pretrain x{len(members)}] done: {spec.total_steps} steps of {len(members)} runs in"
       f" {format_seconds(progress.elapsed())}; checkpoints in each run's workdir")
  return [{"step": spec.total_steps, **(m.record or {}), "noise_rate_train": m.changed,
           "num_classes": info.num_classes} for m in members]
