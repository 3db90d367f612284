"""Hugging Face text checkpoints (BERT, RoBERTa, GPT-2) -> nmjax text encoders, torch-free.

    model, variables = nmjax.convert.load("bert-base-uncased/")      # a save_pretrained folder
    hidden_states, pooled = model.apply(variables, ids, mask, train=False)

A folder as transformers' `save_pretrained` writes it: config.json (the architecture: its
model_type and sizes) and the weights, model.safetensors (read without torch) or
pytorch_model.bin (read through torch, weights only), either possibly sharded with its
.index.json. The names are transformers':

  bert      BertModel, or BertFor* with the encoder under `bert.`: embeddings.*,
            encoder.layer.N.attention.self.{query,key,value}, attention.output.{dense,LayerNorm},
            intermediate.dense, output.{dense,LayerNorm}
  roberta   RobertaModel, or RobertaFor* under `roberta.`: BERT's names
  gpt2      GPT2Model, or GPT2LMHeadModel / GPT2For* under `transformer.`: wte, wpe,
            h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_f

Everything outside the encoder is a task head and is left out (MLM and classifier heads, the LM
head tied to wte, BERT's pooler, which nmjax's pooling replaces), and so are buffers that older
files carry (position_ids, GPT-2's causal-mask `attn.bias`); old BERT files' LayerNorm
`gamma`/`beta` read as weight/bias. Every other name must match: a file that lacks a weight or
has one nmjax does not know, or one of another shape, is refused with one line that names at most
ten of each and their counts (nmjax.convert.mapping).

Linear weights are (out, in) in PyTorch and become (in, out) Dense kernels; GPT-2's Conv1D
weights are already (in, out) and are taken as they are, the fused c_attn (in, 3 x hidden)
included (the encoder splits it into query, key and value in that order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import io as nmjax_io
from nmjax.convert import mapping, readers
from nmjax.convert.mapping import Layout
from nmjax.errors import ConfigError, DataError
from nmjax.models import text_encoders
from nmjax.models.text_encoders import TextConfig

MODEL_TYPES = ("bert", "roberta", "gpt2")
# The weight files looked for, in this order (the .index.json of a sharded save lists its shards).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Where a *For* model keeps its encoder (transformers' base_model_prefix).
BASE_PREFIXES = {"bert": "bert.", "roberta": "roberta.", "gpt2": "transformer."}
# Buffers (not weights) that some transformers versions saved; nmjax computes them.
IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids", ".attn.bias",
                    ".attn.masked_bias")
# BERT's pooler (dense + tanh over [CLS]) is a head for next-sentence prediction.
IGNORED_PREFIXES = ("pooler.",)
SHOWN = 10  # Names a mismatch message lists of each kind.


@dataclasses.dataclass(frozen=True)
class TextImport:
  """A converted Hugging Face text checkpoint: its model_type, the nmjax encoder and variables,
  the architecture, and the files read (config.json first)."""
  model_type: str
  model: Any
  variables: dict[str, Any]
  config: TextConfig
  files: tuple[str, ...]


def is_hf_folder(path: str) -> bool:
  """Whether `path` is a folder holding a config.json (a Hugging Face model folder)."""
  return bool(path) and nmjax_io.isdir(path) and nmjax_io.isfile(nmjax_io.join(path,
                                                                                 "config.json"))


def read_json(path: str, what: str) -> dict[str, Any]:
  """A JSON object file; DataError with one line when it is not one."""
  try:
    loaded = json.loads(nmjax_io.read_text(path))
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise DataError(f"{what} {path} cannot be read as JSON ({type(e).__name__})") from None
  if not isinstance(loaded, dict):
    raise DataError(f"{what} {path} holds a JSON {type(loaded).__name__}, not an object")
  return loaded


def folder_config(folder: str) -> dict[str, Any]:
  """The folder's config.json; ConfigError when the folder or the file is missing."""
  if not nmjax_io.isdir(folder):
    why = "is a file" if nmjax_io.isfile(folder) else "does not exist"
    raise ConfigError(f"Hugging Face model folder {folder} {why}; pass a folder written by"
                      " save_pretrained (config.json and model.safetensors)")
  path = nmjax_io.join(folder, "config.json")
  if not nmjax_io.isfile(path):
    raise ConfigError(f"{folder} has no config.json, so nothing says its architecture; a Hugging"
                      f" Face model folder of model_type {', '.join(MODEL_TYPES)} is needed")
  return read_json(path, "config file")


