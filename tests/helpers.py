"""Assertions the tests share."""

import jax
import numpy as np


def assert_trees_equal(a, b) -> None:
  """Same tree structure and bitwise-equal leaves."""
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def study_scores(records) -> dict:
  """What a study measures, keyed by where: accuracies, spectral metrics, pre-training."""
  out = {}
  for r in records:
    key = (r["record"], r["seed"], r["noise_ratio"], r.get("task"), r.get("method"))
    if r["record"] == "task":
      out[key] = (r["accuracy"], r["sve"], r["lsvr"], r["z_sve"] if "z_sve" in r else None)
    elif r["record"] == "spectrum":
      out[key] = (r["sve"], r["lsvr"], tuple(r["spectrum"]))
    elif r["record"] in ("delta", "gain", "spectral_delta"):
      out[key + (r["kind"], r.get("baseline"), r.get("metric"))] = (
          r["delta"], tuple(r["delta_ci95"] or ()), r["ci_method"])
    elif r["record"] == "claim":
      out[key + (r["kind"], r["claim"])] = (r["estimate"], tuple(r["ci95"] or ()), r["verdict"])
    elif r["record"] == "tune":
      out[key] = (r["chosen"], tuple(m["mean_val_accuracy"] for m in r["members"]))
    else:
      out[key] = (r["test_acc"], r["train_loss"], r["step"])
  return out
