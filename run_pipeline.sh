#!/usr/bin/env bash
# Both stages in one shot: image + (--query TEXT | --prompt TEXT) → masks → 3D objects + scene.
# All arguments go to `python -m pipeline run`; see --help.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PIPELINE_PYTHON:-$here/.venv/bin/python}"; [ -x "$py" ] || py=python3
PYTHONPATH="$here" exec "$py" -m pipeline run "$@"
