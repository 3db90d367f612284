"""Token ids for the text encoders, from a checkpoint's own tokenizer files, by Hugging Face's
`tokenizers` library (the `text` extra: pip install 'nmjax[text]').

    tok = nmjax.text.tokenizer("bert-base-uncased/")
    ids, mask = tok.encode(["a sentence", "another"], max_length=128)
    ids, mask = tok.encode(premises, 128, pairs=hypotheses)        # GLUE's pair tasks

The folder's files, looked for in this order:

  tokenizer.json              the whole pipeline as transformers saves it (normalizer,
                              pre-tokenizer, model, special tokens), used as it is.
  vocab.txt                   BERT's WordPiece vocabulary: BERT's normalizer (lower case as
                              tokenizer_config.json's do_lower_case says, default true), BERT's
                              pre-tokenizer, [CLS] A [SEP] (B [SEP]) with segment ids 0 and 1.
  vocab.json + merges.txt     byte-level BPE. RoBERTa's (tokenizer_config.json's tokenizer_class
                              or config.json's model_type says so, or the vocabulary has <s> and
                              </s>): <s> A </s> (</s> B </s>). GPT-2's otherwise: no special
                              tokens, as transformers' GPT-2 tokenizer adds none.

Rows are truncated to max_length (a pair: the longer text first, as transformers' default
truncation) and padded on the right with the pad token (GPT-2 has none: its end-of-text token,
else 0), mask 0 there. An empty text is refused: every example must say something.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from nmjax import io as nmjax_io
from nmjax.errors import ConfigError, DataError, NmjaxError

TOKENIZER_JSON = "tokenizer.json"
WORDPIECE_FILES = ("vocab.txt",)
BPE_FILES = ("vocab.json", "merges.txt")
# Beside the vocabulary: what says how to use it (lower case, special tokens, which model).
SETTINGS_FILES = ("tokenizer_config.json", "special_tokens_map.json", "config.json")
# Every file a tokenizer may read (the import job copies these into WORKDIR/tokenizer/).
TOKENIZER_FILES = (TOKENIZER_JSON, *WORDPIECE_FILES, *BPE_FILES, *SETTINGS_FILES)
# Padding tokens by name, in the order they are looked for when no file names one.
PAD_TOKENS = ("[PAD]", "<pad>", "<|endoftext|>", "</s>")


class MissingExtraError(NmjaxError, ImportError):
  """The `text` extra (tokenizers) is not installed; the message says what to run."""


@functools.lru_cache(maxsize=None)
def _tokenizers() -> Any:
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise MissingExtraError(
        "the text tokenizer needs the package tokenizers, which is not installed; install the"
        " text extra: pip install 'nmjax[text]' (bootstrap.sh does)") from None
  return tokenizers


def _settings(folder: str) -> dict[str, Any]:
  """tokenizer_config.json, special_tokens_map.json and config.json of the folder merged (the
  earlier file wins); files that are absent or unreadable count as empty."""
  merged: dict[str, Any] = {}
  for name in reversed(SETTINGS_FILES):
    path = nmjax_io.join(folder, name)
    if not nmjax_io.isfile(path):
      continue
    try:
      loaded = json.loads(nmjax_io.read_text(path))
    except (OSError, ValueError, UnicodeDecodeError) as e:
      raise DataError(f"tokenizer file {path} cannot be read as JSON ({type(e).__name__})"
                      ) from None
    if isinstance(loaded, dict):
      merged.update(loaded)
  return merged


def _token_name(value: Any) -> str | None:
  """A special token as the settings files write it: a string or {"content": string}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _special_tokens(settings: dict[str, Any], defaults: dict[str, str]) -> dict[str, str]:
  """{role: token} of the roles in `defaults` (cls_token, sep_token, ...), as the settings say
  or the defaults."""
  return {role: _token_name(settings.get(role)) or token for role, token in defaults.items()}


def _local(folder: str, name: str) -> str:
  """A local path of the folder's file (a bucket's file is copied once, nmjax.io)."""
  return nmjax_io.local_mirror(nmjax_io.join(folder, name))


def _wordpiece(folder: str, settings: dict[str, Any]) -> Any:
  """BERT's tokenizer over vocab.txt, built from tokenizers' own parts."""
  tk = _tokenizers()
  special = _special_tokens(settings, {"unk_token": "[UNK]", "sep_token": "[SEP]",
                                       "pad_token": "[PAD]", "cls_token": "[CLS]",
                                       "mask_token": "[MASK]"})
  model = tk.models.WordPiece.from_file(_local(folder, "vocab.txt"),
                                        unk_token=special["unk_token"])
  built = tk.Tokenizer(model)
  built.normalizer = tk.normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)),
      strip_accents=settings.get("strip_accents"),
      lowercase=bool(settings.get("do_lower_case", True)))
  built.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
  cls, sep = special["cls_token"], special["sep_token"]
  _check_in_vocabulary(built, (cls, sep), folder)
  built.post_processor = tk.processors.TemplateProcessing(
      single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
      special_tokens=[(cls, built.token_to_id(cls)), (sep, built.token_to_id(sep))])
  _add_special(built, special.values())
  return built


