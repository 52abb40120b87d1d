#!/usr/bin/env bash
# Build the carried tree .device-sam3d/site/ for a random-weight GPU run (see README.md beside this file).
# Needs `fetch` snapshots (git dirs) of the four upstream repos; nothing it writes is committed.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
mirror=${MIRROR:-/work/.mirror}
site=$root/.device-sam3d/site
shims=$root/benchmarks/sam3d_shims
rm -rf "$site" && mkdir -p "$site"
git -C "$mirror/facebookresearch+sam-3d-objects/repo" archive HEAD sam3d_objects | tar -x -C "$site"
git -C "$mirror/microsoft+MoGe/repo" archive a8c37341 moge | tar -x -C "$site"
git -C "$mirror/EasternJournalist+utils3d/repo" archive 3913c65d utils3d | tar -x -C "$site"
git -C "$mirror/facebookresearch+pytorch3d/repo" archive 75ebeeae pytorch3d/__init__.py pytorch3d/common pytorch3d/transforms | tar -x -C "$site"
cp -r "$shims/pytorch3d_renderer" "$site/pytorch3d/renderer"
cp -r "$shims/pytorch3d_structures" "$site/pytorch3d/structures"
cp -r "$shims/stubs/." "$site/"
cp -r "$shims/dinov2_hub" "$site/dinov2_hub"
# Public copies of the checkpoint configs (the HF repo is gated): kpfeifer-work/sam-3d-objects.
cfg=$root/.device-sam3d/checkpoints
rm -rf "$cfg" && mkdir -p "$cfg"
git -C "$mirror/kpfeifer-work+sam-3d-objects/repo" archive HEAD checkpoints/hf | tar -x -C "$cfg" --strip-components=2 --wildcards '*.yaml'
find "$site" -name '__pycache__' -prune -exec rm -rf {} +
du -sh "$site" "$cfg"
