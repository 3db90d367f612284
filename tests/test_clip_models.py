"""CLIP towers: open_clip's parameter counts and names, shapes, pooling, activations, training.

RN50 and ViT-B/16 are only traced (jax.eval_shape), never run at 224x224: the counts and shapes
come from the traced variables. A narrow ModifiedResNet runs for real at 32x32 so that the ResNet
code path is exercised, and its attention pooling is checked against the torch formula in numpy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nmjax.clip.loss import contrastive_loss
from nmjax.errors import ConfigError
from nmjax.models.clip_model import CLIP, CLIP_MODELS, ResNetVisionConfig, get_clip_model
from nmjax.models.clip_towers import AttentionPool2d, MultiheadAttention

EOT = 49407
SOT = 49406


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _random_tokens(rng, batch, length):
  """CLIP-like rows: SOT, random ids, EOT at a random position, zero padding after it."""
  tokens = np.zeros((batch, length), np.int32)
  for row in range(batch):
    eot = int(rng.integers(2, length))
    tokens[row, 0] = SOT
    tokens[row, 1:eot] = rng.integers(1, SOT, size=eot - 1)
    tokens[row, eot] = EOT
  return tokens


def _abstract_variables(model, batch=2):
  images = jax.ShapeDtypeStruct((batch,) + model.image_shape, jnp.float32)
  tokens = jax.ShapeDtypeStruct((batch, model.context_length), jnp.int32)
  variables = jax.eval_shape(lambda i, t: model.init(jax.random.key(0), i, t), images, tokens)
  outputs = jax.eval_shape(lambda v, i, t: model.apply(v, i, t), variables, images, tokens)
  return variables, outputs


def _split_counts(params):
  image = _count(params["visual"])
  scalars = 1 + ("logit_bias" in params)
  return image, _count(params) - image - scalars, _count(params)


@pytest.mark.slow
def test_rn50_matches_open_clip_parameter_count_and_names():
  model = get_clip_model("clip_rn50")
  variables, (image, text, scale) = _abstract_variables(model)
  params = variables["params"]
  # open_clip docs/model_profile.csv, row RN50: mparams 102.01, image 38.32, text 63.69.
  image_count, text_count, total = _split_counts(params)
  assert (round(image_count / 1e6, 2), round(text_count / 1e6, 2)) == (38.32, 63.69)
  assert round(total / 1e6, 2) == 102.01
  assert total == 102_007_137
  assert image.shape == text.shape == (2, 1024) and scale.shape == ()
  assert model.feature_dim == 1024 and "batch_stats" in variables
  visual = params["visual"]
  assert visual["conv1"]["kernel"].shape == (3, 3, 3, 32)
  assert visual["attnpool"]["positional_embedding"].shape == (50, 2048)  # 7x7 + mean token
  assert visual["attnpool"]["c_proj"]["kernel"].shape == (2048, 1024)
  assert "downsample_0" in visual["layer1_0"] and "downsample_0" not in visual["layer1_1"]
  assert [k for k in visual if k.startswith("layer3_")] == [f"layer3_{i}" for i in range(6)]
  block = params["transformer"]["resblocks_11"]
  assert block["attn"]["in_proj"]["kernel"].shape == (512, 1536)
  assert block["mlp"]["c_fc"]["kernel"].shape == (512, 2048)
  assert params["token_embedding"]["embedding"].shape == (49408, 512)
  assert params["text_projection"].shape == (512, 1024)


def test_vit_b16_matches_open_clip_parameter_count():
  model = get_clip_model("clip_vit_b16")
  variables, (image, text, _) = _abstract_variables(model)
  params = variables["params"]
  # open_clip docs/model_profile.csv, row ViT-B-16: 149.62, image 86.19, text 63.43.
  image_count, text_count, total = _split_counts(params)
  assert (round(image_count / 1e6, 2), round(text_count / 1e6, 2)) == (86.19, 63.43)
  assert round(total / 1e6, 2) == 149.62
  assert image.shape == text.shape == (2, 512) and model.feature_dim == 512
  assert params["visual"]["positional_embedding"].shape == (197, 768)
  assert params["visual"]["conv1"]["kernel"].shape == (16, 16, 3, 768)
  assert "batch_stats" not in variables


def _init(model, *inputs):
  # As nmjax.train.state does: the partitionable threefry lowering compiles init much slower.
  with jax.threefry_partitionable(False):
    return jax.jit(model.init)(jax.random.key(0), *inputs)


@functools.cache
def _small():
  model = get_clip_model("clip_small")
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8,) + model.image_shape), jnp.float32)
  tokens = jnp.asarray(_random_tokens(rng, 8, model.context_length))
  return model, _init(model, images, tokens)["params"], images, tokens


@functools.cache
def _forward(model):
  """One jitted program per model: (image_embed, text_embed, logit_scale, text_states)."""
  def forward(module, images, tokens):
    return (*module(images, tokens), module.text_states(tokens))
  return jax.jit(lambda p, i, t: model.apply({"params": p}, i, t, method=forward))


def test_clip_small_shapes_and_init():
  model, params, images, tokens = _small()
  image, text, scale, states = _forward(model)(params, images, tokens)
  assert image.shape == text.shape == (8, model.feature_dim) == (8, 64)
  assert states.shape == (8, 32, 64)
  assert image.dtype == text.dtype == jnp.float32
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)
  assert "logit_bias" not in params


def test_siglip_adds_logit_bias():
  model = get_clip_model("clip_small", siglip=True)
  # Only setup's own parameters are created: the towers are never called.
  params = model.init(jax.random.key(0), method=lambda m: (m.logit_scale, m.logit_bias))["params"]
  assert "visual" not in params
  np.testing.assert_allclose(params["logit_bias"], -10.0)
  np.testing.assert_allclose(params["logit_scale"], np.log(10.0), rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model, params, images, tokens = _small()
  bf16 = get_clip_model("clip_small", dtype=jnp.bfloat16)
  image, text, _, _ = _forward(bf16)(params, images, tokens)
  assert image.dtype == text.dtype == jnp.float32
  reference, reference_text, _, _ = _forward(model)(params, images, tokens)
  np.testing.assert_allclose(image, reference, atol=0.1)
  np.testing.assert_allclose(text, reference_text, atol=0.1)


def test_quick_gelu_switch_changes_outputs():
  model, params, images, tokens = _small()
  image, text, _, _ = _forward(model)(params, images, tokens)
  quick_image, quick_text, _, _ = _forward(model.clone(quick_gelu=True))(params, images, tokens)
  assert np.max(np.abs(np.asarray(text - quick_text))) > 1e-3
  assert np.max(np.abs(np.asarray(image - quick_image))) > 1e-3


def test_text_embedding_is_the_end_of_text_state():
  model, params, images, tokens = _small()
  forward = _forward(model)
  _, embed, _, states = forward(params, images, tokens)
  eot = np.argmax(np.asarray(tokens), axis=1)
  picked = np.asarray(states)[np.arange(len(eot)), eot] @ np.asarray(params["text_projection"])
  np.testing.assert_allclose(embed, picked, rtol=1e-5, atol=1e-5)
  # Causal: ids after the end-of-text token change nothing; one before it changes the embedding.
  after = np.asarray(tokens).copy()
  after[0, eot[0] + 1:] = 7
  before = np.asarray(tokens).copy()
  before[0, eot[0] - 1] = 7 if before[0, eot[0] - 1] != 7 else 8
  _, changed_after, _, _ = forward(params, images, after)
  _, changed_before, _, _ = forward(params, images, before)
  np.testing.assert_allclose(changed_after, embed, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(np.asarray(changed_before[0] - embed[0]))) > 1e-4


def test_unknown_tower_and_override_are_refused_with_one_line():
  with pytest.raises(ConfigError) as error:
    get_clip_model("clip_rn101")
  message = str(error.value)
  assert "\n" not in message and "clip_rn101" in message
  assert all(name in message for name in CLIP_MODELS)
  with pytest.raises(ConfigError, match="quickgelu"):
    get_clip_model("clip_small", quickgelu=True)


def test_clip_small_adam_steps_lower_the_loss():
  model, params, images, tokens = _small()
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      return contrastive_loss(*model.apply({"params": p}, images, tokens, train=True))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(4):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses


def _random_variables(model, rng, *inputs):
  """Random values in the shapes init gives: XLA:CPU compiles a conv tower's init slowly."""
  shapes = jax.eval_shape(lambda *x: model.init(jax.random.key(0), *x), *inputs)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (np.ones(x.shape, np.float32) if path[-1].key == "var" else
                       (0.1 * rng.normal(size=x.shape)).astype(np.float32)), shapes)


