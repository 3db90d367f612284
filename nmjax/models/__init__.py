"""The model zoo: a registry from config names to ResNet and ViT factories, and their feature widths.

`get_model(config.model, num_classes)` is the one way jobs build an encoder; a name outside the
registry is a ConfigError that lists the known names. Two-tower CLIP models have their own
registry, `CLIP_MODELS`, built by `get_clip_model(name)` (nmjax.models.clip_model), and so do
the text encoders (BERT, RoBERTa, GPT-2): `TEXT_MODELS`, built by `get_text_model(name or
TextConfig)` (nmjax.models.text_encoders), which map token ids and a mask to (hidden states, pooled).
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from nmjax.errors import ConfigError
from nmjax.models import resnet, vit
# The two-tower registry (its models take no num_classes); the module holds the CLIP classes.
from nmjax.models.clip_model import CLIP_MODELS, get_clip_model
# The text registry (token ids in, hidden states and a pooled vector out).
from nmjax.models.text_encoders import TEXT_MODELS, TextConfig, get_text_model

__all__ = ["get_model", "get_text_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet_small": resnet.resnet_small,
    "resnet18": resnet.resnet18,
    "resnet50": resnet.resnet50,
    "vit_s16": vit.vit_s16,
    "vit_b16": vit.vit_b16,
}
# Compute dtypes by config name (config.dtype); parameters stay float32 whichever is chosen.
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _check_name(name: str) -> None:
  if name not in MODELS:
    raise ConfigError(
        f"config.model={name!r} is unknown; known models: {', '.join(sorted(MODELS))}")


def get_model(name: str, num_classes: int, dtype: Any = jnp.float32,
              **options: Any) -> nn.Module:
  """Builds the registered model `name` with a `num_classes`-way head and compute `dtype`.

  Args:
    name: a MODELS name: resnet_small, resnet18, resnet50, vit_s16 or vit_b16.
    num_classes: the classifier head's outputs.
    dtype: the compute dtype (parameters stay float32), jnp.float32 or jnp.bfloat16.
    **options: layout fields the factory accepts (the ViTs': pooling, position_embedding,
      image_size, gelu_approximate, layernorm_epsilon); none is the model as pre-training
      builds it.

  Returns:
    The flax module; model.apply(variables, images, train=...) maps NHWC images to
    (logits (N, num_classes), features (N, model.feature_dim)).

  Raises:
    ConfigError: an unknown name (listing the known ones), or options the model does not take.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nmjax import models
    >>> model = models.get_model("resnet_small", num_classes=10)
    >>> images = jnp.zeros((2, 28, 28, 1))
    >>> variables = model.init(jax.random.key(0), images, train=False)
    >>> logits, features = model.apply(variables, images, train=False)
    >>> logits.shape, features.shape
    ((2, 10), (2, 64))
  """
  _check_name(name)
  if not options:
    return MODELS[name](num_classes, dtype=dtype)
  try:
    return MODELS[name](num_classes, dtype=dtype, **options)
  except TypeError:
    raise ConfigError(f"model {name!r} does not take the options {sorted(options)}") from None


def feature_dim(name: str) -> int:
  """Width of the pooled pre-logit features that model `name` returns."""
  # Constructing a Linen module only fills in its dataclass fields; nothing is initialized.
  return get_model(name, num_classes=1).feature_dim

