"""The pre-training loop: resume from the workdir, jitted sharded steps, per-epoch evaluation,
metrics, checkpoints, preemption, and a guard that stops on a non-finite loss.

Exact resume: the checkpoint holds the train state (its step included), the data iterator's
state and the running epoch sums. The step itself draws no random numbers; the only randomness
is the data order and augmentation, a pure function of (seed, stream position) inside the grain
pipeline, whose position the iterator state records. So a run killed at any point and started
again ends with bitwise the same parameters, and sees the same examples, as an uninterrupted one.

Preemption: SIGTERM (what schedulers and TPU maintenance send first) makes the loop save a
checkpoint after the step in flight and return cleanly. With several processes, jax's preemption
service owns SIGTERM and picks a step at which every process saves
(CheckpointManager.reached_preemption); alone, a Python signal handler sets a flag. Ctrl-C
(SIGINT) does the same and then raises Interrupted (exit 130); a second Ctrl-C ends the process
at once, leaving only committed checkpoints.

Several processes: every process runs the same steps; arrays are global (jit with shardings),
checkpoints are written collectively by orbax, and process 0 alone writes metrics and logs.

Profiling: LoopSpec.profile_steps (N, M) has process 0 write a jax.profiler trace of steps N to M
into WORKDIR/profile (nmjax/train/profiling.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import io as nmjax_io, parallel
from nmjax.errors import Interrupted, TrainingError
from nmjax.models import batching
from nmjax.progress import Progress, format_seconds
from nmjax.train import checkpoint
from nmjax.train.profiling import Profiler
from nmjax.train.state import TrainState
from nmjax.train.steps import Objective
from nmjax.writers import MetricWriter


@dataclasses.dataclass
class LoopSpec:
  """What the loop needs, already built by the job (nothing here reads a config file)."""
  init_state: Callable[[], TrainState]    # pure: same state every call
  train_iterator: Callable[[dict | None], Iterator[dict[str, np.ndarray]]]  # from saved state
  eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]]
  steps_per_epoch: int
  total_steps: int
  objective: Objective  # The two steps and how their numbers read (train/steps.py).
  log_every_steps: int = 100
  checkpoint_every_steps: int = 500
  max_to_keep: int = 3
  param_sharding: str = "replicated"  # parallel.leaf_spec rule: replicated | model
  record_examples: bool = False  # Write each step's example indices to examples_seen.jsonl.
  eval_every_epochs: int = 1  # Test-set evaluation every N epochs (0: never), and after the end.
  name: str = "pretrain"
  profile_steps: tuple[int, int] | None = None  # Steps N..M (1-based) traced by jax.profiler.


def _epoch_keys(spec: LoopSpec) -> tuple[str, ...]:
  return ("loss", "count", *spec.objective.train_fields)


def _say(text: str) -> None:
  """A log line, from process 0 only (the others run the same steps)."""
  if parallel.is_main_process():
    print(text, flush=True)


def _zero_sums(spec: LoopSpec) -> dict[str, float]:
  return {k: 0.0 for k in _epoch_keys(spec)} | {"seconds": 0.0}


def evaluate(eval_fn: Callable, state: TrainState, batches: Iterable[dict[str, np.ndarray]],
             mesh: jax.sharding.Mesh,
             fields: dict[str, str] | None = None) -> dict[str, float]:
  """test_loss and the eval counters as fractions (`fields`: sum key -> record field; default
  accuracy as test_acc) over every example exactly once (batches are padded and masked)."""
  fields = {"correct": "test_acc"} if fields is None else fields
  totals = None
  for batch in batches:
    sums = eval_fn(state, parallel.host_to_global(batch, mesh))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = parallel.to_host(totals)
  count = float(totals["count"])
  return ({name: float(totals[key]) / count for key, name in fields.items()}
          | {"test_loss": float(totals["loss_sum"]) / count, "test_count": int(count)})


def _diverged(mngr, what: str, step: int) -> TrainingError:
  mngr.wait_until_finished()  # A save still in flight is good: let it commit before naming it.
  good = mngr.latest_step()
  where = (f"last good checkpoint: {mngr.directory / str(good)} (step {good})"
           if good is not None else "no checkpoint was saved before it")
  return TrainingError(f"{what} became non-finite at step {step}; training stopped; {where}")


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _check_finite(window: list[tuple[int, dict]], mngr, sums: dict[str, float],
                  counters: Iterable[str]) -> None:
  """Adds the window's metrics into the epoch sums, or stops at the first non-finite loss."""
  fetched = jax.device_get([m for _, m in window])
  for (step, _), metrics in zip(window, fetched):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise _diverged(mngr, f"the loss ({loss})", step)
    count = float(metrics["count"])
    sums["loss"] += loss * count
    for key in ("count", *counters):
      sums[key] += float(metrics[key])