def _field(stated: dict[str, Any], names: tuple[str, ...], path: str, default: Any = None
           ) -> Any:
  """The first of `names` that config.json sets (not null), else `default`; ConfigError when
  there is no default."""
  for name in names:
    if stated.get(name) is not None:
      return stated[name]
  if default is None:
    raise ConfigError(f"{path} has no {' or '.join(names)}; it is not a complete"
                      f" {stated.get('model_type')} config")
  return default


def text_config(stated: dict[str, Any], path: str = "config.json") -> TextConfig:
  """The TextConfig of a transformers config.json (already read into `stated`).

  Raises:
    ConfigError: a model_type other than bert, roberta or gpt2 (naming them), a field that is
      missing or holds what nmjax does not compute (relative positions, a decoder BERT,
      cross-attention, an unknown activation).
  """
  family = stated.get("model_type")
  if family not in MODEL_TYPES:
    raise ConfigError(f"{path}: model_type={family!r} is not a text encoder nmjax imports;"
                      f" allowed: {', '.join(MODEL_TYPES)}")
  # GPT-2 is a decoder by nature; a BERT or RoBERTa decoder is causal, which nmjax does not build.
  if stated.get("add_cross_attention") or (family != "gpt2" and stated.get("is_decoder")):
    raise ConfigError(f"{path}: a {family} decoder (is_decoder / add_cross_attention) is not an"
                      " encoder nmjax imports; allowed: plain encoders")
  positions = stated.get("position_embedding_type", "absolute")
  if positions not in (None, "absolute"):
    raise ConfigError(f"{path}: position_embedding_type={positions!r} is not computed by nmjax;"
                      " allowed: absolute")
  try:
    config = _stated_config(family, stated, path)
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:  # A size that is not a number.
    raise ConfigError(f"{path}: a {family} size is not a number ({e})") from None
  try:
    return config.check()
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None


