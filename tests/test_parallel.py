"""Sharded training in one process: meshes, sharding rules, 1 vs 8 devices, restore 8 -> 1, bf16.

The 1-vs-8 comparison runs the smoke config's recipe (batch 32, SGD Nesterov, no warm-up, cosine
over 12 steps) on real Fashion-MNIST batches at lr 0.01, where the parameters of one and of eight
devices stay within float32 rounding of each other. At the smoke config's own lr 0.1 they drift
apart: XLA:CPU sums the stem kernel's gradient over all batch x pixel terms in one float32 pass
on one device, less accurately than eight devices' partial sums (checked against float64), and
lr 0.1 from a fresh initialization amplifies that rounding at every step.
"""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nmjax import models, parallel
from nmjax.data import pipeline, sources
from nmjax.errors import ConfigError
from nmjax.train import checkpoint, state as state_lib
from nmjax.train.steps import train_step

SMOKE_OPTIMIZER = dict(optimizer="sgd", weight_decay=5e-4, momentum=0.9, nesterov=True)


def _init_fn(dtype=jax.numpy.float32, lr=0.01, total_steps=12):
  model = models.get_model("resnet_small", num_classes=10, dtype=dtype)
  schedule = state_lib.learning_rate_schedule(base_lr=lr, warmup_steps=0, total_steps=total_steps)
  tx = state_lib.make_optimizer(ml_collections.ConfigDict(SMOKE_OPTIMIZER), schedule)
  return lambda: state_lib.create_train_state(model, jax.random.key(0), (1, 28, 28, 1), tx)


@functools.cache
def _initial_state():
  return jax.jit(_init_fn())()


@functools.cache  # One compilation per (mesh, dtype) for the whole module.
def _step_fn(mesh, dtype=jax.numpy.float32):
  info = sources.get_source("fashion_mnist").info
  replicated = parallel.replicated(mesh)
  return jax.jit(functools.partial(train_step, mean=tuple(info.mean), std=tuple(info.std),
                                   num_classes=10, dtype=dtype),
                 in_shardings=(replicated, parallel.data_sharded(mesh)),
                 out_shardings=(replicated, replicated))


@pytest.fixture(scope="module")
def fmnist_batches():
  source = sources.get_source("fashion_mnist")
  stream = pipeline.train_iterator(source.data_source("train"), labels=source.labels("train"),
                                   global_batch_size=32, seed=0, num_steps=6)
  return [next(stream) for _ in range(6)]


def _train(mesh, batches, state=None):
  if state is None:
    state = jax.device_put(_initial_state(), parallel.replicated(mesh))
  step = _step_fn(mesh)
  for batch in batches:
    state, _ = step(state, parallel.host_to_global(batch, mesh))
  return state


@pytest.fixture(scope="module")
def one_and_eight(fmnist_batches):
  one = _train(parallel.make_mesh(jax.devices()[:1]), fmnist_batches[:5])
  eight = _train(parallel.make_mesh(jax.devices()), fmnist_batches[:5])
  return one, eight


def _max_gap(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_mesh_spec_parsing_and_errors():
  mesh = parallel.make_mesh(spec="data:4,model:2")
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert dict(parallel.make_mesh(spec="data:-1").shape) == {"data": 8}
  assert dict(parallel.make_mesh(spec="model:2,data:-1").shape) == {"model": 2, "data": 4}
  for bad in ("batch:8", "model:8", "data:-1,model:-1", "data:3", "data:0", "data:4,data:2"):
    with pytest.raises(ConfigError, match=r"config\.mesh="):
      parallel.make_mesh(spec=bad)
  with pytest.raises(ConfigError, match="data axis"):
    parallel.check_batch_size(34, mesh)  # 34 is not divisible by the 4-way data axis.


def test_model_rule_shards_big_kernels_and_optimizer_state_follows():
  mesh = parallel.make_mesh(spec="data:4,model:2")
  model = models.get_model("resnet18", num_classes=1000)
  tx = state_lib.make_optimizer(ml_collections.ConfigDict(SMOKE_OPTIMIZER),
                                state_lib.learning_rate_schedule(base_lr=0.1, warmup_steps=0,
                                                                 total_steps=10))
  shapes = jax.eval_shape(lambda: state_lib.create_train_state(
      model, jax.random.key(0), (1, 64, 64, 3), tx))
  shardings = parallel.state_shardings(shapes, mesh, "model")
  params = shardings.params
  # The last stage's 3x3x512x512 kernel: largest divisible axis is the output features.
  assert params["stage4_block2"]["Conv_1"]["kernel"].spec == P(None, None, None, "model")
  assert params["head"]["kernel"].spec == P("model", None) or (
      params["head"]["kernel"].spec == P(None, "model"))
  assert params["stem_conv"]["kernel"].spec == P()  # 9,408 elements: too small to split.
  assert params["stem_bn"]["scale"].spec == P()
  momentum = shardings.opt_state[1][0].trace  # sgd's trace mirrors the params tree.
  for path, sharding in jax.tree_util.tree_leaves_with_path(params):
    follower = functools.reduce(lambda t, k: t[k.key], path, momentum)
    assert follower.spec == sharding.spec, jax.tree_util.keystr(path)
  assert parallel.state_shardings(shapes, mesh).params["head"]["kernel"].spec == P()
  with pytest.raises(ConfigError, match="param_sharding"):
    parallel.leaf_spec((512, 512), mesh, "fsdp")


def test_one_vs_eight_devices_same_parameters(one_and_eight):
  one, eight = one_and_eight
  assert int(one.step) == int(eight.step) == 5
  assert _max_gap(one.params, eight.params) < 1e-5
  assert _max_gap(one.batch_stats, eight.batch_stats) < 1e-5
  assert _max_gap(one.params, _initial_state().params) > 1e-3  # It did train.


def test_checkpoint_saved_on_eight_devices_restores_on_one(one_and_eight, fmnist_batches,
                                                           tmp_path):
  _, eight = one_and_eight
  assert len(eight.params["head"]["kernel"].sharding.device_set) == 8
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 5, eight, {"data": None})
  mngr.wait_until_finished()
  mngr.close()

  one_mesh = parallel.make_mesh(jax.devices()[:1])
  # Same static fields (model, optimizer) as the cached step's inputs: no recompilation.
  abstract = checkpoint.abstract_with_sharding(_initial_state(), parallel.replicated(one_mesh))
  mngr = checkpoint.manager(str(tmp_path))
  restored, loop_state = checkpoint.restore(mngr, mngr.latest_step(), abstract)
  mngr.close()
  assert loop_state == {"data": None}
  assert restored.params["head"]["kernel"].sharding.device_set == {jax.devices()[0]}
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(eight)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # And it trains on: one more step on 1 device matches that step on 8.
  on_one = _train(one_mesh, fmnist_batches[5:], restored)
  on_eight = _train(parallel.make_mesh(jax.devices()), fmnist_batches[5:], eight)
  assert int(on_one.step) == 6
  assert _max_gap(on_one.params, on_eight.params) < 1e-5


