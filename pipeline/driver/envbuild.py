"""``python -m pipeline envs create``: build stage envs from their specs, step by step, resumably.

An env's build is a list of named steps (:func:`plan_steps`):

1. ``create`` — the conda tool creates the prefix from the spec's conda part (micromamba, mamba or conda,
   for ``kind: conda``), or ``pythonX.Y -m venv`` where there is no conda tool or the kind is ``venv``;
2. ``pip`` — ``<prefix>/bin/python -m pip install`` of the spec's ``pip:`` list;
3. … the extra steps declared in ``envs/steps/<name>.yml`` (see :mod:`pipeline.driver.envspec`), e.g.
   ``compiled`` and ``sam3d_objects`` for ``sam3d-objects``.

After each step the list of finished steps is written atomically to ``<prefix>/.pipeline-env-build.json``;
a failed step leaves the earlier ones' results, and rerunning the command resumes at the failed step. A failed
``create`` removes the prefix (nothing half-created is reused). The stamp ``<prefix>/.pipeline-env.json`` (the
spec's hash, read by :func:`stamp_state`) is written only when every step succeeded; a changed spec (or
steps file) makes the env *stale* and the next build starts over, as does ``--recreate``.

Each step's child runs through :func:`~pipeline.driver.proc.run_command` (argument list, own process group,
stopped on Ctrl-C) with its output in ``.envs/logs/<name>.log``; :mod:`pipeline.driver.envprogress` shows what
it does meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from pipeline.atomic import write_bytes_atomic, write_json_atomic
from pipeline.config import PROJECT_ROOT, PipelineConfig
from pipeline.driver.envprogress import Counter, StepDisplay, make_display
from pipeline.driver.envs import ENVS_ROOT, Env, pipeline_command, resolve_env
from pipeline.driver.envspec import EnvSpec, read_spec
from pipeline.driver.proc import capture_output, child_environment, run_command, tail_lines
from pipeline.errors import EnvCreateFailed
from pipeline.handoff import now_iso

__all__ = [
    "SPECS_DIR",
    "BuildStep",
    "BuildStatus",
    "read_spec",
    "spec_for",
    "target_env",
    "build_status",
    "stamp_state",
    "find_python",
    "plan_steps",
    "run_steps",
    "create_envs",
]

SPECS_DIR = PROJECT_ROOT / "envs"
CONDA_TOOLS = ("micromamba", "mamba", "conda")
STATE_VERSION = 1
_PIP = ("-m", "pip", "install", "--disable-pip-version-check")
_PROBE_PYTHON = "import sys; print('%d.%d' % sys.version_info[:2]); import ensurepip, venv; print('venv ok')"


@dataclass(frozen=True)
class BuildStep:
    """One named command of an env's build: ``argv`` with ``variables`` set on top of the build environment.

    ``counter`` says which log lines count as progress; ``fresh_prefix`` steps (``create``) start from an
    empty prefix and remove it when they fail.
    """

    name: str
    argv: tuple[str, ...]
    variables: Mapping[str, str] = field(default_factory=dict)
    counter: Counter = "pip"
    fresh_prefix: bool = False


@dataclass(frozen=True)
class BuildStatus:
    """Where an env's build stands: ``state`` and, for a half-built env, the step a rerun starts at."""

    state: Literal["missing", "no stamp", "stale", "incomplete", "up to date"]
    resume_at: str | None = None
    done: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``up to date``, ``stale (spec changed)``, ``incomplete (resumes at step X)``, ``no stamp``, ``missing``."""
        if self.state == "stale":
            return "stale (spec changed)"
        if self.state == "incomplete":
            return f"incomplete (resumes at step {self.resume_at})"
        return self.state


def spec_for(config: PipelineConfig, name: str) -> EnvSpec:
    """The parsed spec of env ``name`` (``envs.<name>.spec``, a file under ``envs/`` or an absolute path)."""
    cfg = config.env_for(name)
    return read_spec(SPECS_DIR / (cfg.spec or f"{name}.yml"))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_state(env: Env) -> dict[str, Any] | None:
    state = _read_json(env.build_state)
    if state is None or state.get("schema_version") != STATE_VERSION or not isinstance(state.get("steps"), list):
        return None
    return state


def build_status(env: Env, spec: EnvSpec | None) -> BuildStatus:
    """Compare the env's stamp (or, while half-built, its build state) with ``spec``."""
    if not env.exists():
        return BuildStatus("missing")
    if env.stamp.exists():
        stamp = _read_json(env.stamp)
        if stamp is None:
            return BuildStatus("no stamp")
        if spec is not None and stamp.get("spec_sha256") != spec.sha256:
            return BuildStatus("stale")
        return BuildStatus("up to date")
    state = _read_state(env)
    if state is None:
        return BuildStatus("no stamp")
    if spec is not None and state.get("spec_sha256") != spec.sha256:
        return BuildStatus("stale")
    done = tuple(state.get("done", {}))
    pending = [s for s in state["steps"] if s not in done]
    return BuildStatus("incomplete", pending[0] if pending else state["steps"][-1], done)


