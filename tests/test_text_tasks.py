"""Text tasks end to end: sets the test writes as jsonl, csv and tsv files (in domain and out of
domain), a GLUE-like TFDS dataset the test prepares and nmjax reads without TensorFlow, a tiny
random BERT saved by transformers with a WordPiece vocabulary trained by `tokenizers`, the
transfer and NMTune jobs on its features (cached by the encoder's content), and bad text files
refused with one line and exit code 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from nmjax import encoder as encoder_lib, jobs, tasks
from nmjax.data import text_sources
from nmjax.errors import ConfigError, DataError
from nmjax.jobs import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import text_transfer  # pylint: disable=wrong-import-position

POSITIVE = ("good", "great", "fine", "nice", "lovely", "superb")
NEGATIVE = ("bad", "awful", "poor", "sad", "dull", "boring")
FILLER = ("the", "film", "was", "a", "story", "plot", "acting", "really", "quite", "so")
SHIFTED = ("the", "phone", "battery", "was", "screen", "camera", "really", "quite", "so")


def _sentences(count, filler, seed):
  """(text, label 0 negative / 1 positive) pairs: filler words around one sentiment word."""
  rng = np.random.default_rng(seed)
  for i in range(count):
    label = i % 2
    words = list(rng.choice(filler, size=4))
    words.insert(int(rng.integers(0, 5)), str(rng.choice(POSITIVE if label else NEGATIVE)))
    yield " ".join(words), label


def _write(path, rows, kind):
  """rows of (text, label) as jsonl (label names), csv (label indices) or tsv (label names)."""
  names = ("negative", "positive")
  with open(path, "w", encoding="utf-8") as f:
    if kind == "jsonl":
      f.writelines(json.dumps({"sentence": t, "label": names[y]}) + "\n" for t, y in rows)
    else:
      sep = "," if kind == "csv" else "\t"
      f.write(f"sentence{sep}label\n")
      f.writelines(f"{t}{sep}{y if kind == 'csv' else names[y]}\n" for t, y in rows)
  return str(path)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  """A random 2-layer BERT (hidden 32) saved by transformers, with a WordPiece vocabulary."""
  transformers = pytest.importorskip("transformers", reason="transformers builds the test BERT")
  tokenizers = pytest.importorskip("tokenizers", reason="tokenizers trains the test vocabulary")
  import torch  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp("tiny_bert")
  wordpiece = tokenizers.BertWordPieceTokenizer(lowercase=True)
  wordpiece.train_from_iterator([" ".join(POSITIVE + NEGATIVE + FILLER + SHIFTED)] * 4,
                                vocab_size=200, min_frequency=1)
  wordpiece.save_model(str(folder))  # vocab.txt
  torch.manual_seed(0)
  config = transformers.BertConfig(
      vocab_size=wordpiece.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
  transformers.BertModel(config).eval().save_pretrained(str(folder))
  return str(folder)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
  """A set the test writes: train (jsonl) and test (csv) in domain, and an out-of-domain (tsv)
  set of other filler words."""
  folder = tmp_path_factory.mktemp("text_files")
  return {"train": _write(folder / "train.jsonl", _sentences(48, FILLER, 0), "jsonl"),
          "test": _write(folder / "test.csv", _sentences(24, FILLER, 1), "csv"),
          "ood": _write(folder / "shifted.tsv", _sentences(24, SHIFTED, 2), "tsv")}


def _config(model, files, arg="", **fields):
  """configs/text_transfer.py's smoke variant on the sets `toy` (train and test files) and
  `shifted` (an out-of-domain test of toy's train split)."""
  config = text_transfer.get_config(f"smoke,files=toy+shifted,tasks=files,model={model}"
                                    + (f",{arg}" if arg else ""))
  config.text_files.toy.train = files["train"]
  config.text_files.toy.test = files["test"]
  config.text_files.toy.label_names = "negative,positive"
  config.text_files.shifted.test = files["ood"]
  config.text_files.shifted.train_task = "toy"
  config.text_files.shifted.label_names = "negative,positive"
  for key, value in fields.items():
    config[key] = value
  return config


def _rows(workdir):
  with open(os.path.join(workdir, "results.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_transfer_and_nmtune_jobs_on_text_files_with_features_cached_once(tiny_bert, text_files,
                                                                         tmp_path):
  first = jobs.run(_config(tiny_bert, text_files, "job=transfer"), str(tmp_path / "transfer"))
  rows = _rows(tmp_path / "transfer")
  assert [(r["task"], r["kind"], r["method"]) for r in rows] == [
      ("toy", "id", "lp"), ("toy", "id", "ridge"), ("toy_to_shifted", "ood", "lp"),
      ("toy_to_shifted", "ood", "ridge")]
  for row in rows:
    assert 0.0 <= row["accuracy"] <= 1.0 and row["feature_dim"] == 32
    assert np.isfinite(row["sve"]) and 0.0 < row["lsvr"] <= 1.0
    assert row["model"] == "bert" and row["checkpoint"] == tiny_bert
  assert (rows[0]["num_train"], rows[0]["num_test"], rows[2]["num_test"]) == (48, 24, 24)
  assert rows[1]["accuracy"] >= 0.75  # ridge tells the sentiment words apart, in domain.
  assert first["features_extracted"] == 3  # toy train and test, shifted test
  table = (tmp_path / "transfer" / "results.md").read_text()
  assert "| toy_to_shifted | ood |" in table and "OOD avg" in table
  assert (tmp_path / "transfer" / "heads" / "toy" / "ridge" / "head.json").is_file()

  config = _config(tiny_bert, text_files, methods="lp,mlp,nmtune", epochs=3)
  tuned = jobs.run(config, str(tmp_path / "nmtune"))
  assert tuned["features_extracted"] == 0  # The same encoder, pooling, tokens and files.
  rows = _rows(tmp_path / "nmtune")
  assert [(r["task"], r["method"]) for r in rows] == [
      (t, m) for t in ("toy", "toy_to_shifted") for m in ("lp", "mlp", "nmtune")]
  assert all(r["views"] == "features" and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
  assert "| nmtune |" in (tmp_path / "nmtune" / "results.md").read_text()
  assert (tmp_path / "nmtune" / "heads" / "toy_to_shifted" / "nmtune" / "head.json").is_file()

  # Another pooling is another encoder: its features are extracted again.
  again = jobs.run(_config(tiny_bert, text_files, "job=transfer,pooling=mean", methods="ridge"),
                   str(tmp_path / "mean"))
  assert again["features_extracted"] == 3


def test_an_import_workdir_of_the_folder_is_the_same_encoder(tiny_bert, text_files, tmp_path):
  imported = tmp_path / "import"
  jobs.run(cli.load_config(f"{ROOT}/configs/import.py:source={tiny_bert}"), str(imported))
  config = _config(str(imported), text_files, "job=transfer", methods="ridge")
  from_workdir = jobs.run(config, str(tmp_path / "transfer"))
  from_folder = jobs.run(_config(tiny_bert, text_files, "job=transfer", methods="ridge"),
                         str(tmp_path / "folder"))
  assert [r["accuracy"] for r in from_workdir["rows"]] == [
      r["accuracy"] for r in from_folder["rows"]]
  # One content digest (weights, architecture, pooling, tokens, tokenizer files) for both.
  digests = os.listdir(imported / "features")
  assert len(digests) == 1 and digests[0] in os.listdir(os.path.join(tiny_bert, "features"))


def _tiny_gpt2(folder):
  """A random 2-layer GPT-2 (hidden 32) with a byte-level BPE vocabulary, saved by transformers."""
  transformers = pytest.importorskip("transformers", reason="transformers builds the test GPT-2")
  tokenizers = pytest.importorskip("tokenizers", reason="tokenizers trains the test vocabulary")
  import torch  # pylint: disable=g-import-not-at-top
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator([" ".join(FILLER + POSITIVE + NEGATIVE + ("not", "no"))] * 4,
                          vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
  folder.mkdir()
  bpe.save_model(str(folder))  # vocab.json, merges.txt
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_embd=32, n_layer=2,
                                   n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
  transformers.GPT2Model(config).eval().save_pretrained(str(folder))
  return str(folder)


def test_a_pair_task_on_gpt2_pools_its_last_token(tmp_path):
  model = _tiny_gpt2(tmp_path / "gpt2")
  names = ("entailment", "neutral", "contradiction")
  rows = []
  for i, (text, _) in enumerate(_sentences(60, FILLER, 5)):
    hypothesis = (text, text + " so", "not " + text)[i % 3]
    rows.append(json.dumps({"premise": text, "hypothesis": hypothesis, "label": names[i % 3]}))
  (tmp_path / "nli.jsonl").write_text("\n".join(rows[:40]) + "\n", encoding="utf-8")
  (tmp_path / "nli_test.jsonl").write_text("\n".join(rows[40:]) + "\n", encoding="utf-8")
  config = text_transfer.get_config(f"smoke,job=transfer,files=nli,tasks=nli,model={model}")
  config.methods = "ridge"
  nli = config.text_files.nli
  nli.train, nli.test = str(tmp_path / "nli.jsonl"), str(tmp_path / "nli_test.jsonl")
  nli.text_field, nli.pair_field, nli.label_names = "premise", "hypothesis", ",".join(names)
  result = jobs.run(config, str(tmp_path / "out"))
  assert [(r["task"], r["model"], r["num_classes"], r["num_train"]) for r in result["rows"]] == [
      ("nli", "gpt2", 3, 40)]
  encoder = encoder_lib.load(model, max_length=32)
  assert encoder.text.model.pooling == "last" and encoder.feature_dim == 32


class FakeGlue(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """GLUE's sst2 config as TFDS lays it out (sentence, label, idx), written by the test."""

  name = "glue"
  VERSION = tfds.core.Version("2.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="sst2")]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "sentence": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=["negative", "positive"]),
        "idx": np.int32}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(40, 3), "validation": self._generate_examples(20, 4)}

  def _generate_examples(self, count, seed):
    for i, (text, label) in enumerate(_sentences(count, FILLER, seed)):
      yield i, {"sentence": text, "label": label, "idx": i}


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  FakeGlue(config="sst2", data_dir=str(data_dir / "tfds")).download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(data_dir)


def test_a_glue_like_tfds_dataset_is_read_without_tensorflow(glue_dir):
  script = ("import sys; from nmjax.data import text_sources as t;"
            f" s = t.get_source('glue/sst2', data_dir={glue_dir!r});"
            " v = s.split('validation');"
            " print(s.info.class_names, s.info.text_fields, len(v), v.texts[0]);"
            " assert 'tensorflow' not in sys.modules")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False)
  assert out.returncode == 0, out.stderr
  assert "('negative', 'positive') ('sentence',) 20 " in out.stdout
  source = text_sources.get_source("glue/sst2", data_dir=glue_dir)
  train = source.split("train")
  assert len(train) == 40 and train.pairs is None and set(train.labels) == {0, 1}
  assert tasks.TASKS["glue_sst2"].test[0].split == "validation"


def test_a_glue_task_runs_on_the_prepared_dataset(tiny_bert, glue_dir, tmp_path):
  config = text_transfer.get_config(f"smoke,job=transfer,tasks=glue_sst2,model={tiny_bert}")
  config.methods = "ridge"
  config.data_dir = glue_dir
  rows = jobs.run(config, str(tmp_path))["rows"]
  assert [(r["task"], r["kind"], r["num_train"], r["num_test"]) for r in rows] == [
      ("glue_sst2", "id", 40, 20)]
  missing = text_transfer.get_config(f"smoke,tasks=glue_mnli,model={tiny_bert}")
  missing.data_dir = glue_dir
  with pytest.raises(DataError, match="tfds build glue/mnli --data_dir="):
    jobs.run(missing, str(tmp_path / "mnli"))


def _bad(folder, name, text):
  path = folder / name
  path.write_text(text, encoding="utf-8")
  return str(path)


def test_bad_text_files_fail_with_one_line_naming_file_line_and_field(tiny_bert, text_files,
                                                                      tmp_path):
  cases = {
      "missing field": (_bad(tmp_path, "a.csv", "text,label\ngood film,1\n"),
                        r"a.csv line 2: field 'sentence' is missing \(fields: text, label\)"),
      "label outside the set": (_bad(tmp_path, "b.jsonl", '{"sentence": "ok", "label": 1}\n'
                                     '{"sentence": "meh", "label": "neutral"}\n'),
                                r"b.jsonl line 2 field 'label': label 'neutral' is not in the"
                                r" label set \(negative, positive\)"),
      "empty text": (_bad(tmp_path, "c.tsv", "sentence\tlabel\ngood\t1\n \t0\n"),
                     r"c.tsv line 3 field 'sentence': empty text"),
  }
  for what, (path, message) in cases.items():
    config = _config(tiny_bert, text_files)
    config.text_files.shifted.test = path
    with pytest.raises(DataError, match=message) as caught:
      jobs.run(config, str(tmp_path / what.replace(" ", "_")))
    assert "\n" not in str(caught.value), what
  assert not (tmp_path / "missing_field" / "results.jsonl").exists()
  config = _config(tiny_bert, text_files)
  config.text_files.toy.label_names = "positive"
  with pytest.raises(ConfigError, match="config.text_files.toy.label_names='positive' is not"):
    jobs.validate(config)


def test_cli_refuses_a_missing_field_with_one_line_and_exit_code_2(tiny_bert, text_files,
                                                                   tmp_path):
  bad = _bad(tmp_path, "bad.jsonl", '{"text": "good film", "label": 1}\n')
  out = subprocess.run(
      [sys.executable, "main.py",
       f"--config=configs/text_transfer.py:smoke,files=toy,tasks=files,model={tiny_bert}",
       f"--config.text_files.toy.train={text_files['train']}",
       f"--config.text_files.toy.test={bad}",
       "--config.text_files.toy.label_names=negative,positive", f"--workdir={tmp_path / 'out'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "Traceback" not in out.stderr, out.stderr
  assert f"text file {bad} line 1: field 'sentence' is missing" in lines[-1]
