"""Every job is a declared contract: one registry, each config validated once into a plan that
the run reads (never the config), the library apart from the runner, and the command line's
--help, --dry_run and error policy. Several tests read the code itself."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import default as default_config  # pylint: disable=wrong-import-position
from configs import pretrain as pretrain_config  # pylint: disable=wrong-import-position
from nmjax import jobs  # pylint: disable=wrong-import-position
from nmjax.errors import ConfigError  # pylint: disable=wrong-import-position

RUNNER = "nmjax.jobs"
# Where reading a config's fields by probing is allowed: turning a config into a plan.
VALIDATION_FILES = {"nmjax/jobs/plans.py", "nmjax/jobs/cli.py"}
PROBES = re.compile(r"\b(config|cfg)\.get\(|\bin (config|cfg)\b|hasattr\((config|cfg)\b")


def _modules():
  """{module name: (path, parsed tree)} of every module in nmjax/."""
  found = {}
  for path in sorted((ROOT / "nmjax").rglob("*.py")):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    found[".".join(parts)] = (path, ast.parse(path.read_text()))
  return found


def _imports(name, tree, modules):
  """The nmjax modules `name` imports anywhere in its file (function-level imports included),
  each resolved to the module (a submodule where `from package import submodule`)."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("nmjax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nmjax"):
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        out.add(sub if sub in modules else node.module)
  return {m for m in out if m in modules and m != name}


def _functions_of_validation(tree):
  """Line ranges of functions named validate* / check* (validation code)."""
  return [(n.lineno, n.end_lineno) for n in ast.walk(tree)
          if isinstance(n, ast.FunctionDef) and n.name.lstrip("_").startswith(("validate",
                                                                                "check"))]


def test_jobs_registry_holds_every_job_as_a_contract():
  assert set(jobs.JOBS) == {"study", "pretrain", "pretrain_clip", "transfer", "nmtune",
                            "import", "report", "predict"}
  for name, module in jobs.JOBS.items():
    assert module.NAME == name
    assert callable(module.validate) and callable(module.run) and callable(module.lock_index)


def test_the_library_never_imports_the_runner_and_there_is_no_cycle():
  modules = _modules()
  graph = {name: _imports(name, tree, modules) for name, (_, tree) in modules.items()}
  for name, deps in graph.items():
    if not name.startswith(RUNNER):
      runner = sorted(d for d in deps if d.startswith(RUNNER))
      assert not runner, f"library module {name} imports the runner: {runner}"
  state = {}

  def visit(node, path):
    state[node] = "open"
    for dep in graph[node]:
      if state.get(dep) == "open":
        pytest.fail(f"import cycle: {' -> '.join(path + [dep])}")
      if dep not in state:
        visit(dep, path + [dep])
    state[node] = "done"

  for name in graph:
    if name not in state:
      visit(name, [name])


def test_no_two_modules_share_a_name_and_sizes_stay_small():
  names = {}
  for name, (path, tree) in _modules().items():
    short = name.rsplit(".", 1)[-1]
    names.setdefault(short, []).append(name)
    assert len(path.read_text().splitlines()) <= 450, f"{path} is over 450 lines"
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        assert length <= 60, f"{path}:{node.lineno} {node.name} is {length} lines"
  shared = {k: v for k, v in names.items() if len(v) > 1}
  assert not shared, f"modules sharing a name: {shared}"


def test_no_config_is_probed_outside_validation():
  for name, (path, tree) in _modules().items():
    rel = str(path.relative_to(ROOT))
    if rel in VALIDATION_FILES:
      continue
    allowed = _functions_of_validation(tree) if name.startswith(RUNNER) else []
    for number, line in enumerate(path.read_text().splitlines(), 1):
      code = line.split("#", 1)[0]
      if PROBES.search(code) and not any(a <= number <= b for a, b in allowed):
        pytest.fail(f"{rel}:{number} probes a config outside validation: {line.strip()}")


class _Poisoned(dict):
  """A ConfigDict's fields after validate: any read fails the test."""

  def __getitem__(self, key):
    raise AssertionError(f"config.{key} read after validate")

  def get(self, key, default=None):
    raise AssertionError(f"config.{key} read after validate")

  def __contains__(self, key):
    raise AssertionError(f"'{key}' in config probed after validate")


def _count_validations(monkeypatch):
  counts = {}
  for name, module in jobs.JOBS.items():
    original = module.validate

    def counted(config, _original=original, _name=name):
      counts[_name] = counts.get(_name, 0) + 1
      plan = _original(config)
      fields = dict(object.__getattribute__(config, "_fields"))
      object.__setattr__(config, "_fields", _Poisoned(fields))
      return plan

    monkeypatch.setattr(module, "validate", counted)
  return counts


def test_a_pretraining_config_is_validated_once_and_never_read_again(monkeypatch, tmp_path):
  counts = _count_validations(monkeypatch)
  result = jobs.run(pretrain_config.get_config("dataset=digits,smoke"), str(tmp_path))
  assert counts == {"pretrain": 1}
  assert result["step"] == 12
  plan = json.loads((tmp_path / "plan.json").read_text())
  assert plan["job"] == "pretrain" and plan["dataset"] == "digits"


def test_a_study_validates_each_child_once(monkeypatch, tmp_path):
  counts = _count_validations(monkeypatch)
  config = default_config.get_config("smoke")
  config.stage = "list"
  out = jobs.run(config, str(tmp_path / "w"))
  points = len(out["stages"])
  # The study, then each point's pre-training and evaluation, and the tune stage's grid.
  assert counts == {"study": 1, "pretrain": points, "nmtune": points + 1}


def test_main_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
  workdir = tmp_path / "never"
  out = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/default.py:smoke", "--dry_run",
       f"--workdir={workdir}", "--config.nmtune.epochs=3"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr
  plan = json.loads(out.stdout)
  assert plan["job"] == "study" and plan["seeds"] == [0]
  assert {e["epochs"] for e in plan["evaluate"]} == {3}
  assert not workdir.exists()


def test_main_help_lists_the_configs_and_jobs():
  out = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=False)
  text = out.stdout + out.stderr
  for config in sorted(p.name for p in (ROOT / "configs").glob("*.py")):
    assert config in text, config
  assert "Jobs (config.job): study, pretrain" in text
  assert "(default: 'None')" not in text


def test_a_bug_in_a_config_file_keeps_its_traceback(tmp_path):
  config = tmp_path / "broken.py"
  config.write_text("def get_config(arg=None):\n  raise ValueError('a bug in this config')\n")
  out = subprocess.run([sys.executable, "main.py", f"--config={config}", "--dry_run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode not in (0, 2)
  assert "Traceback" in out.stderr and "ValueError: a bug in this config" in out.stderr
  assert "broken.py" in out.stderr


def test_nmjax_errors_are_one_line_unless_debugging(tmp_path):
  args = [sys.executable, "main.py", "--config=configs/pretrain.py:smoke",
          "--config.noise_ratio=1.5", "--dry_run"]
  out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
  assert "config.noise_ratio=1.5 is out of range" in out.stderr
  debug = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False, env={**os.environ, "NMJAX_DEBUG": "1"})
  assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_an_unknown_job_is_one_line():
  config = pretrain_config.get_config("smoke")
  config.job = "pretrian"
  with pytest.raises(ConfigError, match=r"config.job='pretrian' is unknown; allowed: study"):
    jobs.validate(config)