def _tell(text: str) -> None:
  """A line on stderr from a signal handler: os.write, as the handler may run while the main
  thread is inside print (a buffered write there would fail as reentrant)."""
  os.write(sys.stderr.fileno(), (text + "\n").encode())


class PreemptionWatch:
  """Says when to save and stop because the job is being preempted or interrupted.

  With jax.distributed running, jax's preemption service catches SIGTERM on any process and
  agrees on a step at which all of them save (orbax's reached_preemption); it must be asked at
  every step by every process. Without it, a SIGTERM handler (main thread only) sets a flag that
  the next step reads. The first SIGINT (Ctrl-C) sets `interrupted` and asks for the same save
  (with several processes by sending this process SIGTERM, for the preemption service); a
  second one ends the process at once with exit code 130. Use as a context manager: the
  previous handlers come back on exit.
  """

  def __init__(self, mngr, name: str = "pretrain"):
    self._mngr = mngr
    self._name = name
    self._flag = threading.Event()
    self._previous: dict[int, Any] = {}
    self.interrupted = False

  def __enter__(self) -> "PreemptionWatch":
    if threading.current_thread() is threading.main_thread():
      if not jax.distributed.is_initialized():
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM,
                                                       lambda *_: self._flag.set())
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      if previous is not None:  # None: a handler not set from Python; leave ours.
        signal.signal(sig, previous)

  def _on_interrupt(self, *_) -> None:
    if self.interrupted:
      _tell(f"[{self._name}] interrupted again (Ctrl-C): stopped at once; only committed"
            " checkpoints are kept")
      os._exit(130)  # pylint: disable=protected-access
    self.interrupted = True
    _tell(f"[{self._name}] Ctrl-C: saving after the step in flight (Ctrl-C again to stop at"
          " once)")
    if jax.distributed.is_initialized():
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self._flag.set()

  def reached(self, step: int) -> bool:
    return self._mngr.reached_preemption(step) or self._flag.is_set()


@dataclasses.dataclass
class _Loop:
  """What stays fixed while the steps run."""
  spec: LoopSpec
  mesh: jax.sharding.Mesh
  mngr: Any  # orbax CheckpointManager
  writer: MetricWriter
  examples_log: MetricWriter | None
  progress: Progress
  eval_step_fn: Callable
  profiler: Profiler


@dataclasses.dataclass
class _Running:
  """The loop's state from step to step, besides the train state's own; the checkpoint holds
  the epoch sums and the last record (the window and the clock start again on resume)."""
  state: TrainState
  sums: dict[str, float]
  record: dict[str, Any] | None
  window: list[tuple[int, dict]] = dataclasses.field(default_factory=list)
  interval_start: float = 0.0  # Set once the first (compiling) step has finished.


def _epoch_of(done: int, spec: LoopSpec) -> int:
  return (done - 1) // spec.steps_per_epoch + 1


def _jit_steps(spec: LoopSpec, mesh: jax.sharding.Mesh,
                   state_sharding: Any) -> tuple[Callable, Callable]:
  """The jitted train step (state donated) and eval step, with explicit shardings."""
  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.data_sharded(mesh)
  options = batching.compiler_options()  # The same numbers as the steps side by side.
  train_step_fn = jax.jit(
      spec.objective.train_step, in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, replicated), donate_argnums=0, compiler_options=options)
  eval_step_fn = jax.jit(spec.objective.eval_step,
                         in_shardings=(state_sharding, batch_sharding), out_shardings=replicated,
                         compiler_options=options)
  return train_step_fn, eval_step_fn


def _restore_or_init(spec: LoopSpec, workdir: str, shape: Any,
                     state_sharding: Any) -> tuple[int, _Running, dict | None]:
  """(start step, running state, data iterator state) of the workdir's newest usable
  checkpoint when there is one (damaged newer ones are skipped and moved aside), else of a
  fresh state at step 0."""
  abstract = checkpoint.abstract_with_sharding(shape, state_sharding)
  found = checkpoint.restore_latest(workdir, abstract)
  if found is None:
    state = jax.jit(spec.init_state, out_shardings=state_sharding)()
    return 0, _Running(state, _zero_sums(spec), None), None
  start_step, state, loop_state = found
  folder = nmjax_io.join(checkpoint.directory(workdir), str(start_step))
  _say(f"[{spec.name}] resumed from {folder} (step {start_step})")
  running = _Running(state, dict(loop_state["epoch_sums"]), loop_state.get("last_record"))
  return start_step, running, loop_state["data"]


