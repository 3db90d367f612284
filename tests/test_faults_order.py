"""Every check that can run before work runs before it, and a refused run leaves nothing that
blocks the correct one: NMTune fields the data refuses (svd_topk above the batch or D, a batch
above the train set) before the first method writes its row; a study's data-dependent fields, a
zero-shot prompt set's typo and zero-shot on a supervised study before the first pre-training; a
job-array task with a changed flag before it trains, leaving the workdir as it was."""

import json
import os
import sys
import types

import numpy as np
import pytest

from nmjax import errors, evaluate, features as features_lib, io as nmjax_io, jobs
from nmjax import tasks as tasks_lib
from nmjax.jobs import plans, study, study_stages, tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import default as default_config  # pylint: disable=wrong-import-position
from configs import nmtune as nmtune_config  # pylint: disable=wrong-import-position
from configs import study_clip as study_clip_config  # pylint: disable=wrong-import-position


def _refused(capsys, config, workdir):
  """Runs the job as main.py does; returns its one error line (exit 2 checked)."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as done:
    with errors.one_line_errors():
      jobs.run(config, str(workdir))
  assert done.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: "), err
  return err.strip()


def _snapshot(folder):
  """{relative path: bytes} of every file under folder (what a refused run must not change)."""
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


# ------------------------------------------------------------------ the nmtune job (files)


@pytest.fixture(name="files")
def _files(tmp_path):
  """Tiny train (64 rows, D = 8, 3 classes) and test features files."""
  rng = np.random.default_rng(0)
  paths = {"train_features": str(tmp_path / "train.npz"),
           "test_features": str(tmp_path / "test.npz")}
  for path, rows in zip(paths.values(), (64, 32)):
    features_lib.save(path, rng.normal(size=(rows, 8)).astype(np.float32), np.arange(rows) % 3)
  return paths


def _tuning(files, **fields):
  config = nmtune_config.get_config("smoke")
  config.batch_size = 16
  config.update({**files, **fields})
  return config


def _rows(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("fields, words", [
    ({"svd_topk": 12}, "error: config.svd_topk=12 is not allowed; allowed: 1 <= svd_topk <="
                       " min(batch_size, D) = 8 (D = 8, the feature dimension of train features"
                       " file "),
    ({"batch_size": 100}, "config.batch_size=100 needs 100 train examples per step but the train"
                          " set has 64; lower config.batch_size"),
    ({"num_classes": 2}, "train.npz: labels outside [0, 2): label 2 in row 2"),
])
def test_a_field_the_features_refuse_is_refused_before_the_first_method(files, tmp_path, capsys,
                                                                        fields, words):
  """lp runs before nmtune and appends its row: the refusal comes before either runs, so an
  earlier run's rows stay as they were, and the corrected run keeps one row per method."""
  out = tmp_path / "out"
  jobs.run(_tuning(files, methods="lp"), str(out))
  before = _snapshot(out)
  line = _refused(capsys, _tuning(files, methods="lp,nmtune", **fields), out)
  assert words in line, line
  assert _snapshot(out) == before  # No row appended, no head written, plan.json kept.
  for _ in range(2):  # The corrected run, twice: one set of rows.
    jobs.run(_tuning(files, methods="lp,nmtune"), str(out))
  assert [r["method"] for r in _rows(out)] == ["lp", "nmtune"]


@pytest.mark.parametrize("fields, words", [
    ({"svd_topk": 20}, "error: config.svd_topk=20 is not allowed; allowed: 1 <= svd_topk <="
                       " batch_size = 16 (NMTune's loss takes the top svd_topk singular values of"
                       " each step's 16 rows)"),
    ({"grid": "svd_topk=2,40", "val_fraction": 0.2}, "error: config.grid value svd_topk=40 is"
                                                     " not allowed; allowed: 1 <= svd_topk <="
                                                     " batch_size = 16"),
    ({"methods": "lp,zeroshot"}, "error: config.methods entry 'zeroshot' needs a CLIP"
                                 " checkpoint's text tower"),
    ({"methods": "lp,zeroshot", "checkpoint": "ckpt", "train_features": "",
      "test_features": "", "zeroshot_templates": "imagenett"},
     "error: config.zeroshot_templates='imagenett' is unknown; allowed: imagenet, simple"),
    ({"checkpoint": "ckpt", "train_features": "", "test_features": "", "views": "cached",
      "batch_size": 15}, "error: config.batch_size=15 must be even with two augmented views"),
])
def test_a_field_the_config_refuses_is_refused_before_the_workdir(files, tmp_path, capsys,
                                                                  fields, words):
  line = _refused(capsys, _tuning(files, **fields), tmp_path / "out")
  assert line.startswith(words), line
  assert not (tmp_path / "out").exists()


