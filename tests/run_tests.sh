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
set +e
.venv-test/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
