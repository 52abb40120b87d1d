"""Both real stages through the engine on one GPU: batch, serve and the Python API's warm block (issue 21).

SAM3 (random weights, CUDA graphs) and SAM 3D Objects (random weights, the GPU kit's shims) in workers of env
kind ``current`` on one GPU, through the real entry points:

1. ``python -m pipeline batch`` over ``--count`` photo-like JPEGs of phone sizes (2–4 objects each), once per
   preset (``--presets quality,fast,preview``): per image and stage the worker's job time, the stage's wall,
   the model loads, and the batch wall against the sum of both stages' job times (the lanes' overlap);
2. ``python -m pipeline serve``: the first upload to a fresh server, then the same photos uploaded one at a
   time, then as a burst: upload → first object written → last object written → job succeeded (files
   downloadable), from the job's server-sent events;
3. ``with Pipeline.from_config(...) as p``: ``p.run`` per photo, then ``p.batch`` over all of them.

GPU memory, all the while: the GPU's used memory and each process's (NVML, else ``nvidia-smi``, every 0.25 s),
and each worker's own torch peak (allocated / reserved, written by the kit's ``sitecustomize``), against the
estimate of ``pipeline/driver/budget.py`` for the same config.

Masks: SAM3's random-weight masks are noise, so by default the segment backend is
``benchmarks.gpu_kit.fixed_masks:Sam3FixedMasks``: the real SAM3 runs, but the 3D stage gets the photos' coloured
shapes as masks (``--sam3-masks`` keeps SAM3's own). Every section is written to ``--out`` as soon as it ends.

``--hold-gib N`` starts a process that holds N GiB of the GPU for the whole run, before the baseline is taken:
it stands in for the vLLM server's share (``vlm.gpu_memory_utilization`` × the GPU's memory, which vLLM reserves
at start), so that a run on an 80 GB card shows whether both stages still fit beside it.

On the GPU machine (after ``benchmarks/gpu_kit/run.sh`` has set the paths up; run.sh calls this)::

    python3 benchmarks/bench_pipeline_gpu.py --kit .gpu-kit --out $OUT [--presets quality,fast,preview]
        [--parts batch,serve,api] [--serve-preset fast] [--budget-s 560]

CPU dry run of the harness (no model: fixed masks and the cube double, in this interpreter)::

    python benchmarks/bench_pipeline_gpu.py --dry-run-cpu --count 3 --presets fast --out /tmp/bpg-out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import signal
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_kit.fixed_masks import PROMPT, objects_in, write_photos  # noqa: E402

BASE_CONFIG = ROOT / "benchmarks" / "gpu_kit" / "pipeline-gpu.yaml"
STAGES = ("segment", "reconstruct")
FIXED = "benchmarks.gpu_kit.fixed_masks:Sam3FixedMasks"
DRY_RUN_SETS = [
    "segment.backend=benchmarks.gpu_kit.fixed_masks:FixedMasks", "segment.device=cpu",
    "reconstruct.backend=tests.doubles.reconstructors:CubeReconstructorDouble", "reconstruct.device=cpu",
]


# ---------------------------------------------------------------------------------------------- GPU memory


def _role_of(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    for i, arg in enumerate(argv):
        if arg == b"-m" and i + 1 < len(argv) and argv[i + 1].startswith(b"pipeline.stages."):
            return argv[i + 1].decode().rsplit(".", 1)[1]
    return "driver" if any(b"pipeline" in a for a in argv) else "other"


class GpuSampler:
    """Samples GPU 0's used memory and each process's, every ``period`` s, into the current section's peaks."""

    def __init__(self, period: float = 0.25) -> None:
        self.period = period
        self.section: str | None = None
        self.peaks: dict[str, dict[str, Any]] = {}
        self.source = "none"
        self.total_mib: float | None = None
        self.baseline_mib: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._read = self._setup()
        if self._read is not None:
            used, _ = self._read()
            self.baseline_mib = used
            self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
            self._thread.start()

    def _setup(self) -> Any:
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.total_mib = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20

            def read_nvml() -> tuple[float, dict[int, float]]:
                used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                procs = {}
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if p.usedGpuMemory is not None:
                        procs[int(p.pid)] = p.usedGpuMemory / 2**20
                return used, procs

            read_nvml()
            self.source = "NVML (nvidia-ml-py)"
            return read_nvml
        except Exception:  # noqa: BLE001 - no NVML: try nvidia-smi
            pass
        if shutil.which("nvidia-smi") is None:
            return None

        def smi(*query: str) -> list[list[str]]:
            out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=10).stdout
            return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

        def read_smi() -> tuple[float, dict[int, float]]:
            used = float(smi("-i", "0", "--query-gpu=memory.used")[0][0])
            procs = {}
            for row in smi("-i", "0", "--query-compute-apps=pid,used_memory"):
                if len(row) == 2 and row[0].isdigit() and row[1].replace(".", "").isdigit():
                    procs[int(row[0])] = float(row[1])
            return used, procs

        try:
            self.total_mib = float(smi("-i", "0", "--query-gpu=memory.total")[0][0])
            read_smi()
        except Exception:  # noqa: BLE001
            return None
        self.source = "nvidia-smi"
        return read_smi

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                used, procs = self._read()
            except Exception:  # noqa: BLE001 - a failed read is skipped
                continue
            with self._lock:
                if self.section is None:
                    continue
                peak = self.peaks.setdefault(self.section, {"used_mib": 0.0, "roles_mib": {}, "sum_roles_mib": 0.0})
                peak["used_mib"] = max(peak["used_mib"], used)
                roles: dict[str, float] = {}
                for pid, mib in procs.items():
                    role = _role_of(pid)
                    roles[role] = roles.get(role, 0.0) + mib
                for role, mib in roles.items():
                    peak["roles_mib"][role] = max(peak["roles_mib"].get(role, 0.0), mib)
                peak["sum_roles_mib"] = max(peak["sum_roles_mib"], sum(roles.values()))

    def start(self, section: str) -> None:
        with self._lock:
            self.section = section

    def stop(self) -> dict[str, Any] | None:
        with self._lock:
            section, self.section = self.section, None
        return self.peaks.get(section) if section else None

    def close(self) -> None:
        self._stop.set()


