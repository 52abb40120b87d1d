"""``python -m pipeline envs check``: one readable block per env, and the command that fixes each problem.

Per env: a heading (``sam3 (segment)  ✓ ready`` or ``✗ blocked``), then ``key: value`` lines — where it is
and how its build stands, its Python against the spec's pin, the versions of its key packages, the GPU its
torch sees, the weights its stages need — then, for each blocking problem, one line saying what is wrong and
the one command that fixes it. Lines are wrapped to the terminal (at most 100 columns; 80 reads fine).

Blocking: a missing, half-built or stale env, a Python other than the spec's, a missing key package, a probe
that fails, missing gated weights, no Hugging Face token while weights are missing. Warnings (not blocking):
no GPU visible — checking on a CPU machine (a login node, CI) is legitimate, the stages only need the GPU
when they run —, a GPU smaller than the stage needs, weights that the first run will download itself. An env
that no stage of this config uses is reported, never blocking. Exit code 1 when any env is blocked.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from pipeline.config import PipelineConfig
from pipeline.driver.budget import STAGE_NEEDS_GIB
from pipeline.driver.envbuild import build_status, spec_for, target_env
from pipeline.driver.envs import Env, pipeline_command
from pipeline.driver.envspec import EnvSpec, requirement_name
from pipeline.driver.proc import capture_output
from pipeline.driver.weights import find_token, shown_path, weights_environment, weights_jobs, weights_present
from pipeline.errors import ConfigError

__all__ = ["KEY_PACKAGES", "EnvReport", "diagnose", "render", "check_envs"]

# Packages whose versions `envs check` reports, per env name; other envs: the first names of their spec's pip list.
KEY_PACKAGES: dict[str, tuple[str, ...]] = {
    "vllm": ("vllm", "torch", "transformers", "openai"),
    "sam3": ("sam3", "torch", "torchvision", "open_clip_torch", "huggingface_hub", "openai", "pydantic"),
    "sam3d-objects": ("sam3d_objects", "torch", "pytorch3d", "gsplat", "spconv-cu121", "huggingface_hub", "pydantic"),
}
PROBE = r"""
import json, sys, importlib.metadata as md
out = {"python": sys.version.split()[0], "packages": {}, "gpu": None, "gpu_gib": None, "torch": False}
for name in sys.argv[1:]:
    try: out["packages"][name] = md.version(name)
    except md.PackageNotFoundError: out["packages"][name] = None
try:
    import torch
except Exception as exc:
    out["gpu"] = f"not checked (no torch: {type(exc).__name__})"