def test_bfloat16_compute_keeps_float32_params_and_optimizer_state(fmnist_batches):
  # Traced, not compiled: the output types of the step are fixed by tracing.
  info = sources.get_source("fashion_mnist").info
  step = functools.partial(train_step, mean=tuple(info.mean), std=tuple(info.std),
                           num_classes=10, dtype=jax.numpy.bfloat16)
  state = jax.eval_shape(_init_fn(dtype=jax.numpy.bfloat16))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fmnist_batches[0])
  new_state, metrics = jax.eval_shape(step, state, batch)
  floats = [x for x in jax.tree.leaves((new_state.params, new_state.batch_stats,
                                        new_state.opt_state))
            if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
  assert floats and all(x.dtype == jax.numpy.float32 for x in floats)
  assert metrics["loss"].dtype == jax.numpy.float32
  # The convolutions themselves run in bfloat16.
  jaxpr = str(jax.make_jaxpr(step)(state, batch))
  convs = [line for line in jaxpr.splitlines() if "conv_general_dilated" in line]
  assert convs and all("bf16" in line for line in convs)


def test_restore_ignores_an_uncommitted_checkpoint(tmp_path):
  mngr = checkpoint.manager(str(tmp_path))
  tree = {"w": np.arange(4.0, dtype=np.float32)}
  checkpoint.save(mngr, 2, tree, {"data": None})
  mngr.wait_until_finished()
  mngr.close()
  # What a kill in the middle of writing step 7 leaves: a temporary directory, half full.
  partial = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1764000000"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "junk").write_bytes(b"\0" * 10)
  mngr = checkpoint.manager(str(tmp_path))
  assert mngr.latest_step() == 2 and list(mngr.all_steps()) == [2]
  mngr.close()
  step, restored = checkpoint.load_state(str(tmp_path))
  assert step == 2
  np.testing.assert_array_equal(restored["w"], tree["w"])


def test_model_axis_sharded_state_trains_like_replicated(one_and_eight, fmnist_batches,
                                                         monkeypatch):
  # The small ResNet's kernels are all below the size threshold: lower it so the rule bites.
  monkeypatch.setattr(parallel, "MIN_SHARDED_SIZE", 256)
  mesh = parallel.make_mesh(spec="data:4,model:2")
  shardings = parallel.state_shardings(_initial_state(), mesh, "model")
  split = [s for s in jax.tree.leaves(shardings) if "model" in s.spec]
  assert len(split) >= 6
  info = sources.get_source("fashion_mnist").info
  step = jax.jit(functools.partial(train_step, mean=tuple(info.mean), std=tuple(info.std),
                                   num_classes=10),
                 in_shardings=(shardings, parallel.data_sharded(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)))
  state = jax.device_put(_initial_state(), shardings)
  for batch in fmnist_batches[:5]:
    state, _ = step(state, parallel.host_to_global(batch, mesh))
  kernel = state.params["stage3_block1"]["Conv_1"]["kernel"]
  assert kernel.sharding.spec == P(None, None, None, "model")
  assert kernel.addressable_shards[0].data.shape == (3, 3, 64, 32)
  _, eight = one_and_eight
  assert _max_gap(state.params, eight.params) < 1e-5