def stamp_state(env: Env, spec: EnvSpec | None) -> str:
    """The label of :func:`build_status` (``up to date``, ``stale (spec changed)``, ``missing``, …)."""
    return build_status(env, spec).label


# ---------------------------------------------------------------------------------------------- interpreters


def _python_dirs() -> list[Path]:
    return [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]


def find_python(version: tuple[int, int]) -> tuple[Path | None, str]:
    """An interpreter of ``version`` that can make venvs: the driver's own when it matches, else
    ``pythonX.Y`` on PATH (every match is tried: a pyenv shim of an inactive version does not run), else
    ``uv python find X.Y``. Returns ``(path, "")`` or ``(None, why the candidates were refused)``."""
    if sys.version_info[:2] == version:
        return Path(sys.executable), ""
    wanted = f"{version[0]}.{version[1]}"
    candidates = [d / f"python{wanted}" for d in _python_dirs() if (d / f"python{wanted}").is_file()]
    uv = shutil.which("uv")
    if uv:
        rc, out = capture_output([uv, "python", "find", wanted], env=child_environment(), timeout_s=30)
        if rc == 0 and out.strip():
            candidates.append(Path(out.strip().splitlines()[-1]))
    refused: list[str] = []
    for candidate in dict.fromkeys(candidates):
        rc, out = capture_output([str(candidate), "-c", _PROBE_PYTHON], env=child_environment(), timeout_s=30)
        lines = out.split()
        if lines[:1] == [wanted] and rc == 0:
            return candidate, ""
        refused.append(f"{candidate} " + ("lacks the venv module" if lines[:1] == [wanted] else "does not run"))
    return None, "; ".join(refused)


def _python_missing(name: str, env: Env, wanted: str, refused: str) -> EnvCreateFailed:
    fixes = f"install python{wanted} (apt install python{wanted}-venv, pyenv, or uv python install {wanted})"
    other = ("or install micromamba/conda so the env gets its own Python" if env.kind == "conda"
             else f"or set envs.{name}.kind=conda (with micromamba/conda on PATH)")
    seen = f" ({refused})" if refused else ""
    return EnvCreateFailed(
        f"env '{name}' needs Python {wanted} (its spec pins it) and no python{wanted} was found{seen}",
        hint=f"{fixes}, {other}, or pass --any-python to build it with Python {sys.version.split()[0]} anyway",
    )


# ---------------------------------------------------------------------------------------------- plan


def _conda_tool() -> str | None:
    return next((shutil.which(t) for t in CONDA_TOOLS if shutil.which(t)), None)


def _conda_part(spec: EnvSpec, name: str) -> Path:
    """The spec minus its ``pip:`` list (the ``pip`` step installs that), written beside the logs."""
    path = ENVS_ROOT / "logs" / f"{name}.conda.yml"
    text = f"# generated from {spec.path} by `envs create`: its conda part (the pip step installs the rest)\n"
    write_bytes_atomic(path, (text + yaml.safe_dump(dict(spec.conda_file), sort_keys=False)).encode())
    return path


def plan_steps(env: Env, spec: EnvSpec, *, tool: str, python: Path | None = None,
               conda_file: Path | None = None) -> list[BuildStep]:
    """The build of ``env`` from ``spec`` as named steps.

    ``tool`` is the conda tool's path or ``"venv"``; ``python`` makes the venv (default: the driver's);
    ``conda_file`` is the spec's conda part (default: the spec itself).
    """
    prefix = str(env.prefix)
    env_python = str(env.prefix / "bin" / "python")
    if tool == "venv":
        create = BuildStep("create", (str(python or sys.executable), "-m", "venv", prefix), counter="none", fresh_prefix=True)
    else:
        source = str(conda_file or spec.path)
        if Path(tool).name == "micromamba":
            argv = (tool, "create", "--yes", "--prefix", prefix, "--file", source)
        else:
            argv = (tool, "env", "create", "--prefix", prefix, "--file", source)
        create = BuildStep("create", argv, counter="conda", fresh_prefix=True)
    steps = [create]
    if spec.pip:
        steps.append(BuildStep("pip", (env_python, *_PIP, *spec.pip)))
    for extra in spec.steps:
        variables = {k: v.replace("{prefix}", prefix) for k, v in extra.conda_variables.items()} if tool != "venv" else {}
        steps.append(BuildStep(extra.name, (env_python, *_PIP, *extra.pip), variables))
    return steps


