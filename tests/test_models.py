"""Tests for the model zoo: output contract, BatchNorm state, dtypes, registry errors, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nmjax.errors import ConfigError
from nmjax.models import MODELS, feature_dim, get_model
from nmjax.models.resnet import Bottleneck, ResNet
from nmjax.models.vit import ViT, sincos_2d_position_embedding

NUM_CLASSES = 7

# Small inputs keep resnet18/50 cheap on CPU; resnet_small gets the 28x28x1 it is built for.
_INPUT_SHAPES = {
    "resnet_small": (2, 28, 28, 1),
    "resnet18": (2, 32, 32, 3),
    "resnet50": (2, 32, 32, 3),
    "vit_s16": (2, 224, 224, 3),
    "vit_b16": (2, 224, 224, 3),
}


def _images(shape: tuple[int, ...], seed: int = 0) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


@pytest.fixture(scope="module")
def small() -> tuple[ResNet, jnp.ndarray, dict]:
  """resnet_small, a batch for it, and its initialized variables, built once for the module."""
  model = get_model("resnet_small", NUM_CLASSES)
  images = _images(_INPUT_SHAPES["resnet_small"])
  # XLA:CPU spends far longer optimizing the partitionable threefry kernels of a jitted init than
  # the classic ones; these tests check the model, not the PRNG, so they take the cheap kernels.
  with jax.threefry_partitionable(False):
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)
  return model, images, variables


def test_registry_covers_every_model():
  assert sorted(MODELS) == sorted(_INPUT_SHAPES)


@pytest.mark.parametrize("name", sorted(_INPUT_SHAPES))
def test_outputs_are_logits_and_pooled_features(name):
  model = get_model(name, NUM_CLASSES)
  images = jax.ShapeDtypeStruct(_INPUT_SHAPES[name], jnp.float32)
  # Shapes only: eval_shape traces without compiling, which keeps resnet50 cheap.
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  logits, features = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  batch = images.shape[0]
  assert logits.shape == (batch, NUM_CLASSES)
  assert features.shape == (batch, feature_dim(name))
  assert logits.dtype == features.dtype == jnp.float32
  assert set(variables) == ({"params"} if name.startswith("vit") else {"params", "batch_stats"})


def test_forward_pass_is_finite(small):
  model, images, variables = small
  logits, features = model.apply(variables, images, train=False)
  assert logits.shape == (images.shape[0], NUM_CLASSES)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(features))


def test_bottleneck_resnet_with_imagenet_stem_runs():
  # resnet50's code path (ImageNet stem, Bottlenecks, projections) at a width that compiles fast.
  model = ResNet(
      num_classes=NUM_CLASSES, stage_sizes=(1, 1), stage_widths=(4, 8), stage_strides=(1, 2),
      block_cls=Bottleneck, stem_width=4)
  images = _images((2, 32, 32, 3))
  with jax.threefry_partitionable(False):
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)
  (logits, features), _ = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images)
  assert logits.shape == (2, NUM_CLASSES)
  assert features.shape == (2, model.feature_dim) == (2, 32)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(features))


def test_feature_dims():
  assert {name: feature_dim(name) for name in MODELS} == {
      "resnet_small": 64, "resnet18": 512, "resnet50": 2048, "vit_s16": 384, "vit_b16": 768}


def test_batch_stats_change_in_train_mode_only(small):
  model, images, variables = small
  before = variables["batch_stats"]

  _, train_updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, train_updates["batch_stats"])
  assert all(jax.tree.leaves(changed))

  _, eval_updates = model.apply(variables, images, train=False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, before, eval_updates["batch_stats"])


def test_last_batchnorm_scale_of_each_block_starts_at_zero(small):
  _, _, variables = small
  for stage in ("stage1_block1", "stage2_block1", "stage3_block1"):
    assert not np.any(variables["params"][stage]["BatchNorm_1"]["scale"])
    assert np.all(variables["params"][stage]["BatchNorm_0"]["scale"] == 1)


def test_bfloat16_computes_in_bfloat16_with_float32_params(small):
  _, images, variables = small
  model = get_model("resnet_small", NUM_CLASSES, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}

  # Parameters do not depend on the compute dtype, so the float32 model's variables fit.
  (logits, features), state = model.apply(
      variables, images, train=True, mutable=["batch_stats", "intermediates"],
      capture_intermediates=True)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(features))
  assert state["intermediates"]["stem_conv"]["__call__"][0].dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(state["batch_stats"])} == {jnp.dtype(jnp.float32)}


def test_unknown_model_is_a_config_error_listing_known_models():
  expected = ("config.model='vgg16' is unknown; known models: resnet18, resnet50, resnet_small,"
              " vit_b16, vit_s16")
  with pytest.raises(ConfigError) as excinfo:
    get_model("vgg16", NUM_CLASSES)
  assert str(excinfo.value) == expected
  with pytest.raises(ConfigError):
    feature_dim("vgg16")


def test_sgd_steps_reduce_loss_on_a_fixed_batch(small):
  model, _, variables = small
  images = _images((32, 28, 28, 1))
  labels = jnp.asarray(np.random.default_rng(1).integers(0, NUM_CLASSES, 32))
  tx = optax.sgd(0.1, momentum=0.9)
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

  @jax.jit
  def train_step(state, images, labels):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      (logits, _), updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    param_updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, param_updates)
    return (params, updates["batch_stats"], opt_state), loss

  losses = []
  for _ in range(10):
    state, loss = train_step(state, images, labels)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
  assert losses[-1] < 0.85 * losses[0], losses


def test_vit_s16_has_the_published_size():
  # ViT-S/16 at 224: 196 patch tokens of width 384; about 22M parameters (21.7M + a 1000-way head).
  model = get_model("vit_s16", 1000)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                             jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables))
  assert 21.5e6 < count < 22.5e6, count
  assert len([k for k in variables["params"] if k.startswith("block")]) == 12


def test_small_vit_forward_is_finite_and_the_same_in_train_and_eval():
  # vit_s16's code path (patches, sincos positions, pre-LN blocks, pooling) at a tiny width.
  model = ViT(num_classes=NUM_CLASSES, patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32)
  images = _images((4, 32, 32, 3))
  with jax.threefry_partitionable(False):
    params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)["params"]
  both_modes = jax.jit(lambda p, x: (model.apply({"params": p}, x, train=False),
                                     model.apply({"params": p}, x, train=True)))
  (logits, features), (_, train_features) = both_modes(params, images)
  assert logits.shape == (4, NUM_CLASSES) and features.shape == (4, 16)
  assert np.all(np.isfinite(features)) and np.std(np.asarray(features)) > 0.1
  np.testing.assert_array_equal(logits, 0.0)  # zero-initialized head
  np.testing.assert_array_equal(train_features, features)
  # Each image's features depend on that image alone, and differ between images.
  (_, reversed_features), _ = both_modes(params, images[::-1])
  np.testing.assert_allclose(reversed_features, features[::-1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(features[0], features[1])


def test_sincos_position_embedding_distinguishes_every_patch():
  embedding = sincos_2d_position_embedding(4, 5, 32)
  assert embedding.shape == (20, 32)
  distances = np.linalg.norm(embedding[:, None] - embedding[None], axis=-1)
  assert np.all(distances[~np.eye(20, dtype=bool)] > 1e-3)
