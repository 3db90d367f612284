"""scripts/launch_tpu_pod.sh and scripts/slurm_example.sbatch, with a fake gcloud (no network)."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "launch_tpu_pod.sh"
SBATCH = ROOT / "scripts" / "slurm_example.sbatch"
FLAGS = ["--config", "configs/default.py", "--workdir", "gs://b/run"]


@pytest.fixture
def launch(tmp_path):
  """Runs the script with a fake gcloud first on PATH that appends its argv to calls.jsonl."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(tmp_path / 'calls.jsonl')!r}, 'a').write("
                    "json.dumps(sys.argv[1:]) + '\\n')\n")
  gcloud.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             TMPDIR=str(tmp_path))

  def run(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=30, check=False)
  return run


def calls(tmp_path):
  """The fake gcloud's recorded argv lists."""
  log = tmp_path / "calls.jsonl"
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def main_words(line):
  """The words of the remote shell command in a printed gcloud ssh line."""
  (command,) = [w for w in shlex.split(line) if w.startswith("--command=")]
  return shlex.split(command.removeprefix("--command="))


def worker_lines(out):
  return [l for l in out.splitlines() if "--worker=" in l and "--worker=all" not in l]


def test_dry_run_prints_every_command_and_per_worker_lines(launch, tmp_path):
  r = launch("--dry-run", "--workers", "4", "NAME", "ZONE", "--", *FLAGS)
  assert r.returncode == 0, r.stderr
  lines = worker_lines(r.stdout)
  assert len(lines) == 4
  for i, line in enumerate(lines):
    words = shlex.split(line)
    assert words[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "NAME", "--zone", "ZONE"]
    assert f"--worker={i}" in words
    remote = main_words(line)
    assert "main.py" in remote and "--config.distributed=auto" in remote
    assert remote[remote.index("--workdir") + 1] == "gs://b/run"
  assert "gcloud compute tpus tpu-vm scp" in r.stdout and "git ls-files" in r.stdout
  assert "python3 -m venv .venv" in r.stdout and "pip install" in r.stdout
  assert "jax[tpu]" in r.stdout and ".nmjax-launch-installed" in r.stdout
  for word in ("apt-get", "npm", "sudo"):
    assert word not in r.stdout
  assert calls(tmp_path) == [] and not list(tmp_path.glob("*.tgz"))


def test_flags_with_spaces_and_quotes_survive(launch):
  note = "--config.note='a b' \"c\""
  r = launch("--dry-run", "--workers", "1", "N", "Z", "--", *FLAGS, note, "--config.x=$HOME")
  assert r.returncode == 0, r.stderr
  remote = main_words(worker_lines(r.stdout)[0])
  i = remote.index("main.py")
  assert remote[i + 1:i + 8] == [*FLAGS, note, "--config.x=$HOME", "--config.distributed=auto"]


def test_explicit_distributed_is_kept(launch):
  r = launch("--dry-run", "--workers", "2", "N", "Z", "--", *FLAGS,
             "--config.distributed=explicit")
  assert r.returncode == 0, r.stderr
  assert "--config.distributed=auto" not in r.stdout
  assert all("--config.distributed=explicit" in main_words(l) for l in worker_lines(r.stdout))


@pytest.mark.parametrize("args", [
    ["--dry-run", "NAME"], ["--dry-run"], ["--dry-run", "--", *FLAGS],
    ["--dry-run", "--workers", "0", "N", "Z"], ["--dry-run", "--workers", "x", "N", "Z"],
    ["--dry-run", "--bogus", "N", "Z"], ["--dry-run", "N", "Z", "extra"],
    ["--workers", "2", "N", "Z"]])
def test_usage_errors_are_one_line(launch, tmp_path, args):
  r = launch(*args)
  assert r.returncode == 2 and r.stdout == ""
  assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("launch_tpu_pod.sh: ")
  assert calls(tmp_path) == []


def test_help(launch):
  r = launch("--help")
  assert r.returncode == 0 and "usage:" in r.stdout


def test_real_run_calls_gcloud_as_the_dry_run_prints(launch, tmp_path):
  r = launch("N", "Z", "--", *FLAGS, "--config.note=a b")
  assert r.returncode == 0, r.stderr
  recorded = calls(tmp_path)
  dry = launch("--dry-run", "N", "Z", "--", *FLAGS, "--config.note=a b")
  assert recorded == [shlex.split(l)[1:] for l in dry.stdout.splitlines()
                      if l.startswith("gcloud ")]
  assert [c[3] for c in recorded] == ["scp", "ssh", "ssh", "ssh"]
  assert all("--worker=all" in c for c in recorded)
  remote = main_words(shlex.join(["gcloud", *recorded[-1]]))
  assert "main.py" in remote and "--config.note=a b" in remote and "gs://b/run" in remote
  assert not list(tmp_path.glob("*.tgz"))  # The local tarball is removed.


def test_real_run_without_gcloud(tmp_path):
  r = subprocess.run(["/bin/bash", str(SCRIPT), "N", "Z"], env={"PATH": str(tmp_path)},
                     capture_output=True, text=True, timeout=30, check=False)
  assert r.returncode == 2 and r.stderr.startswith("launch_tpu_pod.sh: ")
  assert len(r.stderr.splitlines()) == 1


def test_slurm_example():
  subprocess.run(["bash", "-n", str(SBATCH)], check=True)
  text = SBATCH.read_text()
  assert "--config.distributed=auto" in text and "#SBATCH --requeue" in text
  assert "jax[cuda12]" in text and "sudo" not in text and "apt-get" not in text
