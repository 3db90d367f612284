"""Text encoders (nmjax.models.text_encoders), their import from Hugging Face folders
(nmjax.convert.hf_text) and their tokenizers (nmjax.text), against the real transformers and
tokenizers libraries: tiny random BertModel, RobertaModel and GPT2Model built by transformers,
saved with save_pretrained and read by nmjax; token ids of vocabularies trained here with
tokenizers; the import job's text workdir; bad input refused with one line."""

import importlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the golden tests compare to PyTorch (tests extra)")
transformers = pytest.importorskip(
    "transformers", reason="the golden tests compare to transformers (tests extra)")
tokenizers = pytest.importorskip("tokenizers", reason="nmjax.text needs the text extra")

from nmjax import convert, jobs, models, text  # pylint: disable=g-import-not-at-top
from nmjax.convert import hf_text  # pylint: disable=g-import-not-at-top
from nmjax.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top
from nmjax.models.text_encoders import pool  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import_config = importlib.import_module("configs.import")  # `import` is a keyword.

SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37)
# Two rows: one padded after six real tokens, one full; ids inside the tiny vocabulary.
IDS = np.array([[2, 5, 7, 9, 11, 3, 0, 0], [2, 40, 41, 42, 43, 44, 45, 3]], np.int64)
MASK = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int64)
CORPUS = ["The quick brown fox jumps over the lazy dog.", "A man, a plan, a canal: Panama!",
          "Noisy labels hurt pre-training; NMTune repairs the features.",
          "Héllo wörld, naïve café au lait.", "Pairs of sentences entail or contradict."] * 10
TEXTS = ["The lazy fox, naïve!", "a canal Panama plan unknownword xyz", "short"]
PAIRS = ["quick brown dog jumps over", "A",
         "Noisy labels hurt pre-training, so NMTune repairs the features again and again"]


def _transformers_model(family, head=False):
  """A tiny random transformers model of `family` (a *For* model when `head`), eval mode."""
  torch.manual_seed(0)
  if family == "bert":
    config = transformers.BertConfig(max_position_embeddings=64, **SIZES)
    cls = transformers.BertForSequenceClassification if head else transformers.BertModel
  elif family == "roberta":
    config = transformers.RobertaConfig(max_position_embeddings=66, pad_token_id=1,
                                        type_vocab_size=1, layer_norm_eps=1e-5, **SIZES)
    cls = transformers.RobertaForMaskedLM if head else transformers.RobertaModel
  else:
    config = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64, n_inner=37)
    cls = transformers.GPT2LMHeadModel if head else transformers.GPT2Model
  return cls(config).eval()


def _batch(family):
  """IDS and MASK, RoBERTa's padding holding its pad id (1) as its tokenizer writes it."""
  return (np.where(MASK > 0, IDS, 1) if family == "roberta" else IDS), MASK


def _last_hidden_state(model, ids, mask):
  base = getattr(model, model.base_model_prefix, model)
  with torch.no_grad():
    return base(input_ids=torch.tensor(ids),
                attention_mask=torch.tensor(mask)).last_hidden_state.numpy()


def _relative(ours, reference):
  return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """{family: (folder, transformers model)} of BertModel, RobertaModel and GPT2Model."""
  out = {}
  for family in hf_text.MODEL_TYPES:
    folder = str(tmp_path_factory.mktemp(family))
    model = _transformers_model(family)
    model.save_pretrained(folder)
    out[family] = (folder, model)
  return out


# ---------------------------------------------------------------------------- golden outputs

@pytest.mark.parametrize("family", hf_text.MODEL_TYPES)
def test_imported_hidden_states_equal_transformers_on_a_padded_batch(saved, family):
  folder, reference_model = saved[family]
  model, variables = convert.load(folder)
  ids, mask = _batch(family)
  hidden, pooled = jax.jit(model.apply)(variables, jnp.asarray(ids), jnp.asarray(mask))
  reference = _last_hidden_state(reference_model, ids, mask)
  assert hidden.shape == reference.shape == (2, 8, 32) and hidden.dtype == jnp.float32
  # Everywhere, padding included: transformers defines every position given the mask (GPT-2's
  # padding is on the right, where the causal mask still sees the real tokens).
  assert _relative(hidden, reference) < 1e-5
  assert model.pooling == models.text_encoders.DEFAULT_POOLING[family]
  np.testing.assert_allclose(pooled, pool(hidden, jnp.asarray(mask), model.pooling), rtol=0,
                             atol=0)


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2"])
def test_a_for_model_loads_its_encoder_and_ignores_its_head(tmp_path, family):
  reference_model = _transformers_model(family, head=True)
  reference_model.save_pretrained(str(tmp_path))
  model, variables = convert.load(str(tmp_path))
  ids, mask = _batch(family)
  hidden, _ = jax.jit(model.apply)(variables, jnp.asarray(ids), jnp.asarray(mask))
  assert _relative(hidden, _last_hidden_state(reference_model, ids, mask)) < 1e-5


