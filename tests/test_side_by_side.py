"""Seeds side by side (nmjax/train/side_by_side.py, nmjax/models/batching.py): one vmapped
program equals separate runs bitwise, per member, and its workdirs read as separate runs'."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from nmjax.errors import ConfigError
from nmjax.jobs import pretrain, study
from nmjax.models import batching, get_model
from nmjax.train import checkpoint, side_by_side, supervised


def _plans(seeds=(0, 1), ratios=(0.0, 0.3), **overrides):
  config = default_config.get_config("smoke")
  for key, value in overrides.items():
    setattr(config.pretrain, key, value)
  return [pretrain.validate(study.pretrain_config(config, s, r)) for s in seeds for r in ratios]


def _params(workdir):
  return checkpoint.load_state(workdir)[1]["params"]


def _max_difference(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_vmapped_conv_is_the_plain_conv_and_its_gradient():
  x = jax.random.normal(jax.random.key(0), (3, 2, 9, 9, 4))
  k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4, 5))
  dims = jax.lax.conv_dimension_numbers(x.shape[1:], k.shape[1:], ("NHWC", "HWIO", "NHWC"))

  def loss(conv, xi, ki):
    return jnp.sum(jnp.sin(conv(xi, ki, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dims)))

  for mode in batching.BATCHINGS:
    os.environ["NMJAX_SEED_CONV"] = mode
    try:
      ours = jax.jit(jax.vmap(jax.value_and_grad(
          lambda a, b: loss(batching.conv_general_dilated, a, b), argnums=(0, 1))))(x, k)
    finally:
      del os.environ["NMJAX_SEED_CONV"]
    plain = jax.vmap(jax.value_and_grad(
        lambda a, b: loss(jax.lax.conv_general_dilated, a, b), argnums=(0, 1)))(x, k)
    assert _max_difference(ours, plain) < 1e-4, mode


@pytest.mark.parametrize("members", [4, 9])
def test_stacked_reductions_sum_as_one_model_does(members):
  """BatchNorm's statistics and a softmax loss, vmapped over 4 or 9 stacked models, compiled with
  batching.compiler_options: each model's numbers are bitwise those of its program alone (XLA:CPU's
  default YNNPACK reductions change their order from four stacked models on)."""
  def stats(x, logits):
    return (jnp.mean(x, axis=(0, 1, 2)), jnp.var(x, axis=(0, 1, 2)),
            jax.nn.log_softmax(logits).mean())

  x = jax.random.normal(jax.random.key(0), (members, 32, 14, 14, 16))
  logits = jax.random.normal(jax.random.key(1), (members, 128, 10))
  options = batching.compiler_options()
  alone = jax.jit(stats, compiler_options=options)
  stacked = jax.jit(jax.vmap(stats), compiler_options=options)(x, logits)
  for k in range(members):
    for a, b in zip(alone(x[k], logits[k]), stacked):
      assert np.array_equal(np.asarray(a), np.asarray(b[k])), k


def test_members_must_share_everything_but_seed_and_noise():
  plans = _plans(seeds=(0,), ratios=(0.0,)) + _plans(seeds=(1,), ratios=(0.0,),
                                                     learning_rate=0.05)
  with pytest.raises(ConfigError, match="differ in learning_rate"):
    side_by_side.check_members(plans)
  with pytest.raises(ConfigError, match="at least two"):
    side_by_side.check_members(plans[:1])


@pytest.mark.slow  # Four separate pre-training runs and one group: about half a minute.
def test_side_by_side_equals_separate_runs(tmp_path):
  plans = _plans()
  separate = []
  for i, plan in enumerate(plans):
    workdir = tmp_path / f"separate{i}"
    workdir.mkdir()
    separate.append(supervised.run(plan, str(workdir)))
  workdirs = []
  for i in range(len(plans)):
    (tmp_path / f"member{i}").mkdir()
    workdirs.append(str(tmp_path / f"member{i}"))
  (tmp_path / "group").mkdir()
  together = side_by_side.run(plans, workdirs, str(tmp_path / "group"))
  for i, (alone, side) in enumerate(zip(separate, together)):
    assert side["step"] == alone["step"] == plans[i].num_train_steps
    assert side["noise_rate_train"] == alone["noise_rate_train"]
    # Bitwise: the same sums in the same order (batching.compiler_options), four runs stacked.
    difference = _max_difference(_params(str(tmp_path / f"separate{i}")), _params(workdirs[i]))
    assert difference == 0.0, (i, difference)
    assert side["test_acc"] == alone["test_acc"] and side["test_loss"] == alone["test_loss"]
    # The member's workdir reads as a separate run's: its config.json and metrics records.
    saved = json.loads((tmp_path / f"member{i}" / "config.json").read_text())
    assert saved["seed"] == plans[i].seed and saved["noise_ratio"] == plans[i].noise_ratio
    steps = [json.loads(line)["step"] for line in
             (tmp_path / f"member{i}" / "metrics.jsonl").read_text().splitlines()]
    alone_steps = [json.loads(line)["step"] for line in
                   (tmp_path / f"separate{i}" / "metrics.jsonl").read_text().splitlines()]
    assert steps == alone_steps


@pytest.mark.slow  # Three groups of pre-training runs.
def test_a_preempted_group_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
  """SIGTERM's path (the preemption watch says stop after step 5): the group saves and returns;
  the same call again resumes from the group's checkpoint and ends bitwise where an
  uninterrupted group ends."""
  plans = _plans(ratios=(0.3,))

  def run(root, stop_at=None):
    workdirs = [str(root / f"m{i}") for i in range(len(plans))]
    for d in workdirs + [str(root / "group")]:
      os.makedirs(d, exist_ok=True)
    if stop_at is not None:
      monkeypatch.setattr(side_by_side.loop.PreemptionWatch, "reached",
                          lambda self, step: step == stop_at)
    try:
      return side_by_side.run(plans, workdirs, str(root / "group")), workdirs
    finally:
      monkeypatch.undo()

  stopped, _ = run(tmp_path / "killed", stop_at=5)
  assert stopped[0]["preempted"] and stopped[0]["step"] == 5
  assert checkpoint.saved_steps(str(tmp_path / "killed" / "group")) == [5]
  resumed, workdirs = run(tmp_path / "killed")
  straight, straight_dirs = run(tmp_path / "straight")
  for a, b in zip(workdirs, straight_dirs):
    assert _max_difference(_params(a), _params(b)) == 0.0
  assert [r["test_acc"] for r in resumed] == [r["test_acc"] for r in straight]
