"""NMTune: a residual MLP over frozen features with three spectral regularizers (REFERENCE.md s.4).

The module (NMTuneHead) maps a frozen feature f (D) to z = s * h(f) + f, with h = Dense(r*D) ->
BatchNorm -> ReLU -> Dense(D) and s a learnable per-dimension scale, then to logits = Dense(C)(z).
Training minimizes, over batches of n rows,

    CE(logits, labels) + mse_weight * consistency_loss(z_s, f_w)
                       + cov_weight * covariance_loss(z) - svd_weight * dominant_singular_value_loss(z)

with AdamW (weight decay on every parameter), a per-step cosine decay to 0 and no warm-up, then
evaluates with BatchNorm's running statistics. The regularizers are pure jittable functions with
the reference's exact normalization; dominant_singular_value_loss returns the positive share of
the top-k singular values, and the total subtracts it.

Where the rows come from (`fit_multi`'s train argument):
  * features (a features file, a FeatureSet or a (features, labels) pair): the black-box mode, one
    view per example, n = config.batch_size rows per step (default 128, the reference's 2B); the
    consistency term pairs each row's z with its own f.
  * OnlineViews (images + a frozen encoder): the reference data flow. Every step takes n/2
    images, draws two independent random-resized-crop (scale (0.8, 1), ratio (3/4, 4/3)) and
    flip augmentations of each, runs the frozen encoder on both inside the jitted step, and
    pairs z of the second view with f of the first (z_s, f_w).
  * CachedViews: K augmented views per image encoded once (cache_views); each step picks two
    distinct cached views of each of its n/2 images. Much faster than OnlineViews, the same
    two-view data flow over a fixed pool of augmentations.

Methods (config.method): "nmtune" (the config's weights, reference 1.0 / 0.04 / 0.001, k = 5),
"mlp" (the same module and program with the three weights forced to 0), "lp_aug" (the linear head
alone, z = f, trained by the same program on the same views and rows per step with the linear
probe's learning rate and weight decay, config.lp: the fair control for augmentation), and "lp"
(nmjax.probe.linear_probe on plain features with config.lp: the transfer protocol).

Training runs one jitted program per epoch (a lax.scan over its steps; compiled once per shape),
with the shuffles, view choices and augmentation draws made by numpy's seeded generator outside
it. Every epoch uses floor(N / B) full batches of a fresh permutation (BatchNorm and the
batch-level regularizers need n rows); evaluation covers every test example.
Known difference from the reference: flax's BatchNorm keeps the biased batch variance in its
running average where PyTorch keeps the unbiased one (a factor n / (n - 1) = 1.008 at n = 128).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nmjax import probe, spectral
from nmjax.config import check_choice, check_range
from nmjax.errors import ConfigError, DataError, TrainingError
from nmjax.features import FeatureSet, FeaturesLike, as_feature_set, check_labels, check_matrix
from nmjax.progress import format_seconds

METHODS = ("nmtune", "mlp", "lp_aug", "lp")
COVARIANCE_ROUTES = ("auto", "gram", "covariance")
# Uniforms per augmented view: area scale, log aspect ratio, row offset, column offset, flip.
AUGMENT_DRAWS = 5
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_EVAL_CHUNK = 4096  # Test rows per evaluation call.


def single_threaded_lapack() -> contextlib.AbstractContextManager:
  """On CPU, XLA runs the per-step SVD through LAPACK (OpenBLAS). On a 128-row matrix its
  threads cost 10-50x (1.2 ms single-threaded, 24-90 ms threaded on a busy 2-core machine), so
  training limits BLAS to one thread; XLA's own matmuls keep their threads. threadpoolctl comes
  with scikit-learn; without it nothing is limited."""
  try:
    from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top
  except ImportError:
    return contextlib.nullcontext()
  return threadpool_limits(1, user_api="blas")


# ------------------------------------------------------------------------------ regularizers


def normalize_rows(x: jax.Array) -> jax.Array:
  """Each row divided by its L2 norm (clamped at 1e-12, as torch.nn.functional.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def consistency_loss(z: jax.Array, f: jax.Array) -> jax.Array:
  """Elementwise mean over (n, D) of (normalize(z) - stop_gradient(normalize(f)))^2.

  The mean runs over all n * D entries, so the squared distance of unit rows carries an implicit
  1 / D (the reference's MSE). In two-view training z is the second view's, f the first's.
  """
  z = z.astype(jnp.float32)
  target = jax.lax.stop_gradient(normalize_rows(f.astype(jnp.float32)))
  return jnp.mean(jnp.square(normalize_rows(z) - target))


def covariance_loss(z: jax.Array, *, route: str = "auto") -> jax.Array:
  """Sum of the squared off-diagonal entries of the unbiased (D, D) covariance of z, over D.

  route "covariance" forms C = z_c^T z_c / (n - 1) and zeroes its diagonal; "gram" uses
  ||z_c^T z_c||_F = ||z_c z_c^T||_F (an n x n matrix) and subtracts the diagonal's squares, the
  same value at n^2 D instead of n D^2 cost; "auto" takes the smaller matrix.
  """
  if route not in COVARIANCE_ROUTES:
    raise ConfigError(f"covariance_loss route={route!r} is unknown; allowed:"
                      f" {', '.join(COVARIANCE_ROUTES)}")
  num_rows, dim = z.shape
  if num_rows < 2:
    raise ConfigError(f"covariance_loss needs at least 2 rows, got {num_rows}")
  z = z.astype(jnp.float32)
  centered = z - jnp.mean(z, axis=0)
  if route == "auto":
    route = "gram" if num_rows < dim else "covariance"
  if route == "covariance":
    scatter = centered.T @ centered
    off_diagonal = jnp.sum(jnp.square(jnp.where(jnp.eye(dim, dtype=bool), 0.0, scatter)))
  else:
    gram = centered @ centered.T
    variances = jnp.sum(jnp.square(centered), axis=0)  # The scatter's diagonal.
    off_diagonal = jnp.sum(jnp.square(gram)) - jnp.sum(jnp.square(variances))
  return off_diagonal / ((num_rows - 1) ** 2 * dim)


def _thin_svd(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sigma (r,), U (n, r), V (D, r)) with z = U diag(sigma) V^T, r = min(n, D), through a QR
  of the long side first: the SVD then runs on an r x r triangle (on GPUs a small-matrix Jacobi
  SVD instead of the slow general one; on CPUs 2.6x faster at 128 x 2048)."""
  num_rows, dim = z.shape
  if num_rows == dim:
    u, sigma, vt = jnp.linalg.svd(z)
    return sigma, u, vt.T
  if num_rows < dim:
    q, r = jnp.linalg.qr(z.T)          # z = r^T q^T
    ur, sigma, vrt = jnp.linalg.svd(r)
    return sigma, vrt.T, q @ ur
  q, r = jnp.linalg.qr(z)              # z = q r
  ur, sigma, vrt = jnp.linalg.svd(r)
  return sigma, q @ ur, vrt.T


@jax.custom_jvp
def singular_values(z: jax.Array) -> jax.Array:
  """Singular values of an (n, D) matrix, descending, with the derivative d sigma_i = u_i^T dz v_i.

  That derivative has none of the 1 / (s_i^2 - s_j^2) terms of a full SVD's, so repeated or zero
  singular values give finite gradients (a rank-deficient z included: QR does not invert R here).
  """
  num_rows, dim = z.shape
  if num_rows == dim:
    return jnp.linalg.svd(z, compute_uv=False)
  r = jnp.linalg.qr(z.T if num_rows < dim else z, mode="r")
  return jnp.linalg.svd(r, compute_uv=False)


@singular_values.defjvp
def _singular_values_jvp(primals, tangents):
  (z,), (dz,) = primals, tangents
  sigma, u, v = _thin_svd(z)
  return sigma, jnp.einsum("ni,nd,di->i", u, dz, v)


def dominant_singular_value_loss(z: jax.Array, k: int = 5) -> jax.Array:
  """Mean of the top-k entries of sigma / sum(sigma), sigma the singular values of the raw z.

  Positive; the NMTune loss subtracts it (maximizing the dominant directions' share). Singular
  values only (singular_values: stable derivative, QR first). float32.
  """
  num_rows, dim = z.shape
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= min(num_rows,
                                                                                        dim):
    raise ConfigError(f"svd_topk={k!r} is not allowed; allowed: an integer in [1, min(n, D)]"
                      f" = [1, {min(num_rows, dim)}]")
  sigma = singular_values(z.astype(jnp.float32))
  return jnp.mean(sigma[:k] / jnp.sum(sigma))


# ------------------------------------------------------------------------------------ module


def _torch_uniform(fan_in: int) -> Callable[..., jax.Array]:
  """PyTorch's nn.Linear default for weight and bias alike: U(+-1 / sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class NMTuneHead(nn.Module):
  """z = residual_scale * MLP(f) + f and logits = Dense(C)(z); returns (logits, z).

  The MLP is mlp_layers blocks of Dense(round(mlp_ratio * D)) -> BatchNorm -> ReLU, then
  Dense(D), with PyTorch's default Linear initialization; BatchNorm uses PyTorch's defaults
  (running-average momentum 0.1, i.e. flax momentum 0.9, eps 1e-5). The residual scale is one
  learnable value per dimension, initialized to residual_scale_init. mlp_layers = 0 drops the
  MLP (z = f): the linear-probe control. The classifier is He-uniform with a zero bias.
  """
  num_classes: int
  mlp_ratio: float = 4.0
  mlp_layers: int = 1
  residual_scale_init: float = 1.0

  @nn.compact
  def __call__(self, f: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    f = f.astype(jnp.float32)
    dim = f.shape[-1]
    z = f
    if self.mlp_layers > 0:
      hidden = f
      width = max(1, int(round(self.mlp_ratio * dim)))
      for i in range(self.mlp_layers):
        fan_in = hidden.shape[-1]
        hidden = nn.Dense(width, kernel_init=_torch_uniform(fan_in),
                          bias_init=_torch_uniform(fan_in), name=f"hidden_{i}")(hidden)
        hidden = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                              name=f"norm_{i}")(hidden)
        hidden = nn.relu(hidden)
      hidden = nn.Dense(dim, kernel_init=_torch_uniform(width), bias_init=_torch_uniform(width),
                        name="out")(hidden)
      scale = self.param("residual_scale", nn.initializers.constant(self.residual_scale_init),
                         (dim,))
      z = scale * hidden + f
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.he_uniform(),
                      bias_init=nn.initializers.zeros, name="head")(z)
    return logits, z


def init_variables(model: NMTuneHead, feature_dim: int, seed: int) -> dict[str, Any]:
  """model.init's variables ({"params", "batch_stats"}, same tree and distributions) drawn by
  numpy's seeded generator: flax's init runs jax.random op by op (about 5 s on a CPU) or costs
  seconds of compilation, more than tuning a small head."""
  rng = np.random.default_rng([seed, 3])

  def uniform(bound: float, *shape: int) -> jax.Array:
    return jnp.asarray(rng.uniform(-bound, bound, shape), jnp.float32)

  params: dict[str, Any] = {}
  batch_stats: dict[str, Any] = {}
  if model.mlp_layers > 0:
    width = max(1, int(round(model.mlp_ratio * feature_dim)))
    fan_in = feature_dim
    for i in range(model.mlp_layers):
      bound = 1.0 / np.sqrt(fan_in)
      params[f"hidden_{i}"] = {"kernel": uniform(bound, fan_in, width), "bias": uniform(bound, width)}
      params[f"norm_{i}"] = {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))}
      batch_stats[f"norm_{i}"] = {"mean": jnp.zeros((width,)), "var": jnp.ones((width,))}
      fan_in = width
    bound = 1.0 / np.sqrt(width)
    params["out"] = {"kernel": uniform(bound, width, feature_dim),
                     "bias": uniform(bound, feature_dim)}
    params["residual_scale"] = jnp.full((feature_dim,), model.residual_scale_init, jnp.float32)
  params["head"] = {"kernel": uniform(np.sqrt(6.0 / feature_dim), feature_dim, model.num_classes),
                    "bias": jnp.zeros((model.num_classes,))}
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


