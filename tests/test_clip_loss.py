"""Contrastive losses: float64 numpy references and the global-batch semantics, 1 vs 8 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from nmjax import parallel
from nmjax.clip.loss import contrastive_loss, l2_normalize, siglip_loss


def _features(batch=32, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, dim)).astype(np.float32)
  # Captions correlated with their images, so the loss is neither trivial nor saturated.
  text = (image + rng.normal(size=(batch, dim))).astype(np.float32)
  return image, text


def _numpy_logits(image, text, scale):
  image = np.asarray(image, np.float64)
  text = np.asarray(text, np.float64)
  image = image / np.linalg.norm(image, axis=1, keepdims=True)
  text = text / np.linalg.norm(text, axis=1, keepdims=True)
  return scale * image @ text.T


def _numpy_log_softmax(logits, axis):
  shifted = logits - logits.max(axis=axis, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _numpy_contrastive(image, text, scale):
  logits = _numpy_logits(image, text, scale)
  diagonal = np.arange(len(logits))
  image_to_text = -_numpy_log_softmax(logits, 1)[diagonal, diagonal].mean()
  text_to_image = -_numpy_log_softmax(logits, 0)[diagonal, diagonal].mean()
  return (image_to_text + text_to_image) / 2


def _numpy_siglip(image, text, scale, bias):
  logits = _numpy_logits(image, text, scale) + bias
  signs = 2 * np.eye(len(logits)) - 1
  return -np.sum(-np.logaddexp(0.0, -signs * logits)) / len(logits)


def test_contrastive_loss_matches_float64_numpy():
  image, text = _features()
  for scale in (1.0, 1 / 0.07, 100.0):
    got = contrastive_loss(image, text, jnp.float32(scale))
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, _numpy_contrastive(image, text, scale), rtol=2e-6)


def test_contrastive_loss_computes_in_float32_from_bfloat16_features():
  image, text = _features()
  got = contrastive_loss(jnp.asarray(image, jnp.bfloat16), jnp.asarray(text, jnp.bfloat16), 14.0)
  assert got.dtype == jnp.float32
  rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (image, text)]
  np.testing.assert_allclose(got, _numpy_contrastive(*rounded, 14.0), rtol=1e-5)


def test_siglip_loss_matches_float64_numpy():
  image, text = _features(seed=1)
  for scale, bias in ((10.0, -10.0), (3.0, 0.5)):
    got = siglip_loss(image, text, jnp.float32(scale), jnp.float32(bias))
    np.testing.assert_allclose(got, _numpy_siglip(image, text, scale, bias), rtol=2e-6)


def test_l2_normalize_keeps_zero_vectors_finite():
  out = l2_normalize(jnp.zeros((2, 4)))
  assert np.all(np.asarray(out) == 0)


@functools.cache
def _sharded_value_and_grad(loss, mesh, num_scalars):
  """jit(value_and_grad) with features split over 'data' and the scalars replicated."""
  in_shardings = (parallel.data_sharded(mesh),) * 2 + (parallel.replicated(mesh),) * num_scalars
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(2 + num_scalars))),
                 in_shardings=in_shardings)


def _run(loss, mesh, image, text, *scalars):
  data = NamedSharding(mesh, P(parallel.DATA_AXIS))
  image, text = jax.device_put(image, data), jax.device_put(text, data)
  assert len(image.addressable_shards) == mesh.size
  value, grads = _sharded_value_and_grad(loss, mesh, len(scalars))(
      image, text, *[jnp.float32(s) for s in scalars])
  return float(value), [np.asarray(g) for g in grads]


def test_losses_and_gradients_equal_on_1_and_8_devices():
  one = parallel.make_mesh(jax.devices()[:1])
  eight = parallel.make_mesh(jax.devices())
  assert eight.size == 8
  image, text = _features(batch=32)
  for loss, scalars in ((contrastive_loss, (1 / 0.07,)), (siglip_loss, (10.0, -10.0))):
    value_1, grads_1 = _run(loss, one, image, text, *scalars)
    value_8, grads_8 = _run(loss, eight, image, text, *scalars)
    np.testing.assert_allclose(value_8, value_1, rtol=1e-6)
    for g8, g1 in zip(grads_8, grads_1):
      np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-6)
  # Global, not local: the mean of each device's own 4x4 block loss is a different number.
  local = np.mean([_numpy_contrastive(image[i:i + 4], text[i:i + 4], 1 / 0.07)
                   for i in range(0, 32, 4)])
  value_8, _ = _run(contrastive_loss, eight, image, text, 1 / 0.07)
  np.testing.assert_allclose(value_8, _numpy_contrastive(image, text, 1 / 0.07), rtol=2e-6)
  assert abs(local - value_8) > 0.1
