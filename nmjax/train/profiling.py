"""A jax.profiler trace of chosen training steps: the `profile_steps` field ("N,M") read once,
and the loop's hook that starts the trace before step N and stops it after step M.

The trace goes to WORKDIR/profile in the layout TensorBoard's profile plugin reads
(plugins/profile/<run>/<host>.xplane.pb), written by process 0 only. A workdir in a bucket gets
it traced into a local folder and uploaded when the trace stops.
"""

from __future__ import annotations

import tempfile
from typing import Any

import jax

from nmjax import io as nmjax_io, parallel
from nmjax.errors import ConfigError

PROFILE_DIR = "profile"  # Under the workdir.


def profile_window(text: Any) -> tuple[int, int] | None:
  """The steps of a `profile_steps` value: "N,M" -> (N, M), the 1-based steps N to M inclusive;
  "" -> None (no trace).

  Args:
    text: the config field's value.

  Returns:
    (N, M), or None for an empty value.

  Raises:
    ConfigError: anything but two integers 1 <= N <= M, in one line.

  Examples:
    >>> from nmjax.train.profiling import profile_window
    >>> profile_window("2,4"), profile_window("")
    ((2, 4), None)
  """
  allowed = "allowed: 'N,M' (the steps N to M traced, 1 <= N <= M, e.g. 2,4), or '' (no trace)"
  if not isinstance(text, str):
    raise ConfigError(f"config.profile_steps={text!r} is not a string; {allowed}")
  if not text.strip():
    return None
  parts = [p.strip() for p in text.split(",")]
  if len(parts) == 2 and all(p.isdigit() for p in parts) and 1 <= int(parts[0]) <= int(parts[1]):
    return int(parts[0]), int(parts[1])
  raise ConfigError(f"config.profile_steps={text!r} is not a step range; {allowed}")


class Profiler:
  """Traces the steps of a window (process 0) into WORKDIR/profile; a resumed run traces the
  steps of the window it runs. Nothing happens without a window.

  Args:
    window: (N, M) from profile_window, or None.
    workdir: the run's workdir (local or a bucket).
    name: the job's name, for the line that says where the trace went.
  """

  def __init__(self, window: tuple[int, int] | None, workdir: str, name: str):
    self._window = window if parallel.is_main_process() else None
    self._dest = nmjax_io.join(workdir, PROFILE_DIR)
    self._name = name
    self._folder: str | None = None  # Where the running trace goes.
    self._first = self._last = 0

  def before(self, step: int) -> None:
    """Starts the trace when `step` (about to run) is the first of the window this run does."""
    if self._window is None or self._folder is not None:
      return
    if self._window[0] <= step <= self._window[1]:
      cloud = nmjax_io.is_cloud(self._dest)
      self._folder = tempfile.mkdtemp(prefix="nmjax-profile-") if cloud else self._dest
      nmjax_io.makedirs(self._folder)
      jax.profiler.start_trace(self._folder)
      self._first = self._last = step

  def after(self, step: int, state: Any) -> None:
    """Stops the trace once `step`, just run, is the window's last."""
    if self._folder is None:
      return
    self._last = step
    if step >= self._window[1]:
      self.stop(state)

  def stop(self, state: Any) -> None:
    """Stops a running trace once `state` is computed, and says where the trace went (nothing
    when no trace runs).

    Args:
      state: the train state of the last step traced.
    """
    if self._folder is None:
      return
    folder, self._folder, self._window = self._folder, None, None
    try:
      jax.block_until_ready(state)
    except Exception:  # pylint: disable=broad-except
      pass  # A step that failed may have left a donated state: the trace still ends.
    jax.profiler.stop_trace()
    if folder != self._dest:
      nmjax_io.upload(folder, self._dest)
      nmjax_io.rmtree(folder)
    if parallel.is_main_process():
      print(f"[{self._name}] profile of steps {self._first}-{self._last} in {self._dest}"
            f" (tensorboard --logdir {self._dest}: Profile tab)", flush=True)
