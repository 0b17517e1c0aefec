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
