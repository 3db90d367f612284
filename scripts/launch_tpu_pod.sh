#!/usr/bin/env bash
# Runs main.py on every worker of a TPU VM (a single host or a multi-host pod slice) with gcloud.
#
#   scripts/launch_tpu_pod.sh [--dry-run] [--workers N] [--extras LIST] [--python PY] \
#       NAME ZONE -- MAIN_FLAGS...
#
# Needs gcloud (authenticated, with a default project) and an existing TPU VM NAME in ZONE
# (`gcloud compute tpus tpu-vm create ...`). The steps, each one gcloud call on every worker
# (--worker=all):
#   1. Copy the code: the checkout's tracked files as they are on disk (uncommitted edits
#      included, untracked files left out), `git ls-files` piped into tar, sent with
#      `gcloud compute tpus tpu-vm scp` and unpacked into ~/nmjax. Files deleted here stay on
#      the workers; ~/nmjax/.venv and ~/nmjax/logs are kept.
#   2. The virtualenv ~/nmjax/.venv, with pip only (no root): requirements.txt, nmjax editable
#      with the extras --extras names (default: cloud, which reads and writes gs:// paths) and
#      jax[tpu] from the libtpu wheel index. Skipped on a worker whose .venv/.nmjax-launch-installed
#      holds the sha256 of requirements.txt, pyproject.toml and the extras. The pinned versions
#      need Python >= 3.11 with its venv module: use a TPU VM image that has it, or name one
#      with --python.
#   3. main.py MAIN_FLAGS --config.distributed=auto (added unless MAIN_FLAGS set
#      --config.distributed), from ~/nmjax, with NMJAX_DISTRIBUTED unset, detached (nohup): the
#      script returns once every worker has started, and each worker appends its output to
#      ~/nmjax/logs/main-HOSTNAME.log. Follow worker 0 with
#        gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 --command='tail -f ~/nmjax/logs/main-*.log'
#      A run still going holds the TPU chips: stop it before launching again.
#
# Every worker runs the same command, so data and workdir must be where every worker sees them:
# a bucket (--workdir gs://BUCKET/runs/..., --config.data_dir=gs://BUCKET/data) or a file system
# mounted on every worker. Checkpoints are written by all workers together; after a preemption
# the same command resumes from the workdir. The small datasets of the embedded study are not
# installed on the workers: run jobs on ImageNet (configs/pretrain_imagenet.py, prepared as its
# docstring says) or on data already in the bucket.
#
# Options:
#   --dry-run       print the commands, one a line, shell-quoted (paste them as they are);
#                   runs nothing and needs no gcloud
#   --workers N     with --dry-run: also print the run command for each worker 0..N-1
#                   (--worker=I instead of --worker=all), e.g. to restart one worker by hand; a
#                   real run always uses --worker=all
#   --extras LIST   nmjax extras to install, comma-separated (default: cloud; empty: none)
#   --python PY     the interpreter that creates the virtualenv on the workers (default: python3)
#
# Example (a v4-32 slice: 4 workers):
#   scripts/launch_tpu_pod.sh my-v4-32 us-central2-b -- \
#       --config configs/pretrain_imagenet.py:noise=0.1 \
#       --config.data_dir=gs://BUCKET/data --workdir gs://BUCKET/runs/in1k_r50_n0.1
# Exit status: 0 when every step succeeded; 2 for a usage error or without gcloud; else the
# failing gcloud call's.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/launch_tpu_pod.sh [--dry-run] [--workers N] [--extras LIST] [--python PY] NAME ZONE -- MAIN_FLAGS...

Copies the checkout's tracked files to every worker of TPU VM NAME in ZONE (~/nmjax), builds
~/nmjax/.venv there with pip (requirements.txt, nmjax[EXTRAS], jax[tpu]) unless it is up to date,
and starts main.py MAIN_FLAGS --config.distributed=auto on every worker, detached, with output
in ~/nmjax/logs/main-HOSTNAME.log. Needs gcloud and an existing TPU VM; data and workdir belong
in a bucket (gs://BUCKET/...) or on a file system every worker sees.

  --dry-run       print the commands (shell-quoted, one a line) instead of running them
  --workers N     with --dry-run: also print the run command for each worker 0..N-1
  --extras LIST   nmjax extras, comma-separated (default: cloud; empty: none)
  --python PY     interpreter that creates the virtualenv on the workers (default: python3)
  -h, --help      this text

Example:
  scripts/launch_tpu_pod.sh --dry-run --workers 4 my-v4-32 us-central2-b -- \
      --config configs/pretrain_imagenet.py:noise=0.1 --workdir gs://BUCKET/runs/in1k
EOF
}

die() {
  printf 'launch_tpu_pod.sh: %s\n' "$*" >&2
  exit 2
}

# One word, quoted for a POSIX shell only when it needs it (as Python's shlex.quote does).
q() {
  if [[ -n $1 && $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The words, each quoted, separated by spaces.
qjoin() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(q "$word")"
  done
  printf '%s' "$out"
}

dry_run=0
workers=""
extras=cloud
python=python3
positional=()
flags=()
while (($#)); do
  case $1 in
    --) shift; flags=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --workers|--extras|--python)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --workers) workers=$2 ;;
        --extras) extras=$2 ;;
        --python) python=$2 ;;
      esac
      shift ;;
    --workers=*) workers=${1#*=} ;;
    --extras=*) extras=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    -*) die "unknown option: $1 (see --help)" ;;
    *) positional+=("$1") ;;
  esac
  shift
