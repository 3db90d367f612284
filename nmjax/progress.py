"""Progress a person can follow: elapsed time and an ETA for every loop and job (steps, epochs,
fits, tasks, stages), the rate excluding the first (compile) step."""

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


class Countdown:
  """Elapsed time and ETA over a known amount of work of one or more kinds.

  `done(kind)` marks one unit of `kind` finished; the ETA is the units still pending times the
  mean time of a unit of their kind so far (of any kind while none of theirs has finished).
  With one kind (the default) it is the plain elapsed / done * remaining.
  """

  def __init__(self, total: int | dict[str, int], *, start: float | None = None):
    self.pending = dict(total) if isinstance(total, dict) else {"": int(total)}
    self.seconds: dict[str, list[float]] = {kind: [] for kind in self.pending}
    self.total = sum(self.pending.values())
    self.finished = 0
    self.start = time.perf_counter() if start is None else start
    self._last = self.start

  def done(self, kind: str = "", seconds: float | None = None) -> float:
    """Marks a unit done; `seconds` defaults to the time since the previous unit. Returns it."""
    now = time.perf_counter()
    seconds = now - self._last if seconds is None else seconds
    self._last = now
    self.seconds.setdefault(kind, []).append(seconds)
    self.pending[kind] = max(0, self.pending.get(kind, 0) - 1)
    self.finished += 1
    return seconds

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def eta(self) -> float | None:
    measured = [s for values in self.seconds.values() for s in values]
    if not measured:
      return None
    mean_all = sum(measured) / len(measured)
    return sum(n * (sum(self.seconds[k]) / len(self.seconds[k]) if self.seconds.get(k)
                    else mean_all) for k, n in self.pending.items())

  def line(self) -> str:
    """'elapsed 1m05s | ETA 3m10s' ('ETA ?' before the first unit is done)."""
    eta = self.eta()
    return (f"elapsed {format_seconds(self.elapsed())} | ETA"
            f" {'?' if eta is None else format_seconds(eta)}")
