"""Frozen text encoders: BERT, RoBERTa and GPT-2 as Flax Linen modules with one contract,
`(ids, mask) -> (hidden_states, pooled)`.

    model = get_text_model("bert_base")                 # or a TextConfig read from config.json
    hidden_states, pooled = model.apply(variables, ids, mask, train=False)

`ids` and `mask` are (batch, length) integer arrays (nmjax.text's tokenizer makes them); mask is
1 at real tokens and 0 at padding. hidden_states (batch, length, hidden) are the last layer's
states (after GPT-2's final LayerNorm); pooled (batch, hidden) is one vector per sequence:

  cls   the first token's state (BERT's [CLS], RoBERTa's <s>)
  mean  the average of the real tokens' states
  last  the last real token's state: for a causal model the only one that has read the whole
        text (GPT-2's natural choice)

The three families, as Hugging Face's transformers computes them (so imported checkpoints,
nmjax.convert.hf_text, give the same numbers):

  bert     word + learned position + token type embeddings, LayerNorm; post-LN blocks
           (attention, add, LayerNorm; MLP, add, LayerNorm); bidirectional attention over the
           real tokens.
  roberta  BERT's blocks; positions count real tokens only and start after the pad id
           (pad_token_id + 1, as fairseq numbered them), so padding never shifts a position;
           one token type, always 0.
  gpt2     word + learned position embeddings; pre-LN blocks with a fused q/k/v projection and
           causal attention; a final LayerNorm; the tanh GELU ("gelu_new").

Parameters are float32, `dtype` the compute dtype; outputs come back float32. No dropout:
`train` changes nothing. The parameter tree is named after transformers' modules
(embeddings/word_embeddings, layer_3/attention/query, h_3/attn/c_attn, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nmjax.errors import ConfigError

FAMILIES = ("bert", "roberta", "gpt2")
POOLINGS = ("cls", "mean", "last")
DEFAULT_POOLING = {"bert": "cls", "roberta": "cls", "gpt2": "last"}
_INIT = nn.initializers.normal(0.02)  # Random weights only (benchmarks, tests): BERT's init.


# The MLP activation by transformers' name (config.json's hidden_act / activation_function).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The architecture of a text encoder: what a Hugging Face config.json says, in nmjax's
  words. Plain values, so `TextConfig(**dataclasses.asdict(config))` rebuilds it (a workdir's
  config.json keeps it as a dict).

  Attributes:
    family: "bert", "roberta" or "gpt2".
    vocab_size: rows of the word embedding.
    hidden_size: token width (the feature dimension).
    num_layers: transformer blocks.
    num_heads: attention heads per block.
    intermediate_size: hidden width of each block's MLP.
    max_positions: rows of the position embedding (RoBERTa's include pad_token_id + 1 unused).
    type_vocab_size: token types (BERT 2, RoBERTa 1, GPT-2 none: 0).
    layer_norm_eps: every LayerNorm's epsilon.
    pad_token_id: the padding id (RoBERTa's positions are numbered after it).
    activation: the MLP's activation, a key of ACTIVATIONS.
    scale_attn_weights: GPT-2: scale attention logits by 1/sqrt(head_dim) (always for BERT).
    scale_attn_by_inverse_layer_idx: GPT-2: also divide block i's logits by i + 1.
  """
  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_positions: int
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  activation: str = "gelu"
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False

  def check(self) -> "TextConfig":
    """Itself when every field is usable; ConfigError naming the first that is not."""
    if self.family not in FAMILIES:
      raise ConfigError(f"text model family {self.family!r} is unknown; allowed:"
                        f" {', '.join(FAMILIES)}")
    if self.activation not in ACTIVATIONS:
      raise ConfigError(f"activation {self.activation!r} is not one nmjax computes; allowed:"
                        f" {', '.join(ACTIVATIONS)}")
    sizes = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
             "max_positions") + (("type_vocab_size",) if self.family != "gpt2" else ())
    for name in sizes:
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive integer")
    if self.hidden_size % self.num_heads:
      raise ConfigError(f"hidden_size={self.hidden_size} is not a multiple of"
                        f" num_heads={self.num_heads}")
    return self

  @property
  def max_length(self) -> int:
    """The longest sequence the position embedding covers."""
    if self.family == "roberta":
      return self.max_positions - self.pad_token_id - 1
    return self.max_positions


