"""Mistakes a researcher makes and faults of the machine, each answered with one line: config
typos at any level (main.py's flag parsing, exit code 2), unreadable features and cache files,
labels that would size an absurd head, test classes never seen in train, huge features, a full
disk and a folder that cannot be written (no temporary file left behind)."""

import errno
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nmjax import encoder as encoder_lib, errors, features, jobs, nmtune, probe
from nmjax import io as nmjax_io
from nmjax import tasks as tasks_lib
from nmjax.data import fashion_mnist, sources
from nmjax.errors import ConfigError, DataError, NmjaxError
from nmjax.jobs import tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import nmtune as nmtune_config  # pylint: disable=wrong-import-position
from configs import pretrain as pretrain_config  # pylint: disable=wrong-import-position


def _main(args, tmp_path, timeout=60):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args,
                         f"--workdir={tmp_path / 'out'}"], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, env=env)


def _one_line(done, expected):
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2, done.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
  assert expected in lines[0], lines[0]
  assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------ config flags (CLI)


@pytest.mark.parametrize("args, expected", [
    (["--config.foo=1"], "config has no field 'foo'; its fields: data_dir, job, methods,"),
    (["--config.nmtune.foo=1"], "config.nmtune has no field 'foo'; its fields: batch_size,"),
    (["--config.nmtune.epocs=3"], "did you mean config.nmtune.epochs?"),
    (["--config.batch_size=abc"], "config has no field 'batch_size'; it lives at"
                                  " config.nmtune.batch_size, config.nmtune.lp.batch_size and"
                                  " config.pretrain.batch_size"),
    (["--config.pretrain.noise_ratio=0.1"], "config.pretrain has no field 'noise_ratio'; the study"
                                            " sets it for each stage itself; set"
                                            " config.noise_ratios instead"),
    (["--config.nmtune.epochs.x=1"], "config.nmtune.epochs is a single value (int)"),
    (["--config", "configs/nmtune.py", "--config.epochs=abc"],
     "--config.epochs=abc: config.epochs is an integer (now 30), and 'abc' is not"),
    (["--config", "configs/pretrain.py", "--config.flip=maybe"], "config.flip is true or false"),
    (["--config", "configs/pretrain.py", "--config.epochs=3"],
     "config has no field 'epochs'; did you mean config.num_epochs"),
    (["--config", "configs/pretrain.py:smok"],
     "config argument 'smok' is unknown; did you mean smoke?"),
    (["--config", "configs/pretrian.py"],
     "config file configs/pretrian.py does not exist; did you mean configs/pretrain.py"),
    (["--config", "configs"], "configs is a directory, not a config file"),
    (["--nosuchflag=1"], "Unknown command line flag 'nosuchflag'"),
    (["stray"], "unexpected arguments: stray"),
])
def test_config_flag_mistakes_give_one_line_and_exit_2(args, expected, tmp_path):
  _one_line(_main(args, tmp_path), expected)
  assert not os.listdir(tmp_path)  # Nothing written, not even the workdir.


def test_help_still_works(tmp_path):
  done = _main(["--helpfull"], tmp_path)
  assert "--config" in done.stdout and "Traceback" not in done.stderr


def test_an_error_inside_a_job_gives_one_line_and_exit_2(tmp_path):
  """Past flag parsing, through main(): a plain .npy given as features (jax is imported here,
  so this is the one such subprocess)."""
  np.save(tmp_path / "train.npy", np.ones((4, 2)))
  done = _main(["--config", "configs/nmtune.py", f"--config.train_features={tmp_path}/train.npy",
                f"--config.test_features={tmp_path}/train.npy"], tmp_path, timeout=120)
  _one_line(done, f"features file {tmp_path}/train.npy is a single .npy array")
  assert "allow_pickle" not in done.stderr


# ------------------------------------------------------------------------ features files


def _blobs(num_examples=120, dim=8, num_classes=4, seed=0):
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(99).normal(size=(num_classes, dim)) * 3.0
  labels = np.arange(num_examples) % num_classes
  return (centers[labels] + rng.normal(size=(num_examples, dim))).astype(np.float32), labels