# ------------------------------------------------------------------------------------ config


def default_config() -> ml_collections.ConfigDict:
  """The reference NMTune defaults (REFERENCE.md s.4), a locked ConfigDict."""
  config = ml_collections.ConfigDict()
  config.method = "nmtune"      # nmtune | mlp | lp_aug | lp
  config.epochs = 30
  config.batch_size = 128       # Rows per step (n): the reference's 2 views x 64 images.
  config.lr = 1e-3
  config.weight_decay = 1e-4
  config.mse_weight = 1.0
  config.cov_weight = 0.04
  config.svd_weight = 0.001
  config.svd_topk = 5
  config.mlp_ratio = 4.0
  config.mlp_layers = 1
  config.residual_scale_init = 1.0
  config.seed = 0
  # None: max train label + 1 (test labels must fall below it).
  config.num_classes = ml_collections.config_dict.placeholder(int)
  # None, or the classes a test set may be predicted as (see nmjax.probe).
  config.logit_subset = ml_collections.config_dict.placeholder(tuple)
  # method "lp": the linear probe's own protocol; method "lp_aug": its learning rate and weight
  # decay (num_classes, logit_subset and seed come from the fields above).
  config.lp = probe.default_config()
  config.lock()
  return config


def resolve_config(config: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
  """Defaults overlaid with the caller's fields (a ConfigDict or a dict); an unknown field and
  every bad value fail here, before any work, with one line naming the field."""
  resolved = default_config()
  if config is not None:
    for key in config.keys():
      if key not in resolved:
        raise ConfigError(f"NMTune config field {key!r} is unknown; known:"
                          f" {', '.join(sorted(resolved.keys()))}")
      value = config[key]
      if key == "lp":
        try:
          lp = probe.resolve_config(value)
        except ConfigError as e:
          raise ConfigError(str(e).replace("config.", "config.lp.", 1)) from None
        with resolved.unlocked():
          resolved.lp = lp
        continue
      try:
        resolved[key] = tuple(value) if isinstance(value, list) else value
      except TypeError:
        raise ConfigError(f"config.{key}={value!r} has the wrong type; expected"
                          f" {type(resolved[key]).__name__} like the default") from None
  check_choice(resolved, "method", METHODS)
  check_range(resolved, "epochs", low=1, integer=True)
  check_range(resolved, "batch_size", low=2, integer=True)
  check_range(resolved, "lr", low=0.0, low_inclusive=False)
  for field in ("weight_decay", "mse_weight", "cov_weight", "svd_weight"):
    check_range(resolved, field, low=0.0)
  check_range(resolved, "svd_topk", low=1, integer=True)
  check_range(resolved, "mlp_ratio", low=0.0, low_inclusive=False)
  check_range(resolved, "mlp_layers", low=1, integer=True)
  check_range(resolved, "residual_scale_init", low=-1e6, high=1e6)
  check_range(resolved, "seed", low=0, integer=True)
  if resolved.num_classes is not None:
    check_range(resolved, "num_classes", low=2, integer=True)
  return resolved


def _method_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with the method's overrides: mlp zeroes the weights; lp_aug drops the MLP and
  takes the linear probe's learning rate and weight decay."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.method in ("mlp", "lp_aug"):
    config.mse_weight = config.cov_weight = config.svd_weight = 0.0
  if config.method == "lp_aug":
    config.lr = config.lp.learning_rate
    config.weight_decay = config.lp.weight_decay
  return config


def probe_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The linear-probe config of method "lp": config.lp with this config's classes and seed."""
  lp = ml_collections.ConfigDict(config.lp.to_dict())
  lp.num_classes = config.num_classes
  lp.logit_subset = config.logit_subset
  lp.seed = config.seed
  return lp


# ---------------------------------------------------------------------------- augmentation


def random_resized_crop_flip(images: jax.Array, draws: jax.Array) -> jax.Array:
  """The reference's train augmentation at the input size: (B, H, W, C) -> float32 (B, H, W, C).

  draws (B, AUGMENT_DRAWS) uniforms in [0, 1): a crop of area scale in CROP_SCALE and aspect ratio
  log-uniform in CROP_RATIO (its sides clipped to the image instead of re-drawn), at a uniform
  position, resized back to H x W bilinearly, then mirrored left-right when the last draw < 0.5.
  Pixel values keep their units (uint8 in, 0..255 floats out).
  """
  _, height, width, channels = images.shape
  area = height * width * (CROP_SCALE[0] + draws[:, 0] * (CROP_SCALE[1] - CROP_SCALE[0]))
  log_low, log_high = np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])
  ratio = jnp.exp(log_low + draws[:, 1] * (log_high - log_low))
  crop_w = jnp.clip(jnp.round(jnp.sqrt(area * ratio)), 1, width)
  crop_h = jnp.clip(jnp.round(jnp.sqrt(area / ratio)), 1, height)
  top = jnp.floor(draws[:, 2] * (height - crop_h + 1))
  left = jnp.floor(draws[:, 3] * (width - crop_w + 1))

  def crop_resize(image, crop_h, crop_w, top, left):
    scale = jnp.stack([height / crop_h, width / crop_w])
    translation = -jnp.stack([top, left]) * scale
    return jax.image.scale_and_translate(image.astype(jnp.float32), (height, width, channels),
                                         (0, 1), scale, translation, method="linear",
                                         antialias=False)

  out = jax.vmap(crop_resize)(images, crop_h, crop_w, top, left)
  return jnp.where((draws[:, 4] < 0.5)[:, None, None, None], out[:, :, ::-1], out)


