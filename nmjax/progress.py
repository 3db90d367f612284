"""Progress lines a person can follow: rate excluding the first (compile) step, and an ETA."""

from __future__ import annotations

import sys
import time


def format_seconds(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


class Progress:
  """Tracks steps done out of `total`; the clock starts after the first measured step so that
  compilation does not distort the rate, and `pause()`/`resume()` exclude evaluation time.
  With `active=False` (every process but 0 of a multi-process run) it keeps time but prints
  nothing."""

  def __init__(self, total: int, *, start: int = 0, prefix: str = "", stream=None,
               active: bool = True):
    self.total = total
    self.active = active
    self.prefix = prefix
    self.stream = stream or sys.stdout
    self._wall_start = time.perf_counter()
    self._t0: float | None = None
    self._s0 = start
    self._paused_at: float | None = None
    self._paused_total = 0.0

  def started(self, step: int) -> None:
    """Call after the first (compiling) step has finished."""
    if self._t0 is None:
      self._t0 = time.perf_counter()
      self._s0 = step

  def pause(self) -> None:
    self._paused_at = time.perf_counter()

  def resume(self) -> None:
    if self._paused_at is not None:
      self._paused_total += time.perf_counter() - self._paused_at
      self._paused_at = None

  def steps_per_second(self, step: int) -> float | None:
    if self._t0 is None or step <= self._s0:
      return None
    busy = time.perf_counter() - self._t0 - self._paused_total
    return (step - self._s0) / max(busy, 1e-9)

  def elapsed(self) -> float:
    return time.perf_counter() - self._wall_start

  def eta(self, step: int) -> float | None:
    rate = self.steps_per_second(step)
    return None if rate is None else (self.total - step) / rate

  def line(self, step: int, text: str) -> None:
    if not self.active:
      return
    eta = self.eta(step)
    eta_text = "ETA ?" if eta is None else f"ETA {format_seconds(eta)}"
    print(f"{self.prefix}step {step}/{self.total} {text} | elapsed"
          f" {format_seconds(self.elapsed())} | {eta_text}", file=self.stream, flush=True)