# ---------------------------------------------------------------------------------------------- run


def _step_environment(env: Env, step: BuildStep) -> dict[str, str]:
    if step.fresh_prefix:  # the create step runs outside the env
        return child_environment()
    marker = {"CONDA_PREFIX": str(env.prefix)} if env.kind == "conda" else {"VIRTUAL_ENV": str(env.prefix)}
    return child_environment(bin_dir=env.prefix / "bin", set_vars={**marker, **step.variables})


def _write_state(env: Env, state: dict[str, Any]) -> None:
    env.prefix.mkdir(parents=True, exist_ok=True)
    write_json_atomic(env.build_state, state)


def run_steps(env: Env, steps: Sequence[BuildStep], *, spec: EnvSpec, log: Path, display: StepDisplay,
              record: Mapping[str, Any] | None = None) -> None:
    """Run the steps of ``env`` not yet recorded as done, recording each; write the stamp after the last.

    ``record`` adds fields to the state and the stamp (the tool, the interpreter). A step that exits non-zero
    raises EnvCreateFailed naming it; the finished steps stay recorded, so the next call starts there.
    """
    names = [s.name for s in steps]
    state = _read_state(env)
    if state is None or state.get("spec_sha256") != spec.sha256 or state.get("steps") != names:
        state = {"schema_version": STATE_VERSION, "spec": str(spec.path), "spec_sha256": spec.sha256,
                 **(record or {}), "steps": names, "done": {}}
    done: dict[str, Any] = state["done"]
    start = next((i for i, name in enumerate(names) if name not in done), len(names))
    if 0 < start < len(names):
        display.note(f"{env.name}: resuming at step {start + 1}/{len(names)} {names[start]} "
                     f"({', '.join(names[:start])} done)")
    for i in range(start, len(steps)):
        step = steps[i]
        if step.fresh_prefix and env.prefix.exists():
            shutil.rmtree(env.prefix)
        display.start(env.name, i + 1, len(steps), step.name, log, step.counter)
        try:
            result = run_command(step.argv, env=_step_environment(env, step), log_path=log, on_poll=display.poll)
        except BaseException:
            display.finish(False, "interrupted")
            if step.fresh_prefix:
                shutil.rmtree(env.prefix, ignore_errors=True)
            raise
        if result.returncode != 0:
            display.finish(False, f"failed (exit {result.returncode})")
            if step.fresh_prefix:
                shutil.rmtree(env.prefix, ignore_errors=True)
            cmd = f"{pipeline_command()} envs create {env.name}"
            raise EnvCreateFailed(
                f"env '{env.name}': step {i + 1}/{len(steps)} '{step.name}' failed (exit {result.returncode}) "
                f"after {result.duration_s:.0f} s; last lines of {log}:\n{tail_lines(log, 15)}",
                hint=f"fix the cause (read {log}), then `{cmd}` resumes at step '{step.name}'",
            )
        display.finish(True)
        done[step.name] = {"finished": now_iso(), "duration_s": round(result.duration_s, 1)}
        _write_state(env, state)
    stamp = {"spec": str(spec.path), "spec_sha256": spec.sha256, **(record or {}), "steps": names, "created": now_iso()}
    write_json_atomic(env.stamp, stamp)


# ---------------------------------------------------------------------------------------------- create


def target_env(config: PipelineConfig, name: str) -> Env:
    """Where env ``name`` is, or will be built: found as the config says, else ``.envs/<name>``."""
    cfg = config.env_for(name)
    env = resolve_env(config, name, must_exist=False)
    if cfg.prefix is None and not env.exists():
        env = Env(name, cfg.kind, ENVS_ROOT / (cfg.name or name), dict(cfg.variables), cfg.spec)
    return env


