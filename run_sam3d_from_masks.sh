#!/usr/bin/env bash
# Stage 2 only: SAM 3D Objects from a run directory (--run DIR) or a folder of masks (--masks DIR --image IMG).
# All arguments go to `python -m pipeline reconstruct`; see --help.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PIPELINE_PYTHON:-$here/.venv/bin/python}"; [ -x "$py" ] || py=python3
PYTHONPATH="$here" exec "$py" -m pipeline reconstruct "$@"