def _is_roberta(settings: dict[str, Any], vocabulary: dict[str, int]) -> bool:
  stated = str(settings.get("tokenizer_class") or "")
  if stated:
    return "roberta" in stated.lower()
  if settings.get("model_type"):
    return settings["model_type"] == "roberta"
  return "<s>" in vocabulary and "</s>" in vocabulary


def _byte_level_bpe(folder: str, settings: dict[str, Any]) -> Any:
  """RoBERTa's or GPT-2's byte-level BPE over vocab.json and merges.txt."""
  tk = _tokenizers()
  model = tk.models.BPE.from_file(_local(folder, "vocab.json"), _local(folder, "merges.txt"),
                                  continuing_subword_prefix="", end_of_word_suffix="",
                                  fuse_unk=False)
  built = tk.Tokenizer(model)
  prefix_space = bool(settings.get("add_prefix_space", False))
  built.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
  built.decoder = tk.decoders.ByteLevel()
  if _is_roberta(settings, built.get_vocab()):
    special = _special_tokens(settings, {"bos_token": "<s>", "eos_token": "</s>",
                                         "unk_token": "<unk>", "sep_token": "</s>",
                                         "cls_token": "<s>", "pad_token": "<pad>",
                                         "mask_token": "<mask>"})
    cls, sep = special["cls_token"], special["sep_token"]
    _check_in_vocabulary(built, (cls, sep), folder)
    built.post_processor = tk.processors.RobertaProcessing(
        (sep, built.token_to_id(sep)), (cls, built.token_to_id(cls)),
        trim_offsets=bool(settings.get("trim_offsets", True)), add_prefix_space=prefix_space)
  else:
    special = _special_tokens(settings, {"eos_token": "<|endoftext|>"})
  _add_special(built, special.values())
  return built


def _check_in_vocabulary(built: Any, tokens: Sequence[str], folder: str) -> None:
  missing = [t for t in tokens if built.token_to_id(t) is None]
  if missing:
    raise DataError(f"the tokenizer vocabulary in {folder} lacks the special token(s)"
                    f" {', '.join(missing)} its sequences are built with")


def _add_special(built: Any, tokens: Any) -> None:
  """Marks the vocabulary's special tokens as such, so a text that spells one gets its id (as
  transformers' tokenizers do); tokens the vocabulary lacks are left out."""
  present = [t for t in dict.fromkeys(tokens) if built.token_to_id(t) is not None]
  built.add_special_tokens(present)


def _pad_id(built: Any, settings: dict[str, Any]) -> int:
  """The pad token's id: the one the settings name, else the first of PAD_TOKENS in the
  vocabulary (GPT-2's end-of-text token), else 0."""
  names = [_token_name(settings.get("pad_token")), *PAD_TOKENS]
  for name in names:
    if name is not None and built.token_to_id(name) is not None:
      return int(built.token_to_id(name))
  return 0