def test_a_grid_point_too_wide_for_the_features_names_the_grid(files, tmp_path, capsys):
  config = _tuning(files, methods="lp,nmtune", grid="svd_topk=2,12", val_fraction=0.2)
  line = _refused(capsys, config, tmp_path / "out")
  assert line.startswith("error: config.grid value svd_topk=12 is not allowed; allowed: 1 <="
                         " svd_topk <= min(batch_size, D) = 8"), line
  assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.parametrize("fields, cached_rows, words", [
    ({"svd_topk": 100}, 0, "error: config.svd_topk=100 is not allowed; allowed: 1 <= svd_topk <="
                           " min(batch_size, D) = 64 (D = 64, the feature dimension of train"
                           " split digits/train (task digits))"),
    ({}, 10, "error: train split digits/train (task digits): config.batch_size=128 needs 128"
             " train examples per step but the train set has 10; lower config.batch_size"),
    ({"methods": "lp,zeroshot"}, 0, "error: config.methods entry 'zeroshot' needs a CLIP encoder"
                                    " (a pretrain_clip workdir); config.checkpoint holds"
                                    " resnet_small"),
])
def test_checkpoint_mode_checks_every_task_before_the_first_fit(tmp_path, capsys, monkeypatch,
                                                                fields, cached_rows, words):
  """The encoder's D, zero-shot's text tower and each task's train labels (its cached features
  file's, else the dataset's, read without encoding) are checked before evaluate.run fits."""
  cache = types.SimpleNamespace(
      encoder=types.SimpleNamespace(feature_dim=64, encode_text=None,
                                    pretraining=types.SimpleNamespace(model="resnet_small")),
      data_dir=None, max_examples=400, path=lambda split: str(tmp_path / f"{split.key}.npz"),
      info=lambda dataset: types.SimpleNamespace(num_classes=10))
  if cached_rows:
    features_lib.save(cache.path(tasks_lib.TASKS["digits"].train),
                      np.zeros((cached_rows, 64), np.float32), np.arange(cached_rows) % 10)
  monkeypatch.setattr(tuning, "open_cache", lambda plan, workdir: cache)
  monkeypatch.setattr(evaluate, "run", lambda *args: pytest.fail("a method was fit"))
  config = nmtune_config.get_config("smoke")
  config.update({"checkpoint": "ckpt", "tasks": "digits,mnist_to_digits", **fields})
  line = _refused(capsys, config, tmp_path / "out")
  assert line == words or line.startswith(words), line
  assert not (tmp_path / "out" / "results.jsonl").exists()


# ------------------------------------------------------------------- the study, in validate


def _study(module=default_config, **fields):
  config = module.get_config("smoke")
  for key, value in fields.items():
    target = config
    *path, name = key.split(".")
    for part in path:
      target = target[part]
    target[name] = value
  return config


@pytest.mark.parametrize("module, fields, words", [
    (default_config, {"nmtune.batch_size": 1000},
     "error: train split digits/train (task digits): config.nmtune.batch_size=1000 needs 500"
     " train examples per step but the train set has 400; lower config.nmtune.batch_size"),
    (default_config, {"nmtune.svd_topk": 100},
     "error: config.nmtune.svd_topk=100 is not allowed; allowed: 1 <= svd_topk <="
     " min(batch_size, D) = 64 (D = 64, the feature dimension of train split digits/train"),
    (default_config, {"tune_grid": "svd_topk=2,100"},
     "error: config.tune_grid value svd_topk=100 is not allowed; allowed: 1 <= svd_topk <="
     " min(batch_size, D) = 64"),
    (default_config, {"tune_val_fraction": 0.9},
     "error: train split digits/train (task digits): config.nmtune.batch_size=128 needs 64 train"
     " examples per step but the train set has 40 after the validation split (360 held out,"
     " config.tune_val_fraction=0.9)"),
    (default_config, {"tune_grid": "svd_weight=x"},
     "error: config.tune_grid: svd_weight value 'x' is not a number"),
    (default_config, {"methods": "lp,zeroshot"},
     "error: config.methods entry 'zeroshot' needs a CLIP encoder's text tower; this study"
     " pre-trains with config.pretrain_job='pretrain'"),
    (study_clip_config, {"nmtune.zeroshot_templates": "imagenett"},
     "error: config.nmtune.zeroshot_templates='imagenett' is unknown; allowed: imagenet, simple"),
    (study_clip_config, {"nmtune.svd_topk": 100},
     "error: config.nmtune.svd_topk=100 is not allowed; allowed: 1 <= svd_topk <="
     " min(batch_size, D) = 64"),
])
def test_a_study_refuses_its_fits_fields_before_the_first_pretraining(tmp_path, capsys, module,
                                                                      fields, words):
  for stage in ("", "seed0_r0.3"):  # The whole sweep, or one task of a job array.
    line = _refused(capsys, _study(module, stage=stage, **fields), tmp_path / "w")
    assert line.startswith(words), line
    assert not (tmp_path / "w").exists()


