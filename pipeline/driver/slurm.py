"""``batch --executor slurm``: a batch split into shards, each shard one SLURM array task running the warm engine.

On the login node the driver plans the batch (images whose run directories are up to date are skipped, bad
lines reported), writes the rest as shard files (batch-list JSONL, ``slurm.shard_size`` images each) under
``ROOT/.slurm/<submission>/``, and submits **array jobs** with plain ``sbatch`` (argument lists, no shell):

- ``per-stage`` (default when the stages ask for different resources): one array per stage, the reconstruct
  array linked task by task with ``--dependency=aftercorr:<segment array> --kill-on-invalid-dep=yes``, so shard
  *i*'s 3D task starts when its segmentation task succeeded and is cancelled when it failed;
- ``combined``: one array running both stages per shard (resources: the larger of the two stages').

Each task runs ``python -m pipeline batch --list <shard> --out ROOT --slurm-task`` (the same batch code as on a
workstation). **Exit policy of a task:** 0 when at least one image of its shard finished (failed images are
recorded in the run directories and the shard summary), 1 when none did (a broken env, a bad node: then the
linked 3D task is cancelled), so one bad photo never cancels the 3D of its shard-mates.

**Preemption and time limits:** tasks ask for ``SIGUSR1`` ``slurm.warn_s`` seconds before their limit
(``--signal=B:USR1@N``); the batch shell forwards it to the driver, which abandons the image in flight (marked
``interrupted``), stops its workers and exits 143; the shell then requeues the task (``scontrol requeue``). The
requeued task skips every finished image by its fingerprint; ``--force`` applies to a task's first start only
(``SLURM_RESTART_COUNT``), so nothing finished is redone.

Secrets (``HF_TOKEN``, the VLM API key) reach the tasks through the environment (sbatch's default
``--export=ALL``), never through scripts, argv or the submission files. The shard files, scripts, submission
record (``submission.json``) and per-task logs (``logs/<stage>-<array job>_<task>.out``) are kept next to each
other; :func:`batch_status` maps every image to its shard, task state and log.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from pipeline.atomic import write_json_atomic, write_with
from pipeline.config import PROJECT_ROOT, STAGE_NAMES, PipelineConfig, SlurmStageConfig, apply_overrides
from pipeline.driver.batch import BatchItem, read_items, requests_for
from pipeline.driver.runner import Runner
from pipeline.errors import PipelineError, UsageError
from pipeline.handoff import RUN_RECORD, RunRecord

__all__ = ["SLURM_DIR", "submit_batch", "batch_status", "task_exit_code", "script_text", "wait_for", "arrays_for"]

SLURM_DIR = ".slurm"
SUBMISSION_NAME = "submission.json"
_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD")


@dataclass(frozen=True)
class Array:
    """One array job to submit: a label (``segment``, ``reconstruct`` or ``all``), its stages and resources."""

    label: str
    stages: tuple[str, ...]
    resources: SlurmStageConfig


# ---------------------------------------------------------------------------------------------- planning


def plan_items(config: PipelineConfig, items: Sequence[BatchItem], stages: tuple[str, ...],
               force: frozenset[str], from_stage: str | None) -> tuple[list[BatchItem], list[str]]:
    """(items with work to do, one line per item skipped or invalid). Up-to-date runs are skipped here, on the
    login node, so no task is spent on them."""
    todo: list[BatchItem] = []
    lines: list[str] = []
    for item, req in requests_for(items, config, stages, force, from_stage):
        if isinstance(req, str):
            lines.append(f"{item.source}: invalid: {req}")
            continue
        try:
            plan = Runner(req.config or config).plan(req)
        except PipelineError as exc:
            lines.append(f"{item.source}: invalid: {exc.message}")
            continue
        if any(d.runs for d in plan):
            todo.append(item)
        else:
            lines.append(f"{item.source}: skip (up to date)")
    return todo, lines


def arrays_for(config: PipelineConfig, stages: tuple[str, ...]) -> list[Array]:
    """The array jobs for ``stages`` under ``slurm.mode`` (see the module docstring)."""
    slurm = config.slurm
    per_stage = slurm.mode == "per-stage" or (slurm.mode == "auto" and slurm.segment != slurm.reconstruct)
    if len(stages) == 1 or per_stage:
        return [Array(s, (s,), slurm.stage(s)) for s in stages]
    seg, rec = slurm.segment, slurm.reconstruct
    larger = SlurmStageConfig(
        gpus=max(seg.gpus, rec.gpus), gpu_type=rec.gpu_type or seg.gpu_type, cpus=max(seg.cpus, rec.cpus),
        mem=max(seg.mem, rec.mem, key=_mem_mb), time=max(seg.time, rec.time, key=_time_s),
    )
    return [Array("all", stages, larger)]


def _mem_mb(mem: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", mem.strip().upper())
    if not match:
        raise UsageError(f"slurm memory {mem!r} is not like 500M or 64G", hint="--set slurm.reconstruct.mem=64G")
    return float(match.group(1)) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[match.group(2)]


def _time_s(value: str) -> int:
    days, _, clock = value.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


# ---------------------------------------------------------------------------------------------- files


def shard_lines(items: Sequence[BatchItem], root: Path) -> list[str]:
    """Batch-list JSONL lines for ``items``: absolute image, run dir relative to the batch ``root`` (resolved),
    query or prompt, per-line options."""
    lines = []
    for item in items:
        out = item.run_dir.resolve().relative_to(root)
        row: dict[str, Any] = {"image": str(item.image), "out": str(out)}
        if item.query is not None:
            row["query"] = item.query
        else:
            row["prompt"] = ",".join(item.prompts)
        for override in item.overrides:
            key, _, value = override.partition("=")
            row[key] = value
        lines.append(json.dumps(row))
    return lines


def script_text(config: PipelineConfig, array: Array, *, sub_dir: Path, root: Path, shards: int,
                force: frozenset[str], from_stage: str | None) -> str:
    """The sbatch script of one array (bash; every value quoted; no secrets)."""
    slurm, res = config.slurm, array.resources
    python = slurm.python or sys.executable
    directives = [
        f"--job-name=i3d-{array.label}-{sub_dir.name}",
        f"--array=0-{shards - 1}%{slurm.parallelism}",
        f"--output={sub_dir}/logs/{array.label}-%A_%a.out",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{slurm.warn_s}",
        f"--time={res.time}",
        f"--cpus-per-task={res.cpus}",
        f"--mem={res.mem}",
    ]
    if res.gpus:
        directives.append(f"--gres=gpu:{res.gpu_type + ':' if res.gpu_type else ''}{res.gpus}")
    for flag, value in (("partition", slurm.partition), ("account", slurm.account), ("qos", slurm.qos)):
        if value:
            directives.append(f"--{flag}={value}")
    directives += slurm.extra_args
    rerun = [f"--force={s}" for s in sorted(force)] + ([f"--from={from_stage}"] if from_stage else [])
    lines = ["#!/bin/bash", *(f"#SBATCH {_quote(d)}" for d in directives), ""]
    lines += [
        f"# image-to-3d batch: stages {','.join(array.stages)}, shard = this task's index (submission {sub_dir.name})",
        "set -u",
        f"cd {_quote(str(PROJECT_ROOT))}",
        f"shard=$(printf '{sub_dir}/shard-%03d.jsonl' \"$SLURM_ARRAY_TASK_ID\")",
        f"rerun=({' '.join(_quote(r) for r in rerun)})",
        'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then rerun=(); fi  # a requeued task only finishes what is left',
        f"{_quote(python)} -u -m pipeline batch --slurm-task --list \"$shard\" --out {_quote(str(root))} "
        f"--stages {','.join(array.stages)} --config {_quote(str(sub_dir / 'config.json'))} "
        f"--summary \"{sub_dir}/summary-{array.label}-$SLURM_ARRAY_TASK_ID.json\" \"${{rerun[@]}}\" &",
        "child=$!",
        "trap 'kill -USR1 \"$child\" 2>/dev/null' USR1  # SLURM's warning (--signal=B:USR1): stop cleanly",
        'wait "$child"; rc=$?',
        'if [ "$rc" -gt 128 ]; then wait "$child"; again=$?; [ "$again" -ne 127 ] && rc=$again; fi',
        'if [ "$rc" -eq 143 ]; then',
        '  echo "stopped before the time limit: requeueing ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return text if re.fullmatch(r"[\w@%+=:,./-]+", text) else "'" + text.replace("'", "'\\''") + "'"


# ---------------------------------------------------------------------------------------------- submitting


def submit_batch(config: PipelineConfig, items: Sequence[BatchItem], *, root: Path, stages: tuple[str, ...],
                 force: frozenset[str] = frozenset(), from_stage: str | None = None, dry_run: bool = False) -> int:
    """Plan, write the shards and scripts, submit the arrays (or print them with ``dry_run``). Exit code."""
    if shutil.which("sbatch") is None and not dry_run:
        raise UsageError("sbatch not found: --executor slurm runs on a SLURM login node",
                         hint="run it where `sbatch` works, or drop --executor slurm to run here")
    root = root.resolve()
    todo, lines = plan_items(config, items, stages, force, from_stage)
    for line in lines:
        print(line)
    if not todo:
        print(f"slurm: nothing to submit ({len(lines)} line(s) skipped or invalid)")
        return 0 if all(": skip" in line for line in lines) else 1
    sub_dir = root / SLURM_DIR / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    shards = [todo[i : i + config.slurm.shard_size] for i in range(0, len(todo), config.slurm.shard_size)]
    arrays = arrays_for(config, stages)
    scripts = {a.label: script_text(config, a, sub_dir=sub_dir, root=root, shards=len(shards), force=force,
                                    from_stage=from_stage) for a in arrays}
    if dry_run:
        return _print_dry_run(sub_dir, root, shards, scripts, arrays)
    (sub_dir / "logs").mkdir(parents=True)
    write_json_atomic(sub_dir / "config.json", config.model_dump(mode="json"))
    for i, shard in enumerate(shards):
        text = "\n".join(shard_lines(shard, root)) + "\n"
        write_with(sub_dir / f"shard-{i:03d}.jsonl", lambda tmp, t=text: tmp.write_text(t))
    for label, text in scripts.items():
        write_with(sub_dir / f"{label}.sbatch", lambda tmp, t=text: tmp.write_text(t))
    jobs: dict[str, str] = {}
    previous: str | None = None
    for array in arrays:
        extra = [f"--dependency=aftercorr:{previous}", "--kill-on-invalid-dep=yes"] if previous else []
        jobs[array.label] = previous = _sbatch([*extra, str(sub_dir / f"{array.label}.sbatch")])
    record = {
        "schema_version": 1, "id": sub_dir.name, "created": datetime.now().isoformat(timespec="seconds"),
        "root": str(root), "stages": list(stages), "arrays": [a.label for a in arrays], "jobs": jobs,
        "shards": [{"index": i, "file": f"shard-{i:03d}.jsonl",
                    "items": [{"source": it.source, "image": str(it.image), "run_dir": str(it.run_dir.resolve())}
                              for it in shard]} for i, shard in enumerate(shards)],
    }
    write_json_atomic(sub_dir / SUBMISSION_NAME, record)
    print(f"slurm: {len(todo)} image(s) in {len(shards)} shard(s); arrays "
          + ", ".join(f"{label} job {jid}" for label, jid in jobs.items()))
    print(f"slurm: follow with `python -m pipeline batch-status {root}`; logs in {sub_dir / 'logs'}")
    return 0


def _sbatch(args: list[str]) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise UsageError(f"sbatch refused the job: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}",
                         hint="check slurm.partition/account/qos and the resources (--set slurm.segment.mem=…)")
    return proc.stdout.strip().split(";")[0]


def _print_dry_run(sub_dir: Path, root: Path, shards: list[list[BatchItem]], scripts: dict[str, str], arrays: list[Array]) -> int:
    print(f"slurm dry run: nothing submitted; files would go to {sub_dir}")
    for i, shard in enumerate(shards):
        print(f"--- {sub_dir}/shard-{i:03d}.jsonl ({len(shard)} image(s))")
        print("\n".join(shard_lines(shard, root)))
    for n, array in enumerate(arrays):
        how = "" if n == 0 else f" (sbatch --dependency=aftercorr:<{arrays[n - 1].label} job id> --kill-on-invalid-dep=yes)"
        print(f"--- {sub_dir}/{array.label}.sbatch{how}")
        print(scripts[array.label], end="")
    return 0


def task_exit_code(statuses: Sequence[str], batch_code: int) -> int:
    """A shard task's exit code from its images' statuses: 0 when any finished, 1 when none did; 130/143 kept."""
    if batch_code in (130, 143):
        return batch_code
    if not statuses or any(s in ("succeeded", "no objects") for s in statuses):
        return 0
    return 1


# ---------------------------------------------------------------------------------------------- status


def _submissions(root: Path) -> list[dict[str, Any]]:
    paths = sorted((root / SLURM_DIR).glob(f"*/{SUBMISSION_NAME}"))
    if not paths:
        raise UsageError(f"no SLURM submissions under {root / SLURM_DIR}",
                         hint="submit with `python -m pipeline batch ... --out ROOT --executor slurm`")
    out = []
    for path in paths:
        record = json.loads(path.read_text())
        record["dir"] = path.parent
        out.append(record)
    return out


def _task_states(jobs: dict[str, str]) -> dict[tuple[str, int], str]:
    """(array label, task index) → scheduler state from ``scontrol show job`` (live tasks and those finished within
    ``MinJobAge``; ``sacct`` is not used: accounting is often absent). Tasks it no longer knows are absent."""
    states: dict[tuple[str, int], str] = {}
    for label, jid in jobs.items():
        proc = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=30)
        for line in proc.stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            state, task = fields.get("JobState", "UNKNOWN"), fields.get("ArrayTaskId", "")
            for index in _task_indices(task):
                states[(label, index)] = state
    return states


def _task_indices(spec: str) -> list[int]:
    """``3`` → [3]; ``0-2%8`` or ``[0-2,5]`` → [0, 1, 2(, 5)]."""
    out: list[int] = []
    for part in spec.strip("[]").split("%")[0].split(","):
        if "-" in part:
            a, b = part.split("-")
            out += range(int(a), int(b) + 1)
        elif part.isdigit():
            out.append(int(part))
    return out


def _image_state(run_dir: Path, stages: Sequence[str]) -> tuple[str, str]:
    """(``done`` | ``failed`` | ``running`` | ``waiting``, the error line) from the run's ``run.json``."""
    path = run_dir / RUN_RECORD
    if not path.exists():
        return "waiting", ""
    record = RunRecord.model_validate_json(path.read_text())
    statuses = [record.stages[s].status if s in record.stages else "pending" for s in stages]
    failed = [record.stages[s].reason or "failed" for s in stages if s in record.stages and record.stages[s].status == "failed"]
    if failed:
        return "failed", failed[0]
    if all(s in ("succeeded", "skipped") for s in statuses):
        return "done", ""
    return ("running" if "running" in statuses else "waiting"), ""


