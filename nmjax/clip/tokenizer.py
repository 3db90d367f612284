"""CLIP's byte-level BPE tokenizer, offline: text -> int32 token ids, equal to the reference's.

The rules are those of the tokenizer OpenAI CLIP and open_clip train with:
1. clean: ftfy.fix_text, html.unescape twice, whitespace runs collapsed to one space and the ends
   stripped, then lower-cased;
2. split with the reference's Unicode-class pattern (the `regex` package: \\p{L}, \\p{N});
3. each piece's UTF-8 bytes become printable characters (one per byte), and BPE merges them by
   the ranks of the vocabulary file, the last symbol of a word carrying the `</w>` suffix;
4. a row is START, the ids, END, then zeros to `context_length`; a longer row is cut and its last
   id replaced by END, so every row ends its text with END (the text tower reads that position).

The vocabulary is data, not code: `bpe_simple_vocab_16e6.txt.gz` inside the open_clip_torch wheel,
which `scripts/bootstrap.sh` installs without its dependencies. nmjax finds the file without
importing open_clip (that would import torch); NMJAX_CLIP_VOCAB=/path/to/the/file overrides it.

Speed: the tokenizer is built once per vocabulary file, BPE results are cached per word and whole
encodings per text, so the templated captions of the embedded study (a few hundred distinct
strings, tens of thousands of rows) cost little more than filling the array.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.metadata
import importlib.util
import os
from typing import Any, Iterable, Sequence

import numpy as np

from nmjax.errors import ConfigError, DataError, NmjaxError

VOCAB_ENV = "NMJAX_CLIP_VOCAB"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
START_TOKEN = 49406
END_TOKEN = 49407
PAD_TOKEN = 0
VOCAB_SIZE = 49408

# The reference keeps the merges on lines 1 .. 49152 - 256 - 2 of the file (line 0 is a version
# header): 256 byte symbols + 256 end-of-word byte symbols + these merges + 2 specials = 49408.
_NUM_MERGES = 49152 - 256 - 2
_SPECIALS = ("<start_of_text>", "<end_of_text>")
_END_OF_WORD = "</w>"
_SPLIT_PATTERN = (
    "|".join(_SPECIALS) + r"|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
_INSTALL_HINT = ("run `bash scripts/bootstrap.sh` (or `pip install --no-deps "
                 f"open_clip_torch==3.3.0`) or set {VOCAB_ENV}=/path/to/{VOCAB_FILE}")


class MissingExtraError(NmjaxError, ImportError):
  """The `clip` extra (ftfy, regex) is not installed; the message says what to run."""


@functools.lru_cache(maxsize=None)
def _text_packages() -> tuple[Any, Any]:
  """(ftfy, the compiled split pattern), imported at first use: only CLIP text needs them, so
  the rest of nmjax imports without the `clip` extra."""
  try:
    import ftfy  # pylint: disable=g-import-not-at-top
    import regex  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise MissingExtraError(
        f"the CLIP tokenizer needs the package {error.name or 'ftfy/regex'}, which is not"
        " installed; install the clip extra: pip install 'nmjax[clip]' (bootstrap.sh does)"
    ) from None
  return ftfy, regex.compile(_SPLIT_PATTERN, regex.IGNORECASE)


def byte_symbols() -> list[str]:
  """One printable character per byte value 0..255 (index = byte), as the vocabulary spells bytes.

  Bytes that print as themselves ('!'..'~', '¡'..'¬', '®'..'ÿ') keep their code point; the other
  68 (space, control characters, ...) take 256, 257, ... in byte order, so no symbol is
  whitespace and BPE words never contain a space.
  """
  printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(
      range(ord("®"), ord("ÿ") + 1))
  symbols, shifted = [], 256
  for byte in range(256):
    if byte in printable:
      symbols.append(chr(byte))
    else:
      symbols.append(chr(shifted))
      shifted += 1
  return symbols


def _vocabulary_order(symbols: list[str]) -> list[str]:
  """The byte symbols in the order the vocabulary numbers them: printable bytes first."""
  printable = [s for b, s in enumerate(symbols) if ord(s) == b]
  return printable + [s for b, s in enumerate(symbols) if ord(s) != b]


def clean(text: str) -> str:
  """The reference's text cleaning: ftfy, HTML unescaped twice, whitespace collapsed, lower case."""
  ftfy, _ = _text_packages()
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).strip().lower()


