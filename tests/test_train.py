"""The project's own train and eval steps, optimizer recipe and config helpers."""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nmjax import models
from nmjax.config import parse_arg, total_steps
from nmjax.errors import ConfigError
from nmjax.train import state as state_lib
from nmjax.train.steps import eval_step, train_step

MEAN, STD = (72.9,), (90.0,)


def _config(**overrides):
  """An optimizer recipe (state_lib.OptimizerSpec: sgd with nesterov momentum by default)."""
  base = dict(optimizer="sgd", weight_decay=5e-4, momentum=0.9, nesterov=True)
  return state_lib.OptimizerSpec(**(base | overrides))


def _state(optimizer="sgd", lr=0.05):
  model = models.get_model("resnet_small", num_classes=10)
  schedule = state_lib.learning_rate_schedule(base_lr=lr, warmup_steps=0, total_steps=100)
  tx = state_lib.make_optimizer(_config(optimizer=optimizer), schedule)
  return state_lib.create_train_state(model, jax.random.key(0), (1, 28, 28, 1), tx)


def _batch(n=64, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.int32)
  return {"image": rng.integers(0, 256, (n, 28, 28, 1)).astype(np.uint8), "label": labels,
          "clean_label": labels, "index": np.arange(n, dtype=np.int32)}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_jitted_train_step_reduces_loss_on_a_fixed_batch(optimizer):
  state = _state(optimizer, lr=0.05 if optimizer == "sgd" else 3e-3)
  step = jax.jit(functools.partial(train_step, mean=MEAN, std=STD, num_classes=10))
  batch = _batch()
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < 0.97 * losses[0], losses
  assert int(state.step) == 6
  assert int(metrics["count"]) == 64
  assert 0 <= int(metrics["correct_noisy"]) <= 64


def test_train_step_counts_noisy_and_clean_hits_separately():
  state = _state()
  batch = _batch()
  batch["clean_label"] = (batch["label"] + 1) % 10  # Every clean label differs from the noisy one.
  _, metrics = jax.jit(functools.partial(train_step, mean=MEAN, std=STD, num_classes=10))(
      state, batch)
  # A prediction cannot match both: the two counts never exceed the batch together.
  assert int(metrics["correct_noisy"]) + int(metrics["correct_clean"]) <= 64


def test_eval_step_ignores_padded_rows():
  state = _state()
  batch = _batch(n=32)
  evaluate = jax.jit(functools.partial(eval_step, mean=MEAN, std=STD, num_classes=10))
  full = evaluate(state, {**batch, "mask": np.ones(32, bool)})
  # Same first 20 rows, the rest replaced by padding (zeros, mask False): sums over the 20 only.
  padded = {k: v.copy() for k, v in batch.items()}
  for k in ("image", "label"):
    padded[k][20:] = 0
  mask = np.arange(32) < 20
  part = evaluate(state, {**padded, "mask": mask})
  only = evaluate(state, {**{k: v[:20] for k, v in batch.items()}, "mask": np.ones(20, bool)})
  assert float(part["count"]) == 20 and float(full["count"]) == 32
  np.testing.assert_allclose(float(part["correct"]), float(only["correct"]))
  np.testing.assert_allclose(float(part["loss_sum"]), float(only["loss_sum"]), rtol=1e-5)


def test_weight_decay_skips_batchnorm_and_biases():
  params = {"conv": {"kernel": jnp.ones((3, 3, 1, 4))}, "bn": {"scale": jnp.ones(4),
                                                               "bias": jnp.ones(4)}}
  tx = state_lib.make_optimizer(_config(weight_decay=0.5, momentum=0.0, nesterov=False),
                                optax.constant_schedule(1.0))
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.5)  # Decayed.
  np.testing.assert_allclose(updates["bn"]["scale"], 0.0)       # Not decayed.
  np.testing.assert_allclose(updates["bn"]["bias"], 0.0)


def test_schedule_warms_up_then_decays_to_zero():
  schedule = state_lib.learning_rate_schedule(base_lr=0.1, warmup_steps=10, total_steps=100)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 0.1, rtol=1e-6)
  assert float(schedule(50)) < 0.1
  np.testing.assert_allclose(float(schedule(100)), 0.0, atol=1e-9)


def test_unknown_optimizer_is_refused():
  with pytest.raises(ConfigError, match="config.optimizer='lion' is unknown; allowed: sgd, adamw"):
    state_lib.make_optimizer(_config(optimizer="lion"), optax.constant_schedule(1.0))


def test_parse_arg_types_flags_and_unknown_keys():
  parsed = parse_arg("noise=0.2,seed=3,smoke,dataset=mnist", noise=0.0, seed=0, smoke=False,
                     dataset="fashion_mnist")
  assert parsed.noise == 0.2 and parsed.seed == 3 and parsed.smoke is True
  assert parsed.dataset == "mnist"
  with pytest.raises(ConfigError, match="known: dataset, noise"):
    parse_arg("nosie=0.2", noise=0.0, dataset="x")
  with pytest.raises(ConfigError, match="not float-valued"):
    parse_arg("noise=high", noise=0.0)


def test_pretrain_config_arguments_map_to_fields():
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "pretrain.py")
  spec = importlib.util.spec_from_file_location("pretrain_config", path)
  pretrain = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(pretrain)
  config = pretrain.get_config("dataset=mnist,noise=0.3,noise_type=pairflip,epochs=2")
  assert (config.dataset, config.noise_ratio, config.noise_type, config.num_epochs) == (
      "mnist", 0.3, "pairflip", 2.0)
  assert pretrain.get_config("smoke").num_train_steps > 0


def test_num_train_steps_wins_over_epochs():
  assert total_steps(num_examples=1000, global_batch_size=100, num_epochs=3,
                     num_train_steps=-1) == (10, 30)
  assert total_steps(num_examples=1000, global_batch_size=100, num_epochs=3,
                     num_train_steps=7) == (10, 7)
  with pytest.raises(ConfigError, match="larger than the training set"):
    total_steps(num_examples=10, global_batch_size=100, num_epochs=1, num_train_steps=-1)