def _log_window(loop: _Loop, running: _Running, done: int, batch_size: int) -> None:
  """Folds the steps since the last line into the epoch sums (stopping at a non-finite loss)
  and prints the progress line."""
  objective = loop.spec.objective
  _check_finite(running.window, loop.mngr, running.sums, objective.train_fields)
  running.window = []
  now = time.perf_counter()
  running.sums["seconds"] += now - running.interval_start
  running.interval_start = now
  sums = running.sums
  count = max(sums["count"], 1.0)
  rate = loop.progress.steps_per_second(done)
  speed = "" if rate is None else f" | {rate * batch_size:.0f} img/s"
  num_epochs = math.ceil(loop.spec.total_steps / loop.spec.steps_per_epoch)
  counters = "".join(f" {objective.labels[name]} {sums[key] / count:.4f}"
                     for key, name in objective.train_fields.items())
  loop.progress.line(done, f"epoch {_epoch_of(done, loop.spec)}/{num_epochs} loss"
                     f" {sums['loss'] / count:.4f}{counters}{speed}")


def _end_epoch(loop: _Loop, running: _Running, done: int) -> None:
  """The epoch's record (train sums, and the test set when due) to the metrics and the log."""
  spec = loop.spec
  epoch = _epoch_of(done, spec)
  sums = running.sums
  count = max(sums["count"], 1.0)
  objective = spec.objective
  record = {"epoch": epoch, "train_loss": sums["loss"] / count}
  record.update({name: sums[key] / count for key, name in objective.train_fields.items()})
  record["examples_per_sec"] = sums["count"] / max(sums["seconds"], 1e-9)
  test_text = ""
  every = spec.eval_every_epochs
  if (every > 0 and epoch % every == 0) or done == spec.total_steps:
    loop.progress.pause()
    eval_start = time.perf_counter()
    record.update(evaluate(loop.eval_step_fn, running.state, spec.eval_batches(), loop.mesh,
                           dict(objective.eval_fields)),
                  eval_seconds=time.perf_counter() - eval_start)
    loop.progress.resume()
    test_text = f"{objective.labels[objective.headline]} {record[objective.headline]:.4f} | "
  loop.writer.write(done, record)
  train_text = ", ".join(f"{objective.labels[name]} {record[name]:.4f}"
                         for name in objective.train_fields.values())
  _say(f"[{spec.name}] epoch {epoch}: {test_text}train {train_text} |"
       f" {record['examples_per_sec']:.0f} img/s")
  running.record = record
  running.sums = _zero_sums(spec)
  running.interval_start = time.perf_counter()


def _save(loop: _Loop, running: _Running, done: int, iterator: Any) -> None:
  """A checkpoint of the state, the data position and the epoch sums, if the state is finite."""
  state = running.state
  # The loss of the last step predates its update: only finite parameters are worth saving.
  if not bool(all_finite((state.params, state.batch_stats))):
    raise _diverged(loop.mngr, "the parameters", done)
  data_state = iterator.get_state()
  # Process 0 alone writes the JSON that every process restores: what steers training must be
  # identical everywhere (timings are process 0's and need not be).
  parallel.assert_same_on_all_processes(
      {"data": data_state, "sums": {k: running.sums[k] for k in _epoch_keys(loop.spec)}},
      f"the data position or epoch sums at step {done}")
  for log in (loop.writer, loop.examples_log):  # A bucket's copy covers what the step saves.
    if log is not None:
      log.flush()
  checkpoint.save(loop.mngr, done, state, {"data": data_state, "epoch_sums": running.sums,
                                           "last_record": running.record})