Encode = Callable[[Any, jax.Array], jax.Array]  # (variables, images) -> (n, D) features


@dataclasses.dataclass(frozen=True, eq=False)
class OnlineViews:
  """Train images through a frozen encoder, augmented twice per image inside every step."""
  encode: Encode
  variables: Any
  images: np.ndarray  # uint8 (N, H, W, C)
  labels: np.ndarray  # int64 (N,)
  feature_dim: int


@dataclasses.dataclass(frozen=True, eq=False)
class CachedViews:
  """K augmented views of every train image, encoded once: features (K, N, D), labels (N,)."""
  features: np.ndarray
  labels: np.ndarray

  @property
  def feature_dim(self) -> int:
    return int(self.features.shape[2])


@functools.partial(jax.jit, static_argnames=("encode",))
def encode_augmented(encode: Encode, variables: Any, images: jax.Array, draws: jax.Array
                     ) -> jax.Array:
  """encode(variables, random_resized_crop_flip(images, draws)) in float32, jitted once per
  encoder and shape (every call of cache_views with the same encoder shares it)."""
  return encode(variables, random_resized_crop_flip(images, draws)).astype(jnp.float32)


def cache_views(encode: Encode, variables: Any, images: np.ndarray, labels: np.ndarray, *,
                num_views: int, seed: int = 0, batch_size: int = 512) -> CachedViews:
  """Encodes num_views augmented copies of every image (random_resized_crop_flip, numpy-seeded
  draws), batch_size images per call; the view pool of CachedViews."""
  if num_views < 2:
    raise ConfigError(f"num_views={num_views} (config.cached_views) is not allowed; allowed: >= 2"
                      " (each step pairs two distinct views of an image)")
  images = np.asarray(images)
  num_images = len(images)
  rng = np.random.default_rng([seed, 7])
  draws = rng.random((num_views, num_images, AUGMENT_DRAWS), dtype=np.float32)
  chunks = []
  for view in range(num_views):
    parts = []
    for start in range(0, num_images, batch_size):
      stop = min(start + batch_size, num_images)
      # Pad the last chunk to a full batch: one compiled shape for every call.
      idx = np.minimum(np.arange(start, start + batch_size), num_images - 1)
      parts.append(np.asarray(encode_augmented(encode, variables, images[idx], draws[view, idx]))
                   [:stop - start])
    chunks.append(np.concatenate(parts))
  return CachedViews(np.stack(chunks), np.asarray(labels, np.int64))


