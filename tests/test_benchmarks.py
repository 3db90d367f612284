"""The benchmark scripts write their figures with their provenance, and the performance page is
generated from those files."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
DEVICE_CHECK = ("pretrain", "nmtune", "clip", "features", "text_features", "input")
RECORD_FIELDS = ("benchmark", "figures", "complete", "command", "commit", "worktree_clean",
                 "date", "machine")
MACHINE_FIELDS = ("cpu_model", "cpu_cores", "device_platform", "device_kind", "device_count",
                  "jax")


def _module(name):
  """benchmarks/<name>.py, imported from its file (benchmarks/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                os.path.join(BENCHMARKS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _check_record(record, name):
  assert set(RECORD_FIELDS) <= set(record), sorted(set(RECORD_FIELDS) - set(record))
  assert record["benchmark"] == name and record["complete"] is True
  assert record["figures"], f"{name}: no figures"
  assert f"benchmarks/{name}.py" in record["command"]
  assert re.fullmatch(r"[0-9a-f]{40}", record["commit"]), record["commit"]
  assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["date"]), record["date"]
  assert set(MACHINE_FIELDS) <= set(record["machine"])
  assert record["machine"]["cpu_model"] and record["machine"]["cpu_cores"] >= 1


@pytest.mark.slow  # Six fresh processes compiling their programs: about a minute on 2 idle cores.
def test_device_check_on_cpu_writes_every_benchmark_json_and_the_page_renders_them(tmp_path):
  out = tmp_path / "bench"
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  done = subprocess.run(["bash", os.path.join(BENCHMARKS, "device_check.sh"), str(out)],
                        capture_output=True, text=True, env=env, timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  for name in DEVICE_CHECK:
    with open(out / f"{name}-cpu.json") as f:
      _check_record(json.load(f), name)
  page = _module("performance_page").render(str(out))
  for name in DEVICE_CHECK:
    assert f"Source: [{name}-cpu.json](benchmarks/{name}-cpu.json)" in page
  for title in ("Pre-training step", "CLIP step", "NMTune", "Feature extraction",
                "Text feature extraction", "ImageNet input pipeline"):
    assert f"\n## {title}\n" in page
  with open(out / "pretrain-cpu.json") as f:
    images_per_s = json.load(f)["figures"]["resnet_small"]["images_per_s"]
  assert f"| {_module('performance_page').fmt(images_per_s)} |" in page


def test_write_records_provenance_and_a_folder_out_names_the_file(tmp_path):
  provenance = _module("provenance")
  path = provenance.write("demo", {"steps_per_s": 12.5}, f"{tmp_path}{os.sep}", complete=False)
  assert path == os.path.join(tmp_path, "demo-cpu.json")
  with open(path) as f:
    record = json.load(f)
  assert record["complete"] is False and record["figures"] == {"steps_per_s": 12.5}
  assert set(RECORD_FIELDS) <= set(record) and set(MACHINE_FIELDS) <= set(record["machine"])
  assert provenance.write("demo", {}, str(tmp_path / "x.json")) == str(tmp_path / "x.json")
  assert provenance.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_page_names_an_incomplete_run_and_renders_an_unknown_benchmark(tmp_path):
  provenance = _module("provenance")
  provenance.write("pretrain", {"resnet50": {"batch": 256, "images_per_s": 5798.4}},
                   str(tmp_path / "pretrain-cpu.json"), complete=False)
  provenance.write("newbench", {"a": {"b": 0.125}}, str(tmp_path / "newbench-cpu.json"))
  page = _module("performance_page").render(str(tmp_path))
  assert "| resnet50 | 256 | 5,798 |" in page
  assert "**Incomplete**" in page
  assert "## newbench" in page and "| a.b | 0.125 |" in page


def test_performance_page_is_the_one_generated_from_docs_benchmarks():
  page = _module("performance_page").render(os.path.join(REPO, "docs", "benchmarks"))
  with open(os.path.join(REPO, "docs", "performance.md")) as f:
    assert f.read() == page, "run .venv/bin/python benchmarks/performance_page.py"