class Tokenizer:
  """CLIP's BPE over one vocabulary file; `tokenizer(texts, context_length)` -> int32 ids."""

  def __init__(self, merges: Sequence[tuple[str, str]], *, cache_size: int = 1 << 16):
    _, self.split = _text_packages()  # MissingExtraError here, before any text is read.
    symbols = byte_symbols()
    ordered = _vocabulary_order(symbols)
    tokens = ordered + [s + _END_OF_WORD for s in ordered] + ["".join(m) for m in merges]
    tokens += list(_SPECIALS)
    self.token_ids = {token: i for i, token in enumerate(tokens)}
    self.tokens = tokens
    self.ranks = {tuple(merge): rank for rank, merge in enumerate(merges)}
    # UTF-8 bytes read as latin-1 are one character per byte; translate maps each to its symbol.
    self.byte_table = {byte: symbol for byte, symbol in enumerate(symbols)}
    self.symbol_bytes = {symbol: byte for byte, symbol in enumerate(symbols)}
    self.special_ids = {name: self.token_ids[name] for name in _SPECIALS}
    self.word_ids = functools.lru_cache(maxsize=cache_size * 4)(self._word_ids)
    self.encode = functools.lru_cache(maxsize=cache_size)(self._encode)

  @classmethod
  def from_file(cls, path: str) -> "Tokenizer":
    """The tokenizer of a `bpe_simple_vocab_16e6.txt.gz`-format file (DataError if unreadable)."""
    try:
      with gzip.open(path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:
      raise DataError(f"CLIP vocabulary {path} cannot be read ({error}); {_INSTALL_HINT}") from None
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
      raise DataError(f"CLIP vocabulary {path} is not a {VOCAB_FILE} file (needs {_NUM_MERGES} "
                      f"merge lines of two symbols); {_INSTALL_HINT}")
    return cls(merges)

  def _merge_word(self, word: list[str]) -> list[str]:
    """BPE: merge the best-ranked adjacent pair everywhere, left to right, until none is known."""
    ranks, unknown = self.ranks, len(self.ranks)
    while len(word) > 1:
      best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, unknown))
      if best not in ranks:
        break
      first, second = best
      merged, i = [], 0
      while i < len(word):
        if word[i] == first and i + 1 < len(word) and word[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    return word

  def _word_ids(self, piece: str) -> tuple[int, ...]:
    """The ids of one piece of the split (cached per piece)."""
    if piece in self.special_ids:
      return (self.special_ids[piece],)
    symbols = piece.encode("utf-8").decode("latin-1").translate(self.byte_table)
    word = list(symbols[:-1]) + [symbols[-1] + _END_OF_WORD]
    return tuple(self.token_ids[token] for token in self._merge_word(word))

  def _encode(self, text: str) -> tuple[int, ...]:
    """The ids of `text` without START/END (cached per text)."""
    ids: list[int] = []
    for piece in self.split.findall(clean(text)):
      ids.extend(self.word_ids(piece))
    return tuple(ids)

  def decode(self, ids: Iterable[int]) -> str:
    """The cleaned text of a row of ids: START skipped, stops at END or padding."""
    data = bytearray()
    for token_id in ids:
      token_id = int(token_id)
      if token_id == END_TOKEN or token_id == PAD_TOKEN:
        break
      token = self.tokens[token_id]
      if token_id == START_TOKEN or token in self.special_ids:
        continue
      word_ends = token.endswith(_END_OF_WORD)
      data.extend(self.symbol_bytes[c] for c in token.removesuffix(_END_OF_WORD))
      if word_ends:
        data.extend(b" ")
    return data.decode("utf-8", errors="replace").strip()

  def __call__(self, texts: str | Sequence[str],
               context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """(N, context_length) int32: START, ids, END, zeros; too long rows end in END."""
    context_length = check_context_length(context_length)
    texts = [texts] if isinstance(texts, str) else list(texts)
    rows = np.zeros((len(texts), context_length), dtype=np.int32)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"texts[{i}] is a {type(text).__name__}; allowed: str")
      ids = (START_TOKEN,) + self.encode(text)
      ids = ids[:context_length - 1] + (END_TOKEN,)
      rows[i, :len(ids)] = ids
    return rows


def check_context_length(context_length: int) -> int:
  """`context_length` as an int >= 1, or a one-line ConfigError."""
  if isinstance(context_length, (bool, np.bool_)) or not isinstance(
      context_length, (int, np.integer)) or context_length < 1:
    raise ConfigError(f"context_length={context_length!r} is invalid; allowed: an integer >= 1 "
                      f"(CLIP models use {CONTEXT_LENGTH})")
  return int(context_length)


def vocab_path() -> str:
  """Where the vocabulary file is: $NMJAX_CLIP_VOCAB, else inside the installed open_clip_torch.

  open_clip is located, never imported (its package imports torch). DataError when absent.
  """
  override = os.environ.get(VOCAB_ENV)
  if override:
    if not os.path.isfile(override):
      raise DataError(f"{VOCAB_ENV}={override} is not a file; point it at {VOCAB_FILE} or unset "
                      f"it and run `bash scripts/bootstrap.sh`")
    return override
  for candidate in _installed_candidates():
    if os.path.isfile(candidate):
      return candidate
  raise DataError(f"CLIP vocabulary {VOCAB_FILE} not found (it ships in the open_clip_torch "
                  f"wheel); {_INSTALL_HINT}")


def _installed_candidates() -> Iterable[str]:
  """Paths the installed open_clip_torch may hold the file at (the package folder, then the
  distribution's file list; the second is slower, so it is read only when the first fails)."""
  try:
    spec = importlib.util.find_spec("open_clip")
  except (ImportError, ValueError):
    spec = None
  for folder in (spec.submodule_search_locations or ()) if spec else ():
    yield os.path.join(folder, VOCAB_FILE)
  try:
    files = importlib.metadata.files("open_clip_torch") or ()
  except importlib.metadata.PackageNotFoundError:
    files = ()
  for file in files:
    if file.name == VOCAB_FILE:
      yield str(file.locate())


@functools.lru_cache(maxsize=4)
def _tokenizer_for(override: str) -> Tokenizer:
  del override  # The cache key: a changed $NMJAX_CLIP_VOCAB builds (and keeps) another tokenizer.
  return Tokenizer.from_file(vocab_path())


def default_tokenizer() -> Tokenizer:
  """The tokenizer of `vocab_path()`, built on first use and shared (one per $NMJAX_CLIP_VOCAB)."""
  return _tokenizer_for(os.environ.get(VOCAB_ENV, ""))


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """CLIP token ids of `texts` (a str or a sequence of str): int32 (N, context_length).

  Equal to open_clip's `tokenize`: START (49406), the BPE ids, END (49407), zeros; a text longer
  than the context is cut and its last id set to END.
  """
  return default_tokenizer()(texts, context_length)