# ----------------------------------------------------------------------------------- program


@dataclasses.dataclass(frozen=True)
class _Spec:
  """What a compiled training program depends on besides array shapes (a static argument)."""
  model: NMTuneHead
  svd_topk: int
  total_steps: int
  two_view: bool
  encode: Encode | None = None  # OnlineViews only


def _make_tx(hparams: Mapping[str, jax.Array], total_steps: int) -> optax.GradientTransformation:
  """AdamW (PyTorch's betas and eps), weight decay on every parameter, per-step cosine to 0."""
  schedule = optax.cosine_decay_schedule(hparams["lr"], decay_steps=total_steps)
  return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=hparams["weight_decay"])


def loss_terms(spec: _Spec, params: Any, batch_stats: Any, f: jax.Array, labels: jax.Array,
               hparams: Mapping[str, jax.Array]) -> tuple[jax.Array, tuple[Any, jax.Array]]:
  """(total loss, (new batch stats, [total, ce, mse, cov, svd, accuracy])) on one batch of rows."""
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  (logits, z), updates = spec.model.apply(variables, f, train=True, mutable=["batch_stats"])
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  if spec.two_view:
    half = f.shape[0] // 2
    mse = consistency_loss(z[half:], f[:half])  # z of the second view, f of the first.
  else:
    mse = consistency_loss(z, f)
  cov = covariance_loss(z)
  svd = dominant_singular_value_loss(z, spec.svd_topk)
  total = (ce + hparams["mse_weight"] * mse + hparams["cov_weight"] * cov
           - hparams["svd_weight"] * svd)
  accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return total, (updates.get("batch_stats", {}), jnp.stack([total, ce, mse, cov, svd, accuracy]))