def pool(hidden_states: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
  """One vector per sequence.

  Args:
    hidden_states: (B, L, H) states.
    mask: (B, L), 1 at real tokens.
    pooling: "cls" (the first token's state), "mean" (over the real tokens; an all-padding row
      gives zeros) or "last" (the last real token's; right or left padding alike).

  Returns:
    (B, H) float32.
  """
  states = hidden_states.astype(jnp.float32)
  if pooling == "cls":
    return states[:, 0]
  real = (mask > 0).astype(jnp.float32)
  if pooling == "mean":
    # A masked sum, not a matmul: no reduced-precision matmul on accelerators.
    total = (states * real[..., None]).sum(axis=1)
    return total / jnp.maximum(real.sum(axis=1, keepdims=True), 1.0)
  if pooling == "last":
    last = mask.shape[1] - 1 - jnp.argmax(real[:, ::-1], axis=1)  # First real one from the end.
    return jnp.take_along_axis(states, last[:, None, None], axis=1)[:, 0]
  raise ConfigError(f"pooling={pooling!r} is unknown; allowed: {', '.join(POOLINGS)}")


def _attend(query: jax.Array, key: jax.Array, value: jax.Array, allowed: jax.Array,
            num_heads: int, scale: float) -> jax.Array:
  """Multi-head attention of (B, L, H) projections under a boolean `allowed` (B, 1, L, L)."""
  batch, length, width = query.shape
  split = lambda x: x.reshape(batch, length, num_heads, width // num_heads)
  out = jax.nn.dot_product_attention(split(query), split(key), split(value), mask=allowed,
                                     scale=scale)
  return out.reshape(batch, length, width)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=_INIT, name=name)


def _layer_norm(epsilon: float, dtype: Any, name: str) -> nn.LayerNorm:
  # Two-pass variance, as PyTorch computes it (imported weights give PyTorch's numbers).
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


def _embed(rows: int, width: int, dtype: Any, name: str) -> nn.Embed:
  return nn.Embed(rows, width, dtype=dtype, param_dtype=jnp.float32, embedding_init=_INIT,
                  name=name)


class BertEmbeddings(nn.Module):
  """Word + position + token type embeddings, then LayerNorm."""

  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, positions: jax.Array, token_types: jax.Array
               ) -> jax.Array:
    config, width = self.config, self.config.hidden_size
    x = (_embed(config.vocab_size, width, self.dtype, "word_embeddings")(ids)
         + _embed(config.max_positions, width, self.dtype, "position_embeddings")(positions)
         + _embed(config.type_vocab_size, width, self.dtype, "token_type_embeddings")(
             token_types))
    return _layer_norm(config.layer_norm_eps, self.dtype, "norm")(x)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention with separate query, key and value projections, then the output
  projection."""

  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
    config, width = self.config, self.config.hidden_size
    heads = _attend(_dense(width, self.dtype, "query")(x), _dense(width, self.dtype, "key")(x),
                    _dense(width, self.dtype, "value")(x), allowed, config.num_heads,
                    (width // config.num_heads) ** -0.5)
    return _dense(width, self.dtype, "output")(heads)


class BertLayer(nn.Module):
  """Post-LN block: LN(x + attention(x)), then LN(x + MLP(x))."""

  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
    config = self.config
    attended = BertSelfAttention(config, self.dtype, name="attention")(x, allowed)
    x = _layer_norm(config.layer_norm_eps, self.dtype, "attention_norm")(x + attended)
    hidden = ACTIVATIONS[config.activation](
        _dense(config.intermediate_size, self.dtype, "intermediate")(x))
    x = x + _dense(config.hidden_size, self.dtype, "output")(hidden)
    return _layer_norm(config.layer_norm_eps, self.dtype, "output_norm")(x)


class GPT2Attention(nn.Module):
  """Causal multi-head self-attention with GPT-2's fused q/k/v projection (c_attn) and output
  projection (c_proj); `scale` multiplies the logits."""

  config: TextConfig
  scale: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
    width = self.config.hidden_size
    qkv = _dense(3 * width, self.dtype, "c_attn")(x)
    heads = _attend(qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:], allowed,
                    self.config.num_heads, self.scale)
    return _dense(width, self.dtype, "c_proj")(heads)


class GPT2MLP(nn.Module):
  """c_fc, the activation, c_proj."""

  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    config = self.config
    hidden = ACTIVATIONS[config.activation](
        _dense(config.intermediate_size, self.dtype, "c_fc")(x))
    return _dense(config.hidden_size, self.dtype, "c_proj")(hidden)


class GPT2Block(nn.Module):
  """Pre-LN block: x + attention(LN(x)), then x + MLP(LN(x)); `index` counts from 0."""

  config: TextConfig
  index: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
    config = self.config
    scale = (config.hidden_size // config.num_heads) ** -0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
      scale /= self.index + 1
    eps = config.layer_norm_eps
    x = x + GPT2Attention(config, scale, self.dtype, name="attn")(
        _layer_norm(eps, self.dtype, "ln_1")(x), allowed)
    return x + GPT2MLP(config, self.dtype, name="mlp")(_layer_norm(eps, self.dtype, "ln_2")(x))


class _TextEncoder(nn.Module):
  """What the three encoders share: fields, checks and pooling."""

  config: TextConfig
  pooling: str = ""
  dtype: Any = jnp.float32

  @property
  def feature_dim(self) -> int:
    """Width of the pooled features (the hidden size)."""
    return self.config.hidden_size

  @property
  def max_length(self) -> int:
    """The longest sequence this encoder takes (its position embedding's reach)."""
    return self.config.max_length

  def _checked(self, ids: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The mask (all ones when None), after the shapes are checked."""
    if ids.ndim != 2:
      raise ValueError(f"ids must be (batch, length); got shape {ids.shape}")
    if ids.shape[1] > self.max_length:
      raise ConfigError(f"sequences of {ids.shape[1]} tokens are longer than the"
                        f" {self.max_length} positions this {self.config.family} encoder has;"
                        f" use max_length <= {self.max_length}")
    if self.pooling not in POOLINGS:
      raise ConfigError(f"pooling={self.pooling!r} is unknown; allowed: {', '.join(POOLINGS)}")
    return jnp.ones(ids.shape, jnp.int32) if mask is None else mask

  def _outputs(self, states: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return states.astype(jnp.float32), pool(states, mask, self.pooling)


class BertEncoder(_TextEncoder):
  """BERT (and, through position_ids, RoBERTa): post-LN bidirectional encoder.

  Attributes:
    config: the architecture (family "bert"; RobertaEncoder for "roberta").
    pooling: "cls", "mean" or "last".
    dtype: compute dtype; parameters stay float32, outputs come back float32.
  """

  def position_ids(self, ids: jax.Array) -> jax.Array:
    """0, 1, 2, ... for every sequence (BERT's absolute positions)."""
    return jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array | None = None, train: bool = False, *,
               token_types: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(B, L) ids and mask -> (hidden_states (B, L, H), pooled (B, H)), both float32.

    `token_types` (B, L): BERT's segment ids (0 for the first text of a pair, 1 for the
    second); None is all 0, as transformers takes it. RoBERTa has one type and ignores them."""
    del train  # No dropout: training and inference compute the same function.
    mask = self._checked(ids, mask)
    if token_types is None or self.config.family == "roberta":
      token_types = jnp.zeros_like(ids)
    x = BertEmbeddings(self.config, self.dtype, name="embeddings")(
        ids, self.position_ids(ids), token_types)
    allowed = (mask > 0)[:, None, None, :]  # Every query sees the real tokens, pads included.
    for i in range(self.config.num_layers):
      x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(x, allowed)
    return self._outputs(x, mask)


class RobertaEncoder(BertEncoder):
  """RoBERTa: BERT's blocks with fairseq's positions and a single token type (see
  position_ids)."""

  def position_ids(self, ids: jax.Array) -> jax.Array:
    """pad_token_id + 1, + 2, ... over the tokens that are not the pad id, the pad id at padding:
    numbered from the ids, as transformers does, so padding never shifts a real token."""
    real = (ids != self.config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + self.config.pad_token_id


class GPT2Encoder(_TextEncoder):
  """GPT-2: pre-LN causal decoder with learned positions and a final LayerNorm.

  Attributes:
    config: the architecture (family "gpt2").
    pooling: "cls", "mean" or "last" ("last": the last real token, which has read the text).
    dtype: compute dtype; parameters stay float32, outputs come back float32.
  """

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array | None = None, train: bool = False, *,
               token_types: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(B, L) ids and mask -> (hidden_states (B, L, H), pooled (B, H)), both float32.

    Positions are 0, 1, 2, ... whatever the mask, as transformers numbers them: pad on the
    right. GPT-2 has no token types; `token_types` is accepted and ignored."""
    del train, token_types
    mask = self._checked(ids, mask)
    config, length = self.config, ids.shape[1]
    x = (_embed(config.vocab_size, config.hidden_size, self.dtype, "wte")(ids)
         + _embed(config.max_positions, config.hidden_size, self.dtype, "wpe")(
             jnp.arange(length))[None])
    causal = jnp.tril(jnp.ones((length, length), bool))
    allowed = causal[None, None] & (mask > 0)[:, None, None, :]
    for i in range(config.num_layers):
      x = GPT2Block(config, i, self.dtype, name=f"h_{i}")(x, allowed)
    return self._outputs(_layer_norm(config.layer_norm_eps, self.dtype, "ln_f")(x), mask)


ENCODERS: dict[str, type[_TextEncoder]] = {
    "bert": BertEncoder, "roberta": RobertaEncoder, "gpt2": GPT2Encoder}


def _published(family: str, hidden: int, layers: int, heads: int) -> TextConfig:
  """A released size of `family` (vocabulary, positions, eps and pad id as released)."""
  stated = {"bert": dict(vocab_size=30522, max_positions=512, type_vocab_size=2,
                         layer_norm_eps=1e-12, pad_token_id=0),
            "roberta": dict(vocab_size=50265, max_positions=514, type_vocab_size=1,
                            layer_norm_eps=1e-5, pad_token_id=1),
            "gpt2": dict(vocab_size=50257, max_positions=1024, type_vocab_size=0,
                         layer_norm_eps=1e-5, pad_token_id=50256, activation="gelu_new")}
  return TextConfig(family, hidden_size=hidden, num_layers=layers, num_heads=heads,
                    intermediate_size=4 * hidden, **stated[family])


# The published sizes by name (bert_tiny: Google's 2-layer, 128-wide BERT, for quick runs).
TEXT_MODELS: dict[str, TextConfig] = {
    "bert_tiny": _published("bert", 128, 2, 2),
    "bert_base": _published("bert", 768, 12, 12),
    "bert_large": _published("bert", 1024, 24, 16),
    "roberta_base": _published("roberta", 768, 12, 12),
    "roberta_large": _published("roberta", 1024, 24, 16),
    "gpt2": _published("gpt2", 768, 12, 12),
    "gpt2_medium": _published("gpt2", 1024, 24, 16),
}


def get_text_model(name_or_config: str | TextConfig, pooling: str | None = None,
                   dtype: Any = jnp.float32) -> _TextEncoder:
  """Builds a text encoder by registry name or from a TextConfig.

  Args:
    name_or_config: a TEXT_MODELS name (bert_tiny, bert_base, bert_large, roberta_base,
      roberta_large, gpt2, gpt2_medium) or a TextConfig (e.g. one read from a Hugging Face
      config.json by nmjax.convert.hf_text).
    pooling: "cls", "mean" or "last"; None: the family's (DEFAULT_POOLING: cls for BERT and
      RoBERTa, last for GPT-2).
    dtype: the compute dtype (parameters stay float32), jnp.float32 or jnp.bfloat16.

  Returns:
    The flax module; model.apply(variables, ids, mask, train=False) maps (B, L) int ids and
    mask to (hidden_states (B, L, hidden), pooled (B, hidden)), float32.

  Raises:
    ConfigError: an unknown name or pooling, or a TextConfig with an unusable field.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nmjax import models
    >>> model = models.get_text_model("bert_tiny", pooling="mean")
    >>> ids, mask = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)
    >>> variables = model.init(jax.random.key(0), ids, mask)
    >>> hidden_states, pooled = model.apply(variables, ids, mask, train=False)
    >>> hidden_states.shape, pooled.shape
    ((2, 8, 128), (2, 128))
  """
  if isinstance(name_or_config, TextConfig):
    config = name_or_config
  elif name_or_config in TEXT_MODELS:
    config = TEXT_MODELS[name_or_config]
  else:
    raise ConfigError(f"text model {name_or_config!r} is unknown; known text models:"
                      f" {', '.join(TEXT_MODELS)}")
  config.check()
  pooling = DEFAULT_POOLING[config.family] if pooling is None else pooling
  if pooling not in POOLINGS:
    raise ConfigError(f"pooling={pooling!r} is unknown; allowed: {', '.join(POOLINGS)}")
  return ENCODERS[config.family](config=config, pooling=pooling, dtype=dtype)