def test_files_that_are_not_features_files_are_named(tmp_path):
  x, y = _blobs()
  good = features.save(tmp_path / "good.npz", x, y)
  data = open(good, "rb").read()
  (tmp_path / "truncated.npz").write_bytes(data[:len(data) // 2])
  (tmp_path / "text.npz").write_text("features,labels\n1,2\n")
  np.save(tmp_path / "plain.npy", x)
  (tmp_path / "folder.npz").mkdir()
  cases = {
      "truncated.npz": "cannot be read as .npz (truncated or damaged: BadZipFile)",
      "text.npz": "cannot be read: it is not an .npz file (no zip header)",
      "plain.npy": "is a single .npy array; a features file is an .npz",
      "folder.npz": "is a directory, not an .npz file",
      "missing.npz": "does not exist",
  }
  for name, expected in cases.items():
    with pytest.raises(DataError) as error:
      features.load(tmp_path / name)
    text = str(error.value)
    assert text == f"features file {tmp_path / name} {expected}" or (
        text.startswith(f"features file {tmp_path / name} {expected}")), text
    assert "\n" not in text and "allow_pickle" not in text


def test_a_truncated_cached_features_file_is_named_and_extracted_again(checkpoint, tmp_path,
                                                                      capsys):
  own = tmp_path / "pretrain"  # A private copy: its feature cache is broken on purpose.
  shutil.copytree(checkpoint, own, ignore=shutil.ignore_patterns("features", ".lock*"))
  enc = encoder_lib.load(str(own))

  def cache():
    return encoder_lib.FeatureCache(enc, str(tmp_path), batch_size=200, max_examples=100,
                                    data_dir=None, mesh=None)

  split = tasks_lib.resolve("digits")[0].train
  first = cache().get(split)
  path = cache().path(split)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 3])
  again = cache()
  second = again.get(split)
  assert again.extracted == 1
  np.testing.assert_array_equal(first.features, second.features)
  assert (f"ignoring a bad cached features file (features file {path} cannot be read as .npz"
          in capsys.readouterr().out)
  assert features.load(path).num_examples == 100  # Written whole again.


# ---------------------------------------------------------------- classes sized from the data


def _stray(labels, row=17, value=999999):
  labels = labels.copy()
  labels[row] = value
  return labels


@pytest.mark.parametrize("fit", [probe.linear_probe, probe.ridge_probe,
                                 lambda train, test: nmtune.fit(train, test, {"batch_size": 32})])
def test_a_stray_label_is_refused_naming_it_and_its_row(fit):
  x, y = _blobs()
  with pytest.raises(DataError, match=r"train features: label 999999 in row 17 is far past the"
                     r" others \(the next largest is 3; 5 distinct labels\), so the head would"
                     r" have 1,000,000 classes") as error:
    fit((x, _stray(y)), (x, y))
  assert "\n" not in str(error.value)
  with pytest.raises(DataError, match=r"test features: labels outside \[0, 4\): label 999999 in"
                     r" row 17 is outside the 4 classes inferred from the train labels"):
    fit((x, y), (x, _stray(y)))


def test_labels_with_room_for_missing_classes_are_accepted():
  """A split that lacks a few classes is no stray label; a test split of a class subset is fine."""
  x, y = _blobs(num_classes=10)
  kept = y != 5  # Class 5 absent: 9 distinct labels, 10 classes.
  result = probe.ridge_probe((x[kept], y[kept]), (x[y >= 8], y[y >= 8]))
  assert result["num_classes"] == 10 and 0.0 <= result["accuracy"] <= 1.0


def test_num_classes_past_the_limit_is_refused():
  x, y = _blobs()
  with pytest.raises(ConfigError, match=r"config.num_classes=1000000 is out of range; allowed:"
                     r" 2 <= num_classes <= 100000"):
    probe.ridge_probe((x, y), (x, y), {"num_classes": 10 ** 6})
  with pytest.raises(ConfigError, match="config.num_classes=1000000 is out of range"):
    nmtune.fit((x, y), (x, y), {"num_classes": 10 ** 6})
  with pytest.raises(DataError, match="label 150000 in row 3 is past nmjax's limit of 100,000"):
    features.save("/nonexistent/never.npz", x, _stray(y, 3, 150000))