LOSS_TERMS = ("total", "ce", "mse", "cov", "svd", "train_batch_accuracy")


def _update(spec: _Spec, state: tuple[Any, Any, Any], f: jax.Array, labels: jax.Array,
            hparams: Mapping[str, jax.Array]) -> tuple[tuple[Any, Any, Any], jax.Array]:
  params, batch_stats, opt_state = state
  grads, (batch_stats, terms) = jax.grad(
      lambda p: loss_terms(spec, p, batch_stats, f, labels, hparams), has_aux=True)(params)
  updates, opt_state = _make_tx(hparams, spec.total_steps).update(grads, opt_state, params)
  return (optax.apply_updates(params, updates), batch_stats, opt_state), terms


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(0,))
def table_epoch(state: tuple[Any, Any, Any], table: jax.Array, labels: jax.Array,
                rows: jax.Array, row_labels: jax.Array, hparams: Mapping[str, jax.Array], *,
                spec: _Spec) -> tuple[tuple[Any, Any, Any], jax.Array]:
  """One epoch over rows of a feature table: rows (S, n) indices into table (M, D), row_labels
  (S, n). Returns the new state and the loss terms of every step (S, len(LOSS_TERMS))."""
  del labels

  def step(state, batch):
    ids, y = batch
    return _update(spec, state, table[ids], y, hparams)

  return jax.lax.scan(step, state, (rows, row_labels))


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(0,))
def online_epoch(state: tuple[Any, Any, Any], encoder_variables: Any, images: jax.Array,
                 labels: jax.Array, image_ids: jax.Array, draws: jax.Array,
                 hparams: Mapping[str, jax.Array], *, spec: _Spec
                 ) -> tuple[tuple[Any, Any, Any], jax.Array]:
  """One epoch of the reference data flow: image_ids (S, B), draws (S, 2, B, AUGMENT_DRAWS).

  Each step augments its B images twice, encodes both views with the frozen encoder (no gradient
  reaches it), and trains on the 2B rows [first views; second views] with duplicated labels.
  """
  def step(state, batch):
    ids, view_draws = batch
    batch_images = images[ids]
    views = jnp.concatenate([random_resized_crop_flip(batch_images, view_draws[0]),
                             random_resized_crop_flip(batch_images, view_draws[1])])
    f = jax.lax.stop_gradient(spec.encode(encoder_variables, views).astype(jnp.float32))
    y = jnp.concatenate([labels[ids], labels[ids]])
    return _update(spec, state, f, y, hparams)

  return jax.lax.scan(step, state, (image_ids, draws))