def _venv_python(name: str, env: Env, spec: EnvSpec, *, any_python: bool, say: Any) -> Path:
    if spec.python_version is None:
        return Path(sys.executable)
    python, refused = find_python(spec.python_version)
    if python is not None:
        return python
    if not any_python:
        raise _python_missing(name, env, spec.python or "", refused)
    say(f"{name}: warning: the spec pins Python {spec.python}, none found; building with "
        f"{sys.version.split()[0]} ({sys.executable}) as --any-python asks")
    return Path(sys.executable)


def _create_one(config: PipelineConfig, name: str, *, recreate: bool, any_python: bool, display: StepDisplay) -> None:
    say = display.note
    cfg = config.env_for(name)
    if cfg.kind == "current":
        say(f"{name}: uses the current interpreter ({sys.executable}); nothing to create")
        return
    spec = spec_for(config, name)
    env = target_env(config, name)
    status = build_status(env, spec)
    if status.state == "up to date" and not recreate:
        say(f"{name}: up to date at {env.prefix}")
        return
    if status.state == "no stamp" and not recreate:
        say(f"{name}: exists at {env.prefix} (not built by this tool); left as is — pass --recreate to rebuild")
        return
    if status.state == "stale" and not recreate:
        say(f"{name}: its spec changed since it was built; starting over")
    state = _read_state(env) if status.state == "incomplete" and not recreate else None
    log = ENVS_ROOT / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if state is None:  # a fresh build: choose the tool and interpreter before anything is removed
        tool = (_conda_tool() if cfg.kind == "conda" else None) or "venv"
        if cfg.kind == "conda" and tool == "venv":
            say(f"{name}: no conda/mamba/micromamba on PATH; building a venv with pip instead")
            if spec.conda:
                say(f"{name}: skipped conda-only entries (install them on the system): {', '.join(spec.conda)}")
        python = _venv_python(name, env, spec, any_python=any_python, say=say) if tool == "venv" else None
        record = {"tool": tool, "python": str(python) if python else None}
        if env.prefix.exists():
            shutil.rmtree(env.prefix)
        log.write_text("")
    else:
        record = {"tool": state.get("tool") or "venv", "python": state.get("python")}
    tool = record["tool"]
    python = Path(record["python"]) if record["python"] else None
    conda_file = _conda_part(spec, name) if tool != "venv" else None
    steps = plan_steps(env, spec, tool=tool, python=python, conda_file=conda_file)
    if tool == "venv" and any(s.conda_variables for s in spec.steps):
        names = sorted({k for s in spec.steps for k in s.conda_variables})
        say(f"{name}: a venv has no conda toolkit: steps use your own {', '.join(names)} (set them if needed)")
    say(f"{name}: building at {env.prefix} in {len(steps)} steps ({', '.join(s.name for s in steps)}); log: {log}")
    run_steps(env, steps, spec=spec, log=log, display=display, record=record)
    say(f"{name}: ready")


def create_envs(config: PipelineConfig, names: Sequence[str], *, recreate: bool = False, any_python: bool = False,
                weights: bool = False, display: StepDisplay | None = None) -> int:
    """Create the named envs (default: all declared), then with ``weights`` fetch their gated weights.

    An env that fails does not stop the others (they are independent); its error is raised at the end, after
    the weights of the envs that were built. Returns 0 (or the weights fetch's code).
    """
    display = display or make_display()
    requested = list(names)
    failed: list[tuple[str, EnvCreateFailed]] = []
    try:
        names = requested or sorted(config.envs)
        if weights:
            from pipeline.driver.weights import token_note

            note = token_note(config, names)
            if note:
                display.note(note)
        for name in names:
            try:
                _create_one(config, name, recreate=recreate, any_python=any_python, display=display)
            except EnvCreateFailed as exc:
                failed.append((name, exc))
                display.note(f"{name}: FAILED: {exc.message.splitlines()[0]}")
        built = [n for n in names if n not in dict(failed)]
        code = 0
        if weights and built:
            from pipeline.driver.weights import fetch_weights

            code = fetch_weights(config, built, display=display)
        elif not failed:
            display.note(f"next: {pipeline_command()} envs check" + (f" {' '.join(requested)}" if requested else ""))
    finally:
        display.close()
    if len(failed) == 1:
        raise failed[0][1]
    if failed:
        which = " ".join(n for n, _ in failed)
        raise EnvCreateFailed(f"{len(failed)} envs failed to build: {which} (the lines above say at which step)",
                              hint=f"fix each cause (logs in {ENVS_ROOT / 'logs'}), then `{pipeline_command()} envs create "
                              f"{which}` resumes each at its failed step")
    return code
