#!/usr/bin/env bash
# CI: follow the README's first command literally (the code block under "## Try it now") in a fresh clone, in a
# fresh venv built from requirements.txt alone (not the test venv), and check what it promises: every sample photo
# gave objects and a scene, and the page answered. Prints the command's wall time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cmd=$(python3 - "$root/README.md" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
section = text.split("## Try it now", 1)[1]
print(re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip())
PY
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/clone"
cd "$work/clone"
echo "first command: $cmd"
start=$(date +%s)
bash -c "$cmd" </dev/null | tee "$work/demo.out"
echo "first command took $(( $(date +%s) - start )) s"
grep -q "the page answers at http://127.0.0.1:" "$work/demo.out"
.venv/bin/python - <<'PY'
import json
from pathlib import Path

samples = json.loads(Path("pipeline/samples/samples.json").read_text())
jobs = [p for p in Path("outputs/demo").iterdir() if (p / "job.json").is_file()]
assert len(jobs) == len(samples), f"{len(jobs)} jobs for {len(samples)} sample photos"
for job in jobs:
    state = json.loads((job / "job.json").read_text())["state"]
    objects = json.loads((job / "objects/manifest.json").read_text())["objects"]
    assert state == "succeeded" and objects, f"{job}: {state}, {len(objects)} objects"
    assert (job / "scene/scene.glb").stat().st_size > 0 and (job / "scene/scene.ply").stat().st_size > 0
print(f"first command: {len(jobs)} photos, each with objects and a scene; the page answered")
PY