@functools.partial(jax.jit, static_argnames=("model",))
def predict(model: NMTuneHead, params: Any, batch_stats: Any, features: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
  """(logits, z) in inference mode (BatchNorm running statistics)."""
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  return model.apply(variables, features, train=False)


def _predict_all(model: NMTuneHead, params: Any, batch_stats: Any, features: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  """predict over every row, in chunks padded to one shape (one compilation per dataset)."""
  num_rows = len(features)
  chunk = min(num_rows, _EVAL_CHUNK)
  logits, zs = [], []
  for start in range(0, num_rows, chunk):
    idx = np.minimum(np.arange(start, start + chunk), num_rows - 1)
    out_logits, out_z = predict(model, params, batch_stats, jnp.asarray(features[idx]))
    keep = min(chunk, num_rows - start)
    logits.append(np.asarray(out_logits)[:keep])
    zs.append(np.asarray(out_z)[:keep])
  return np.concatenate(logits), np.concatenate(zs)


# --------------------------------------------------------------------------------------- fit


TrainLike = Any  # FeaturesLike | OnlineViews | CachedViews


def _train_labels(train: TrainLike, num_classes: int | None) -> tuple[Any, np.ndarray, int]:
  """(validated train source, its labels, D)."""
  if isinstance(train, CachedViews):
    if train.features.ndim != 3:
      raise DataError(f"NMTune cached views: features must be (K, N, D), got shape"
                      f" {train.features.shape}")
    check_matrix("NMTune cached views", train.features.reshape(-1, train.feature_dim))
    labels = check_labels("NMTune cached views", train.labels, train.features.shape[1],
                          num_classes)
    return train, labels, train.feature_dim
  if isinstance(train, OnlineViews):
    labels = check_labels("NMTune online views", train.labels, len(train.images), num_classes)
    return train, labels, train.feature_dim
  train_set = as_feature_set(train, name="NMTune train features", num_classes=num_classes)
  return train_set, train_set.labels, train_set.feature_dim


def _test_sets(tests: Mapping[str, FeaturesLike], feature_dim: int, num_classes: int,
               given_classes: bool) -> dict[str, FeatureSet]:
  sets = {}
  for name, test in tests.items():
    where = "NMTune test features" + ("" if name == "test" else f" {name!r}")
    sets[name] = as_feature_set(test, name=where)
    if sets[name].feature_dim != feature_dim:
      raise DataError(f"{where}: feature dimension {sets[name].feature_dim} differs from the"
                      f" train features' ({feature_dim})")
    high = int(sets[name].labels.max())
    if high >= num_classes and given_classes:
      raise DataError(f"{where}: label {high} is outside config.num_classes={num_classes}")
    if high >= num_classes:
      raise DataError(
          f"{where}: label {high} is outside the {num_classes} classes inferred from the train"
          " labels (max train label + 1); the head could never predict it. Pass"
          " config.num_classes if the train split lacks the top classes")
  return sets


def _logit_bias(config: ml_collections.ConfigDict, name: str, test_set: FeatureSet,
                num_classes: int, logit_subsets: Mapping[str, Any] | None) -> np.ndarray:
  subset = (logit_subsets or {}).get(name, config.logit_subset)
  return probe.test_logit_bias(None if subset is None else tuple(int(c) for c in subset),
                               test_set, num_classes)


def _epoch_inputs(train: Any, labels: np.ndarray, rows_per_step: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, ...]:
  """The numpy-drawn inputs of one epoch for each kind of train source."""
  num_examples = len(labels)
  if isinstance(train, FeatureSet):
    steps = num_examples // rows_per_step
    rows = rng.permutation(num_examples)[:steps * rows_per_step].reshape(steps, rows_per_step)
    return rows.astype(np.int32), labels[rows].astype(np.int32)
  images_per_step = rows_per_step // 2
  steps = num_examples // images_per_step
  ids = rng.permutation(num_examples)[:steps * images_per_step].reshape(steps, images_per_step)
  if isinstance(train, CachedViews):
    num_views = train.features.shape[0]
    first = rng.integers(0, num_views, ids.shape)
    second = (first + rng.integers(1, num_views, ids.shape)) % num_views  # Never the same view.
    rows = np.concatenate([first * num_examples + ids, second * num_examples + ids], axis=1)
    return rows.astype(np.int32), labels[np.concatenate([ids, ids], axis=1)].astype(np.int32)
  draws = rng.random((steps, 2, images_per_step, AUGMENT_DRAWS), dtype=np.float32)
  return ids.astype(np.int32), draws


def _fit_linear_probe(train: TrainLike, tests: Mapping[str, FeaturesLike],
                      config: ml_collections.ConfigDict,
                      logit_subsets: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
  """Method "lp": nmjax.probe.linear_probe with config.lp, once per test set."""
  if isinstance(train, (OnlineViews, CachedViews)):
    raise ConfigError("config.method='lp' trains on plain features; pass train features (the"
                      " 'lp_aug' method is the linear head on augmented views)")
  results = {}
  for name, test in tests.items():
    lp = probe_config(config)
    if logit_subsets and logit_subsets.get(name) is not None:
      lp.logit_subset = tuple(int(c) for c in logit_subsets[name])
    result = probe.linear_probe(train, test, lp)
    results[name] = {**result, "method": "lp", "epochs": lp.num_epochs,
                     "batch_size": lp.batch_size, "lr": lp.learning_rate,
                     "weight_decay": lp.weight_decay, **_weights(0.0, 0.0, 0.0, None)}
  return results


@dataclasses.dataclass
class _Run:
  """A validated NMTune run: the module, its compiled-program spec and its train data."""
  config: ml_collections.ConfigDict
  train: Any            # FeatureSet | CachedViews | OnlineViews
  labels: np.ndarray    # (N,) train labels (images or examples)
  feature_dim: int
  num_classes: int
  model: NMTuneHead
  spec: _Spec
  hparams: dict[str, jax.Array]

  @property
  def views(self) -> str:
    return ("online" if isinstance(self.train, OnlineViews) else
            "cached" if isinstance(self.train, CachedViews) else "features")

  def epoch_fn(self) -> Callable[[Any, tuple[np.ndarray, ...]], tuple[Any, jax.Array]]:
    """(state, numpy epoch inputs) -> (state, per-step loss terms), the data moved once."""
    labels = jnp.asarray(self.labels, jnp.int32)
    if isinstance(self.train, OnlineViews):
      images, variables = jnp.asarray(self.train.images), self.train.variables
      return lambda state, inputs: online_epoch(
          state, variables, images, labels, *map(jnp.asarray, inputs), self.hparams,
          spec=self.spec)
    table = jnp.asarray(self.train.features.reshape(-1, self.feature_dim))
    return lambda state, inputs: table_epoch(state, table, labels, *map(jnp.asarray, inputs),
                                             self.hparams, spec=self.spec)


def _prepare(train: TrainLike, config: ml_collections.ConfigDict) -> _Run:
  """Validates the train data against the config and builds the module and program spec."""
  train, labels, feature_dim = _train_labels(train, config.num_classes)
  num_classes = config.num_classes or int(labels.max()) + 1
  if num_classes < 2:
    raise DataError("NMTune train features: every label is 0; a classifier needs at least 2"
                    " classes")
  rows_per_step = config.batch_size
  two_view = not isinstance(train, FeatureSet)
  if two_view and rows_per_step % 2:
    raise ConfigError(f"config.batch_size={rows_per_step} must be even with two views per image"
                      " (it counts rows: 2 views x batch_size / 2 images)")
  images_per_step = rows_per_step // 2 if two_view else rows_per_step
  if images_per_step > len(labels):
    raise DataError(
        f"config.batch_size={rows_per_step} needs {images_per_step} train examples per step but"
        f" the train set has {len(labels)}; lower config.batch_size")
  if config.svd_topk > min(rows_per_step, feature_dim):
    raise ConfigError(f"config.svd_topk={config.svd_topk} is not allowed; allowed: 1 <= svd_topk"
                      f" <= min(batch_size, D) = {min(rows_per_step, feature_dim)}")
  model = NMTuneHead(num_classes=num_classes, mlp_ratio=float(config.mlp_ratio),
                     mlp_layers=0 if config.method == "lp_aug" else config.mlp_layers,
                     residual_scale_init=float(config.residual_scale_init))
  spec = _Spec(model=model, svd_topk=config.svd_topk,
               total_steps=len(labels) // images_per_step * config.epochs, two_view=two_view,
               encode=train.encode if isinstance(train, OnlineViews) else None)
  hparams = {k: jnp.float32(config[k]) for k in ("lr", "weight_decay", "mse_weight",
                                                  "cov_weight", "svd_weight")}
  return _Run(config, train, labels, feature_dim, num_classes, model, spec, hparams)


def _accuracy(run: _Run, state: Any, test_set: FeatureSet, bias: np.ndarray) -> float:
  logits, _ = _predict_all(run.model, state[0], state[1], test_set.features)
  return float((np.argmax(logits + bias, axis=-1) == test_set.labels).mean())


def _train(run: _Run, test_sets: Mapping[str, FeatureSet], biases: Mapping[str, np.ndarray],
           log: Callable[[str], None] | None, start: float
           ) -> tuple[Any, dict[str, list[float]], list[np.ndarray]]:
  """The epochs: (final state, test accuracy per epoch per test set, mean loss terms per epoch)."""
  config = run.config
  variables = init_variables(run.model, run.feature_dim, config.seed)
  params = variables["params"]
  state = (params, variables.get("batch_stats", {}),
           _make_tx(run.hparams, run.spec.total_steps).init(params))
  epoch_fn = run.epoch_fn()
  rng = np.random.default_rng([config.seed, 11])
  per_epoch: dict[str, list[float]] = {n: [] for n in test_sets}
  losses: list[np.ndarray] = []
  with single_threaded_lapack():
    for epoch in range(config.epochs):
      state, terms = epoch_fn(state, _epoch_inputs(run.train, run.labels, config.batch_size, rng))
      terms = np.asarray(terms)
      bad = np.flatnonzero(~np.isfinite(terms).all(axis=1))
      if len(bad):
        raise TrainingError(
            f"NMTune: the loss became non-finite at step {epoch * len(terms) + bad[0] + 1}"
            f" (epoch {epoch + 1}; terms {dict(zip(LOSS_TERMS, terms[bad[0]].tolist()))});"
            " lower config.lr or the regularizer weights")
      losses.append(terms.mean(axis=0))
      for name, test_set in test_sets.items():
        per_epoch[name].append(_accuracy(run, state, test_set, biases[name]))
      if log is not None:
        elapsed = time.perf_counter() - start
        eta = elapsed / (epoch + 1) * (config.epochs - epoch - 1)
        accs = " ".join(f"{n} {a[-1]:.4f}" for n, a in per_epoch.items())
        log(f"epoch {epoch + 1}/{config.epochs}: loss {losses[-1][0]:.4f} (ce"
            f" {losses[-1][1]:.4f}) | test {accs} | elapsed {format_seconds(elapsed)}, ETA"
            f" {format_seconds(eta)}")
  return state, per_epoch, losses


def fit_multi(train: TrainLike, tests: Mapping[str, FeaturesLike],
              config: ml_collections.ConfigDict | None = None, *,
              logit_subsets: Mapping[str, Any] | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
  """Trains once on `train` and evaluates on every test set; returns {test name: result}.

  train: features (file path, FeatureSet or (features, labels)), OnlineViews or CachedViews.
  tests: {name: features}; test features are plain (unaugmented) features of the same encoder.
  logit_subsets: optional {name: class indices} for tests predicted over a class subset.
  log: called with one progress line per epoch (None: silent).
  Each result holds accuracy (final), test_accuracy_per_epoch, train_accuracy (feature mode),
  loss_per_epoch and loss_means (means of the terms over the steps of each epoch / the last
  epoch), sve and lsvr of z on that test set, seconds (the whole fit), and the run's settings.
  """
  start = time.perf_counter()
  config = resolve_config(config)
  if not tests:
    raise DataError("NMTune: no test sets given")
  if config.method == "lp":
    return _fit_linear_probe(train, tests, config, logit_subsets)
  run = _prepare(train, _method_config(config))
  test_sets = _test_sets(tests, run.feature_dim, run.num_classes,
                         given_classes=config.num_classes is not None)
  biases = {n: _logit_bias(run.config, n, s, run.num_classes, logit_subsets)
            for n, s in test_sets.items()}
  state, per_epoch, losses = _train(run, test_sets, biases, log, start)

  params, batch_stats = state[0], state[1]
  train_accuracy = None
  if isinstance(run.train, FeatureSet):
    train_accuracy = _accuracy(run, state, run.train, np.zeros(run.num_classes, np.float32))
  seconds = time.perf_counter() - start
  loss_per_epoch = {t: [float(v[i]) for v in losses] for i, t in enumerate(LOSS_TERMS)}
  config = run.config
  settings = {
      "method": config.method, "train_accuracy": train_accuracy,
      "loss_per_epoch": loss_per_epoch,
      "loss_means": {t: v[-1] for t, v in loss_per_epoch.items()},
      "num_train": int(len(run.labels)), "feature_dim": run.feature_dim,
      "num_classes": run.num_classes, "views": run.views, "epochs": config.epochs,
      "batch_size": config.batch_size, "lr": config.lr, "weight_decay": config.weight_decay,
      **_weights(config.mse_weight, config.cov_weight, config.svd_weight, config.svd_topk),
      "mlp_ratio": config.mlp_ratio, "mlp_layers": run.model.mlp_layers,
      "residual_scale_init": config.residual_scale_init, "seed": config.seed,
      "residual_scale_mean": (float(np.mean(params["residual_scale"]))
                              if "residual_scale" in params else None),
      "seconds": seconds,
  }
  results = {}
  for name, test_set in test_sets.items():
    _, z = _predict_all(run.model, params, batch_stats, test_set.features)
    spectrum = spectral.metrics(z)
    results[name] = {**settings, "accuracy": per_epoch[name][-1],
                     "test_accuracy_per_epoch": per_epoch[name], "sve": spectrum["sve"],
                     "lsvr": spectrum["lsvr"], "num_test": test_set.num_examples}
  return results


def _weights(mse: float, cov: float, svd: float, topk: int | None) -> dict[str, Any]:
  return {"mse_weight": float(mse), "cov_weight": float(cov), "svd_weight": float(svd),
          "svd_topk": topk}


def fit(train: TrainLike, test: FeaturesLike,
        config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """NMTune (or config.method) trained on `train`, scored on `test`: the result dict (fit_multi).

  train/test: (features, labels) pairs of numpy arrays or paths of features files (train may
  also be OnlineViews or CachedViews); config None: default_config().
  """
  return fit_multi(train, {"test": test}, config)["test"]