def test_modified_resnet_runs_and_updates_batch_stats():
  model = CLIP(embed_dim=16, vision=ResNetVisionConfig(layers=(1, 1), width=8, head_width=16,
                                                       image_size=32),
               context_length=8, text_width=16, text_heads=2, text_layers=1)
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(4,) + model.image_shape), jnp.float32)
  tokens = jnp.asarray(_random_tokens(rng, 4, 8))
  variables = _random_variables(model, rng, images, tokens)
  # 32x32: the stem divides by 4, the second stage by 2: attention over 4x4 + 1 tokens of 64.
  attnpool = variables["params"]["visual"]["attnpool"]
  assert attnpool["positional_embedding"].shape == (17, 64)
  train = jax.jit(lambda v, i, t: model.apply(v, i, t, train=True, mutable=["batch_stats"]))
  (image, text, _), updates = train(variables, images, tokens)
  assert image.shape == text.shape == (4, 16) and np.all(np.isfinite(np.asarray(image)))
  old, new = variables["batch_stats"]["visual"]["bn1"], updates["batch_stats"]["visual"]["bn1"]
  assert np.max(np.abs(np.asarray(new["mean"] - old["mean"]))) > 0


def _torch_style_attention(x, w_qkv, b_qkv, w_out, b_out, heads, causal):
  """numpy float64: F.linear with in_proj, chunk q|k|v, per-head softmax, -inf causal mask."""
  batch, length, width = x.shape
  q, k, v = np.split(x @ w_qkv + b_qkv, 3, axis=-1)
  split = lambda t: t.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)
  logits = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(width // heads)
  if causal:
    logits = logits + np.triu(np.full((length, length), -np.inf), 1)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = (weights @ split(v)).transpose(0, 2, 1, 3).reshape(batch, length, width)
  return out @ w_out + b_out


def test_causal_attention_matches_torch_formula():
  x = np.random.default_rng(2).normal(size=(2, 6, 8))
  module = MultiheadAttention(num_heads=2, causal=True, depth=1)
  params = _init(module, jnp.asarray(x, jnp.float32))["params"]
  params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero biases
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  expected = _torch_style_attention(x, p["in_proj"]["kernel"], p["in_proj"]["bias"],
                                    p["out_proj"]["kernel"], p["out_proj"]["bias"], 2, True)
  got = jax.jit(module.apply)({"params": params}, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_attention_pool_matches_torch_formula():
  x = np.random.default_rng(3).normal(size=(2, 3, 3, 8))
  module = AttentionPool2d(num_heads=2, output_dim=4)
  params = _init(module, jnp.asarray(x, jnp.float32))["params"]
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  tokens = x.reshape(2, 9, 8)
  tokens = np.concatenate([tokens.mean(1, keepdims=True), tokens], 1) + p["positional_embedding"]
  # torch computes every row of attention over [mean; grid] with separate q/k/v, then keeps row 0.
  w_qkv = np.concatenate([p[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj")], axis=1)
  b_qkv = np.concatenate([p[n]["bias"] for n in ("q_proj", "k_proj", "v_proj")])
  expected = _torch_style_attention(tokens, w_qkv, b_qkv, p["c_proj"]["kernel"],
                                    p["c_proj"]["bias"], 2, False)[:, 0]
  got = jax.jit(module.apply)({"params": params}, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
