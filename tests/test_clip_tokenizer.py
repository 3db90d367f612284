"""CLIP tokenizer: ids equal to the reference's (open_clip's tokenizer.py, loaded by file
path where torch is installed), literal ids, truncation, shapes, input forms, validation, and
missing or malformed vocabulary files."""

import gzip
import importlib.util
import os
import random

import numpy as np
import pytest

from nmjax.clip import tokenizer as clip_tokenizer
from nmjax.clip.tokenizer import END_TOKEN, START_TOKEN, VOCAB_SIZE, tokenize
from nmjax.errors import ConfigError, DataError

# Ids written once from open_clip 3.3.0's `tokenize` (START ... END; the rest of the row is 0).
LITERAL_IDS = {
    "a photo of a cat.": [49406, 320, 1125, 539, 320, 2368, 269, 49407],
    "Don't stop!": [49406, 847, 713, 1691, 256, 49407],
    "café &amp; 日本 🙂": [49406, 15304, 261, 39121, 19277, 361, 14860, 49407],
    "": [49406, 49407],
}

VARIED_TEXTS = [
    "a photo of a cat.",
    "A Photo Of A CAT",
    "Hello, world! (really?) -- yes; #1 @home",
    "3.14159 1,000,000 2024-01-31 42nd",
    "don't I'm you're we've they'll she'd it's DON'T",
    "café naïve résumé Ångström crème brûlée",
    "日本語のテキスト 中文字符 한국어",
    "🙂👍🏽 emoji 🎉🇫🇷 family 👨‍👩‍👧",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &amp;amp; &quot;quoted&quot; &#39;",
    "schÃ¶n Ã©tÃ© â€œquotesâ€\x9d",  # mojibake that ftfy repairs
    "  lots   of\n\nnewlines\tand\t\ttabs  \r\n end ",
    "",
    "   ",
    "word " * 120,  # longer than the context: truncated with END kept
    "<start_of_text> literal special tokens <end_of_text>",
    "İstanbul STRASSE straße ﬁne ＦＵＬＬＷＩＤＴＨ",
    "control\x00chars\x1fand\x7fdel",
    "'S 'LL 'ſ ' lone apostrophe '",
    "e\u0301 combining accent, \u200bzero width",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def _random_texts(count, seed=0):
  alphabet = "abcXYZ019 .,'!?-_\n\té日🙂&;<>ßİ\u0301\x1f"
  rng = random.Random(seed)
  return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def reference():
  """open_clip's tokenizer module from the installed wheel, by path (its package would import
  models and more); it imports torch itself, so the comparison needs torch."""
  pytest.importorskip("torch")
  path = os.path.join(os.path.dirname(clip_tokenizer.vocab_path()), "tokenizer.py")
  if not os.path.isfile(path):
    pytest.skip(f"no open_clip tokenizer.py beside the vocabulary ({path})")
  spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("context_length", [77, 16, 5, 1])
def test_ids_equal_reference_on_varied_texts(reference, context_length):
  texts = VARIED_TEXTS + _random_texts(300, seed=context_length)
  expected = reference.tokenize(texts, context_length=context_length).numpy()
  ids = tokenize(texts, context_length)
  for text, want, got in zip(texts, expected, ids):
    assert got.tolist() == want.tolist(), repr(text)


def test_literal_ids_equal_reference(reference):
  for text, want in LITERAL_IDS.items():
    row = reference.tokenize(text)[0].numpy()
    assert row[:len(want)].tolist() == want and not row[len(want):].any(), repr(text)


@pytest.mark.parametrize("text", list(LITERAL_IDS))
def test_literal_ids(text):
  want = LITERAL_IDS[text]
  row = tokenize(text)[0]
  assert row[:len(want)].tolist() == want
  assert not row[len(want):].any()


def test_shape_dtype_and_range():
  # Literal "<end_of_text>" in a text is END, as in the reference; left out for the END count.
  texts = [t for t in VARIED_TEXTS if "_of_text>" not in t]
  ids = tokenize(texts)
  assert ids.shape == (len(texts), 77) and ids.dtype == np.int32
  assert ids.min() >= 0 and ids.max() < VOCAB_SIZE
  assert (ids[:, 0] == START_TOKEN).all()
  # Exactly one END per row; everything after it is padding.
  assert ((ids == END_TOKEN).sum(axis=1) == 1).all()
  end = np.argmax(ids == END_TOKEN, axis=1)
  assert tokenize(VARIED_TEXTS).shape == (len(VARIED_TEXTS), 77)
  assert not (ids * (np.arange(77) > end[:, None])).any()


def test_truncation_keeps_end_token_last():
  ids = tokenize("a photo of a cat.", context_length=5)
  assert ids.tolist() == [[49406, 320, 1125, 539, 49407]]
  long_row = tokenize("word " * 120)[0]
  assert long_row[-1] == END_TOKEN and (long_row[1:-1] != 0).all()
  assert tokenize("anything", context_length=1).tolist() == [[END_TOKEN]]
  # A text that exactly fills the context is not cut.
  assert tokenize("a photo of a cat.", context_length=8)[0].tolist() == LITERAL_IDS[
      "a photo of a cat."]


def test_str_list_tuple_and_array_inputs_agree():
  texts = ["a photo of a cat.", "Don't stop!"]
  single = tokenize(texts[0])
  assert single.shape == (1, 77)
  np.testing.assert_array_equal(tokenize(texts)[:1], single)
  np.testing.assert_array_equal(tokenize(tuple(texts)), tokenize(texts))
  np.testing.assert_array_equal(tokenize(np.array(texts)), tokenize(texts))
  assert tokenize([]).shape == (0, 77) and tokenize([]).dtype == np.int32


def test_cleaning_rules():
  same = ["a photo of a cat.", "  A   PHOTO\nof\ta cat.  ", "a photo of a cat&#46;",
          "a photo of a cat&amp;#46;"]
  rows = tokenize(same)
  assert (rows == rows[0]).all()
  assert tokenize("schÃ¶n").tolist() == tokenize("schön").tolist()  # ftfy's mojibake repair


def test_decode_gives_cleaned_text_with_words_split():
  tok = clip_tokenizer.default_tokenizer()
  assert tok.decode(tokenize("  A Big\tDOG ")[0]) == "a big dog"
  assert tok.decode(tokenize("café 日本 🙂")[0]) == "café 日本 🙂"
  assert tok.decode(tokenize("a photo of a cat.")[0]) == "a photo of a cat ."


@pytest.mark.parametrize("bad", [0, -3, 7.5, "77", None, True])
def test_bad_context_length_is_one_line_error(bad):
  with pytest.raises(ConfigError, match="context_length") as error:
    tokenize("a cat", context_length=bad)
  assert "\n" not in str(error.value)


def test_non_string_text_is_refused():
  with pytest.raises(TypeError, match=r"texts\[1\]"):
    tokenize(["a cat", b"bytes"])


def test_missing_vocabulary_names_bootstrap(monkeypatch, tmp_path):
  monkeypatch.setenv(clip_tokenizer.VOCAB_ENV, str(tmp_path / "absent.txt.gz"))
  with pytest.raises(DataError, match="bootstrap.sh") as error:
    tokenize("a cat")
  assert "\n" not in str(error.value)
  monkeypatch.delenv(clip_tokenizer.VOCAB_ENV)
  monkeypatch.setattr(clip_tokenizer.importlib.util, "find_spec", lambda name: None)
  monkeypatch.setattr(clip_tokenizer.importlib.metadata, "files", lambda name: None)
  with pytest.raises(DataError, match="bootstrap.sh"):
    clip_tokenizer.vocab_path()


def test_malformed_vocabulary_is_data_error(monkeypatch, tmp_path):
  not_gzip = tmp_path / "plain.txt.gz"
  not_gzip.write_text("not gzip")
  short = tmp_path / "short.txt.gz"
  with gzip.open(short, "wt") as f:
    f.write("#version: 0.2\na b\n")
  for path in (not_gzip, short):
    monkeypatch.setenv(clip_tokenizer.VOCAB_ENV, str(path))
    with pytest.raises(DataError, match=str(path)):
      tokenize("a cat")


def test_vocabulary_override_is_used(monkeypatch, tmp_path):
  copy = tmp_path / "vocab.txt.gz"
  with open(clip_tokenizer.vocab_path(), "rb") as src:
    copy.write_bytes(src.read())
  monkeypatch.setenv(clip_tokenizer.VOCAB_ENV, str(copy))
  assert clip_tokenizer.vocab_path() == str(copy)
  assert tokenize("a photo of a cat.")[0, :8].tolist() == LITERAL_IDS["a photo of a cat."]
