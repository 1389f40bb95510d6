#!/usr/bin/env bash
# Prepare an aarch64 Python 3.11 that runs under qemu-aarch64 (user mode), for the runtime's aarch64 tests.
#   tools/aarch64-env.sh [DIR]      (default .cache/aarch64; safe to run again: everything is cached there)
# Debian arm64 packages are unpacked with dpkg -x into DIR/sysroot; aarch64 wheels go to DIR/site.
# Downloads are kept per machine (the .debs in ~/.cache/edgefleet, wheels in pip's cache), so a fresh
# clone, as CI makes, does not download them again.
# onnxruntime is pinned to 1.26 and ai-edge-litert to 2.1: newer aarch64 wheels crash under qemu-user
# (onnxruntime >= 1.28 on import, ai-edge-litert >= 2.2 when an interpreter is created).
set -euo pipefail
DIR=${1:-.cache/aarch64}
PY=${PYTHON:-.venv/bin/python}
DEBS=${XDG_CACHE_HOME:-$HOME/.cache}/edgefleet/aarch64-debs
mkdir -p "$DEBS" "$DIR/sysroot" "$DIR/site"
DIR=$(cd "$DIR" && pwd)
STAMP="$DIR/.ready-$(sha256sum "$0" pyproject.toml $(git ls-files sdk runtime) 2>/dev/null | sha256sum | cut -c1-12)"
[ -e "$STAMP" ] && exit 0

if ! command -v qemu-aarch64 >/dev/null; then
  echo "qemu-aarch64 is missing: apt-get install qemu-user (make test does this when run as root)" >&2; exit 1
fi
PKGS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1 libstdc++6 zlib1g libexpat1
      libffi8 libssl3 libsqlite3-0 libbz2-1.0 liblzma5 libuuid1 libcrypt1 libncursesw6 libtinfo6
      libreadline8 libdb5.3 libgdbm6 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0
      libcom-err2 libkeyutils1 media-types"
if [ "$(ls "$DEBS"/*.deb 2>/dev/null | wc -l)" -lt 20 ]; then
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    apt-get update -q
  fi
  (cd "$DEBS" && apt-get download $(for p in $PKGS; do
      if [ "$p" = media-types ]; then echo "$p"; else echo "$p:arm64"; fi; done))
fi
for d in "$DEBS"/*.deb; do dpkg -x "$d" "$DIR/sysroot"; done

# The project itself is pure Python: build its wheel, install it with aarch64 wheels of its runtime extra.
rm -rf "$DIR/wheel" && mkdir -p "$DIR/wheel"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR/wheel" .
rm -rf "$DIR/site" && mkdir -p "$DIR/site"
# bookworm's glibc is 2.36: accept every manylinux tag up to it.
PLATFORMS=$(for v in $(seq 17 36); do echo "--platform manylinux_2_${v}_aarch64"; done)
"$PY" -m pip install -q --target "$DIR/site" --platform manylinux2014_aarch64 $PLATFORMS --python-version 3.11 \
  --implementation cp --only-binary=:all: \
  "$DIR"/wheel/edgefleet-*.whl "numpy>=1.26,<2.5" "onnxruntime==1.26.*" "ai-edge-litert==2.1.*" \
  "paho-mqtt>=2.1" "cryptography>=42"
# The same LiteRT release for x86_64, so the host side of the comparison runs the very same kernels.
rm -rf "$DIR/host-litert"
"$PY" -m pip install -q --target "$DIR/host-litert" --no-deps --only-binary=:all: "ai-edge-litert==2.1.*"
rm -f "$DIR"/.ready-*
touch "$STAMP"
echo "aarch64 Python ready in $DIR" >&2
