#!/usr/bin/env bash
# GPU kit, on the GPU machine (no network): install the kit's wheels, set the paths, restore the Triton cache,
# check the imports, run a measurement, and leave the results and the Triton cache in $OUT (README.md beside this).
#
#   bash benchmarks/gpu_kit/run.sh [MODE] [ARGS...]      from the repository root, the kit in .gpu-kit/
#
# MODE (default pipeline):
#   pipeline     benchmarks/bench_pipeline_gpu.py: both stages through batch, serve and the API (ARGS go to it)
#   sam3d-batch  benchmarks/bench_sam3d_batch.py --random-weights (what sam3d_shims/device_batch.sh did)
#   sam3d        benchmarks/bench_sam3d.py --random-weights --stage-run (what sam3d_shims/device_run.sh did)
#   check        only the install, the import check and the GPU's description
#
# Environment: GPU_KIT (kit folder, default .gpu-kit), OUT (results, default /tmp/gpu-kit-out), GPU_KIT_SITE
# (where the wheels are installed, default /tmp/gpu-kit-site), TRITON_CACHE_DIR (default $GPU_KIT/triton-cache;
# filled from $GPU_KIT/triton-cache.tgz when empty).
set -uo pipefail
mode=${1:-pipeline}
[ $# -gt 0 ] && shift
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 2
kit=$(cd "${GPU_KIT:-.gpu-kit}" 2>/dev/null && pwd) || { echo "no kit folder ${GPU_KIT:-.gpu-kit}: build it with python3 benchmarks/gpu_kit/build.py" >&2; exit 2; }
OUT=${OUT:-/tmp/gpu-kit-out}; mkdir -p "$OUT"
site=${GPU_KIT_SITE:-/tmp/gpu-kit-site}
t0=$(date +%s)
{
  echo "# gpu kit run: mode $mode, $(date -Is), host $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>&1
  python3 -c 'import json,sys; k=json.load(open(sys.argv[1])); print("kit built", k["built"], "lock sha256", k["lock_sha256"], "bytes", k["bytes"])' "$kit/kit.json"
} | tee "$OUT/env.txt"

# 1. wheels: checked against kit.json, installed once per kit (a warm machine's next call skips this)
stamp=$(sha256sum "$kit/kit.json" | cut -c1-16)
if [ "$(cat "$site/.gpu-kit-stamp" 2>/dev/null)" != "$stamp" ]; then
  python3 - "$kit" <<'EOF' || exit 3
import hashlib, json, sys
from pathlib import Path
kit = Path(sys.argv[1]); info = json.loads((kit / "kit.json").read_text())
bad = [p["carried"] for p in info["packages"].values()
       if hashlib.sha256((kit / "wheels" / p["carried"]).read_bytes()).hexdigest() != p["carried_sha256"]]
sys.exit(f"wheels differ from kit.json: {bad}" if bad else 0)
EOF
  rm -rf "$site" && mkdir -p "$site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$kit"/wheels/*.whl 2>&1 | tee -a "$OUT/env.txt" || exit 3
  echo "$stamp" > "$site/.gpu-kit-stamp"
fi
export PYTHONPATH="$site:$kit/site:$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export SAM3D_DINOV2_HUB="$kit/site/dinov2_hub" LIDRA_SKIP_INIT=true

# 2. Triton cache (spconv-triton's kernels: ~270 s of compilation on first use without it)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$kit/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
if [ -z "$(ls -A "$TRITON_CACHE_DIR")" ]; then  # one .tgz, or its parts (.tgz.00, .01, ...) as they came back
  if [ -f "$kit/triton-cache.tgz" ]; then
    tar -xzf "$kit/triton-cache.tgz" -C "$TRITON_CACHE_DIR" && echo "triton cache restored from $kit/triton-cache.tgz"
  elif compgen -G "$kit/triton-cache.tgz.[0-9][0-9]" > /dev/null; then
    cat "$kit"/triton-cache.tgz.[0-9][0-9] | tar -xz -C "$TRITON_CACHE_DIR" && echo "triton cache restored from $kit/triton-cache.tgz.NN"
  fi
fi
before=$(find "$TRITON_CACHE_DIR" -type f | wc -l)
echo "triton cache $TRITON_CACHE_DIR: $before files before the run" | tee -a "$OUT/env.txt"

# 3. imports
python3 benchmarks/gpu_kit/check.py --kit "$kit" --site "$site" 2>&1 | tee -a "$OUT/env.txt"
rc=${PIPESTATUS[0]}
echo "install + check: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
if [ "$mode" = check ] || [ "$rc" != 0 ]; then exit "$rc"; fi

# 4. the measurement
case "$mode" in
  pipeline)
    python3 benchmarks/bench_pipeline_gpu.py --kit "$kit" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"; rc=${PIPESTATUS[0]} ;;
  sam3d-batch)
    python3 benchmarks/bench_sam3d_batch.py --checkpoint-dir "$kit/checkpoints" --random-weights \
      --out "$OUT/bench.md" --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"; rc=${PIPESTATUS[0]} ;;
  sam3d)
    python3 benchmarks/bench_sam3d.py --checkpoint-dir "$kit/checkpoints" --random-weights \
      --stage-run /tmp/gpu-kit-stage-run --out "$OUT/bench.md" "$@" 2>&1 | tee "$OUT/bench.log"; rc=${PIPESTATUS[0]}
    cp /tmp/gpu-kit-stage-run/stage.log "$OUT/stage.log" 2>/dev/null ;;
  *) echo "unknown mode $mode (pipeline, sam3d-batch, sam3d, check)" >&2; exit 2 ;;
esac

# 5. the Triton cache comes back for the next run (put it at $GPU_KIT/triton-cache.tgz there)
after=$(find "$TRITON_CACHE_DIR" -type f | wc -l)
tar -czf "$OUT/triton-cache.tgz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
size=$(stat -c %s "$OUT/triton-cache.tgz" 2>/dev/null || echo 0)
echo "triton cache: $before -> $after files, $OUT/triton-cache.tgz $((size / 1048576)) MiB" | tee -a "$OUT/env.txt"
if [ "$size" -gt $((15 * 1048576)) ]; then  # a returned file may be 16 MiB at most: parts of 15 MiB
  split -b 15M -d -a 2 "$OUT/triton-cache.tgz" "$OUT/triton-cache.tgz." && rm -f "$OUT/triton-cache.tgz"
  echo "triton cache split into $(ls "$OUT"/triton-cache.tgz.* | wc -l) parts of at most 15 MiB" | tee -a "$OUT/env.txt"
fi
echo "total: $(( $(date +%s) - t0 )) s, exit $rc" | tee -a "$OUT/env.txt"
exit "$rc"