def torch_peaks(folder: Path) -> dict[str, dict[str, float]]:
    """role → the highest torch peaks (GiB) over the processes of that role that wrote into ``folder``."""
    out: dict[str, dict[str, float]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        for dev in record.get("devices", {}).values():
            role = out.setdefault(record.get("role", "?"), {"max_allocated_gib": 0.0, "max_reserved_gib": 0.0, "processes": 0})
            role["max_allocated_gib"] = max(role["max_allocated_gib"], dev["max_allocated_gib"])
            role["max_reserved_gib"] = max(role["max_reserved_gib"], dev["max_reserved_gib"])
        if record.get("devices"):
            out[record.get("role", "?")]["processes"] += 1
    return out


# ---------------------------------------------------------------------------------------------- helpers


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.res: dict[str, Any] = {"sections": {}, "skipped": [], "errors": []}
        self.sampler = GpuSampler()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        out = self.args.out
        (out / "pipeline-gpu.json").write_text(json.dumps(self.res, indent=1, default=str), encoding="utf-8")
        (out / "pipeline-gpu.md").write_text(to_markdown(self.res), encoding="utf-8")

    def section(self, name: str, fn: Any, *fn_args: Any) -> Any:
        print(f"[{self.elapsed():6.1f} s] {name} ...", flush=True)
        peaks_dir = self.args.work / "peaks" / name.replace("/", "-")
        shutil.rmtree(peaks_dir, ignore_errors=True)
        os.environ["GPU_KIT_PEAKS_DIR"] = str(peaks_dir)
        self.sampler.start(name)
        t = time.perf_counter()
        try:
            value = fn(*fn_args)
        except Exception as exc:  # noqa: BLE001 - recorded; the next section still runs
            import traceback

            traceback.print_exc()
            self.res["errors"].append(f"{name}: {type(exc).__name__}: {str(exc)[:600]}")
            value = None
        finally:
            gpu = self.sampler.stop()
            os.environ.pop("GPU_KIT_PEAKS_DIR", None)
        if value is not None:
            value["section_s"] = round(time.perf_counter() - t, 2)
            value["gpu"] = gpu
            value["torch_peaks"] = torch_peaks(peaks_dir)
            self.res["sections"][name] = value
        print(f"[{self.elapsed():6.1f} s] {name} done: {json.dumps(value, default=str)[:400]}", flush=True)
        self.save()
        return value


def cli(args: list[str], *, log: Path, timeout: float) -> tuple[int, float]:
    """``python -m pipeline ARGS`` from the project root, output to ``log``; (exit code, wall seconds)."""
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    return proc.returncode, time.perf_counter() - t0


def read_run(run_dir: Path) -> dict[str, Any]:
    """The per-stage numbers of one run directory's run.json, and its object count."""
    record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    row: dict[str, Any] = {"run": run_dir.name, "source": record.get("source_image")}
    for stage in STAGES:
        st = record.get("stages", {}).get(stage, {})
        t = st.get("timings", {})
        row[stage] = {"status": st.get("status"), "duration_s": st.get("duration_s"), "job_s": t.get("job_s"),
                      "wall_s": t.get("wall_s"), "load_s": t.get("load_s"), "start_s": t.get("start_s"),
                      "graph_capture_s": t.get("load_graph_capture_s"), "prepare_s": t.get("prepare_s"),
                      "predict_s": t.get("predict_s"),
                      "objects_s": round(sum(v for k, v in t.items() if k.startswith("object_")), 3) or None}
    manifest = run_dir / "objects" / "manifest.json"
    row["objects"] = len(json.loads(manifest.read_text(encoding="utf-8")).get("objects", [])) if manifest.exists() else None
    masks = run_dir / "masks" / "manifest.json"
    row["masks"] = len(json.loads(masks.read_text(encoding="utf-8")).get("objects", [])) if masks.exists() else None
    return row


def _sum(rows: list[dict], stage: str, key: str) -> float:
    return round(sum(r[stage][key] or 0.0 for r in rows), 3)


def _max(rows: list[dict], stage: str, key: str) -> float | None:
    vals = [r[stage][key] for r in rows if r[stage][key] is not None]
    return max(vals) if vals else None


# ---------------------------------------------------------------------------------------------- parts


def part_batch(b: Bench, config: Path, photos: Path, preset: str) -> dict[str, Any]:
    root = b.args.work / f"batch-{preset}"
    shutil.rmtree(root, ignore_errors=True)
    code, wall = cli(["batch", "--config", str(config), "--images", str(photos), "--prompt", PROMPT, "--out", str(root),
                      "--set", f"reconstruct.sam3d.preset={preset}"], log=b.args.work / f"batch-{preset}.log",
                     timeout=b.args.part_timeout_s)
    rows = [read_run(d) for d in sorted(root.iterdir()) if (d / "run.json").is_file()]
    seg_job, rec_job = _sum(rows, "segment", "job_s"), _sum(rows, "reconstruct", "job_s")
    starts = {s: _max(rows, s, "start_s") for s in STAGES}
    loads = {s: _max(rows, s, "load_s") for s in STAGES}
    serial = seg_job + rec_job + sum(v or 0.0 for v in starts.values())
    return {"preset": preset, "exit": code, "wall_s": round(wall, 2), "images": len(rows), "rows": rows,
            "objects": sum(r["objects"] or 0 for r in rows), "expected_objects": sum(objects_in(p) for p in photos.iterdir()),
            "segment_job_s": seg_job, "reconstruct_job_s": rec_job, "worker_start_s": starts, "model_load_s": loads,
            "graph_capture_s": _max(rows, "segment", "graph_capture_s"),
            "serial_s": round(serial, 2), "overlap": round(serial / wall, 3) if wall else None,
            "failed": sum(r[s]["status"] == "failed" for r in rows for s in STAGES)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _job_times(events: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """Seconds from ``t0`` (just before the upload) to the job's milestones, from its events' ``time`` stamps."""
    def first(pred: Any) -> float | None:
        return next((round(e["time"] - t0, 3) for e in events if pred(e)), None)

    rec_progress = [e for e in events if e.get("kind") == "progress" and e.get("stage") == "reconstruct"]
    total = max((e.get("total") or 0 for e in rec_progress), default=0)
    return {
        "started_s": first(lambda e: e.get("kind") == "started"),
        "segment_done_s": first(lambda e: e.get("kind") == "stage_finished" and e.get("stage") == "segment"),
        "first_object_s": first(lambda e: e in rec_progress and (e.get("done") or 0) >= 1 and total),
        "last_object_s": first(lambda e: e in rec_progress and total and (e.get("done") or 0) >= total),
        "succeeded_s": first(lambda e: e.get("kind") == "succeeded"),
        "end": events[-1].get("kind") if events else None,
        "objects": total,
    }


def part_serve(b: Bench, config: Path, photo_paths: list[Path], preset: str) -> dict[str, Any]:
    import httpx

    work = b.args.work / f"serve-{preset}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = _free_port()
    argv = [sys.executable, "-m", "pipeline", "serve", "--config", str(config), "--port", str(port),
            "--jobs-dir", str(work / "jobs"), "--max-queue", "1000", "--set", f"reconstruct.sam3d.preset={preset}"]
    log = (work / "serve.log").open("wb")
    t_launch = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"preset": preset, "photos": len(photo_paths)}
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"serve did not come up; see {work / 'serve.log'}")
            time.sleep(0.1)
        result["server_up_s"] = round(time.time() - t_launch, 2)
        with httpx.Client(base_url=url, timeout=b.args.part_timeout_s) as c:
            def submit(path: Path) -> tuple[str, float]:
                t0 = time.time()
                res = c.post("/api/jobs", files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                             data={"prompt": PROMPT})
                if res.status_code != 202:
                    raise RuntimeError(f"upload of {path.name}: {res.status_code} {res.text[:300]}")
                return str(res.json()["id"]), t0

            def events(job_id: str) -> list[dict[str, Any]]:
                out = []
                with c.stream("GET", f"/api/jobs/{job_id}/events", timeout=b.args.part_timeout_s) as res:
                    for line in res.iter_lines():
                        if line.startswith("data:"):
                            out.append(json.loads(line[5:]))
                return out

            def job_s(job_id: str) -> dict[str, Any]:
                run = json.loads((work / "jobs" / job_id / "run.json").read_text(encoding="utf-8"))
                return {s: (run["stages"].get(s, {}).get("timings") or {}).get("job_s") for s in STAGES}

            def one(path: Path) -> dict[str, Any]:
                job_id, t0 = submit(path)
                row = {"photo": path.name, "job": job_id, **_job_times(events(job_id), t0), "job_s": job_s(job_id)}
                t = time.time()
                got = c.get(f"/api/jobs/{job_id}/files/objects/000/gaussians.ply")
                row["first_file_http"] = got.status_code
                row["first_file_mb"] = round(len(got.content) / 1e6, 2) if got.status_code == 200 else None
                row["first_file_get_s"] = round(time.time() - t, 3)
                return row

            result["cold"] = one(photo_paths[0])  # the first upload to a fresh server: both workers start for it
            result["one_at_a_time"] = [one(p) for p in photo_paths]
            t_burst = time.time()
            submitted = [(p, *submit(p)) for p in photo_paths]
            burst = []
            for p, job_id, t0 in submitted:
                times = _job_times(events(job_id), t0)
                burst.append({"photo": p.name, "job": job_id, **times, "job_s": job_s(job_id),
                              "from_burst_start_succeeded_s": round(t0 - t_burst + (times["succeeded_s"] or 0), 3)})
            result["burst"] = burst
            result["burst_wall_s"] = round(max(r["from_burst_start_succeeded_s"] for r in burst), 2)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return result


API_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from pipeline.api import Pipeline
cfg, preset, prompt, out, *photos = sys.argv[1:]
rows = {"import_s": round(time.perf_counter() - t0, 3), "runs": []}
t = time.perf_counter()
with Pipeline.from_config(cfg, overrides=[f"reconstruct.sam3d.preset={preset}"]) as p:
    rows["enter_s"] = round(time.perf_counter() - t, 3)
    for i, photo in enumerate(photos):
        t = time.perf_counter()
        r = p.run(photo, prompt=prompt, out=f"{out}/run-{i:02d}")
        rows["runs"].append({"photo": photo.rsplit("/", 1)[-1], "wall_s": round(time.perf_counter() - t, 3),
                             "objects": len(r.objects), "timings": r.timings})
    t = time.perf_counter()
    results = p.batch(photos, prompt=prompt)
    rows["batch_wall_s"] = round(time.perf_counter() - t, 3)
    rows["batch_ok"] = sum(not isinstance(r, Exception) for r in results)
    rows["batch_objects"] = sum(len(r.objects) for r in results if not isinstance(r, Exception))
    t = time.perf_counter()
rows["exit_s"] = round(time.perf_counter() - t, 3)
print("API-RESULT " + json.dumps(rows))
"""


def part_api(b: Bench, config: Path, photo_paths: list[Path], preset: str) -> dict[str, Any]:
    work = b.args.work / f"api-{preset}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    cfg.setdefault("run", {})["out_root"] = str(work / "batch")  # p.batch's default run dirs
    api_config = work / "config.yaml"
    api_config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    t0 = time.perf_counter()
    log = work / "api.log"
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.run([sys.executable, "-c", API_CHILD, str(api_config), preset, PROMPT, str(work),
                               *map(str, photo_paths)], cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True,
                              timeout=b.args.part_timeout_s)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("API-RESULT ")), None)
    if line is None:
        raise RuntimeError(f"API child exited {proc.returncode} without a result; see {log}")
    result = json.loads(line[len("API-RESULT "):])
    result.update({"preset": preset, "process_wall_s": round(time.perf_counter() - t0, 2), "exit": proc.returncode})
    return result


def fixed_mask_cost(photo_paths: list[Path]) -> list[float]:
    """Seconds the fixed-mask segmenter adds to each photo's predict (finding the shapes; on this host's CPU)."""
    from PIL import Image, ImageOps

    from benchmarks.gpu_kit.fixed_masks import colour_detections

    out = []
    for path in photo_paths:
        with Image.open(path) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
        t = time.perf_counter()
        found = colour_detections(image, PROMPT.split(","))
        out.append(round(time.perf_counter() - t, 3))
        if sum(len(d.scores) for d in found) != objects_in(path):
            raise SystemExit(f"{path.name}: the fixed masks found {sum(len(d.scores) for d in found)} shapes")
    return out


def budget_estimate(config: Path) -> dict[str, Any]:
    """budget.py's needs for this config, with the fixed-mask segmenter counted as the SAM3 it runs."""
    from pipeline.config import load_config
    from pipeline.driver import budget

    cfg = load_config(config, [])
    # a plug-in is not counted by budget.py: count the fixed-mask segmenter as the SAM3 it runs, and (CPU dry
    # runs) any stage as the GPU backend it stands in for, on GPU 0
    segment = cfg.segment.model_copy(update={"backend": "sam3", "device": "cuda:0" if cfg.segment.device == "cpu" else cfg.segment.device})
    recon = cfg.reconstruct.model_copy(update={"backend": "sam3d", "device": "cuda:0" if cfg.reconstruct.device == "cpu" else cfg.reconstruct.device})
    cfg = cfg.model_copy(update={"segment": segment, "reconstruct": recon})
    totals = budget.gpu_totals_gib()
    needs = budget.plan_needs(cfg, with_vlm=False, gpu_totals=totals)
    return {"needs_gib": {n.what: n.gib for n in needs}, "headroom_gib": budget.HEADROOM_GIB,
            "sum_gib": round(sum(n.gib for n in needs) + budget.HEADROOM_GIB, 2), "gpu_totals_gib": totals}


