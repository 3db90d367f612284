"""The features of a frozen text encoder (BERT, RoBERTa, GPT-2; nmjax.models.text_encoders): its
model read from a Hugging Face folder or rebuilt from an nmjax import workdir's record, its
tokenizer (nmjax.text), and the pooled features of a text split, tokenized into padded, masked
batches of max_length tokens and encoded jitted over the mesh (nmjax.features.extract).

nmjax.encoder wraps what is here into an Encoder whose feature cache is keyed by the weights,
the pooling, max_length and the tokenizer's files, so a change of any of them encodes again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import features as features_lib
from nmjax import io as nmjax_io
from nmjax import models, text as text_lib
from nmjax.models import text_encoders
from nmjax.convert import hf_text
from nmjax.data import text_sources as text_data
from nmjax.errors import ConfigError, DataError

POOLINGS = text_encoders.POOLINGS  # "" (a job's default) is the family's: cls, or last for GPT-2.
# What encode(variables, *inputs) takes: the names of a token batch's arrays.
INPUTS = ("ids", "attention_mask", "token_types")


@dataclasses.dataclass(frozen=True)
class TextModel:
  """A text encoder's module, architecture and tokenizer (nmjax.text), and the digest of the
  tokenizer's files."""
  model: Any
  config: models.TextConfig
  tokenizer: Any
  tokenizer_digest: str

  @property
  def family(self) -> str:
    return self.config.family

  @property
  def options(self) -> dict[str, Any]:
    """What the features depend on beside the weights and the tokens: the architecture and
    the pooling (an encoder record's model_options)."""
    return {"pooling": self.model.pooling, "text_config": dataclasses.asdict(self.config)}


def is_folder(path: str) -> bool:
  """Whether `path` is a Hugging Face model folder (a config.json with a model_type), not an
  nmjax workdir."""
  if not hf_text.is_hf_folder(path):
    return False
  try:
    stated = json.loads(nmjax_io.read_text(nmjax_io.join(path, "config.json")))
  except (OSError, ValueError):
    return False
  return isinstance(stated, dict) and "model_type" in stated and "job" not in stated


def is_record(record: dict[str, Any]) -> bool:
  """Whether a workdir's config.json is the record of an imported text encoder."""
  return "text_config" in record


def tokenizer_digest(folder: str) -> str:
  """Short sha256 of the tokenizer files in `folder` (nmjax.text's, those present)."""
  digest = hashlib.sha256()
  for name in text_lib.TOKENIZER_FILES:
    path = nmjax_io.join(folder, name)
    if nmjax_io.isfile(path):
      digest.update(name.encode() + b"\0" + nmjax_io.read_bytes(path))
  return digest.hexdigest()[:16]


def from_folder(folder: str, pooling: str) -> tuple[TextModel, Any]:
  """(the TextModel, its variables) of a Hugging Face folder; pooling "" is the family's."""
  imported = hf_text.read(folder, pooling=pooling or None)
  text_model = TextModel(imported.model, imported.config, text_lib.tokenizer(folder),
                         tokenizer_digest(folder))
  return text_model, imported.variables


def from_record(workdir: str, record: dict[str, Any], pooling: str) -> TextModel:
  """The TextModel of an import workdir (its variables are its checkpoint's); pooling "" is the
  one the record keeps."""
  config = models.TextConfig(**record["text_config"])
  model = models.get_text_model(config, pooling=pooling or record.get("pooling") or None)
  if not record.get("tokenizer"):
    raise DataError(f"config.checkpoint={workdir} holds no tokenizer (the folder it was imported"
                    " from had none); import a folder with its tokenizer files")
  folder = nmjax_io.join(workdir, record["tokenizer"])
  return TextModel(model, config, text_lib.tokenizer(folder), tokenizer_digest(folder))


def check_length(text_model: TextModel, max_length: int) -> None:
  """ConfigError unless 1 <= max_length <= the positions the encoder has."""
  top = text_model.config.max_length
  if not 1 <= max_length <= top:
    raise ConfigError(f"config.max_length={max_length} is out of range; allowed: 1 <= max_length"
                      f" <= {top} (the positions of this {text_model.family} encoder)")


def encode_fn(model: Any) -> Callable[..., jax.Array]:
  """encode(variables, ids, attention_mask, token_types) -> (n, D) float32 pooled features."""

  def encode(variables: Any, ids: jax.Array, attention_mask: jax.Array,
             token_types: jax.Array) -> jax.Array:
    _, pooled = model.apply(variables, ids, attention_mask, train=False, token_types=token_types)
    return pooled.astype(jnp.float32)

  return encode


def extract(encode: Callable[..., jax.Array], variables: Any, text_model: TextModel,
            split: text_data.TextSplit, *, max_length: int, batch_size: int,
            mesh: jax.sharding.Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The pooled features and labels of every example of a text split, in order.

  Args:
    encode: encode_fn(model) (or any function of the variables and INPUTS).
    variables: the encoder's variables.
    text_model: the encoder (its tokenizer tokenizes).
    split: the examples.
    max_length: token positions per example (longer texts are cut).
    batch_size: global examples per batch.
    mesh: the device mesh (None: every device on 'data').

  Returns:
    (features float32 (N, D), labels int64 (N,)).
  """
  tokenizer = text_model.tokenizer

  def tokenize(texts: list[str], pairs: list[str] | None) -> tuple[np.ndarray, ...]:
    return tokenizer.encode_with_types(texts, max_length, pairs=pairs)

  batches = text_data.token_batches(split, tokenize, batch_size=batch_size,
                                    max_length=max_length, pad_id=int(tokenizer.pad_id),
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  return features_lib.extract(encode, variables, batches, mesh=mesh, inputs=INPUTS)
