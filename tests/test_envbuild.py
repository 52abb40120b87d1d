"""`envs create` in resumable steps, its progress display, the Python a venv is built with, the weights fetch
and the `envs check` doctor — on CPU, with fake steps (``python -c`` snippets) and a test double of the hub
client (tests/doubles/fake_hub). No real conda, no real download."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.atomic import sha256_file, write_json_atomic
from pipeline.config import PipelineConfig
from pipeline.driver import envbuild, weights
from pipeline.driver.envbuild import BuildStep, build_status, create_envs, find_python, plan_steps, read_spec, run_steps
from pipeline.driver.envprogress import LiveDisplay, LogProgress, PlainDisplay
from pipeline.driver.envs import Env, pipeline_command, resolve_env
from pipeline.driver.proc import child_environment, run_command
from pipeline.errors import EnvCreateFailed, EnvNotFound
from tests.conftest import PROJECT_ROOT

FAKE_HUB = PROJECT_ROOT / "tests" / "doubles" / "fake_hub"
SECRET = "hf_test_0123456789secret"


class Lines:
    """A display sink that keeps the lines it is given."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        self.lines.append(text)

    def text(self) -> str:
        return "\n".join(self.lines)


def _step(name: str, code: str, *, fresh: bool = False) -> BuildStep:
    return BuildStep(name, (sys.executable, "-c", code), counter="pip", fresh_prefix=fresh)


def _recording(calls: Path, name: str, extra: str = "") -> str:
    """Snippet: append ``name`` to ``calls``, then run ``extra``."""
    return f"open({str(calls)!r}, 'a').write({name!r} + '\\n')\n{extra}"


def _fail_once(marker: Path) -> str:
    return f"import os, sys\nif not os.path.exists({str(marker)!r}):\n    open({str(marker)!r}, 'w').close(); sys.exit(3)\n"


def _make_python(prefix: Path) -> str:
    """Snippet for a fake create step: make ``<prefix>/bin/python`` (a link to this interpreter)."""
    return (f"import os, sys\nos.makedirs({str(prefix / 'bin')!r}, exist_ok=True)\n"
            f"os.symlink(sys.executable, {str(prefix / 'bin' / 'python')!r})\n")


def _spec(tmp_path: Path, body: str = "", name: str = "spec.yml") -> Path:
    path = tmp_path / "specs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("name: t\ndependencies:\n  - pip\n" + body)
    return path