def test_pytorch_bin_and_sharded_safetensors_read_the_same(saved, tmp_path):
  folder, reference_model = saved["bert"]
  bin_folder, sharded = tmp_path / "bin", tmp_path / "sharded"
  bin_folder.mkdir()
  shutil.copy(os.path.join(folder, "config.json"), bin_folder)
  torch.save({f"bert.{k}": v for k, v in reference_model.state_dict().items()},
             bin_folder / "pytorch_model.bin")
  reference_model.save_pretrained(str(sharded), max_shard_size="20KB")
  assert (sharded / "model.safetensors.index.json").exists()
  _, expected = convert.load(folder)
  for other in (bin_folder, sharded):
    _, variables = convert.load(str(other))
    jax.tree.map(np.testing.assert_array_equal, variables, expected)


def test_pooling_cls_mean_last_match_numpy():
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]], np.int32)
  real = mask[..., None].astype(np.float32)
  np.testing.assert_array_equal(pool(hidden, mask, "cls"), hidden[:, 0])
  np.testing.assert_allclose(pool(hidden, mask, "mean"),
                             (hidden * real).sum(1) / real.sum(1), rtol=1e-6)
  np.testing.assert_array_equal(pool(hidden, mask, "last"), hidden[[0, 1, 2], [2, 4, 3]])


def test_registry_builds_each_family_in_bfloat16_with_float32_params():
  assert set(models.TEXT_MODELS) >= {"bert_base", "bert_large", "roberta_base", "gpt2"}
  assert models.get_text_model("bert_large").feature_dim == 1024
  config = models.TextConfig("gpt2", vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                             intermediate_size=32, max_positions=16, activation="gelu_new")
  ids, mask = jnp.asarray(IDS[:, :6] % 50), jnp.asarray(MASK[:, :6])
  full = models.get_text_model(config)
  variables = jax.jit(full.init)(jax.random.key(0), ids, mask)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  half = models.get_text_model(config, pooling="mean", dtype=jnp.bfloat16)
  hidden, pooled = jax.jit(half.apply)(variables, ids, mask)
  assert hidden.dtype == pooled.dtype == jnp.float32
  assert _relative(hidden, np.asarray(jax.jit(full.apply)(variables, ids, mask)[0])) < 5e-2
  with pytest.raises(ConfigError, match="text model 'bert_huge' is unknown; known text models"):
    models.get_text_model("bert_huge")
  with pytest.raises(ConfigError, match="pooling='max' is unknown; allowed: cls, mean, last"):
    models.get_text_model(config, pooling="max")
  with pytest.raises(ConfigError, match="longer than the 16 positions"):
    full.apply(variables, jnp.zeros((1, 17), jnp.int32), jnp.ones((1, 17), jnp.int32))


# --------------------------------------------------------------------------------- tokenizers

