"""The embedded study (configs/default.py:smoke) end to end: every report file, finite numbers,
reuse of finished stages, a kill mid-way then a restart ending with the same numbers, bad input."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import helpers  # pylint: disable=wrong-import-position
from configs import default as default_config  # pylint: disable=wrong-import-position
from configs import report as report_config  # pylint: disable=wrong-import-position
from nmjax import jobs  # pylint: disable=wrong-import-position
from nmjax.errors import ConfigError  # pylint: disable=wrong-import-position
from nmjax import stats, tasks as tasks_lib  # pylint: disable=wrong-import-position
from nmjax.jobs import figures, tables as report  # pylint: disable=wrong-import-position
from nmjax.jobs import plans, study, study_stages  # pylint: disable=wrong-import-position

# Minutes of processes and training: the full tier (`-m "not slow"` leaves them out).
pytestmark = pytest.mark.slow

SMOKE = "configs/default.py:smoke"


def _smoke(**overrides):
  config = default_config.get_config("smoke")
  for key, value in overrides.items():
    target = config
    *path, field = key.split(".")
    for part in path:
      target = target[part]
    target[field] = value
  return config


def _numbers(value):
  """Every number in a JSON value (nested lists and dicts included)."""
  if isinstance(value, bool):
    return []
  if isinstance(value, (int, float)):
    return [value]
  if isinstance(value, dict):
    return [n for v in value.values() for n in _numbers(v)]
  if isinstance(value, list):
    return [n for v in value for n in _numbers(v)]
  return []


def _read_records(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


def _main(workdir, *flags, **popen):
  """main.py on the smoke study, in its own process with one CPU device."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={SMOKE}",
         f"--workdir={workdir}", *flags]
  popen.setdefault("stderr", subprocess.STDOUT)
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, **popen)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The uninterrupted smoke study through main.py (the smoke command of docs/study.md)."""
  workdir = str(tmp_path_factory.mktemp("study"))
  proc = _main(workdir)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out
  return workdir, out


def test_smoke_study_writes_every_report_file_with_finite_numbers(smoke_run):
  workdir, out = smoke_run
  assert "(4 to run, the others done)" in out and "(4 stage(s) run, 0 reused)" in out, out
  lines = [l for l in out.splitlines() if l.startswith("[study] stage ")]
  assert [l.split(":")[0] for l in lines] == [
      "[study] stage 1/4 pretrain seed 0 r=0", "[study] stage 2/4 eval seed 0 r=0",
      "[study] stage 3/4 pretrain seed 0 r=0.3", "[study] stage 4/4 eval seed 0 r=0.3"]
  assert all(" | elapsed " in l and " | ETA " in l for l in lines), lines
  assert "| r | pretrain test acc |" in out and "Report in " in out, out
  for name in report.STUDY_FILES:
    path = os.path.join(workdir, name)
    assert os.path.getsize(path) > 0, name
    if name.endswith(".png"):
      with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  events = os.listdir(os.path.join(workdir, "tb", "seed0"))
  assert any(e.startswith("events.out.tfevents") for e in events), events

  records = _read_records(workdir)
  kinds = [r["record"] for r in records]
  # 2 ratios x (1 pre-training + 2 tasks x 3 methods + 2 spectra).
  assert (kinds.count("pretrain"), kinds.count("task"), kinds.count("spectrum")) == (2, 12, 4)
  assert sorted({r["noise_ratio"] for r in records}) == [0.0, 0.3]
  numbers = [n for r in records for n in _numbers(r)]
  assert numbers and all(math.isfinite(n) for n in numbers)
  for r in records:
    if r["record"] == "task":
      assert 0.0 <= r["accuracy"] <= 1.0 and r["method"] in ("lp", "mlp", "nmtune")
    if r["record"] == "spectrum":
      assert math.isclose(sum(r["spectrum"]), 1.0, rel_tol=1e-4) and r["lsvr"] == r["spectrum"][0]
  # The pre-training stages really differ only by their noise.
  pre = {r["noise_ratio"]: r for r in records if r["record"] == "pretrain"}
  saved = [json.load(open(os.path.join(workdir, "pretrain", f"seed0_r{r:g}", "config.json")))
           for r in (0.0, 0.3)]
  assert saved[0]["noise_ratio"] == 0.0 and saved[1]["noise_ratio"] == 0.3
  assert {k: v for k, v in saved[0].items() if k != "noise_ratio"} == {
      k: v for k, v in saved[1].items() if k != "noise_ratio"}
  assert pre[0.0]["step"] == pre[0.3]["step"] == 12
  # Paired deltas: each r > 0 task record against the same seed, task and method at r = 0.
  tasks = {(r["noise_ratio"], r["task"], r["method"]): r for r in records if r["record"] == "task"}
  for (ratio, task, method), r in tasks.items():
    if ratio == 0:
      assert "delta" not in r
      continue
    assert math.isclose(r["delta"], r["accuracy"] - tasks[(0.0, task, method)]["accuracy"])
    low, high = r["delta_ci95"]
    assert low <= r["delta"] <= high and high - low < 0.5, r
  averages = [r for r in records if r["record"] == "delta"]
  assert sorted((r["kind"], r["method"]) for r in averages) == sorted(
      (k, m) for k in ("id", "far") for m in ("lp", "mlp", "nmtune"))
  assert all(r["tasks"] == 1 and r["noise_ratio"] == 0.3 for r in averages)
  # One seed of a smoke variant: the report says its numbers test the plumbing and prints no
  # change or gain table (the records are in results.jsonl, their intervals over examples only).
  assert "these numbers test the plumbing, not the science" in out
  assert "Change from r = 0" not in out and "Gain of" not in out, out
  assert all(r["ci_method"] == stats.EXAMPLES_CI_METHOD for r in records
             if r["record"] in ("delta", "gain"))
  gains = {(r["noise_ratio"], r["kind"], r["method"], r["baseline"]): r for r in records
           if r["record"] == "gain"}
  assert len(gains) == 2 * 2 * 2, gains
  for (ratio, kind, method, baseline), gain in gains.items():
    pair = [tasks[(ratio, t, m)]["accuracy"] for m in (method, baseline)
            for t in ("digits", "mnist_to_digits") if tasks[(ratio, t, m)]["kind"] == kind]
    assert math.isclose(gain["delta"], pair[0] - pair[1]), gain
  # The realized noise on the images used, and the memorization gap from it.
  assert pre[0.0]["noise_rate_train"] == 0.0 and abs(pre[0.0]["memorization_gap"]) < 1e-9
  assert pre[0.3]["noise_rate_train"] == 0.3, pre[0.3]  # Exactly 48 of the 160 images used.
  r, c = pre[0.3]["noise_rate_train"], pre[0.3]["train_acc_clean"]
  assert math.isclose(pre[0.3]["memorization_gap"],
                      pre[0.3]["train_acc_noisy"] - ((1 - r) * c + r * (1 - c) / 9))

  text = open(os.path.join(workdir, "results.md")).read()
  assert ("| r | pretrain test acc | memorization gap | ID lp | ID mlp | ID nmtune | Far lp |"
          " Far mlp | Far nmtune |" in text)
  for row in ("| 0% |", "| 30% |", "## nmtune: test accuracy (%) per task", "## SVE of"):
    assert row in text, text
  # The main table's ID cell is the average of that method's ID tasks.
  lp_id = [r["accuracy"] for r in records if r["record"] == "task" and r["method"] == "lp"
           and r["kind"] == "id" and r["noise_ratio"] == 0.0]
  line = next(l for l in text.splitlines() if l.startswith("| 0% |"))
  assert line.split(" | ")[3] == f"{100 * sum(lp_id) / len(lp_id):.2f}"
  # The tune stage: NMTune's weights chosen on the r = 0 encoder's validation split, then used
  # by every evaluation stage.
  tune = [r for r in records if r["record"] == "tune"]
  assert len(tune) == 1 and len(tune[0]["members"]) == 2 and tune[0]["val_fraction"] == 0.2
  chosen = tune[0]["members"][tune[0]["chosen"]]
  assert chosen["mean_val_accuracy"] == max(m["mean_val_accuracy"] for m in tune[0]["members"])
  assert tune[0]["weights"] == chosen["values"] and "svd_weight" in chosen["values"]
  for r in records:
    if r["record"] == "task" and r["method"] == "nmtune":
      assert r["svd_weight"] == chosen["values"]["svd_weight"] and r["views"] == "cached", r
  assert "were chosen once among the grid svd_weight=0.001,0.01" in text


def test_a_finished_study_is_reused_and_only_rendered_again(smoke_run, capsys):
  workdir, _ = smoke_run
  before = helpers.study_scores(_read_records(workdir))
  os.remove(os.path.join(workdir, "spectra.png"))
  again = jobs.run(_smoke(), workdir)
  assert again["stages_run"] == 0
  assert helpers.study_scores(again["records"]) == before
  assert os.path.getsize(os.path.join(workdir, "spectra.png")) > 0
  out = capsys.readouterr().out
  assert out.count(", reused |") == 4 and "[pretrain] step" not in out, out
  # A narrower sweep reuses its stages too, and its table has just its rows.
  narrow = jobs.run(_smoke(noise_ratios="0.3"), workdir)
  assert narrow["stages_run"] == 0
  # (The tune record names the r = 0 encoder it chose the weights on.)
  assert {r["noise_ratio"] for r in narrow["records"] if r["record"] != "tune"} == {0.3}
  jobs.run(_smoke(), workdir)  # The whole report again, for the other tests.
  assert helpers.study_scores(_read_records(workdir)) == before


def test_the_report_job_renders_finished_studies_anywhere(smoke_run, tmp_path):
  workdir, _ = smoke_run
  out = jobs.run(report_config.get_config(f"workdirs={workdir}"), str(tmp_path / "report"))
  assert helpers.study_scores(out["records"]) == helpers.study_scores(_read_records(workdir))
  for name in report.STUDY_FILES:
    assert os.path.getsize(tmp_path / "report" / name) > 0, name
  with pytest.raises(ConfigError, match=r"config.workdirs entry .* holds no study"):
    jobs.run(report_config.get_config(f"workdirs={tmp_path}"), str(tmp_path / "bad"))


def test_a_moved_study_is_reused_where_it_now_is(smoke_run, tmp_path):
  workdir, _ = smoke_run
  moved = str(tmp_path / "moved")
  shutil.copytree(workdir, moved)
  again = jobs.run(_smoke(), moved)
  assert again["stages_run"] == 0
  assert helpers.study_scores(again["records"]) == helpers.study_scores(_read_records(workdir))
  for record in again["records"]:
    if record["record"] == "pretrain":
      assert record["workdir"].startswith(os.path.abspath(moved)), record["workdir"]


def test_a_changed_pretraining_config_is_refused_not_mixed(smoke_run):
  workdir, _ = smoke_run
  with pytest.raises(ConfigError, match=r"holds the pre-training stage seed0_r0 of a different"
                     r" study \(learning_rate: saved 0.1 vs now 0.05\)"):
    jobs.run(_smoke(**{"pretrain.learning_rate": 0.05}), workdir)


def test_a_changed_downstream_field_runs_only_the_evaluation_again(smoke_run, tmp_path, capsys):
  """--config.nmtune.epochs= changed in an existing study: the tune and evaluation stages run
  again over the features cached with each encoder; no pre-training stage runs."""
  workdir, _ = smoke_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  pretrain_files = {p: os.path.getmtime(p) for p in _stage_files(copy, "pretrain")}
  capsys.readouterr()
  again = jobs.run(_smoke(**{"nmtune.epochs": 3}), copy)
  out = capsys.readouterr().out
  assert again["stages_run"] == 2, out  # The two evaluation stages (the tune stage ran first).
  assert "[pretrain] step" not in out and "[study] tune stage done" in out, out
  assert {p: os.path.getmtime(p) for p in _stage_files(copy, "pretrain")} == pretrain_files
  for stage_file in _stage_files(copy, "eval"):
    with open(stage_file) as f:
      assert json.load(f)["features_extracted"] == 0, stage_file
  nmtune_rows = [r for r in again["records"] if r["record"] == "task" and r["method"] == "nmtune"]
  assert nmtune_rows and all(r["epochs"] == 3 for r in nmtune_rows)


def _stage_files(workdir, kind):
  root = os.path.join(workdir, kind)
  return [os.path.join(root, d, study.STAGE_FILE) for d in sorted(os.listdir(root))]


def test_killed_mid_way_then_restarted_gives_the_same_numbers(smoke_run, tmp_path):
  """SIGKILL while the second pre-training stage runs (once a checkpoint of it is committed),
  then the same command: the same numbers as the uninterrupted run. To save time, the first two
  stages are copied from the uninterrupted run, as a study killed after
  them would have left them."""
  workdir, _ = smoke_run
  killed = tmp_path / "killed"
  for part in ("pretrain/seed0_r0", "tune", "eval/seed0_r0"):
    shutil.copytree(os.path.join(workdir, part), killed / part)
  proc = _main(killed)
  checkpoints = killed / "pretrain" / "seed0_r0.3" / "checkpoints"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and proc.poll() is None:
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()[0]
  proc.send_signal(signal.SIGKILL)
  out = proc.communicate(timeout=60)[0]
  assert not (killed / "pretrain" / "seed0_r0.3" / study.STAGE_FILE).exists(), out
  assert not (killed / "results.jsonl").exists()

  rerun = _main(killed)
  out = rerun.communicate(timeout=300)[0]
  assert rerun.returncode == 0, out
  assert "(2 to run, the others done)" in out, out
  assert "[study] stage 2/4 eval seed 0 r=0: " in out and ", reused |" in out, out
  assert "resumed from" in out, out
  assert helpers.study_scores(_read_records(str(killed))) == helpers.study_scores(_read_records(workdir))


def test_stages_run_as_a_job_array_then_render_the_one_process_report(smoke_run, tmp_path):
  """--config.stage=list names the points; two processes run them at once on one workdir (a
  third, started on a point already running, is refused with one line); render then gives the
  numbers of the one-process run, and a render over a partial workdir names what is missing."""
  workdir, _ = smoke_run
  listing = _main(tmp_path / "list", "--config.stage=list", stderr=subprocess.PIPE)
  out, _ = listing.communicate(timeout=120)
  assert listing.returncode == 0 and out.splitlines() == ["seed0_r0", "seed0_r0.3"], out
  shared = tmp_path / "array"
  procs = [_main(shared, f"--config.stage={s}") for s in ("seed0_r0", "1", "seed0_r0")]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  refused = [o for p, o in zip(procs, outs) if p.returncode == 2]
  assert len(refused) == 1 and "is in use by another run" in refused[0], outs
  assert refused[0].count("\n") == 1 and "study stage seed0_r0" in refused[0], refused
  assert sorted(p.returncode for p in procs) == [0, 0, 2], outs
  assert not (shared / "results.jsonl").exists()  # A stage writes no report.
  render = _main(shared, "--config.stage=render")
  out = render.communicate(timeout=120)[0]
  assert render.returncode == 0 and "from 2 of 2 stage(s)" in out and "missing" not in out, out
  assert helpers.study_scores(_read_records(str(shared))) == helpers.study_scores(_read_records(workdir))

  partial = tmp_path / "partial"
  for part in ("pretrain/seed0_r0", "eval/seed0_r0"):
    shutil.copytree(os.path.join(workdir, part), partial / part)
  result = jobs.run(_smoke(stage="render"), str(partial))
  assert result["missing"] == ["seed0_r0.3"]
  assert {r["noise_ratio"] for r in _read_records(str(partial))} == {0.0}
  with pytest.raises(ConfigError, match=r"config.stage='seed9' is not a stage of this study"):
    jobs.run(_smoke(stage="seed9"), str(tmp_path / "bad"))


def test_a_later_task_with_a_changed_flag_is_refused_before_training(smoke_run, tmp_path):
  """The first task's point finished; the next task, started with another pre-training or
  downstream flag, is refused with one line before it trains and leaves the workdir as it was;
  the same task with the study's flags then runs and gives the one-process run's numbers."""
  workdir, _ = smoke_run
  shared = tmp_path / "array"
  for part in ("pretrain/seed0_r0", "tune", "eval/seed0_r0"):
    shutil.copytree(os.path.join(workdir, part), shared / part)
  shutil.copy(os.path.join(workdir, plans.PLAN_FILE), shared)
  before = sorted(str(p.relative_to(shared)) for p in shared.rglob("*"))
  for flag, words in (("--config.pretrain.learning_rate=0.05",
                       "holds the pre-training stage seed0_r0 of a different study"
                       " (learning_rate: saved 0.1 vs now 0.05)"),
                      ("--config.nmtune.epochs=3", "holds a study run with other flags"
                                                   " (config.nmtune.epochs: recorded 2 vs now 3)")):
    refused = _main(shared, "--config.stage=seed0_r0.3", flag, stderr=subprocess.PIPE)
    out, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and err.count("\n") == 1 and words in err, err
    assert "[pretrain] step" not in out, out
    assert sorted(str(p.relative_to(shared)) for p in shared.rglob("*")) == before
  task = _main(shared, "--config.stage=seed0_r0.3")
  out = task.communicate(timeout=300)[0]
  assert task.returncode == 0, out
  result = jobs.run(_smoke(stage="render"), str(shared))
  assert not result["missing"]
  assert helpers.study_scores(_read_records(str(shared))) == helpers.study_scores(
      _read_records(workdir))


@pytest.mark.parametrize("overrides, message", [
    ({"noise_ratios": "0,1.0"}, r"config.noise_ratios entry '1.0' is out of range; allowed:"
                                r" numbers 0 <= r < 1"),
    ({"noise_ratios": "0,0"}, r"config.noise_ratios lists '0' twice"),
    ({"seeds": "0,x"}, r"config.seeds entry 'x' is not an integer"),
    ({"seeds": ""}, r"config.seeds is empty"),
    ({"methods": "lp,svm"}, r"config.methods entry 'svm' is unknown"),
    ({"spectrum_tasks": "digits,cifar10"}, r"config.spectrum_tasks entry 'cifar10' is unknown"),
    ({"pretrain.num_epochs": -1.0}, r"config.num_epochs=-1.0 is out of range"),
    ({"nmtune.svd_topk": 0}, r"svd_topk"),
    ({"tasks": "fashion_mnist_source", "spectrum_tasks": "fashion_mnist_source",
      "pretrain.max_train_examples": -1}, r"reads images the task fashion_mnist_source probes"),
    ({"tune_grid": "svd_weight=0.1", "tune_val_fraction": 0.0}, r"tune_val_fraction=0.0 is out"),
])
def test_bad_sweep_config_fails_before_any_work(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    jobs.run(_smoke(**overrides), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_main_default_config_is_the_study():
  config = default_config.get_config()
  assert config.job == "study"
  assert config.noise_ratios == "0,0.1,0.3" and config.methods == "lp,mlp,nmtune"
  assert config.seeds == "0,1,2" and config.tune_grid and config.tune_val_fraction == 0.2
  assert config.vmap_seeds is True and not config.smoke
  assert config.tasks == "study" and config.pretrain.model == "resnet_small"
  assert config.pretrain.dataset == "fashion_mnist" and config.pretrain.noise_type == "symmetric"
  # What the sweep sets per stage is not a field of the sub-configs.
  for field in ("job", "noise_ratio", "seed", "data_dir", "distributed"):
    assert field not in config.pretrain, field
  for field in ("job", "method", "tasks", "checkpoint", "seed", "num_classes", "train_features"):
    assert field not in config.nmtune, field
  # Each child's plan is what the pre-training and NMTune jobs validate for that point.
  plan = study.validate(config)
  point = study.Point(seed=1, noise_ratio=0.1)
  stage = plan.pretrain_of(point)
  assert stage.noise_ratio == 0.1 and stage.seed == 1
  assert stage.num_epochs == 20.0 and stage.max_train_examples == 2500
  assert stage.crop_padding == 0 and not stage.flip  # The memorizing regime (docs/study.md).
  tuned = study_stages.eval_plan(plan, point, {"workdir": "/ckpt"}, {"weights": {
      "cov_weight": 0.4}})
  assert tuned.seed == 1 and tuned.checkpoint == "/ckpt"
  assert tuned.methods == ("lp", "mlp", "nmtune") and tuned.epochs == 10
  assert tuned.views == "cached" and tuned.cov_weight == 0.4 and tuned.cached_views == 2
  assert plan.tune.grid == config.tune_grid and plan.tune.methods == ("nmtune",)
  # The source task probes images the pre-training never saw.
  source = tasks_lib.TASKS["fashion_mnist_source"]
  assert source.train.part == "held_out" and 60000 - tasks_lib.HELD_OUT >= 2500
  with open(os.path.join(ROOT, "main.py")) as f:
    assert '"configs", "default.py"' in f.read()


def test_several_seeds_show_mean_and_sample_std(tmp_path):
  tasks = tasks_lib.resolve("digits,mnist_to_digits")
  seeds, ratios = [0, 1, 2], [0.0, 0.3]
  sweep = report.Sweep(ratios=ratios, seeds=seeds, methods=["lp"],
                       kinds={t.name: t.kind for t in tasks},
                       spectrum_tasks=["digits", "mnist_to_digits"])
  records = []
  for seed, acc in zip(seeds, (0.80, 0.82, 0.84)):
    for ratio in ratios:
      common = {"seed": seed, "noise_ratio": ratio}
      records += [
          {"record": "pretrain", **common, "test_acc": 0.9},
          {"record": "task", **common, "task": "digits", "kind": "id", "method": "lp",
           "accuracy": acc - ratio / 10},
          {"record": "task", **common, "task": "mnist_to_digits", "kind": "far", "method": "lp",
           "accuracy": 0.3},
      ]
      for task in tasks:
        records.append({"record": "spectrum", **common, "task": task.name, "kind": task.kind,
                        "sve": 3.0 + seed, "lsvr": 0.2, "spectrum": [0.2, 0.5, 0.3]})
  from nmjax import stats  # pylint: disable=g-import-not-at-top
  stats.add_deltas(records, lambda record: None)  # No hits kept: deltas without intervals.
  table = report.Table(sweep, records)
  text = report.format_summary(table)
  # (No OOD task here, only a far one: LSVR (OOD) has nothing to average.)
  assert ("| 0% | 90.00 ± 0.00 | 82.00 ± 2.00 | 30.00 ± 0.00 | 4.0000 ± 1.0000 | - |"
          in text), text
  assert "| 30% | 90.00 ± 0.00 | 79.00 ± 2.00 |" in text, text
  assert "| r | ID lp | Far lp |\n|---|---|---|\n| 30% | -3.00 | +0.00 |" in text, text
  figures.plot_accuracy(table, str(tmp_path / "a.png"), "t")
  figures.plot_spectral(table, str(tmp_path / "s.png"), "t")
  assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0