def _calls(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# ---------------------------------------------------------------------------------------------- step runner


def test_steps_run_in_order_and_the_stamp_is_written_only_after_the_last(tmp_path: Path) -> None:
    env = Env("t", "venv", tmp_path / "env")
    spec = read_spec(_spec(tmp_path))
    calls = tmp_path / "calls"
    stamp_absent = f"import os, sys\nsys.exit(7 if os.path.exists({str(env.stamp)!r}) else 0)\n"
    steps = [_step("create", _recording(calls, "create", _make_python(env.prefix)), fresh=True),
             _step("pip", _recording(calls, "pip", stamp_absent)),
             _step("extra", _recording(calls, "extra", stamp_absent))]
    sink = Lines()
    run_steps(env, steps, spec=spec, log=tmp_path / "build.log", display=PlainDisplay(sink))
    assert _calls(calls) == ["create", "pip", "extra"]
    stamp = json.loads(env.stamp.read_text())
    assert stamp["spec_sha256"] == spec.sha256 and stamp["steps"] == ["create", "pip", "extra"]
    assert list(json.loads(env.build_state.read_text())["done"]) == ["create", "pip", "extra"]
    assert build_status(env, spec).state == "up to date"
    assert any(line.startswith("✓ t [3/3] extra: done") for line in sink.lines)


def test_a_failed_step_keeps_the_earlier_ones_and_a_rerun_resumes_there(tmp_path: Path, monkeypatch) -> None:
    env = Env("t", "venv", tmp_path / "env")
    spec = read_spec(_spec(tmp_path))
    calls, marker = tmp_path / "calls", tmp_path / "failed-once"
    steps = [_step("create", _recording(calls, "create", _make_python(env.prefix)), fresh=True),
             _step("pip", _recording(calls, "pip", _fail_once(marker))),
             _step("extra", _recording(calls, "extra"))]
    log = tmp_path / "build.log"
    with pytest.raises(EnvCreateFailed) as failed:
        run_steps(env, steps, spec=spec, log=log, display=PlainDisplay(Lines()))
    assert "step 2/3 'pip' failed (exit 3)" in failed.value.message
    assert "resumes at step 'pip'" in (failed.value.hint or "")
    assert not env.stamp.exists() and env.python.exists()  # the create step's result is kept
    status = build_status(env, spec)
    assert (status.state, status.resume_at, status.done) == ("incomplete", "pip", ("create",))
    assert status.label == "incomplete (resumes at step pip)"

    # a run that needs this env is refused with the command that finishes it
    config = PipelineConfig.model_validate({"envs": {"t": {"kind": "venv", "prefix": str(env.prefix)}}})
    with pytest.raises(EnvNotFound, match="half-built") as refused:
        resolve_env(config, "t")
    assert "envs create t" in (refused.value.hint or "")

    sink = Lines()
    run_steps(env, steps, spec=spec, log=log, display=PlainDisplay(sink))
    assert _calls(calls) == ["create", "pip", "pip", "extra"]  # create did not run again
    assert sink.lines[0] == "t: resuming at step 2/3 pip (create done)"
    assert env.stamp.exists() and build_status(env, spec).state == "up to date"


def test_a_failed_create_step_removes_the_prefix(tmp_path: Path) -> None:
    env = Env("t", "venv", tmp_path / "env")
    spec = read_spec(_spec(tmp_path))
    steps = [_step("create", _make_python(env.prefix) + "raise SystemExit(2)\n", fresh=True)]
    with pytest.raises(EnvCreateFailed, match="step 1/1 'create' failed"):
        run_steps(env, steps, spec=spec, log=tmp_path / "build.log", display=PlainDisplay(Lines()))
    assert not env.prefix.exists()
    assert build_status(env, spec).state == "missing"


def _fake_plan(calls: Path, marker: Path | None = None, seen: dict | None = None):
    def plan(env: Env, spec, *, tool: str, python=None, conda_file=None) -> list[BuildStep]:
        if seen is not None:
            seen.update(tool=tool, python=python)
        second = _fail_once(marker) if marker is not None else ""
        return [_step("create", _recording(calls, "create", _make_python(env.prefix)), fresh=True),
                _step("pip", _recording(calls, "pip", second)),
                _step("extra", _recording(calls, "extra"))]
    return plan


@pytest.fixture
def envs_root(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "envs-root"
    monkeypatch.setattr(envbuild, "ENVS_ROOT", root)
    monkeypatch.setattr(weights, "ENVS_ROOT", root)
    return root


def test_create_envs_resumes_recreate_and_a_changed_spec_start_over(tmp_path: Path, monkeypatch, envs_root: Path) -> None:
    calls, marker = tmp_path / "calls", tmp_path / "failed-once"
    monkeypatch.setattr(envbuild, "plan_steps", _fake_plan(calls, marker))
    spec_path = _spec(tmp_path)
    prefix = tmp_path / "env"
    config = PipelineConfig.model_validate({"envs": {"t": {"kind": "venv", "prefix": str(prefix), "spec": str(spec_path)}}})

    with pytest.raises(EnvCreateFailed, match="'pip' failed"):
        create_envs(config, ["t"], display=PlainDisplay(Lines()))
    sink = Lines()
    assert create_envs(config, ["t"], display=PlainDisplay(sink)) == 0
    assert "t: resuming at step 2/3 pip (create done)" in sink.lines
    assert _calls(calls) == ["create", "pip", "pip", "extra"]

    sink = Lines()
    create_envs(config, ["t"], display=PlainDisplay(sink))
    assert any(line.startswith("t: up to date") for line in sink.lines) and len(_calls(calls)) == 4

    create_envs(config, ["t"], recreate=True, display=PlainDisplay(Lines()))
    assert _calls(calls)[4:] == ["create", "pip", "extra"]

    # a changed steps sidecar is a changed spec: stale, and the next build starts over
    sidecar = spec_path.parent / "steps" / spec_path.name
    sidecar.parent.mkdir()
    sidecar.write_text("steps:\n  - name: more\n    pip: [--no-deps, example==1.0]\n")
    assert build_status(Env("t", "venv", prefix), read_spec(spec_path)).label == "stale (spec changed)"
    sink = Lines()
    create_envs(config, ["t"], display=PlainDisplay(sink))
    assert "t: its spec changed since it was built; starting over" in sink.lines
    assert _calls(calls)[7:] == ["create", "pip", "extra"]


def test_a_spec_without_sidecar_keeps_its_file_hash_and_the_sidecar_is_checked(tmp_path: Path) -> None:
    spec_path = _spec(tmp_path)
    assert read_spec(spec_path).sha256 == sha256_file(spec_path)  # stamps of envs built before stay valid
    sidecar = spec_path.parent / "steps" / spec_path.name
    sidecar.parent.mkdir()
    sidecar.write_text("steps:\n  - name: pip\n    pip: [x]\n")
    with pytest.raises(Exception, match="reserved"):
        read_spec(spec_path)
    sidecar.write_text("steps:\n  - name: a\n    pip: [x]\n    shell: rm -rf /\n")
    with pytest.raises(Exception, match="unknown key"):
        read_spec(spec_path)


# ---------------------------------------------------------------------------------------------- real specs


def test_every_env_file_is_a_plain_conda_file_and_sam3d_declares_its_compiled_steps(tmp_path: Path, monkeypatch,
                                                                                   envs_root: Path) -> None:
    for path in sorted((PROJECT_ROOT / "envs").glob("*.yml")):
        data = yaml.safe_load(path.read_text())
        assert set(data) <= {"name", "channels", "dependencies"}, path
    spec = read_spec(PROJECT_ROOT / "envs" / "sam3d-objects.yml")
    assert [s.name for s in spec.steps] == ["compiled", "sam3d_objects"]
    assert spec.sha256 != sha256_file(spec.path)  # the hash covers the steps file too
    assert spec.python == "3.11" and "cuda-toolkit=12.1" in spec.conda
    assert read_spec(PROJECT_ROOT / "envs" / "sam3.yml").python == "3.12"

    env = Env("sam3d-objects", "conda", tmp_path / "p")
    steps = plan_steps(env, spec, tool="/opt/bin/micromamba", conda_file=tmp_path / "part.yml")
    assert [s.name for s in steps] == ["create", "pip", "compiled", "sam3d_objects"]
    assert steps[0].argv[:2] == ("/opt/bin/micromamba", "create") and str(tmp_path / "part.yml") in steps[0].argv
    compiled = steps[2]
    assert compiled.argv[:5] == (str(env.prefix / "bin/python"), "-m", "pip", "install", "--disable-pip-version-check")
    assert "--no-build-isolation" in compiled.argv and any(a.startswith("pytorch3d @ git+") for a in compiled.argv)
    assert compiled.variables["CUDA_HOME"] == str(env.prefix)
    assert "--no-deps" in steps[3].argv and any(a.startswith("sam3d_objects @ git+") for a in steps[3].argv)

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    step_env = envbuild._step_environment(env, compiled)
    assert step_env["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0" and step_env["CUDA_HOME"] == str(env.prefix)
    assert step_env["PATH"].startswith(str(env.prefix / "bin"))

    venv_steps = plan_steps(Env("sam3d-objects", "venv", tmp_path / "v"), spec, tool="venv", python=Path("/usr/bin/python3.11"))
    assert venv_steps[0].argv == ("/usr/bin/python3.11", "-m", "venv", str(tmp_path / "v"))
    assert venv_steps[2].variables == {}  # no conda toolkit in a venv: the user's own CUDA_HOME applies

    part = yaml.safe_load(envbuild._conda_part(spec, "sam3d-objects").read_text())  # what the conda tool gets
    assert part["channels"] == ["nvidia/label/cuda-12.1.1", "conda-forge"]
    assert "python=3.11" in part["dependencies"] and not any(isinstance(d, dict) for d in part["dependencies"])


# ---------------------------------------------------------------------------------------------- progress


def test_progress_counts_pip_lines_as_the_log_grows(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_text("$ earlier step\nCollecting old\n")
    progress = LogProgress(log, "pip")  # counts only what comes after it started
    with open(log, "a") as fh:
        fh.write("Collecting torch==2.5.1\n  Downloading torch-2.5.1.whl (906 MB)\nCollecting numpy\n  Using cached numpy.whl\n"
                 "Processing /wheels/pillow.whl\nCollecting six (from x)\n  Downl")
    progress.poll()
    assert (progress.collected, progress.downloaded, progress.cached) == (4, 1, 1)
    with open(log, "a") as fh:  # the half-written line is finished now
        fh.write("oading six.whl (11 kB)\n  Building wheel for pytorch3d (setup.py): started\n")
    progress.poll()
    assert progress.downloaded == 2 and progress.summary() == "4 collected, 2 downloaded, 1 cached, building pytorch3d"
    with open(log, "a") as fh:
        fh.write("Installing collected packages: six, numpy, torch\n")
    progress.poll()
    assert progress.summary().endswith("installing 3")
    with open(log, "a") as fh:
        fh.write("Successfully installed numpy-2.0 six-1.16 torch-2.5.1 pillow-10\n")
    progress.poll()
    assert progress.summary() == "4 collected, 2 downloaded, 1 cached, 4 installed"


def test_run_command_polls_while_the_child_runs_and_the_displays_show_it(tmp_path: Path) -> None:
    log = tmp_path / "step.log"
    code = ("import time\nfor i in range(4):\n    print(f'Collecting pkg{i}', flush=True); time.sleep(0.3)\n")
    polls = []
    result = run_command([sys.executable, "-c", code], env=child_environment(), log_path=log,
                         on_poll=lambda: polls.append(1), poll_s=0.1)
    assert result.returncode == 0 and len(polls) >= 5

    # plain: one line per start and finish, a heartbeat line per heartbeat_s
    now = [100.0]
    sink = Lines()
    plain = PlainDisplay(sink, heartbeat_s=60, clock=lambda: now[0])
    plain.start("sam3", 2, 3, "pip", log, "pip")
    for t in (130.0, 161.0, 200.0):
        now[0] = t
        plain.poll()
    plain.finish(True)
    assert sink.lines[0] == f"sam3 [2/3] pip: started (log: {log})"
    assert sink.lines[1:-1] == ["sam3 [2/3] pip: 61 s"]  # one heartbeat per minute, nothing between
    assert sink.lines[-1] == "✓ sam3 [2/3] pip: done in 100 s"

    # live (a terminal): the status line names the env, the step, the seconds, the counts and the log
    from rich.console import Console

    out = io.StringIO()
    live = LiveDisplay(Console(file=out, force_terminal=True, width=100))
    live.start("sam3", 2, 3, "pip", log, "pip")
    with open(log, "a") as fh:
        fh.write("Collecting more\n")
    live.poll()
    live.finish(True)
    text = out.getvalue()
    assert "sam3 [2/3] pip" in text and "1 collected" in text and str(log) in text
    assert "✓ sam3 [2/3] pip: done in" in text


# ---------------------------------------------------------------------------------------------- python


def _fake_python(path: Path, output: str, rc: int = 0) -> None:
    path.write_text(f"#!/bin/sh\nprintf '{output}'\nexit {rc}\n")
    path.chmod(0o755)


def test_a_pinned_python_is_searched_on_path_and_its_absence_is_one_clear_error(tmp_path: Path, monkeypatch, envs_root) -> None:
    broken, good = tmp_path / "shims", tmp_path / "bin"
    broken.mkdir()
    good.mkdir()
    _fake_python(broken / "python3.99", "pyenv: python3.99: command not found\\n", rc=127)
    _fake_python(good / "python3.99", "3.99\\nvenv ok\\n")
    monkeypatch.setenv("PATH", os.pathsep.join([str(broken), str(good), "/usr/bin", "/bin"]))
    assert find_python((3, 99)) == (good / "python3.99", "")
    assert find_python(sys.version_info[:2]) == (Path(sys.executable), "")

    monkeypatch.setenv("PATH", os.pathsep.join([str(broken), "/usr/bin", "/bin"]))
    path, why = find_python((3, 99))
    assert path is None and f"{broken / 'python3.99'} does not run" in why

    spec_path = _spec(tmp_path, name="pinned.yml")
    spec_path.write_text("name: t\ndependencies:\n  - python=3.99\n  - pip\n")
    config = PipelineConfig.model_validate({"envs": {"t": {"kind": "venv", "prefix": str(tmp_path / "env"), "spec": str(spec_path)}}})
    old = tmp_path / "env"  # a stale env built before: kept when its rebuild cannot start
    subprocess.run([sys.executable, "-c", _make_python(old)], check=True)
    write_json_atomic(old / ".pipeline-env.json", {"spec_sha256": "older"})
    with pytest.raises(EnvCreateFailed) as missing:
        create_envs(config, ["t"], display=PlainDisplay(Lines()))
    assert "env 't' needs Python 3.99 (its spec pins it) and no python3.99 was found" in missing.value.message
    assert "\n" not in missing.value.message
    assert "apt install python3.99-venv" in missing.value.hint and "--any-python" in missing.value.hint
    assert "envs.t.kind=conda" in missing.value.hint
    assert (old / ".pipeline-env.json").exists()

    seen: dict = {}
    monkeypatch.setattr(envbuild, "plan_steps", _fake_plan(tmp_path / "calls", seen=seen))
    sink = Lines()
    create_envs(config, ["t"], any_python=True, display=PlainDisplay(sink))
    assert seen == {"tool": "venv", "python": Path(sys.executable)}
    assert any("warning: the spec pins Python 3.99" in line for line in sink.lines)


# ---------------------------------------------------------------------------------------------- doctor


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300, env={**base, "COLUMNS": "80", **(env or {})})


def _write_config(path: Path, payload: dict) -> Path:
    path.write_text(yaml.safe_dump(payload))
    return path


def _doctor_config(tmp_path: Path, prefix: Path, spec: Path) -> Path:
    return _write_config(tmp_path / "doctor.yaml", {
        "envs": {"dr": {"kind": "venv", "prefix": str(prefix), "spec": str(spec)}},
        "segment": {"env": "dr", "backend": "tests.doubles.segmenters:ColorBlobSegmenterDouble"},
    })


def _assert_narrow(output: str) -> None:
    too_wide = [line for line in output.splitlines() if len(line) > 80]
    assert not too_wide, too_wide


def test_doctor_missing_env_names_the_create_command_at_80_columns(tmp_path: Path) -> None:
    prefix = tmp_path / "a-rather-long-directory-name-for-the-env" / "that-does-not-exist"
    config = _doctor_config(tmp_path, prefix, PROJECT_ROOT / "tests/envs/light-segment.yml")
    result = _cli("envs", "check", "dr", "--config", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "dr (segment)  ✗ blocked"
    assert "      python -m pipeline envs create dr" in lines
    _assert_narrow(result.stdout)


def _tiny_venv(prefix: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)


def test_doctor_ready_and_stale_envs_at_80_columns(tmp_path: Path) -> None:
    spec = _spec(tmp_path, name="empty.yml")  # no pip packages: a venv without pip is complete
    prefix = tmp_path / "env"
    _tiny_venv(prefix)
    write_json_atomic(prefix / ".pipeline-env.json", {"spec_sha256": read_spec(spec).sha256})
    config = _doctor_config(tmp_path, prefix, spec)
    ready = _cli("envs", "check", "dr", "--config", str(config))
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert ready.stdout.splitlines()[0] == "dr (segment)  ✓ ready"
    assert "(venv, up to date)" in ready.stdout and f"python:     {sys.version.split()[0]}" in ready.stdout
    _assert_narrow(ready.stdout)

    spec.write_text(spec.read_text() + "  - pip:\n      - pyyaml>=6\n")
    stale = _cli("envs", "check", "dr", "--config", str(config))
    assert stale.returncode == 1
    out = stale.stdout
    assert "(venv, stale: its spec changed)" in out and "      python -m pipeline envs create --recreate dr" in out
    assert "pyyaml MISSING" in out and "not installed" not in out  # rebuilding installs it: one fix, not two
    _assert_narrow(out)

    (prefix / ".pipeline-env.json").unlink()  # half-built: the pip step did not finish
    write_json_atomic(prefix / ".pipeline-env-build.json", {
        "schema_version": 1, "spec_sha256": read_spec(spec).sha256, "steps": ["create", "pip"], "done": {"create": {}}})
    half = _cli("envs", "check", "dr", "--config", str(config))
    assert half.returncode == 1
    assert "(venv, half-built, resumes at step pip)" in half.stdout and "✗ half-built: create done" in half.stdout
    assert "      python -m pipeline envs create dr   (resumes at step pip)" in half.stdout
    assert "not installed" not in half.stdout  # resuming installs them: one fix, not two
    _assert_narrow(half.stdout)


def test_doctor_names_the_pip_command_for_a_missing_package(tmp_path: Path, monkeypatch) -> None:
    from pipeline.driver.envdoctor import diagnose

    spec = _spec(tmp_path, "  - pip:\n      - pyyaml>=6\n      - --no-deps\n", name="one.yml")
    prefix = tmp_path / "env"
    _tiny_venv(prefix)
    write_json_atomic(prefix / ".pipeline-env.json", {"spec_sha256": read_spec(spec).sha256})  # built, then lost it
    monkeypatch.chdir(tmp_path)
    config = PipelineConfig.model_validate(yaml.safe_load(_doctor_config(tmp_path, prefix, spec).read_text()))
    report = diagnose(config, "dr")
    assert report.blocked and report.problems == [("not installed: pyyaml", "env/bin/python -m pip install 'pyyaml>=6'")]
    assert ("packages", "pyyaml MISSING") in report.rows


@pytest.mark.slow
def test_doctor_on_the_built_test_venvs(venv_config: Path) -> None:
    result = _cli("envs", "check", "seg-test", "rec-test", "--config", str(venv_config))
    assert result.returncode == 0, result.stdout
    assert "seg-test (segment)  ✓ ready" in result.stdout and "rec-test (reconstruct)  ✓ ready" in result.stdout
    assert "trimesh " in result.stdout and "MISSING" not in result.stdout
    _assert_narrow(result.stdout)


def test_printed_commands_use_the_project_venv_when_the_driver_runs_from_it(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "prefix", str(PROJECT_ROOT / ".venv"))
    monkeypatch.chdir(PROJECT_ROOT)
    assert pipeline_command() == ".venv/bin/python -m pipeline"
    monkeypatch.chdir(tmp_path)
    assert pipeline_command() == f"{PROJECT_ROOT / '.venv/bin/python'} -m pipeline"
    monkeypatch.setattr(sys, "prefix", "/usr")
    assert pipeline_command() == "python -m pipeline"


def test_a_missing_env_error_names_envs_create_and_envs_check(tmp_path: Path) -> None:
    config = PipelineConfig.model_validate({"envs": {"sam3": {"kind": "venv", "prefix": str(tmp_path / "none")}}})
    with pytest.raises(EnvNotFound) as missing:
        resolve_env(config, "sam3")
    assert "envs create sam3" in missing.value.hint and "envs check" in missing.value.hint


# ---------------------------------------------------------------------------------------------- weights


def _weights_config(tmp_path: Path) -> Path:
    return _write_config(tmp_path / "weights.yaml", {
        "envs": {"sam3": {"kind": "current"}, "sam3d-objects": {"kind": "current"}},
        "reconstruct": {"sam3d": {"checkpoint_dir": str(tmp_path / "ckpt" / "sam-3d-objects")}},
        "segment": {"sam3": {"revision": "v1"}},
    })


def test_weights_without_a_token_says_what_to_do_and_tries_nothing(tmp_path: Path) -> None:
    config = _weights_config(tmp_path)
    record = tmp_path / "hub-calls.jsonl"
    result = _cli("envs", "create", "--weights", "--config", str(config), "sam3", "sam3d-objects",
                  env={"HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(FAKE_HUB), "FAKE_HUB_RECORD": str(record)})
    assert result.returncode != 0
    err = result.stderr
    assert "error: no Hugging Face token found" in err and "Traceback" not in err
    for expected in ("https://huggingface.co/facebook/sam3", "https://huggingface.co/facebook/sam-3d-objects",
                     "export HF_TOKEN=hf_...", "/bin/hf auth login",
                     "rerun: python -m pipeline envs create --weights sam3 sam3d-objects"):
        assert expected in err, err
    assert not record.exists(), "no download may be tried without a token"


def test_weights_argv_never_holds_the_token(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    config = PipelineConfig.model_validate({"envs": {"sam3": {"kind": "current"}}, "segment": {"sam3": {"revision": "v1"}}})
    job = weights.weights_jobs(config, ["sam3"])[0]
    env = resolve_env(config, "sam3")
    argv = weights.weights_argv(env, job)
    assert argv[1:] == ["-u", "-m", "pipeline.fetch_weights", "sam3", "--repo", "facebook/sam3", "--revision", "v1"]
    assert not any(SECRET in a for a in argv)
    assert weights.weights_environment(config, env, job)["HF_TOKEN"] == SECRET
    assert weights.find_token({"HF_HOME": str(tmp_path)}) is None
    (tmp_path / "token").write_text("hf_from_file\n")
    assert weights.find_token({"HF_HOME": str(tmp_path)}) == str(tmp_path / "token")


def test_weights_download_through_the_hub_double(tmp_path: Path) -> None:
    config = _weights_config(tmp_path)
    record = tmp_path / "hub-calls.jsonl"
    hub_env = {"HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(FAKE_HUB), "FAKE_HUB_RECORD": str(record), "HF_TOKEN": SECRET}
    result = _cli("envs", "create", "--weights", "--config", str(config), "sam3", "sam3d-objects", env=hub_env)
    assert result.returncode == 0, result.stdout + result.stderr
    dest = tmp_path / "ckpt" / "sam-3d-objects"
    assert (dest / "pipeline.yaml").is_file() and (dest / "slat_generator.ckpt").is_file()
    assert not (tmp_path / "ckpt" / "sam-3d-objects.download").exists()
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["call"] for c in calls] == ["hf_hub_download", "snapshot_download"]
    assert calls[0]["kwargs"]["repo_id"] == "facebook/sam3" and calls[0]["kwargs"]["revision"] == "v1"
    assert calls[1]["kwargs"]["allow_patterns"] == "['checkpoints/*']"
    for call in calls:  # the token reached the child through its environment, and never through argv
        assert call["token"] == SECRET and not any(SECRET in a for a in call["argv"])
    logs = [PROJECT_ROOT / ".envs/logs/weights-sam3.log", PROJECT_ROOT / ".envs/logs/weights-sam3d-objects.log"]
    assert all(SECRET not in p.read_text() for p in logs)
    assert SECRET not in result.stdout + result.stderr

    again = _cli("envs", "create", "--weights", "--config", str(config), "sam3", "sam3d-objects", env=hub_env)
    assert again.returncode == 0 and again.stdout.count("already in") == 2, again.stdout
    assert len(record.read_text().splitlines()) == 2  # nothing fetched twice


def test_a_refused_licence_is_one_line(tmp_path: Path) -> None:
    config = _weights_config(tmp_path)
    result = _cli("envs", "create", "--weights", "--config", str(config), "sam3d-objects",
                  env={"HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(FAKE_HUB), "HF_TOKEN": SECRET, "FAKE_HUB_MODE": "gated"})
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: the hub refused facebook/sam-3d-objects (HTTP 403): the licence is not accepted "
                      "for this token's account"], result.stderr
    assert "https://huggingface.co/facebook/sam-3d-objects" in result.stderr