def _files(tmp_path, train_labels, test_labels):
  x, _ = _blobs()
  train, test = str(tmp_path / "train.npz"), str(tmp_path / "test.npz")
  np.savez(train, features=x, labels=train_labels)  # features.save refuses a stray label.
  np.savez(test, features=x, labels=test_labels)
  config = nmtune_config.get_config()
  config.train_features, config.test_features = train, test
  config.methods = "lp,nmtune"
  return config


def test_the_nmtune_job_refuses_bad_classes_before_any_method(tmp_path):
  _, y = _blobs()
  cases = [
      (_stray(y), y, r"features file .*train.npz: label 999999 in row 17 is far past the others"),
      (y, _stray(y, 5, 4), r"features file .*test.npz: labels outside \[0, 4\): label 4 in"
                           r" row 5 is outside the 4 classes inferred"),
      # Class 2 lies inside [0, 4) but has no train example: no method could predict it.
      (np.where(y == 2, 3, y), y, r"test features file .*test.npz: label 2 in row 2 never occurs"
                                  r" in the train features file .*train.npz \(30 test rows of 1"
                                  r" such classes\)"),
  ]
  for i, (train_labels, test_labels, match) in enumerate(cases):
    workdir = tmp_path / f"out{i}"
    with pytest.raises(DataError, match=match):
      jobs.run(_files(tmp_path, train_labels, test_labels), str(workdir))
    assert not (workdir / "results.jsonl").exists()  # No method ran, no line appended.


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_huge_features_get_a_warning_line(capsys):
  x, y = _blobs()
  probe.ridge_probe((x * 1e19, y), (x, y))
  warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
  assert len(warnings) == 1 and re.fullmatch(
      r"warning: probe train features: features reach \S+e\+\d\d in absolute value \(over 1e\+08\);"
      r" float32 products of such values overflow, so the results may be at chance level;"
      r" rescale the features \(e.g. divide by their standard deviation\)", warnings[0]), warnings
  probe.ridge_probe((x, y), (x, y))
  assert "warning:" not in capsys.readouterr().err


# ------------------------------------------------------------------------ pre-training workdirs


def test_a_file_given_as_checkpoint_is_named_as_a_file(tmp_path):
  (tmp_path / "model.npz").write_bytes(b"x")
  with pytest.raises(ConfigError, match=f"config.checkpoint={tmp_path}/model.npz is a file, not a"
                                        " pre-training workdir"):
    encoder_lib.load(str(tmp_path / "model.npz"))


def test_a_truncated_config_json_is_named(checkpoint, tmp_path):
  workdir = tmp_path / "pretrain"
  shutil.copytree(checkpoint, workdir)
  path = workdir / "config.json"
  path.write_text(path.read_text()[:40])
  with pytest.raises(DataError, match=f"config.checkpoint={workdir}: {path} cannot be read"
                                      r" \(JSONDecodeError\)"):
    encoder_lib.load(str(workdir))
  # A resume in that workdir is refused too, naming it (nmjax.train.supervised).
  with pytest.raises(ConfigError, match=f"--workdir={workdir} .*config.json") as error:
    jobs.run(pretrain_config.get_config("dataset=digits,noise=0.1,smoke"), str(workdir))
  assert "\n" not in str(error.value)


# ------------------------------------------------------------- a full disk, unwritable folders