def batch_status(root: Path, *, resume: bool = False, overrides: Sequence[str] = (), dry_run: bool = False) -> int:
    """Print per shard and per image state; with ``resume`` resubmit what is missing or failed, with the latest
    submission's config changed by ``overrides`` (``KEY=VALUE``, e.g. more memory). Exit code: 0 when every image
    is done, 1 otherwise (3 while tasks are still queued or running)."""
    root = root.resolve()
    latest: dict[str, tuple[dict[str, Any], int, dict[str, str]]] = {}
    active = 0
    for sub in _submissions(root):
        states = _task_states(sub["jobs"])
        print(f"submission {sub['id']}: arrays " + ", ".join(f"{k} {v}" for k, v in sub["jobs"].items()))
        for shard in sub["shards"]:
            index = shard["index"]
            tasks = {label: states.get((label, index), "ENDED") for label in sub["arrays"]}
            active += sum(s in _ACTIVE for s in tasks.values())
            counts: dict[str, int] = {}
            for item in shard["items"]:
                state, _ = _image_state(Path(item["run_dir"]), sub["stages"])
                counts[state] = counts.get(state, 0) + 1
                latest[item["run_dir"]] = (sub, index, item)
            print(f"  shard {index:03d}: " + ", ".join(f"{label} {state.lower()}" for label, state in tasks.items())
                  + " | " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    failed, missing = [], []
    for run_dir, (sub, index, item) in latest.items():
        state, error = _image_state(Path(run_dir), sub["stages"])
        if state == "failed":
            failed.append((sub, index, item, error))
        elif state != "done":
            missing.append((sub, index, item))
    done = len(latest) - len(failed) - len(missing)
    print(f"images: {done} done, {len(failed)} failed, {len(missing)} not finished, {active} task(s) queued or running")
    for sub, index, item, error in failed:
        logs = ", ".join(str(Path(sub["dir"]) / "logs" / f"{label}-{sub['jobs'][label]}_{index}.out") for label in sub["arrays"])
        print(f"failed: {item['source']}: {error} (log: {logs})")
    if not resume:
        return 3 if active else (0 if not failed and not missing else 1)
    if active:
        raise UsageError(f"{active} task(s) of this batch are still queued or running",
                         hint="wait for them (batch-status shows progress) or scancel them, then --resume")
    redo = [(sub, item) for sub, _, item, _ in failed] + [(sub, item) for sub, _, item in missing]
    if not redo:
        print("resume: nothing to resubmit")
        return 0
    return _resubmit(redo, overrides, root, dry_run)


def _resubmit(redo: list[tuple[dict[str, Any], dict[str, str]]], overrides: Sequence[str], root: Path,
              dry_run: bool) -> int:
    """Submit the images of ``redo`` again, from their shard lines, with the latest submission's config and
    ``overrides`` on top."""
    sub = redo[-1][0]
    cfg = PipelineConfig.model_validate(json.loads((Path(sub["dir"]) / "config.json").read_text()))
    cfg = apply_overrides(cfg, overrides) if overrides else cfg
    wanted = {item["run_dir"] for _, item in redo}
    by_run: dict[str, BatchItem] = {}  # the newest line of each run dir (an image may sit in several submissions)
    for shard_file in sorted({Path(s["dir"]) / sh["file"] for s, _ in redo for sh in s["shards"]}):
        by_run.update({str(it.run_dir): it for it in read_items(list_file=shard_file, out_root=root)
                       if str(it.run_dir) in wanted})
    items = list(by_run.values())
    print(f"resume: resubmitting {len(items)} image(s)")
    stages = tuple(s for s in STAGE_NAMES if s in sub["stages"])
    return submit_batch(cfg, items, root=root, stages=stages, dry_run=dry_run)


def wait_for(root: Path, timeout_s: float) -> bool:
    """True once no task of the batch under ``root`` is queued or running (polls the scheduler)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(s in _ACTIVE for sub in _submissions(root.resolve()) for s in _task_states(sub["jobs"]).values()):
            return True
        time.sleep(1)
    return False

