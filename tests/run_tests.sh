#!/usr/bin/env bash
# Set up a test venv (.venv-test) with requirements-dev.txt and run the CPU test suite.
# Usage: bash tests/run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-test/bin/python ]; then
  "$PY" -m venv .venv-test
fi
.venv-test/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
# The web page's three.js + Spark come from npm (web/package-lock.json) and are copied into the package (no CDN).
if command -v npm >/dev/null 2>&1; then
  npm ci --prefix web --no-audit --no-fund --loglevel=error
  npm run --prefix web --silent build
elif [ -n "${CI:-}" ]; then
  echo "npm is missing: the web page's assets cannot be built (apt-get install nodejs npm)" >&2
  exit 1
else
  echo "note: npm is missing, the web page's assets are not built (its browser test will be skipped)" >&2
fi
set +e
.venv-test/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