else:
    out["torch"] = True
    try:
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
            out["gpu_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    except Exception as exc:
        out["gpu"] = f"CUDA error ({type(exc).__name__})"
print(json.dumps(out))
"""
_KEY_WIDTH = 10
_GPU_LABELS = {"sam3": "SAM3", "sam3d": "SAM 3D Objects"}


@dataclass
class EnvReport:
    """The doctor's findings for one env: ``rows`` (key, value), ``problems`` (what, fix), ``warnings``."""

    name: str
    used_by: list[str]
    rows: list[tuple[str, str]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        """True when a stage of this config uses the env and something stops it from running."""
        return bool(self.used_by and self.problems)


def _used_by(config: PipelineConfig, name: str) -> list[str]:
    users = [stage for stage in ("segment", "reconstruct") if config.stage(stage).env == name]
    if config.vlm.url is None and config.vlm.env == name:
        users.append("query mode")
    return users


def _key_packages(name: str, spec: EnvSpec | None) -> tuple[str, ...]:
    if name in KEY_PACKAGES:
        return KEY_PACKAGES[name]
    names = [requirement_name(item) for item in (spec.pip if spec else ())]
    return tuple(dict.fromkeys(n for n in names if n))[:8]


def _probe(env: Env, packages: Sequence[str]) -> dict | None:
    rc, out = capture_output([str(env.python), "-c", PROBE, *packages], env=env.child_env(), timeout_s=180)
    try:
        return json.loads(out.strip().splitlines()[-1]) if rc == 0 and out.strip() else None
    except (ValueError, IndexError):
        return None


def _token_label(token: str | None) -> str:
    if token is None:
        return "none"
    return f"{token} set" if token.isupper() else f"file {shown_path(Path(token))}"


def _hf_cli(env: Env) -> str:
    return shown_path(env.bin_dir / "hf")


def _check_weights(config: PipelineConfig, report: EnvReport, env: Env, cmd: str) -> None:
    seg = config.segment
    if report.name == seg.env and seg.backend == "sam3" and not seg.sam3.random_weights:
        from pipeline.backends.sam3_assets import is_local_checkpoint

        if is_local_checkpoint(seg.sam3.checkpoint):
            path = Path(seg.sam3.checkpoint).expanduser()
            found = path.is_file()
            report.rows.append(("weights", f"{path} " + ("found" if found else "missing")))
            if not found:
                report.problems.append((f"segment.sam3.checkpoint {path} does not exist",
                                        "set segment.sam3.checkpoint to a sam3.pt, or to facebook/sam3"))
    for job in weights_jobs(config, [report.name]):
        environ = weights_environment(config, env, job)
        present = weights_present(job, environ)
        token = find_token(environ)
        where = shown_path(job.dest) if job.dest else "the HF cache"
        state = "found" if present else f"not downloaded; HF token: {_token_label(token)}"
        report.rows.append(("weights", f"{job.repo} in {where}: {state}"))
        if present:
            continue
        if token is None:
            report.problems.append((f"no Hugging Face token ({job.repo} is gated; accept its licence at "
                                    f"{job.licence_url} first)",
                                    f"export HF_TOKEN=hf_...   (or: {_hf_cli(env)} auth login)"))
        fetch = f"{cmd} envs create --weights {report.name}"
        if job.what == "sam3" and token is not None:
            report.warnings.append(f"{job.repo} is fetched by the first run, or now: {fetch}")
        else:
            report.problems.append((f"{job.repo} weights are missing", fetch))
    if report.name == config.vlm.env and config.vlm.url is None:
        model = config.vlm.model
        local = Path(model).expanduser().exists()
        report.rows.append(("weights", f"{model} " + ("found locally" if local else "(public): vLLM downloads it at first start")))


def _check_probe(report: EnvReport, env: Env, spec: EnvSpec | None, info: dict, config: PipelineConfig, cmd: str,
                 *, rebuilding: bool) -> None:
    name = report.name
    pinned = spec.python if spec else None
    version = info.get("python", "?")
    mismatch = pinned is not None and not (version == pinned or version.startswith(pinned + "."))
    report.rows.append(("python", f"{version}" + (f" (spec pins {pinned}: MISMATCH)" if mismatch else
                                                  f" (spec pins {pinned})" if pinned else "")))
    if mismatch and env.kind != "current":
        report.problems.append((f"Python {version}, but the spec pins {pinned} (built with --any-python?)",
                                f"{cmd} envs create --recreate {name}   (needs python{pinned} or conda)"))
    packages = info.get("packages", {})
    report.rows.append(("packages", ", ".join(f"{k} {v or 'MISSING'}" for k, v in packages.items()) or "-"))
    missing = [k for k, v in packages.items() if v is None]
    if missing and not rebuilding:  # a half-built or stale env's own fix installs them
        requirements = [spec.requirement_for(p) if spec else None for p in missing]
        install = f"{shown_path(env.python)} -m pip install " + " ".join(shlex.quote(r or "") for r in requirements)
        if all(requirements) and len(install) <= 70:
            fix = install
        elif env.kind == "current":
            pins = f" (pins: {shown_path(spec.path)})" if spec else ""
            fix = f"install them into {shown_path(env.python)}{pins}"
        else:
            fix = f"{cmd} envs create --recreate {name}"
        report.problems.append((f"not installed: {', '.join(missing)}", fix))
    gpu, gib = info.get("gpu"), info.get("gpu_gib")
    if info.get("torch") and gpu is None:
        report.rows.append(("GPU", "none visible to torch"))
        report.warnings.append("no GPU visible: fine for checking on a CPU machine; the stages need one to run")
    else:
        report.rows.append(("GPU", f"{gpu}, {gib:.0f} GiB" if gib else str(gpu)))
    for stage in ("segment", "reconstruct"):
        section = config.stage(stage)
        need = STAGE_NEEDS_GIB.get(section.backend)
        if section.env == name and need and gib and gib < need:
            report.warnings.append(f"{_GPU_LABELS[section.backend]} needs about {need:.0f} GiB; this GPU has {gib:.0f}")


def diagnose(config: PipelineConfig, name: str) -> EnvReport:
    """Look at env ``name``: build state, probe (Python, packages, GPU), weights."""
    cmd = pipeline_command()
    report = EnvReport(name, _used_by(config, name))
    cfg = config.env_for(name)
    try:
        spec = spec_for(config, name)  # for kind current too: it names the packages and their pins
    except ConfigError as exc:
        spec = None
        if cfg.kind != "current":  # a current env needs no spec
            report.warnings.append(exc.message)
    env = target_env(config, name)
    status = build_status(env, spec) if cfg.kind != "current" else None
    if status is None:
        report.rows.append(("where", f"{shown_path(Path(sys.executable))} (current: the driver's interpreter)"))
    else:
        words = {"stale": "stale: its spec changed", "incomplete": f"half-built, resumes at step {status.resume_at}",
                 "no stamp": "not built by this tool"}
        state = "" if status.state == "missing" else f", {words.get(status.state, status.label)}"
        report.rows.append(("where", f"{shown_path(env.prefix)} ({cfg.kind}{state})"))
    if status is not None and status.state == "missing":
        report.rows[-1] = ("where", f"{shown_path(env.prefix)} ({cfg.kind}): not there")
        report.problems.append(("the env does not exist", f"{cmd} envs create {name}"))
        _check_weights(config, report, env, cmd)
        return report
    if status is not None and status.state == "incomplete":
        report.problems.append((f"half-built: {', '.join(status.done) or 'no step'} done",
                                f"{cmd} envs create {name}   (resumes at step {status.resume_at})"))
    elif status is not None and status.state == "stale":
        report.problems.append(("stale: its spec changed since it was built", f"{cmd} envs create --recreate {name}"))
    info = _probe(env, _key_packages(name, spec))
    if info is None:
        report.problems.append((f"its Python does not run ({shown_path(env.python)})", f"{cmd} envs create --recreate {name}"))
    else:
        _check_probe(report, env, spec, info, config, cmd,
                     rebuilding=status is not None and status.state in ("incomplete", "stale"))
    _check_weights(config, report, env, cmd)
    return report


def _wrap(text: str, first: str, rest: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False) or [first]


def render(report: EnvReport, width: int) -> list[str]:
    """The block of lines for one env, none wider than ``width``."""
    users = f" ({', '.join(report.used_by)})" if report.used_by else " (not used by this config)"
    verdict = "✗ blocked" if report.blocked else ("✓ ready" if not report.problems else "– not ready")
    lines = _wrap(f"{report.name}{users}  {verdict}", "", "    ", width)
    pad = " " * (2 + _KEY_WIDTH + 2)
    for key, value in report.rows:
        lines += _wrap(value, f"  {key + ':':<{_KEY_WIDTH + 1}} ", pad, width)
    for problem, fix in report.problems:
        lines += _wrap(problem, "  ✗ ", "    ", width)
        lines += _wrap(fix, "      ", "        ", width)
    for warning in report.warnings:
        lines += _wrap(warning, "  ! ", "    ", width)
    return lines


def check_envs(config: PipelineConfig, names: Sequence[str], *, write: Callable[[str], None] = print,
               width: int | None = None) -> int:
    """Print one block per env (default: all declared); 1 if any env a stage uses is blocked, else 0."""
    width = width or max(60, min(100, shutil.get_terminal_size((80, 24)).columns))
    blocked = False
    for i, name in enumerate(names or sorted(config.envs)):
        report = diagnose(config, name)
        blocked = blocked or report.blocked
        for line in ([""] if i else []) + render(report, width):
            write(line)
    return 1 if blocked else 0
