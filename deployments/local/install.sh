#!/usr/bin/env bash
# Installs everything Headwater needs on a fresh machine; a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# Go builds the pinned Weaviate server. Debian's golang is too old; the Go toolchain from the
# official tarball (preinstalled on our machines) or GOTOOLCHAIN=auto is needed.
if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
  export PATH="/usr/local/go/bin:$PATH"
fi
command -v go >/dev/null || { echo "install.sh: Go 1.26+ is required to build Weaviate" >&2; exit 1; }

# PostgreSQL (Debian's package): the tests run the state store against a real server too.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "== installing PostgreSQL from Debian's packages"
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi

# Chromium (Debian's package): the web console's tests drive it headless through Playwright,
# which is never let download a browser of its own.
if [ ! -x /usr/bin/chromium ]; then
  echo "== installing Chromium from Debian's packages"
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi

# Reinstall only when pyproject.toml changed since the last successful install.
stamp=.venv/.headwater-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing Python dependencies (torch and its CUDA libraries: about 6 GB)"
  # No wheel cache: it would hold a second copy of torch's ~4 GB of wheels on a machine whose
  # disk may be nearly full (a CI run once failed here with ENOSPC).
  .venv/bin/pip install --quiet --no-cache-dir --upgrade pip
  .venv/bin/pip install --quiet --no-cache-dir -e '.[dev]'
  echo "$want" > "$stamp"
fi

echo "== building Weaviate (first time only; about 7 minutes on 2 cores)"
.venv/bin/headwater build