class TextTokenizer:
  """A checkpoint's tokenizer: texts (and pairs) -> fixed-length (ids, mask) int32 arrays.

  Attributes:
    folder: where its files were read.
    source: the file(s) it was built from ("tokenizer.json", "vocab.txt" or
      "vocab.json+merges.txt").
    pad_id: the id padding positions hold (their mask is 0).
    vocab_size: ids it can produce (the vocabulary with its added tokens).
  """

  def __init__(self, built: Any, folder: str, source: str, pad_id: int):
    self._built = built
    self.folder = folder
    self.source = source
    self.pad_id = pad_id
    self.vocab_size = int(built.get_vocab_size(with_added_tokens=True))

  def __repr__(self) -> str:
    return f"TextTokenizer({self.folder!r}, {self.source}, pad_id={self.pad_id})"

  def encode(self, texts: Sequence[str], max_length: int,
             pairs: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask of each text (or text pair), truncated and padded to max_length.

    Args:
      texts: the texts (for pair tasks, each pair's first text).
      max_length: the row length (special tokens included).
      pairs: each pair's second text (as many as texts), or None for single texts.

    Returns:
      (ids, mask): int32 arrays (len(texts), max_length); mask is 1 at tokens, 0 at padding.

    Raises:
      DataError: an empty (or blank) text, or a text that is not a string.
      ConfigError: max_length too short for the special tokens, or pairs of another count.

    Examples:
      >>> tok = tokenizer("bert-base-uncased/")  # doctest: +SKIP
      >>> ids, mask = tok.encode(["a cat", "a dog sat"], max_length=8)  # doctest: +SKIP
    """
    ids, mask, _ = self.encode_with_types(texts, max_length, pairs)
    return ids, mask

  def encode_with_types(self, texts: Sequence[str], max_length: int,
                        pairs: Sequence[str] | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """encode's arrays and the token types, for BERT's pair tasks.

    Args:
      texts: the texts (for pair tasks, each pair's first text).
      max_length: the row length (special tokens included).
      pairs: each pair's second text, or None.

    Returns:
      (ids, mask, token_types): int32 (len(texts), max_length); token_types are BERT's segment
      ids (0 for the first text and its special tokens, 1 for the second's), 0 at padding.
    """
    texts = _checked_texts(texts, "text")
    if pairs is not None:
      pairs = _checked_texts(pairs, "second text of pair")
      if len(pairs) != len(texts):
        raise ConfigError(f"pairs has {len(pairs)} texts for {len(texts)} first texts; give"
                          " one second text per pair")
    if not isinstance(max_length, (int, np.integer)) or max_length < 1:
      raise ConfigError(f"max_length={max_length!r} must be a positive integer")
    self._built.no_padding()
    self._built.enable_truncation(int(max_length))
    inputs = list(zip(texts, pairs)) if pairs is not None else texts
    try:
      encodings = self._built.encode_batch(inputs)
    except Exception as e:  # pylint: disable=broad-except
      # tokenizers refuses some lengths that its special tokens alone do not fit in ...
      raise ConfigError(f"max_length={max_length} cannot hold these texts with their special"
                        f" tokens ({str(e).splitlines()[0][:120]}); use a longer max_length"
                        ) from None
    longest = max((len(e.ids) for e in encodings), default=0)
    if longest > max_length:  # ... and lets others through untruncated.
      raise ConfigError(f"max_length={max_length} cannot hold these texts with their special"
                        f" tokens (a row needs {longest}); use a longer max_length")
    shape = (len(texts), int(max_length))
    ids, mask = np.full(shape, self.pad_id, np.int32), np.zeros(shape, np.int32)
    types = np.zeros(shape, np.int32)
    for row, encoding in enumerate(encodings):
      length = len(encoding.ids)
      ids[row, :length] = encoding.ids
      mask[row, :length] = 1
      types[row, :length] = encoding.type_ids
    return ids, mask, types


def _checked_texts(texts: Sequence[str], what: str) -> list[str]:
  """`texts` as a list, each a non-blank string; DataError naming the first that is not."""
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise DataError(f"{what} {i} is a {type(text).__name__}, not a string")
    if not text.strip():
      raise DataError(f"{what} {i} (of {len(texts)}) is empty; every example needs some text"
                      " (drop or fill the empty ones)")
  return texts


def tokenizer(folder: str) -> TextTokenizer:
  """The tokenizer of a Hugging Face checkpoint folder (or an import workdir's tokenizer/).

  Args:
    folder: a folder holding tokenizer.json, or vocab.txt (BERT), or vocab.json and merges.txt
      (RoBERTa, GPT-2), with the tokenizer_config.json that transformers writes beside them
      where there is one.

  Returns:
    A TextTokenizer: .encode(texts, max_length, pairs=None) -> (ids, mask) int32 arrays.

  Raises:
    DataError: none of the tokenizer files is there (naming those looked for), or one cannot
      be read.
    MissingExtraError: the tokenizers package is not installed.

  Examples:
    >>> from nmjax import text
    >>> text.tokenizer("no_such_folder")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nmjax.errors.DataError: no_such_folder has no tokenizer files; looked for tokenizer.json, ...
  """
  has = lambda name: nmjax_io.isfile(nmjax_io.join(folder, name))
  if has(TOKENIZER_JSON):
    source = TOKENIZER_JSON
  elif all(has(name) for name in WORDPIECE_FILES):
    source = "vocab.txt"
  elif all(has(name) for name in BPE_FILES):
    source = "vocab.json+merges.txt"
  else:
    raise DataError(f"{folder} has no tokenizer files; looked for {TOKENIZER_JSON},"
                    f" {', '.join(WORDPIECE_FILES)}, {' + '.join(BPE_FILES)}")
  settings = _settings(folder)
  tk = _tokenizers()
  try:
    if source == TOKENIZER_JSON:
      built = tk.Tokenizer.from_file(_local(folder, TOKENIZER_JSON))
    elif source == "vocab.txt":
      built = _wordpiece(folder, settings)
    else:
      built = _byte_level_bpe(folder, settings)
  except NmjaxError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # tokenizers reports a malformed file as its own Exception.
    first = (str(e).strip().splitlines() or [""])[0][:160]
    raise DataError(f"the tokenizer files ({source}) in {folder} cannot be read"
                    f" ({type(e).__name__}: {first})") from None
  return TextTokenizer(built, folder, source, _pad_id(built, settings))