def _train(kind, folder):
  """A vocabulary trained here with tokenizers: BERT WordPiece (vocab.txt) or byte-level BPE
  (vocab.json + merges.txt) with RoBERTa's or GPT-2's special tokens."""
  os.makedirs(folder, exist_ok=True)
  if kind == "bert":
    trained = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    trained.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    trained.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    trained.train_from_iterator(CORPUS, tokenizers.trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    trained.model.save(folder)
    return transformers.BertTokenizer.from_pretrained(folder)
  trained = tokenizers.ByteLevelBPETokenizer()
  special = (["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if kind == "roberta"
             else ["<|endoftext|>"])
  trained.train_from_iterator(CORPUS, vocab_size=300, special_tokens=special)
  trained.save_model(folder)
  if kind == "roberta":
    return transformers.RobertaTokenizer.from_pretrained(folder)
  reference = transformers.GPT2Tokenizer.from_pretrained(folder)
  reference.pad_token = reference.eos_token  # GPT-2 has no pad token; nmjax pads with eos.
  return reference


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2"])
def test_token_ids_equal_the_transformers_tokenizer_single_and_pairs(tmp_path, kind):
  reference = _train(kind, str(tmp_path / "files"))
  reference.save_pretrained(str(tmp_path / "saved"))  # tokenizer.json + tokenizer_config.json
  for folder, source in ((tmp_path / "files", "vocab"), (tmp_path / "saved", "tokenizer.json")):
    ours = text.tokenizer(str(folder))
    assert ours.source.startswith(source)
    for args in ((TEXTS,), (TEXTS, PAIRS)):
      ids, mask, types = ours.encode_with_types(args[0], 12, pairs=args[1] if len(args) > 1
                                                else None)
      want = reference(*args, max_length=12, truncation=True, padding="max_length",
                       return_tensors="np")
      assert ids.dtype == mask.dtype == np.int32 and ids.shape == (3, 12)
      np.testing.assert_array_equal(ids, want["input_ids"])
      np.testing.assert_array_equal(mask, want["attention_mask"])
      if "token_type_ids" in want:
        np.testing.assert_array_equal(types, want["token_type_ids"])
    assert (ids[mask == 0] == ours.pad_id).all()


def test_tokenizer_refuses_missing_files_and_empty_text(tmp_path):
  with pytest.raises(DataError, match=r"has no tokenizer files; looked for tokenizer.json,"
                     r" vocab.txt, vocab.json \+ merges.txt") as refused:
    text.tokenizer(str(tmp_path))
  assert "\n" not in str(refused.value)
  _train("bert", str(tmp_path / "bert"))
  ours = text.tokenizer(str(tmp_path / "bert"))
  with pytest.raises(DataError, match=r"text 1 \(of 3\) is empty") as refused:
    ours.encode(["fine", "  ", "also fine"], 8)
  assert "\n" not in str(refused.value)
  with pytest.raises(DataError, match=r"second text of pair 0 \(of 1\) is empty"):
    ours.encode(["fine"], 8, pairs=[""])
  with pytest.raises(ConfigError, match="max_length=1 cannot hold"):
    ours.encode(["fine"], 1)


# ------------------------------------------------------------------------------- bad folders

def test_unknown_model_type_or_no_config_is_one_config_error_line(saved, tmp_path):
  shutil.copytree(saved["bert"][0], tmp_path / "t5")
  stated = json.loads((tmp_path / "t5" / "config.json").read_text())
  (tmp_path / "t5" / "config.json").write_text(json.dumps({**stated, "model_type": "t5"}))
  with pytest.raises(ConfigError, match="model_type='t5' is not a text encoder nmjax imports;"
                     " allowed: bert, roberta, gpt2") as refused:
    convert.load(str(tmp_path / "t5"))
  assert "\n" not in str(refused.value)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConfigError, match="has no config.json.*bert, roberta, gpt2"):
    convert.load(str(tmp_path / "empty"))


def test_missing_weights_are_one_line_with_counts_and_at_most_ten_names(saved, tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "bert"
  shutil.copytree(saved["bert"][0], folder)
  tensors = load_file(str(folder / "model.safetensors"))
  dropped = sorted(n for n in tensors if n.startswith("encoder.layer.1."))  # 16 weights
  save_file({n: v for n, v in tensors.items() if n not in dropped} | {"extra.weight": tensors[
      "embeddings.LayerNorm.bias"]}, str(folder / "model.safetensors"))
  with pytest.raises(DataError) as refused:
    convert.load(str(folder))
  message = str(refused.value)
  assert "\n" not in message
  assert f"missing {len(dropped)}: {', '.join(dropped[:10])} and {len(dropped) - 10} more" \
      in message
  assert "unexpected 1: extra.weight" in message and dropped[10] not in message


# ---------------------------------------------------------------------------- the import job

def test_import_job_writes_a_text_workdir_with_its_tokenizer(saved, tmp_path):
  folder = tmp_path / "gpt2"
  shutil.copytree(saved["gpt2"][0], folder)
  _train("gpt2", str(folder))  # vocab.json + merges.txt beside the weights
  np.savez(tmp_path / "acts.npz", ids=IDS, mask=MASK,
           hidden_states=_last_hidden_state(saved["gpt2"][1], IDS, MASK))
  config = import_config.get_config(f"source={folder}")
  config.reference = str(tmp_path / "acts.npz")
  workdir = str(tmp_path / "workdir")
  result = jobs.run(config, workdir)
  record = json.loads(open(os.path.join(workdir, "config.json")).read())
  assert result["written"] and result["differences"]["hidden_states"] < 1e-5
  assert (record["job"], record["model"], record["pooling"], record["tokenizer"]) == (
      "import", "gpt2", "last", "tokenizer")
  model = models.get_text_model(models.TextConfig(**record["text_config"]))
  assert model.feature_dim == 32
  copied = text.tokenizer(os.path.join(workdir, record["tokenizer"])).encode(TEXTS, 10)
  np.testing.assert_array_equal(copied, text.tokenizer(str(folder)).encode(TEXTS, 10))
  assert not jobs.run(config, workdir)["written"]  # The same import again writes nothing.
  config.arch = "resnet50"
  with pytest.raises(ConfigError, match="is a folder: a Hugging Face text model"):
    jobs.JOBS["import"].validate(config)


def test_import_job_exits_2_with_one_line_for_an_unknown_model_type(saved, tmp_path):
  shutil.copytree(saved["bert"][0], tmp_path / "t5")
  stated = json.loads((tmp_path / "t5" / "config.json").read_text())
  (tmp_path / "t5" / "config.json").write_text(json.dumps({**stated, "model_type": "t5"}))
  done = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/import.py",
       f"--config.source={tmp_path / 't5'}", f"--workdir={tmp_path / 'out'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 2, done.stderr[-2000:]
  lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "model_type='t5'" in lines[0] and "bert, roberta, gpt2" in lines[0]
  assert not (tmp_path / "out" / "config.json").exists()