def _run_steps(loop: _Loop, running: _Running, iterator: Any, train_step_fn: Callable,
               start_step: int, watch: PreemptionWatch) -> tuple[int, bool]:
  """Steps from start_step to the end or a preemption; returns (last step done, preempted)."""
  spec = loop.spec
  done, preempted = start_step, False
  for step in range(start_step, spec.total_steps):
    batch = parallel.host_to_global(next(iterator), loop.mesh)
    loop.profiler.before(step + 1)
    running.state, metrics = train_step_fn(running.state, batch)
    done = step + 1
    loop.profiler.after(done, running.state)
    running.window.append((done, metrics))
    if loop.examples_log is not None:
      # Gathered from the global batch, i.e. what the step consumed on every process.
      loop.examples_log.write(done, {"index": parallel.gather_to_host(batch["index"]).tolist()})
    # Asked at every step by every process (the preemption service's protocol needs that).
    preempted = watch.reached(done) and done < spec.total_steps
    if step == start_step:
      jax.block_until_ready(metrics)  # Compile time stays out of the rate and the ETA.
      loop.progress.started(done)
      running.interval_start = time.perf_counter()
    end_of_epoch = done % spec.steps_per_epoch == 0 or done == spec.total_steps
    save_now = done % spec.checkpoint_every_steps == 0 or end_of_epoch or preempted
    if done % spec.log_every_steps == 0 or save_now:
      _log_window(loop, running, done, batch["image"].shape[0])
    if end_of_epoch:
      _end_epoch(loop, running, done)
    if save_now:
      _save(loop, running, done, iterator)
    if preempted:
      break
  return done, preempted


def _finish(spec: LoopSpec, mngr, progress: Progress, running: _Running, done: int,
            preempted: bool, interrupted: bool) -> dict[str, Any]:
  """The last line and the record, or Interrupted after a Ctrl-C (once the save committed)."""
  where = mngr.directory / str(done)
  if interrupted:
    raise Interrupted(f"interrupted (Ctrl-C) at step {done} of {spec.total_steps}: checkpoint"
                      f" saved in {where}; run the same command to resume")
  if preempted:
    _say(f"[{spec.name}] preempted: saved {where} (step {done}) and stopped;"
         " run the same command to resume")
    return {"step": done, "preempted": True, **(running.record or {})}
  _say(f"[{spec.name}] done: {spec.total_steps} steps in {format_seconds(progress.elapsed())};"
       f" checkpoints in {mngr.directory}")
  return {"step": spec.total_steps, **(running.record or {})}


def train_and_evaluate(spec: LoopSpec, workdir: str, *, mesh: jax.sharding.Mesh | None = None,
                       writer: MetricWriter | None = None) -> dict[str, Any]:
  """Runs (or resumes) training to spec.total_steps; returns the last epoch's record.

  Raises Interrupted after a Ctrl-C, once the checkpoint of the step in flight is committed.
  """
  mesh = mesh or parallel.make_mesh()
  shape = jax.eval_shape(spec.init_state)
  state_sharding = parallel.state_shardings(shape, mesh, spec.param_sharding)
  # Before the writing manager exists: a damaged newest step is moved aside first.
  start_step, running, data_state = _restore_or_init(spec, workdir, shape, state_sharding)
  mngr = checkpoint.manager(workdir, max_to_keep=spec.max_to_keep)
  # A full disk leaves the committed steps and no folder of an unfinished save.
  with checkpoint.disk_faults(mngr):
    return _train(spec, workdir, mesh, mngr, writer, start_step, running, data_state,
                  state_sharding)


def _train(spec: LoopSpec, workdir: str, mesh: jax.sharding.Mesh, mngr: Any,
           writer: MetricWriter | None, start_step: int, running: _Running,
           data_state: dict | None, state_sharding: Any) -> dict[str, Any]:
  """train_and_evaluate's steps, from the restored (or fresh) state on."""
  writer = writer or MetricWriter(workdir)
  examples_log = (MetricWriter(workdir, filename="examples_seen.jsonl", tensorboard=False)
                  if spec.record_examples else None)
  logs = [writer] + ([examples_log] if examples_log is not None else [])
  for log in logs:
    log.truncate_after(start_step)
  # From here a Ctrl-C means: save after the step in flight (a second one: stop at once).
  with PreemptionWatch(mngr, spec.name) as watch:
    train_step_fn, eval_step_fn = _jit_steps(spec, mesh, state_sharding)
    iterator = spec.train_iterator(data_state)
    progress = Progress(spec.total_steps, start=start_step, prefix=f"[{spec.name}] ",
                        active=parallel.is_main_process())
    profiler = Profiler(spec.profile_steps, workdir, spec.name)
    loop = _Loop(spec, mesh, mngr, writer, examples_log, progress, eval_step_fn, profiler)
    try:
      done, preempted = _run_steps(loop, running, iterator, train_step_fn, start_step, watch)
    finally:  # A trace still running (the run ended or stopped inside its window) is closed.
      profiler.stop(running.state)
      for log in logs:  # A bucket workdir gets the records written so far, whatever happened.
        log.flush()
    mngr.wait_until_finished()  # A Ctrl-C while the last save commits still stops at once.
  mngr.close()
  for log in logs:
    log.close()
  return _finish(spec, mngr, progress, running, done, preempted, watch.interrupted)
