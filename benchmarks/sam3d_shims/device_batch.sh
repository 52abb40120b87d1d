#!/usr/bin/env bash
# Random-weight GPU run of benchmarks/bench_sam3d_batch.py on the lent machine (see README.md beside this file).
# Carried: .whl-sam3d (wheels) and .device-sam3d (assemble.sh output). Writes logs and results to $OUT.
# Usage: bash benchmarks/sam3d_shims/device_batch.sh [extra bench_sam3d_batch.py args...]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-sam3d/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.device-sam3d/site:$PWD PYTHONUNBUFFERED=1
export SAM3D_DINOV2_HUB=$PWD/.device-sam3d/site/dinov2_hub
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
if [ -f triton-cache.tgz ]; then mkdir -p "$TRITON_CACHE_DIR" && tar -xzf triton-cache.tgz -C "$TRITON_CACHE_DIR"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 benchmarks/bench_sam3d_batch.py --checkpoint-dir .device-sam3d/checkpoints --random-weights \
    --out "$OUT/bench.md" --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
tar -czf "$OUT/triton-cache.tgz" -C "$TRITON_CACHE_DIR" . 2>/dev/null; ls -la "$OUT"
exit $rc