def _stated_config(family: str, stated: dict[str, Any], path: str) -> TextConfig:
  """The TextConfig fields of a transformers config.json of `family` (GPT-2 names its sizes
  n_embd, n_layer, ...; BERT and RoBERTa hidden_size, num_hidden_layers, ...)."""
  field = lambda *names, default=None: _field(stated, names, path, default)
  if family == "gpt2":
    hidden = int(field("n_embd", "hidden_size"))
    eos = stated.get("eos_token_id")
    return TextConfig(
        family, vocab_size=int(field("vocab_size")), hidden_size=hidden,
        num_layers=int(field("n_layer", "num_hidden_layers")),
        num_heads=int(field("n_head", "num_attention_heads")),
        intermediate_size=int(field("n_inner", default=4 * hidden)),
        max_positions=int(field("n_positions", "max_position_embeddings")),
        type_vocab_size=0, layer_norm_eps=float(field("layer_norm_epsilon", default=1e-5)),
        pad_token_id=int(field("pad_token_id", default=eos if isinstance(eos, int) else 0)),
        activation=str(field("activation_function", default="gelu_new")),
        scale_attn_weights=bool(stated.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(stated.get("scale_attn_by_inverse_layer_idx",
                                                        False)))
  return TextConfig(
      family, vocab_size=int(field("vocab_size")), hidden_size=int(field("hidden_size")),
      num_layers=int(field("num_hidden_layers")), num_heads=int(field("num_attention_heads")),
      intermediate_size=int(field("intermediate_size")),
      max_positions=int(field("max_position_embeddings")),
      type_vocab_size=int(field("type_vocab_size", default=2)),
      layer_norm_eps=float(field("layer_norm_eps", default=1e-12)),
      pad_token_id=int(field("pad_token_id", default=1 if family == "roberta" else 0)),
      activation=str(field("hidden_act", default="gelu")))


def weight_files(folder: str) -> list[str]:
  """The folder's weight files (a sharded save's shards, in its index's order); DataError
  naming the files looked for when there are none."""
  for name in WEIGHT_FILES:
    path = nmjax_io.join(folder, name)
    if not nmjax_io.isfile(path):
      continue
    if not name.endswith(".index.json"):
      return [path]
    shards = read_json(path, "weight index").get("weight_map")
    if not isinstance(shards, dict) or not shards:
      raise DataError(f"weight index {path} has no weight_map of names to shard files")
    return [nmjax_io.join(folder, shard) for shard in dict.fromkeys(shards.values())]
  raise DataError(f"{folder} holds no weights; looked for {', '.join(WEIGHT_FILES)}")


def read_weights(folder: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """{name: float32 array} of every weight file of the folder (nmjax.convert.readers)."""
  tensors: dict[str, np.ndarray] = {}
  for path in weight_files(folder):
    tensors.update(readers.read_checkpoint(path, trust_pickle=trust_pickle).tensors)
  return tensors


def encoder_weights(tensors: dict[str, np.ndarray], family: str) -> dict[str, np.ndarray]:
  """The encoder's weights under their base-model names: a *For* model's base prefix stripped
  and its heads left out, old LayerNorm names (gamma, beta) renamed, buffers dropped."""
  prefix = BASE_PREFIXES[family]
  if any(name.startswith(prefix) for name in tensors):
    tensors = {name[len(prefix):]: value for name, value in tensors.items()
               if name.startswith(prefix)}
  elif family == "gpt2":
    tensors = {name: value for name, value in tensors.items() if not name.startswith("lm_head.")}
  renamed = {}
  for name, value in tensors.items():
    if name.endswith(IGNORED_SUFFIXES) or name.startswith(IGNORED_PREFIXES):
      continue
    if name.endswith(".gamma") or name.endswith(".beta"):
      stem, part = name.rsplit(".", 1)
      name = f"{stem}.{'weight' if part == 'gamma' else 'bias'}"
    renamed[name] = value
  return renamed


def _embedding(torch_name: str, flax_path: tuple[str, ...]) -> Layout:
  return {f"{torch_name}.weight": [(("params", *flax_path, "embedding"), mapping.same)]}


def _conv1d(torch_name: str, flax_path: tuple[str, ...]) -> Layout:
  """GPT-2's Conv1D: weight (in, out), already a Dense kernel's layout."""
  return {f"{torch_name}.weight": [(("params", *flax_path, "kernel"), mapping.same)],
          f"{torch_name}.bias": [(("params", *flax_path, "bias"), mapping.same)]}


def bert_layout(config: TextConfig) -> Layout:
  """transformers' BertModel / RobertaModel names -> the variables of
  nmjax.models.text_encoders.BertEncoder."""
  layout: Layout = {
      **_embedding("embeddings.word_embeddings", ("embeddings", "word_embeddings")),
      **_embedding("embeddings.position_embeddings", ("embeddings", "position_embeddings")),
      **_embedding("embeddings.token_type_embeddings", ("embeddings", "token_type_embeddings")),
      **mapping.layer_norm("embeddings.LayerNorm", ("embeddings", "norm")),
  }
  for i in range(config.num_layers):
    torch_name, layer = f"encoder.layer.{i}", f"layer_{i}"
    for part in ("query", "key", "value"):
      layout.update(mapping.linear(f"{torch_name}.attention.self.{part}",
                                   (layer, "attention", part)))
    layout.update(mapping.linear(f"{torch_name}.attention.output.dense",
                                 (layer, "attention", "output")))
    layout.update(mapping.layer_norm(f"{torch_name}.attention.output.LayerNorm",
                                     (layer, "attention_norm")))
    layout.update(mapping.linear(f"{torch_name}.intermediate.dense", (layer, "intermediate")))
    layout.update(mapping.linear(f"{torch_name}.output.dense", (layer, "output")))
    layout.update(mapping.layer_norm(f"{torch_name}.output.LayerNorm", (layer, "output_norm")))
  return layout


def gpt2_layout(config: TextConfig) -> Layout:
  """transformers' GPT2Model names -> nmjax.models.text_encoders.GPT2Encoder variables."""
  layout: Layout = {**_embedding("wte", ("wte",)), **_embedding("wpe", ("wpe",)),
                    **mapping.layer_norm("ln_f", ("ln_f",))}
  for i in range(config.num_layers):
    torch_name, block = f"h.{i}", f"h_{i}"
    layout.update(mapping.layer_norm(f"{torch_name}.ln_1", (block, "ln_1")))
    layout.update(mapping.layer_norm(f"{torch_name}.ln_2", (block, "ln_2")))
    for module, part in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"),
                         ("mlp", "c_proj")):
      layout.update(_conv1d(f"{torch_name}.{module}.{part}", (block, module, part)))
  return layout


def template(model: Any) -> Any:
  """The model's variables as shapes only (nothing is computed)."""
  ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  return jax.eval_shape(lambda i: model.init(jax.random.key(0), i, i), ids)


def from_tensors(tensors: dict[str, np.ndarray], config: TextConfig, *, what: str,
                 pooling: str | None = None, dtype: Any = jnp.float32
                 ) -> tuple[Any, dict[str, Any]]:
  """The nmjax encoder of `config` and its variables from a transformers state dict (a *For*
  model's too); DataError with one line for names or shapes that do not match."""
  model = text_encoders.get_text_model(config, pooling=pooling, dtype=dtype)
  layout = gpt2_layout(config) if config.family == "gpt2" else bert_layout(config)
  described = (f"{what} as a Hugging Face {config.family} ({config.num_layers} layers, hidden"
               f" {config.hidden_size})")
  variables = mapping.assign(encoder_weights(tensors, config.family), layout, template(model),
                             what=described, limit=SHOWN)
  return model, jax.tree.map(jnp.asarray, variables)


def read(folder: str, *, pooling: str | None = None, dtype: Any = jnp.float32,
         trust_pickle: bool = False) -> TextImport:
  """Reads and converts a Hugging Face text model folder (see load_hf)."""
  config = text_config(folder_config(folder), nmjax_io.join(folder, "config.json"))
  files = weight_files(folder)
  tensors = read_weights(folder, trust_pickle=trust_pickle)
  model, variables = from_tensors(tensors, config, what=folder, pooling=pooling, dtype=dtype)
  return TextImport(config.family, model, variables, config,
                    (nmjax_io.join(folder, "config.json"), *files))


def load_hf(folder: str, pooling: str | None = None, *, dtype: Any = jnp.float32,
            trust_pickle: bool = False) -> tuple[Any, dict[str, Any]]:
  """Reads a Hugging Face BERT, RoBERTa or GPT-2 folder as an nmjax text encoder.

  Args:
    folder: a folder written by transformers' save_pretrained (config.json and
      model.safetensors or pytorch_model.bin), of a *Model or a *For* model.
    pooling: "cls", "mean" or "last"; None: the family's (cls for BERT and RoBERTa, last for
      GPT-2).
    dtype: the compute dtype (parameters stay float32).
    trust_pickle: let torch unpickle arbitrary objects from a pytorch_model.bin (only for files
      you trust; safetensors files never need it).

  Returns:
    (model, variables): model.apply(variables, ids, mask, train=False) returns
    (hidden_states (B, L, hidden), pooled (B, hidden)), float32; hidden_states are
    transformers' last_hidden_state.

  Raises:
    ConfigError: no config.json, or a model_type other than bert, roberta or gpt2.
    DataError: no weight file, or weights that do not match the config (one line naming at
      most ten missing, unexpected and mis-shaped names, with their counts).
  """
  imported = read(folder, pooling=pooling, dtype=dtype, trust_pickle=trust_pickle)
  return imported.model, imported.variables


def files_sha256(paths: tuple[str, ...]) -> str:
  """Hex sha256 over the files' own sha256 digests, in order: one identity for a folder's
  config and weights."""
  digest = hashlib.sha256()
  for path in paths:
    digest.update(readers.file_sha256(path).encode())
  return digest.hexdigest()


# ------------------------------------------------------------------------------- validation

REFERENCE_INPUTS = ("ids", "mask")
REFERENCE_OUTPUTS = ("hidden_states", "pooled")


def reference_outputs(imported: TextImport, arrays: dict[str, np.ndarray], reference_path: str
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{output: (the encoder's, the reference's)} for a reference .npz's arrays: `ids` and `mask`
  (N, L) and transformers' `hidden_states` (its last_hidden_state; compared at real tokens,
  since what padding holds is each model's own business) and/or `pooled` on them."""
  outputs = [k for k in REFERENCE_OUTPUTS if k in arrays]
  if not all(k in arrays and arrays[k].ndim == 2 for k in REFERENCE_INPUTS) or not outputs:
    raise DataError(f"reference file {reference_path} must hold `ids` and `mask` (N, L) and"
                    f" `hidden_states` and/or `pooled`; it holds {', '.join(arrays) or 'nothing'}")
  apply = jax.jit(lambda v, i, m: imported.model.apply(v, i, m, train=False))
  hidden, pooled = apply(imported.variables, jnp.asarray(arrays["ids"], jnp.int32),
                         jnp.asarray(arrays["mask"], jnp.int32))
  ours = {"hidden_states": np.asarray(hidden), "pooled": np.asarray(pooled)}
  real = np.asarray(arrays["mask"]) > 0
  pairs = {}
  for key in outputs:
    if arrays[key].shape != ours[key].shape:
      raise DataError(f"reference file {reference_path}: {key} is {arrays[key].shape}, the"
                      f" imported model gives {ours[key].shape}")
    pairs[key] = ((ours[key][real], arrays[key][real]) if key == "hidden_states"
                  else (ours[key], arrays[key]))
  return pairs
