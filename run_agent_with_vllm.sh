#!/usr/bin/env bash
# Stage 1 only: with --query, start (or reuse) the vLLM server, run the VLM agent + SAM3, stop the server;
# with --prompt, SAM3 alone. All arguments go to `python -m pipeline segment`; see --help.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PIPELINE_PYTHON:-$here/.venv/bin/python}"; [ -x "$py" ] || py=python3
PYTHONPATH="$here" exec "$py" -m pipeline segment "$@"
