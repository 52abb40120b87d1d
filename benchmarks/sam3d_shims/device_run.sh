#!/usr/bin/env bash
# Random-weight GPU run of the SAM 3D Objects backend on the lent machine (see README.md beside this file).
# Carried: .whl-sam3d (wheels) and .device-sam3d (assemble.sh output). Writes logs and results to $OUT.
# Usage: bash benchmarks/sam3d_shims/device_run.sh [extra bench_sam3d.py args...]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-sam3d/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.device-sam3d/site:$PWD PYTHONUNBUFFERED=1
export SAM3D_DINOV2_HUB=$PWD/.device-sam3d/site/dinov2_hub
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, timm, lightning, triton; print('torch', torch.__version__, 'tv', torchvision.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__, 'triton', triton.__version__)"
python3 benchmarks/bench_sam3d.py --checkpoint-dir .device-sam3d/checkpoints --random-weights \
    --stage-run /tmp/run1 --out "$OUT/bench.md" "$@" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
cp /tmp/run1/stage.log "$OUT/stage.log" 2>/dev/null
cp /tmp/run1/scene/preview.png "$OUT/preview.png" 2>/dev/null
cp /tmp/run1/objects/manifest.json "$OUT/objects_manifest.json" 2>/dev/null
ls -la /tmp/run1/objects/000 /tmp/run1/scene 2>/dev/null
exit $rc