# ---------------------------------------------------------------------------------------------- report


def _f(x: Any, spec: str = ".2f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "—"


def _gib(mib: Any) -> str:
    return f"{mib / 1024:.1f}" if isinstance(mib, (int, float)) else "—"


def _med(vals: list[Any]) -> str:
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals:
        return "—"
    return f"{statistics.median(vals):.2f} ({min(vals):.2f}–{max(vals):.2f})"


def _held(res: dict[str, Any]) -> str:
    gib = res.get("held_gib") or 0.0
    return f", of which {gib:g} GiB held all run by a process standing in for vLLM's share" if gib else ""


def to_markdown(res: dict[str, Any]) -> str:
    sec = res["sections"]
    m = res.get("machine", {})
    lines = [f"# Both stages through the engine on one GPU — {m.get('gpu', '?')}, {res.get('date')}", "",
             f"Host: {m.get('cpu', '?')}; Python {m.get('python')}, torch {m.get('torch')}; GPU memory sampled by "
             f"{res.get('sampler', '?')} (baseline {_gib(res.get('baseline_mib'))} GiB used before the first part"
             f"{_held(res)}). "
             f"Segment backend `{res.get('segment_backend')}`; photos: {res.get('photos_desc')}; prompt `{PROMPT}`.", ""]
    if res.get("fixed_masks_s"):
        lines += [f"Fixed masks: finding the shapes adds {_med(res['fixed_masks_s'])} s per photo to the segment job's "
                  "predict (measured alone on this host; included in the segment job times below).", ""]
    batches = [v for k, v in sec.items() if k.startswith("batch/")]
    if batches:
        lines += ["## batch: per preset", "",
                  "| preset | images (objects) | batch wall s | Σ segment job s | Σ reconstruct job s | worker start s seg / rec (model load) | serial s (starts + Σ jobs) | overlap serial / wall | failed |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for v in batches:
            st, ld = v["worker_start_s"], v["model_load_s"]
            lines.append(f"| {v['preset']} | {v['images']} ({v['objects']}/{v['expected_objects']}) | {_f(v['wall_s'])} | "
                         f"{_f(v['segment_job_s'])} | {_f(v['reconstruct_job_s'])} | {_f(st.get('segment'))} ({_f(ld.get('segment'))}) / "
                         f"{_f(st.get('reconstruct'))} ({_f(ld.get('reconstruct'))}) | {_f(v['serial_s'])} | {_f(v['overlap'], '.2f')}× | {v['failed']} |")
        for v in batches:
            lines += ["", f"### batch, preset {v['preset']}: per image", "",
                      "| run | objects | segment job s (predict) | segment wall s (stage) | reconstruct job s | reconstruct wall s (stage) | pointmap s | objects s |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in v["rows"]:
                s, c = r["segment"], r["reconstruct"]
                lines.append(f"| {r['run']} | {r['objects']} | {_f(s['job_s'])} ({_f(s['predict_s'])}) | {_f(s['duration_s'])} | {_f(c['job_s'])} | "
                             f"{_f(c['duration_s'])} | {_f(c['prepare_s'])} | {_f(c['objects_s'])} |")
    serves = [v for k, v in sec.items() if k.startswith("serve/")]
    for v in serves:
        cold = v.get("cold", {})
        lines += ["", f"## serve, preset {v['preset']} ({v['photos']} photos)", "",
                  f"Server up (launch → /api/health answers) {_f(v.get('server_up_s'))} s. First upload to the fresh "
                  f"server (both workers start for it): first object written {_f(cold.get('first_object_s'))} s, last "
                  f"{_f(cold.get('last_object_s'))} s, succeeded {_f(cold.get('succeeded_s'))} s.", "",
                  "| upload → (s), median (min–max) | one at a time | burst |", "| --- | --- | --- |"]
        one, burst = v.get("one_at_a_time", []), v.get("burst", [])
        for key, label in (("started_s", "engine picked the job up"), ("segment_done_s", "masks done"),
                           ("first_object_s", "**first object written**"), ("last_object_s", "last object written"),
                           ("succeeded_s", "**succeeded: files downloadable**")):
            lines.append(f"| {label} | {_med([r[key] for r in one])} | {_med([r[key] for r in burst])} |")
        lines.append(f"| workers' job s (segment + reconstruct) | {_med([sum(x or 0 for x in r['job_s'].values()) for r in one])} | "
                     f"{_med([sum(x or 0 for x in r['job_s'].values()) for r in burst])} |")
        lines.append(f"| burst wall (first upload → last job succeeded) | | {_f(v.get('burst_wall_s'))} |")
    for k, v in sec.items():
        if k.startswith("api/"):
            runs = v.get("runs", [])
            lines += ["", f"## Python API warm block, preset {v['preset']}", "",
                      f"`with Pipeline.from_config(...)`: enter {_f(v.get('enter_s'))} s; `p.run` per photo "
                      f"{', '.join(_f(r['wall_s']) for r in runs)} s (the first includes both workers' start); "
                      f"`p.batch` of {len(runs)}: {_f(v.get('batch_wall_s'))} s ({v.get('batch_ok')} ok, "
                      f"{v.get('batch_objects')} objects); leaving the block {_f(v.get('exit_s'))} s."]
    est = res.get("budget") or {}
    lines += ["", "## GPU memory: measured peaks vs budget.py", "",
              f"budget.py's estimate for this config: {', '.join(f'{k} {v:g}' for k, v in est.get('needs_gib', {}).items())} "
              f"+ {est.get('headroom_gib', '?')} headroom = {est.get('sum_gib', '?')} GiB.", "",
              "| part | GPU used, peak − baseline (GiB) | segment worker: process (GiB) / torch alloc / reserved | reconstruct worker: process / torch alloc / reserved | driver process |",
              "| --- | --- | --- | --- | --- |"]
    base = res.get("baseline_mib") or 0.0
    for k, v in sec.items():
        g, tp = v.get("gpu") or {}, v.get("torch_peaks") or {}
        roles = g.get("roles_mib", {})

        def tcol(role: str) -> str:
            t = tp.get(role, {})
            return f"{_gib(roles.get(role))} / {_f(t.get('max_allocated_gib'), '.1f')} / {_f(t.get('max_reserved_gib'), '.1f')}"

        used = g.get("used_mib")
        lines.append(f"| {k} | {_gib(used - base) if isinstance(used, (int, float)) else '—'} | {tcol('segment')} | "
                     f"{tcol('reconstruct')} | {_gib(roles.get('driver'))} |")
    if res.get("verdict"):
        lines += ["", *res["verdict"]]
    if res.get("skipped"):
        lines += ["", "Not run (time budget): " + "; ".join(res["skipped"])]
    if res.get("errors"):
        lines += ["", "Errors:", *[f"- {e}" for e in res["errors"]]]
    return "\n".join(lines) + "\n"


def verdict(res: dict[str, Any]) -> list[str]:
    """Each worker's measured peak (process memory as NVML sees it, else torch reserved + 0.5) against its need."""
    est = (res.get("budget") or {}).get("needs_gib", {})
    lines = []
    for role, label in (("segment", "SAM3"), ("reconstruct", "SAM 3D Objects")):
        need = est.get(label)
        proc = max(((v.get("gpu") or {}).get("roles_mib", {}).get(role, 0.0) for v in res["sections"].values()), default=0.0) / 1024
        reserved = max(((v.get("torch_peaks") or {}).get(role, {}).get("max_reserved_gib", 0.0) for v in res["sections"].values()), default=0.0)
        seen = proc or (reserved + 0.5 if reserved else 0.0)
        if need is None or not seen:
            lines.append(f"- {label}: no measurement or no estimate (need {need}, process {proc:.1f} GiB, reserved {reserved:.1f} GiB)")
            continue
        ok = "holds" if seen <= need else "**too low**"
        lines.append(f"- {label}: budget.py {need:g} GiB vs measured {seen:.1f} GiB "
                     f"({'process, NVML' if proc else 'torch reserved + 0.5 GiB context'}; torch reserved {reserved:.1f}): {ok}")
    together = max(((v.get("gpu") or {}).get("used_mib", 0.0) for v in res["sections"].values()), default=0.0)
    if together and res.get("baseline_mib") is not None and (res.get("budget") or {}).get("sum_gib"):
        used = (together - res["baseline_mib"]) / 1024
        lines.append(f"- together: budget.py {res['budget']['sum_gib']} GiB vs measured {used:.1f} GiB "
                     f"(GPU used, peak − baseline): {'holds' if used <= res['budget']['sum_gib'] else '**too low**'}")
    if together and res.get("held_gib") and res.get("total_mib"):
        failed = sum(v.get("failed", 0) for v in res["sections"].values() if isinstance(v, dict))
        lines.append(f"- beside {res['held_gib']:g} GiB held for vLLM: GPU used at most {together / 1024:.1f} of "
                     f"{res['total_mib'] / 1024:.1f} GiB; {failed} image(s) failed" + (f"; errors: {len(res['errors'])}" if res["errors"] else ""))
    return lines


# ---------------------------------------------------------------------------------------------- main


def _merge(into: dict[str, Any], layer: dict[str, Any]) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def write_config(args: argparse.Namespace) -> Path:
    cfg = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    cfg.setdefault("reconstruct", {}).setdefault("sam3d", {})["checkpoint_dir"] = str((args.kit / "checkpoints").resolve())
    cfg.setdefault("engine", {})["state_dir"] = str(args.work / "state")
    if args.sam3_masks:
        cfg["segment"]["backend"] = "sam3"
    sets = (DRY_RUN_SETS if args.dry_run_cpu else []) + args.overrides
    if sets:
        from pipeline.config import parse_set_flags

        _merge(cfg, parse_set_flags(sets))
    path = args.work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def pack_logs(work: Path, dest: Path, limit: int = 12 * 2**20) -> None:
    """The parts' logs (CLI, serve, API, each run's stage logs, the peak files) as one .tgz, at most ``limit``."""
    import tarfile

    files = sorted(p for p in work.rglob("*") if p.is_file() and (p.suffix == ".log" or p.parent.parent.name == "peaks"))
    total = 0
    with tarfile.open(dest, "w:gz") as tar:
        for path in files:
            total += path.stat().st_size
            if total > limit:
                break
            tar.add(path, arcname=str(path.relative_to(work)))


def hold_gpu_memory(gib: float) -> subprocess.Popen[str]:
    """A child (own process group) holding ``gib`` GiB of GPU 0 until it is killed; returns once it holds it."""
    code = ("import sys, time, torch\n"
            "x = torch.empty(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device='cuda')\n"
            "print('held', flush=True)\n"
            "time.sleep(10**6)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(gib)], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    line = child.stdout.readline() if child.stdout else ""
    if line.strip() != "held":
        child.kill()
        raise SystemExit(f"--hold-gib {gib}: the holding process could not allocate it (exit {child.wait()})")
    return child


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "host": platform.node()}
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo", encoding="utf-8") if ln.startswith("model name")]
        info["cpu"] = f"{names[0] if names else platform.processor()}, {os.cpu_count()} cores"
    except OSError:
        info["cpu"] = f"{os.cpu_count()} cores"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        info["gpu"] = smi.splitlines()[0] if smi else "no GPU"
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = "no GPU (nvidia-smi missing)"
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = "not installed"
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kit", type=Path, default=ROOT / ".gpu-kit", help="the GPU kit folder (its checkpoints/)")
    ap.add_argument("--config", type=Path, default=BASE_CONFIG)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-pipeline-gpu"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench-pipeline-gpu-out")))
    ap.add_argument("--count", type=int, default=8, help="photos (default 8, 2–4 objects each)")
    ap.add_argument("--presets", default="quality,fast,preview", help="batch presets, in this order")
    ap.add_argument("--parts", default="batch,serve,api")
    ap.add_argument("--serve-preset", default="fast", help="preset of the serve and API parts")
    ap.add_argument("--budget-s", type=float, default=560.0, help="start no part that would end after this")
    ap.add_argument("--part-timeout-s", type=float, default=540.0)
    ap.add_argument("--sam3-masks", action="store_true", help="keep SAM3's own (random-weight) masks")
    ap.add_argument("--dry-run-cpu", action="store_true", help="no model: fixed masks and the cube double on CPU")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--hold-gib", type=float, default=0.0, help="hold this much GPU memory all run (vLLM's share)")
    ap.add_argument("--render", type=Path, help="only re-render a pipeline-gpu.json as Markdown into --out")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        res = json.loads(args.render.read_text(encoding="utf-8"))
        (args.out / "pipeline-gpu.md").write_text(to_markdown(res), encoding="utf-8")
        return 0
    args.work = args.work.resolve()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    holder = hold_gpu_memory(args.hold_gib) if args.hold_gib > 0 else None
    try:
        return _run(args)
    finally:
        if holder is not None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()


def _run(args: argparse.Namespace) -> int:
    b = Bench(args)
    res = b.res
    res["held_gib"] = args.hold_gib
    res.update({"date": date.today().isoformat(), "machine": machine(), "argv": sys.argv[1:], "sampler": b.sampler.source,
                "baseline_mib": b.sampler.baseline_mib, "total_mib": b.sampler.total_mib})
    config = write_config(args)
    res["config"] = yaml.safe_load(config.read_text(encoding="utf-8"))
    res["segment_backend"] = res["config"]["segment"]["backend"]
    photos_dir = args.work / "photos"
    photo_paths = write_photos(photos_dir, args.count)
    res["photos_desc"] = ", ".join(p.name for p in photo_paths)
    res["budget"] = budget_estimate(config)
    if res["segment_backend"].startswith("benchmarks.gpu_kit.fixed_masks:"):
        res["fixed_masks_s"] = fixed_mask_cost(photo_paths)
    parts = args.parts.split(",")
    estimate: dict[str, float] = {}  # a part's expected seconds, from the batches measured so far

    def fits(name: str, guess: float) -> bool:
        if b.elapsed() + guess > args.budget_s:
            res["skipped"].append(f"{name} (≈{guess:.0f} s would end after --budget-s {args.budget_s:.0f})")
            b.save()
            return False
        return True

    if "batch" in parts:
        for preset in args.presets.split(","):
            guess = estimate.get("batch", 60.0)
            if fits(f"batch/{preset}", guess):
                v = b.section(f"batch/{preset}", part_batch, b, config, photos_dir, preset)
                if v:
                    estimate["batch"] = max(estimate.get("batch", 0.0), v["wall_s"])
                    estimate[preset] = v["wall_s"]
    base = estimate.get(args.serve_preset, estimate.get("batch", 60.0))
    if "serve" in parts and fits(f"serve/{args.serve_preset}", 2.6 * base + 30):
        b.section(f"serve/{args.serve_preset}", part_serve, b, config, photo_paths, args.serve_preset)
    if "api" in parts and fits(f"api/{args.serve_preset}", 2.2 * base + 20):
        b.section(f"api/{args.serve_preset}", part_api, b, config, photo_paths, args.serve_preset)
    res["verdict"] = verdict(res)
    res["total_s"] = round(b.elapsed(), 1)
    b.sampler.close()
    b.save()
    pack_logs(args.work, args.out / "logs.tgz")
    print((args.out / "pipeline-gpu.md").read_text(encoding="utf-8"))
    return 0 if not res["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