done

case ${#positional[@]} in
  0) die "missing NAME and ZONE (the TPU VM and its zone; see --help)" ;;
  1) die "missing ZONE (the TPU VM's zone, after NAME; see --help)" ;;
  2) ;;
  *) die "unexpected argument: ${positional[2]} (main.py flags go after --)" ;;
esac
name=${positional[0]}
zone=${positional[1]}
[[ -n $name ]] || die "NAME is empty"
[[ -n $zone ]] || die "ZONE is empty"
if [[ -n $workers ]]; then
  [[ $workers =~ ^[0-9]+$ ]] && ((10#$workers >= 1)) \
    || die "--workers needs an integer >= 1, got '$workers'"
  workers=$((10#$workers))
  ((dry_run)) || die "--workers only changes what --dry-run prints (a real run uses --worker=all)"
fi
[[ $extras =~ ^[A-Za-z0-9_.,-]*$ ]] || die "--extras needs comma-separated extra names, got '$extras'"
[[ -n $python ]] || die "--python is empty"
if ((!dry_run)); then
  command -v gcloud >/dev/null 2>&1 || die "gcloud is not on PATH (install it, or use --dry-run to print the commands)"
fi

here=${BASH_SOURCE[0]}
[[ $here == */* ]] && here=${here%/*} || here=.
root=$(cd "$here/.." && pwd)
tarball="${TMPDIR:-/tmp}/nmjax-launch-${name//[^A-Za-z0-9_.-]/_}.tgz"
remote_tarball=nmjax-launch.tgz

# 1. The code: tracked files that exist on disk, packed here and unpacked on every worker.
pack="cd $(q "$root") && git ls-files -z"
pack+=' | while IFS= read -r -d "" f; do if [ -e "$f" ] || [ -L "$f" ]; then printf "%s\0" "$f"; fi; done'
pack+=" | tar --null -T - -czf $(q "$tarball")"
unpack="mkdir -p ~/nmjax && tar -xzf ~/$remote_tarball -C ~/nmjax && rm -f ~/$remote_tarball"

# 2. The virtualenv, skipped when the stamp matches (checked on each worker).
editable=.
[[ -z $extras ]] || editable=".[$extras]"
py=$(q "$python")
venv="cd ~/nmjax && want=\$({ cat requirements.txt pyproject.toml; echo \"$editable\"; } | sha256sum | cut -d\" \" -f1)"
venv+=" && if [ \"\$(cat .venv/.nmjax-launch-installed 2>/dev/null)\" != \"\$want\" ]; then"
venv+=" { [ -x .venv/bin/python ] || $py -m venv .venv; }"
venv+=" && .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt"
venv+=" -e \"$editable\" \"jax[tpu]\" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
venv+=" && echo \"\$want\" > .venv/.nmjax-launch-installed; fi"

# 3. main.py on every worker, detached, appending to a log per worker.
main=(.venv/bin/python main.py ${flags[@]+"${flags[@]}"})
add_auto=1
for flag in ${flags[@]+"${flags[@]}"}; do
  case $flag in
    --config.distributed|--config.distributed=*|-config.distributed|-config.distributed=*) add_auto=0 ;;
  esac
done
((!add_auto)) || main+=(--config.distributed=auto)
start="cd ~/nmjax && mkdir -p logs && unset NMJAX_DISTRIBUTED"
start+=" && { nohup $(qjoin "${main[@]}") >> \"logs/main-\$(hostname).log\" 2>&1 < /dev/null & }"
start+=" && echo \"started main.py on \$(hostname): ~/nmjax/logs/main-\$(hostname).log\""

ssh=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone")

# A command as words: printed (dry run) or shown on stderr and run.
run() {
  if ((dry_run)); then
    qjoin "$@"
    echo
  else
    echo "+ $(qjoin "$@")" >&2
    "$@"
  fi
}

if ((dry_run)); then
  echo "$pack"
else
  git -C "$root" rev-parse --git-dir >/dev/null 2>&1 || die "$root is not a git checkout"
  trap 'rm -f "$tarball"' EXIT
  echo "+ $pack" >&2
  bash -o pipefail -c "$pack"
fi
run gcloud compute tpus tpu-vm scp "$tarball" "$name:$remote_tarball" --zone "$zone" --worker=all
run "${ssh[@]}" --worker=all "--command=$unpack"
run "${ssh[@]}" --worker=all "--command=$venv"
run "${ssh[@]}" --worker=all "--command=$start"
if ((dry_run)) && [[ -n $workers ]]; then
  echo "# the last command, one worker at a time (workers 0..$((workers - 1))):"
  for ((i = 0; i < workers; i++)); do
    run "${ssh[@]}" "--worker=$i" "--command=$start"
  done
fi
if ((!dry_run)); then
  echo "launch_tpu_pod.sh: main.py started on every worker of $name; follow worker 0 with:" >&2
  echo "  $(qjoin "${ssh[@]}" --worker=0 "--command=tail -f ~/nmjax/logs/main-*.log")" >&2
fi