def _enospc(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


class _FullDiskFile:
  """A file whose writes fail like a full disk's (after creating the file)."""

  def __init__(self, path, *args, **kwargs):
    self._file = open(path, *args, **kwargs)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._file.close()

  def write(self, data):
    self._file.write(data[:3])
    _enospc()


def test_a_full_disk_leaves_no_temporary_file_and_names_the_path(tmp_path, monkeypatch):
  monkeypatch.setattr(nmjax_io.files, "open", _FullDiskFile, raising=False)
  target = tmp_path / "config.json"
  with pytest.raises(OSError) as error:
    nmjax_io.write_json(target, {"a": 1})
  assert error.value.errno == errno.ENOSPC and error.value.filename == str(target)
  assert not os.listdir(tmp_path)
  monkeypatch.undo()

  def torn_savez(path, **arrays):
    with open(path, "wb") as f:
      f.write(b"PK\x03\x04 half")
    _enospc()

  monkeypatch.setattr(np, "savez", torn_savez)
  x, y = _blobs()
  with pytest.raises(OSError) as error:
    features.save(tmp_path / "f.npz", x, y)
  assert error.value.filename == str(tmp_path / "f.npz") and not os.listdir(tmp_path)


def test_a_full_disk_in_the_nmtune_job_appends_no_torn_line(tmp_path, monkeypatch, capsys):
  _, y = _blobs()
  config = _files(tmp_path, y, y)
  config.methods = "lp"
  workdir = tmp_path / "out"
  plan = tuning.validate(config)
  # The job's own writes fail (the workdir's lock and plan.json are the runner's, written first).
  monkeypatch.setattr(nmjax_io.files, "open", _FullDiskFile, raising=False)
  with pytest.raises(SystemExit) as done:
    with errors.one_line_errors():
      tuning.run(plan, str(workdir))
  assert done.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: no space left on the device writing {workdir}/results.jsonl (")
  assert "\n" not in err and "free some space" in err
  assert not [n for n in os.listdir(workdir) if "tmp" in n or n == "results.jsonl"]


def test_environment_faults_become_one_line(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("NMJAX_DATA_DIR", str(tmp_path / "data"))

  def line_of(error):
    with pytest.raises(SystemExit) as done:
      with errors.one_line_errors():
        raise error
    assert done.value.code == 2
    text = capsys.readouterr().err
    assert text.count("\n") == 1 and text.startswith("error: ")
    return text.strip()

  data_file = str(tmp_path / "data" / "tfds" / "x.lock")
  assert line_of(OSError(errno.EROFS, "Read-only file system", data_file)) == (
      f"error: cannot write {data_file}: Read-only file system; set NMJAX_DATA_DIR to a writable"
      " folder")
  assert line_of(PermissionError(errno.EACCES, "Permission denied", "/w/metrics.jsonl")) == (
      "error: cannot write /w/metrics.jsonl: Permission denied; make it writable or pass another"
      " --workdir")
  wrapped = RuntimeError("orbax save failed")
  wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt"))
  assert line_of(wrapped).startswith(f"error: no space left on the device writing {tmp_path}/ckpt")
  assert "the system did not say which" in line_of(OSError(errno.ENOSPC, "No space left"))
  assert line_of(ConfigError("config.x=1 is out of range")) == (
      "error: config.x=1 is out of range")
  with pytest.raises(FileNotFoundError):  # Not an environment fault: propagates as it is.
    with errors.one_line_errors():
      raise FileNotFoundError(errno.ENOENT, "No such file", "x")

  class Stopped(NmjaxError):
    exit_code = 130

  with pytest.raises(SystemExit) as done:
    with errors.one_line_errors():
      raise Stopped("stopped")
  assert done.value.code == 130


@pytest.mark.parametrize("variable", ["NMJAX_DATA_DIR", None])
def test_a_read_only_data_dir_names_the_variable_to_set(variable, tmp_path, monkeypatch):
  data_dir = tmp_path / "readonly"

  def read_only(self, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", str(data_dir / "tfds" / "incomplete.1"))

  monkeypatch.setattr(fashion_mnist.NmjaxFashionMnist, "download_and_prepare", read_only)
  if variable:
    monkeypatch.setenv(variable, str(data_dir))
    call = lambda: sources.get_source("fashion_mnist")
  else:
    call = lambda: sources.get_source("fashion_mnist", data_dir=str(data_dir))
  with pytest.raises(DataError, match=f"the data folder {data_dir}/tfds cannot be written"
                                      r" \(Read-only file system: .*incomplete.1\), .* set"
                                      r" NMJAX_DATA_DIR \(or --config.data_dir\) to a writable"
                                      " folder"):
    call()
