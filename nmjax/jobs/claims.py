"""The paper's claims read against a study's records: one "claim" record per claim, noise ratio
and kind, with its estimate, interval and verdict (nmjax.stats.verdict), and the markdown table
of them that results.md shows. Nothing here is written by hand: the table is the records'.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nmjax import stats
from nmjax.jobs.tables import KIND_LABELS, ratio_label

SLIGHT = 0.1  # "Slight" noise: the paper's 5-10%.


@dataclasses.dataclass(frozen=True)
class Claim:
  """A claim of the paper, as the study reads it.

  Attributes:
    name: its stable id in results.jsonl.
    words: the claim, as results.md states it.
    record: the record type that measures it: delta, gain or spectral_delta (nmjax.stats).
    direction: +1 where the paper says the number is above 0, -1 below.
    kinds: the task kinds it is read on, each a row.
    method: the method (delta, gain).
    baseline: the method it is compared with (gain).
    metric: the spectral metric (spectral_delta).
    ratios: which noise ratios it is read at: "slight" (the smallest r > 0 and every
      0 < r <= SLIGHT), "noisy" (every r > 0) or "all".
  """
  name: str
  words: str
  record: str
  direction: int
  kinds: tuple[str, ...]
  method: str | None = None
  baseline: str | None = None
  metric: str | None = None
  ratios: str = "noisy"

  def measure(self, kind: str) -> str:
    """What is measured, in results.md's words."""
    label = KIND_LABELS[kind]
    if self.record == "gain":
      return f"{label} {self.method} - {self.baseline} (points)"
    if self.record == "delta":
      return f"{label} {self.method}, change from r = 0 (points)"
    return f"{self.metric.upper()} ({label} average), change from r = 0"


CLAIMS = (
    Claim("slight_noise_helps_id", "Slight noise (5-10%) improves ID linear-probe accuracy",
          "delta", +1, ("id",), method="lp", ratios="slight"),
    Claim("noise_hurts_ood", "Pre-training noise hurts OOD linear-probe accuracy", "delta", -1,
          ("ood",), method="lp"),
    Claim("sve_up_id", "Noise raises the SVE of ID test features", "spectral_delta", +1,
          ("id",), metric="sve"),
    Claim("lsvr_down_ood", "Noise lowers the LSVR of OOD test features", "spectral_delta", -1,
          ("ood",), metric="lsvr"),
    Claim("nmtune_over_lp", "NMTune beats the linear probe on ID and on OOD", "gain", +1,
          ("id", "ood"), method="nmtune", baseline="lp", ratios="all"),
    Claim("nmtune_over_mlp", "NMTune beats a plain MLP on ID and on OOD", "gain", +1,
          ("id", "ood"), method="nmtune", baseline="mlp", ratios="all"),
)
"""The paper's claims (docs/study.md), in results.md's order."""


def claim_ratios(claim: Claim, ratios: list[float]) -> list[float]:
  """The noise ratios of `ratios` a claim is read at (Claim.ratios)."""
  noisy = sorted(r for r in ratios if r > 0)
  if claim.ratios == "all":
    return sorted(ratios)
  if claim.ratios == "slight":
    return [r for i, r in enumerate(noisy) if r <= SLIGHT or i == 0]
  return noisy


def _measured(records: list[dict[str, Any]], claim: Claim, ratio: float,
              kind: str) -> dict[str, Any] | None:
  """The record that measures `claim` at (r, kind): a kind average, never a task's."""
  for r in records:
    if (r["record"] == claim.record and r["noise_ratio"] == ratio and r["kind"] == kind
        and r.get("task") is None and r.get("method") == claim.method
        and r.get("baseline") == claim.baseline and r.get("metric") == claim.metric):
      return r
  return None


def add_claims(records: list[dict[str, Any]], ratios: list[float], seeds: list[int]) -> None:
  """Appends a "claim" record per claim of CLAIMS, ratio and kind that the records measure.

  Args:
    records: results.jsonl's records, with their delta, gain and spectral_delta records
      (nmjax.stats); the claims are appended.
    ratios: the study's noise ratios shown.
    seeds: the seeds the records hold.
  """
  for claim in CLAIMS:
    for ratio in claim_ratios(claim, ratios):
      for kind in claim.kinds:
        found = _measured(records, claim, ratio, kind)
        if found is None:
          continue
        records.append({
            "record": "claim", "seed": None, "noise_ratio": ratio, "claim": claim.name,
            "words": claim.words, "measure": claim.measure(kind), "kind": kind,
            "method": claim.method, "baseline": claim.baseline, "metric": claim.metric,
            "direction": "up" if claim.direction > 0 else "down",
            "estimate": found["delta"], "ci95": found["delta_ci95"],
            "ci_method": found["ci_method"],
            "verdict": stats.verdict(found["delta_ci95"], claim.direction),
            "seeds": found["seeds"], "seed_ids": list(seeds)})


def _value(record: dict[str, Any]) -> str:
  """'+0.58 [-1.30, +2.41]': accuracy in points, spectral metrics as they are."""
  scale, digits = (1.0, 4) if record["metric"] else (100.0, 2)
  ci = record["ci95"]
  text = f"{scale * record['estimate']:+.{digits}f}"
  return text if ci is None else (f"{text} [{scale * ci[0]:+.{digits}f},"
                                  f" {scale * ci[1]:+.{digits}f}]")


def format_claims(records: list[dict[str, Any]]) -> str:
  """results.md's claims table: a row per "claim" record; '' without them."""
  claims = [r for r in records if r["record"] == "claim"]
  if not claims:
    return ""
  lines = ["| the paper's claim | measured here | r | estimate [95% interval] | verdict |"
           " seeds |", "|---|---|---|---|---|---|"]
  for r in claims:
    lines.append(f"| {r['words']} | {r['measure']} | {ratio_label(r['noise_ratio'])} |"
                 f" {_value(r)} | {r['verdict']} | {r['seeds']} |")
  return "\n".join(lines) + "\n"
