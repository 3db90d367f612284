"""Text embeddings of a CLIP encoder for prompts: tokenized here, encoded in jitted batches."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from nmjax.clip.tokenizer import tokenize


@functools.lru_cache(maxsize=8)
def _jitted(encode_text: Any) -> Any:
  return jax.jit(encode_text)


def embed_texts(encoder: Any, prompts: Sequence[str], batch_size: int = 256) -> np.ndarray:
  """(len(prompts), E) float32 unnormalized text embeddings from `encoder`'s text tower
  (an nmjax.encoder.Encoder of a CLIP workdir). The last batch is padded to batch_size, so one
  program serves every batch."""
  tokens = tokenize(list(prompts), context_length=encoder.context_length)
  encode = _jitted(encoder.encode_text)
  out = []
  for start in range(0, len(tokens), batch_size):
    chunk = tokens[start:start + batch_size]
    padded = np.zeros((batch_size, tokens.shape[1]), np.int32)
    padded[:len(chunk)] = chunk
    out.append(np.asarray(encode(encoder.variables, padded))[:len(chunk)])
  return np.concatenate(out).astype(np.float32)