# --------------------------------------------------------- the study's workdir, as a job array


@pytest.fixture(name="array")
def _array(tmp_path, monkeypatch):
  """A study workdir as a job array's first task left it (plan.json and the finished pre-training
  of seed0_r0; its records only), and the points the later tasks reach (no training here)."""
  workdir = tmp_path / "study"
  plan = study.validate(_study())
  point = study_stages.Point(0, 0.0)
  stage = workdir / "pretrain" / point.name
  stage.mkdir(parents=True)
  plans.write(plan.pretrain_of(point), "pretrain", str(stage))
  (stage / study.STAGE_FILE).write_text(json.dumps(
      {"plan": study_stages.identity(plan.pretrain_of(point)), "workdir": str(stage),
       "result": {"step": 12}, "seconds": 1.0}))
  plans.write(plan, "study", str(workdir))
  reached = []
  monkeypatch.setattr(study_stages, "run_one_point",
                      lambda plan, point, workdir: reached.append(point.name) or {})
  return workdir, reached


@pytest.mark.parametrize("fields, words", [
    ({"nmtune.epochs": 3}, "holds a study run with other flags (config.nmtune.epochs: recorded 2"
                           " vs now 3); --config.stage=seed0_r0.3 runs with its study's flags:"
                           " pass the same --config.* flags to every task (plan.json there"
                           " records them), run the whole study (no --config.stage) to change"
                           " them for every point, or use a new --workdir"),
    ({"tune_grid": "svd_weight=0.1,0.2"}, "(config.tune_grid: recorded 'svd_weight=0.001,0.01'"
                                          " vs now 'svd_weight=0.1,0.2')"),
    ({"pretrain.learning_rate": 0.05}, "holds the pre-training stage seed0_r0 of a different"
                                       " study (learning_rate: saved 0.1 vs now 0.05); use a"
                                       " new --workdir or the same config"),
    ({"pretrain.max_test_examples": 100}, "holds the pre-training stage seed0_r0 of a different"
                                          " study (max_test_examples: saved"),
])
def test_a_later_task_with_a_changed_flag_is_refused_before_it_trains(array, capsys, fields,
                                                                      words):
  workdir, reached = array
  before = _snapshot(workdir)
  line = _refused(capsys, _study(stage="seed0_r0.3", **fields), workdir)
  assert words in line, line
  assert _snapshot(workdir) == before and reached == []  # No folder, no plan.json change.
  jobs.run(_study(stage="seed0_r0.3"), str(workdir))  # The corrected task goes on.
  assert reached == ["seed0_r0.3"]


def test_render_with_changed_flags_is_refused_and_a_sweep_refused_keeps_the_plan(array, capsys):
  workdir, _ = array
  before = _snapshot(workdir)
  line = _refused(capsys, _study(stage="render", **{"nmtune.epochs": 3}), workdir)
  assert "(config.nmtune.epochs: recorded 2 vs now 3); --config.stage=render" in line, line
  line = _refused(capsys, _study(**{"pretrain.learning_rate": 0.05}), workdir)
  assert "holds the pre-training stage seed0_r0 of a different study" in line, line
  assert _snapshot(workdir) == before  # The recorded plan is still the study's.


def test_what_a_refused_or_idle_task_left_does_not_block_the_correct_one(tmp_path, monkeypatch):
  """A recorded plan with no stage started (its task was refused, or did nothing) and stage
  folders holding only a lock are no study to keep to: a task with other flags runs."""
  reached = []
  monkeypatch.setattr(study_stages, "run_one_point",
                      lambda plan, point, workdir: reached.append(point.name) or {})
  workdir = tmp_path / "study"
  workdir.mkdir()
  plans.write(study.validate(_study(**{"nmtune.epochs": 3})), "study", str(workdir))
  for kind in ("pretrain", "eval"):
    (workdir / kind / "seed0_r0").mkdir(parents=True)
    with open(nmjax_io.lock_path(str(workdir / kind / "seed0_r0")), "w"):
      pass
  jobs.run(_study(stage="seed0_r0"), str(workdir))
  assert reached == ["seed0_r0"]
  with open(workdir / plans.PLAN_FILE) as f:
    assert [e["epochs"] for e in json.load(f)["evaluate"]] == [2, 2]  # Its own plan, recorded.
