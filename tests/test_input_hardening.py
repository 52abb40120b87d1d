"""Hostile or careless inputs (issue 19): batch run directories stay inside ROOT, config files and ``--set`` values
that are huge, not UTF-8 or nested without end are one line each, backends and the VLM env are checked before a
run writes anything, one set of request limits for every entry point, and ``--images`` says what it skipped.

The CLI is called in-process (``cli.main``) with both stages as workers of this interpreter (env kind ``current``)
and the doubles as backends, so every test here takes well under a second or two.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import yaml

from pipeline import config as config_module
from pipeline.config import MAX_CONFIG_BYTES, PipelineConfig, RequestLimits, load_config
from pipeline.driver import cli
from pipeline.driver.batch import MAX_LINE_BYTES, read_items
from pipeline.driver.runner import RunRequest, Runner, check_request_text
from pipeline.errors import ConfigError, UsageError
from tests.conftest import draw_scene
from tests.doubles.vllm_server import free_port


def _here(tmp_path: Path) -> list[str]:
    """--set flags: both stages in this interpreter with the doubles, engine state under tmp_path."""
    return ["--set", "envs.here.kind=current",
            "--set", "segment.env=here", "--set", "segment.backend=tests.doubles.segmenters:ColorBlobSegmenterDouble",
            "--set", "reconstruct.env=here", "--set", "reconstruct.backend=tests.doubles.reconstructors:CubeReconstructorDouble",
            "--set", f"engine.state_dir={tmp_path / 'state'}"]


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


# ---------------------------------------------------------------------------------------------- 1. run dirs in ROOT


def test_a_list_line_out_must_stay_inside_the_batch_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    draw_scene(tmp_path / "a.png")
    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "ok-link").symlink_to(root / "inside", target_is_directory=True)
    outs = ["../escape", str(tmp_path / "abs"), ".", "", "link/run", "sub/../kept", str(root / "abs-inside"), "ok-link/x",
            "a/../../b", 7, "/".join(["a"] * 51)]
    lines = [json.dumps({"image": "a.png", "prompt": "red", "out": out}) for out in outs]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    items = read_items(list_file=tmp_path / "list.jsonl", out_root=root)
    errors = [i.error for i in items]
    assert "leads outside the batch root" in errors[0] and "'../escape'" in errors[0]
    assert "an absolute path" in errors[1]
    assert "is the batch root itself" in errors[2]
    assert errors[3] is None and items[3].run_dir.parent == root  # an empty out: the default run directory
    assert ".. or a symlink" in errors[4]
    assert errors[5] is None and items[5].run_dir == root / "kept"  # '..' that stays inside is fine, normalised
    assert "is an absolute path" in errors[6]  # even inside the root: a line's out is relative to it
    assert errors[7] is None and items[7].run_dir == root / "inside" / "x"
    assert "leads outside" in errors[8] and "must be a path" in errors[9] and "more than 50 folder levels" in errors[10]

    before = _tree(tmp_path)
    code, out, _ = _main(capsys, "batch", "--list", str(tmp_path / "list.jsonl"), "--out", str(root), "--dry-run",
                         *_here(tmp_path))
    assert code == 0
    planned = [line for line in out.splitlines() if " → " in line]
    assert len(planned) == 3 and all(f" → {root}/" in line for line in planned), out
    assert out.count(": invalid: ") == 8
    assert {p for p in _tree(tmp_path) - before if not p.startswith(("root", "state"))} == set()


# ---------------------------------------------------------------------------------------------- 2. hostile config


def test_hostile_config_files_are_one_line_each(tmp_path: Path) -> None:
    cases = {
        "huge.yaml": ("segment:\n  options:\n    blob: '" + "x" * MAX_CONFIG_BYTES + "'\n").encode(),
        "latin1.yaml": "segment:\n  device: 'caf\xe9'\n".encode("latin-1"),
        "flow.yaml": ("segment:\n  options: {x: " + "[" * 200 + "]" * 200 + "}\n").encode(),
        "block.yaml": "".join("  " * i + f"k{i}:\n" for i in range(300)).encode(),
        "laughs.yaml": ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                        + "".join(f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                                  for p, n in zip("abcdefg", "bcdefgh"))
                        + "segment:\n  options:\n    boom: *h\n").encode(),
        "bigint.yaml": ("segment:\n  options:\n    n: " + "7" * 5000 + "\n").encode(),
        "hexint.yaml": ("segment:\n  options:\n    n: 0x" + "f" * 5000 + "\n").encode(),
        "tag.yaml": ("segment: !<" + "t" * 5000 + "> x\n").encode(),
    }
    expected = {"huge.yaml": "is larger than 1 MB", "latin1.yaml": "is not UTF-8 text (byte 0xe9 at offset 23)",
                "flow.yaml": "nested deeper than 50 levels", "block.yaml": "nested deeper than 50 levels",
                "laughs.yaml": "more than 100000 values", "bigint.yaml": "", "hexint.yaml": "more than 3000 digits",
                "tag.yaml": "is not valid YAML"}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert expected[name] in err.value.message, (name, err.value.message)
        assert str(path) in err.value.message or name == "bigint.yaml", err.value.message
        assert len(str(err.value)) < 400 and "\n" not in str(err.value), (name, str(err.value)[:500])


def test_hostile_set_values_are_one_line_each() -> None:
    for flag, expected in (
        ("segment.options.x=" + "[" * 3000 + "]" * 3000, "nested deeper than 50 levels"),
        ("segment.options.n=" + "9" * 5000, ""),  # a number Python will not build: the text stays a string
        ("segment.options.n=0x" + "f" * 5000, "more than 3000 digits"),
        (".".join(["k"] * 60) + "=1", "more than 50 parts"),
        ("k" * 100_000 + "=1", "unknown config key"),
        ("envs." + "e" * 100_000 + ".kind=bad", "envs.eee"),
        ("segment.threshold=" + "\n" * 50 + "x" * 100_000, "segment.threshold"),
        ("segment.sam3.graph_buckets=[" + ",".join(["0"] * 20_000) + "]", "graph_buckets"),
        ("x" * 100_000, "is not of the form"),
    ):
        try:
            load_config(None, [flag])
        except ConfigError as exc:
            assert expected in exc.message and len(str(exc)) < 400 and "\n" not in str(exc), (flag[:40], str(exc)[:500])
        else:
            assert expected == "", flag[:40]


def test_the_c_loader_reads_configs_where_pyyaml_has_it() -> None:
    if hasattr(yaml, "CSafeLoader"):
        assert config_module._YAML_LOADER is yaml.CSafeLoader
    assert config_module.parse_yaml("a: [1, {b: c}]") == {"a": [1, {"b": "c"}]}


def test_backend_names_are_checked_when_the_config_loads() -> None:
    for bad in ("sam4", "tests.doubles.segmenters", "a b:C", "mod:1bad", ":Cls", "pkg..mod:C", "x" * 10_000):
        with pytest.raises(ConfigError, match="segment.backend.*nor an import path") as err:
            load_config(None, [f"segment.backend={bad}"])
        assert len(str(err.value)) < 400
    assert load_config(None, ["segment.backend=demo", "reconstruct.backend=pkg.mod:Cls"]).reconstruct.backend == "pkg.mod:Cls"


def test_a_run_that_cannot_start_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = draw_scene(tmp_path / "a.png")
    run_dir = tmp_path / "runs" / "one"
    code, _, err = _main(capsys, "run", "--image", str(image), "--prompt", "red", "--out", str(run_dir), *_here(tmp_path),
                         "--set", "reconstruct.backend=no_such_pkg.recon:Thing")
    assert code == 2, err
    assert err.splitlines()[0] == ("error: reconstruct backend 'no_such_pkg.recon:Thing': no module 'no_such_pkg.recon' "
                                   f"in {config_module.PROJECT_ROOT} or on the import path of env 'here'")
    assert "Traceback" not in err and not (tmp_path / "runs").exists()

    # an existing run directory is never emptied by a run that is refused
    run_dir.mkdir(parents=True)
    (run_dir / "keep.txt").write_text("mine")
    code, _, _ = _main(capsys, "run", "--image", str(image), "--prompt", "red", "--out", str(run_dir), *_here(tmp_path),
                       "--set", "segment.backend=no_such_pkg.seg:Thing")
    assert code == 2 and sorted(p.name for p in run_dir.iterdir()) == ["keep.txt"]


def test_a_plugin_backend_is_looked_for_in_the_stage_env_without_importing_it(tmp_path: Path) -> None:
    from pipeline.driver.envs import Env
    from pipeline.driver.preflight import check_backend

    site = tmp_path / "env" / "lib" / "python3.11" / "site-packages"
    (site / "mypkg").mkdir(parents=True)
    (site / "mypkg" / "seg.py").write_text("raise SystemExit('imported!')\n")  # found, never imported
    (site / "distutils-precedence.pth").write_text("import os; var = 'x'\n")
    (tmp_path / "src" / "devpkg").mkdir(parents=True)
    (tmp_path / "src" / "devpkg" / "__init__.py").write_text("")
    (site / "dev.pth").write_text(f"{tmp_path / 'src'}\n")
    env = Env("seg", "venv", tmp_path / "env")

    def config(backend: str) -> PipelineConfig:
        return load_config(None, [f"segment.backend={backend}"])

    check_backend(config("mypkg.seg:Seg"), "segment", env)
    check_backend(config("devpkg:Seg"), "segment", env)  # a folder named by a .pth file
    check_backend(config("tests.doubles.segmenters:ColorBlobSegmenterDouble"), "segment", env)  # the project
    check_backend(config("sam3"), "segment", env)
    with pytest.raises(ConfigError, match="no module 'mypkg.other' in .* of env 'seg'"):
        check_backend(config("mypkg.other:Seg"), "segment", env)
    (site / "__editable__.finder.pth").write_text("import __editable___finder; __editable___finder.install()\n")
    check_backend(config("mypkg.other:Seg"), "segment", env)  # an import hook: cannot tell, so not refused


def test_query_mode_without_a_vllm_env_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = draw_scene(tmp_path / "a.png")
    # no vllm env and no server on the port: refused before run.json, input/ and config.json are written
    code, _, err = _main(capsys, "run", "--image", str(image), "--query", "the red box", "--out", str(tmp_path / "runs" / "q"),
                         *_here(tmp_path), "--set", "envs.vllm.kind=venv", "--set", f"envs.vllm.prefix={tmp_path / 'nope'}",
                         "--set", f"vlm.port={free_port()}")
    assert code == 2, err
    assert err.startswith("error: query mode needs the VLM: venv env 'vllm' not found"), err
    assert not (tmp_path / "runs").exists()


def test_a_failure_while_opening_removes_only_what_this_run_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.driver import runner as runner_module
    from pipeline.errors import InputError

    def refuse(*args: object, **kwargs: object) -> None:
        raise InputError("the photo changed while it was read")

    monkeypatch.setattr(runner_module, "store_input", refuse)
    config = load_config(None, [a for a in _here(tmp_path) if a != "--set"])
    image = draw_scene(tmp_path / "a.png")
    fresh = tmp_path / "new" / "run"
    with pytest.raises(InputError):
        Runner(config).open(RunRequest(run_dir=fresh, image=image, prompts=("red",)))
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "old"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep")
    with pytest.raises(InputError):
        Runner(config).open(RunRequest(run_dir=existing, image=image, prompts=("red",)))
    assert (existing / "notes.txt").read_text() == "keep"


def test_list_lines_that_are_not_utf8_too_long_or_too_deep_are_invalid_and_the_rest_go_on(tmp_path: Path) -> None:
    draw_scene(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "prompt": "red"}).encode()
    lines = [good, b'{"image": "a.png", "prompt": "caf\xe9"}', json.dumps({"image": "a.png", "prompt": "r" + " " * MAX_LINE_BYTES}).encode(),
             b'{"image": "a.png", "prompt": "red", "segment.options": ' + b"[" * 5000 + b"]" * 5000 + b"}",
             b'{"image": "a.png", "prompt": "red", "seed": ' + b"1" * 5000 + b"}",
             json.dumps({"image": "a.png", "query": ["not", "text"]}).encode(), good]
    (tmp_path / "list.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    items = read_items(list_file=tmp_path / "list.jsonl", out_root=tmp_path / "out")
    errors = [i.error for i in items]
    assert errors[0] is None and errors[-1] is None and len(items) == 7
    offset = len(good) + 1 + len(b'{"image": "a.png", "prompt": "caf')
    assert errors[1] == f"not UTF-8 text (byte 0xe9 at offset {offset} of the file)"
    assert errors[2].startswith("line is longer than 64 KB")
    assert "nested deeper than 50 levels" in errors[3]
    assert errors[4].startswith("not usable JSON") and len(errors[4]) < 200
    assert errors[5] == "'query' must be text, not list"
    (tmp_path / "list.csv").write_bytes(b"image,prompt\na.png,red\na.png,caf\xe9\na.png,blue\n")
    items = read_items(list_file=tmp_path / "list.csv", out_root=tmp_path / "out")
    assert [(i.source, i.error is None) for i in items] == [("list.csv:2", True), ("list.csv:3", False), ("list.csv:4", True)]


# ---------------------------------------------------------------------------------------------- 3. request limits


def test_one_function_applies_the_request_limits() -> None:
    limits = RequestLimits()
    text = check_request_text(None, ["red, Red", "blue ", "red"], limits)
    assert text.prompts == ("red", "blue") and text.notes == ("dropped 2 repeated phrases: 'Red', 'red'",)
    assert check_request_text("the red box", None, limits).notes == ()
    with pytest.raises(UsageError, match="the query is 501 characters long; at most 500"):
        check_request_text("q" * 501, None, limits)
    with pytest.raises(UsageError, match="17 phrases given; at most 16") as err:
        check_request_text(None, ",".join(f"p{i}" for i in range(17)), limits)
    assert "run.limits.max_phrases" in (err.value.hint or "")
    with pytest.raises(UsageError, match="is 201 characters long; at most 200"):
        check_request_text(None, "p" * 201, limits)
    assert check_request_text(None, ",".join(["same"] * 40), limits).prompts == ("same",)  # counted after dropping repeats
    wider = RequestLimits(max_phrases=32)
    assert len(check_request_text(None, ",".join(f"p{i}" for i in range(20)), wider).prompts) == 20


def test_the_cli_applies_the_limits_and_notes_dropped_repeats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = str(draw_scene(tmp_path / "a.png"))
    code, _, err = _main(capsys, "run", "--image", image, "--prompt", ",".join(f"p{i}" for i in range(17)), "--dry-run",
                         *_here(tmp_path))
    assert code == 2 and err.startswith("error: 17 phrases given; at most 16 are allowed"), err
    code, _, err = _main(capsys, "segment", "--image", image, "--query", "q" * 600, "--dry-run", *_here(tmp_path))
    assert code == 2 and "the query is 600 characters long" in err
    code, out, err = _main(capsys, "run", "--image", image, "--prompt", "red, red", "--prompt", "blue", "--dry-run",
                           "--set", "run.limits.max_phrases=2", *_here(tmp_path))
    assert code == 0 and "note: dropped 1 repeated phrase: 'red'" in err, err
    code, _, err = _main(capsys, "run", "--image", image, "--prompt", "a, b, c", "--dry-run",
                         "--set", "run.limits.max_phrases=2", *_here(tmp_path))
    assert code == 2 and "3 phrases given; at most 2" in err


def test_batch_lines_and_the_batch_prompt_get_the_same_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    draw_scene(tmp_path / "a.png")
    lines = [{"image": "a.png", "prompt": "p" * 201}, {"image": "a.png", "query": "q" * 501},
             {"image": "a.png", "prompt": "red, red, blue"}]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, out, err = _main(capsys, "batch", "--list", str(tmp_path / "list.jsonl"), "--out", str(tmp_path / "root"),
                           "--dry-run", *_here(tmp_path))
    assert code == 0
    assert "list.jsonl:1: invalid: the phrase 'ppppp" in out and "is 201 characters long" in out
    assert "list.jsonl:2: invalid: the query is 501 characters long" in out
    assert "list.jsonl:3: note: dropped 1 repeated phrase: 'red'" in err
    code, _, err = _main(capsys, "batch", "--images", str(tmp_path / "a.png"), "--prompt", "p" * 300, "--out",
                         str(tmp_path / "root"), "--dry-run", *_here(tmp_path))
    assert code == 2 and "is 300 characters long" in err


def test_the_python_api_applies_the_limits(tmp_path: Path) -> None:
    from pipeline.api import Pipeline

    image = draw_scene(tmp_path / "a.png")
    api = Pipeline(PipelineConfig.model_validate({"run": {"out_root": str(tmp_path / "out")}}))
    with pytest.raises(UsageError, match="17 phrases given"):
        api.request(image, prompt=[f"p{i}" for i in range(17)])
    with pytest.raises(UsageError, match="the query is 501 characters"):
        api.request(image, query="q" * 501)
    req = api.request(image, prompt="horse, Horse, rider")
    assert req.prompts == ("horse", "rider") and req.notes == ("dropped 1 repeated phrase: 'Horse'",)
    assert req.run_dir == api.request(image, prompt="horse, rider").run_dir  # repeats do not change the run


def test_the_web_uses_the_same_limits_with_its_422_answer(tmp_path: Path) -> None:
    from fastapi import HTTPException

    from pipeline.driver.web.app import JobService, WebSettings
    from pipeline.driver.web.jobs import JobStore

    def submit(config: PipelineConfig, **text: str | None) -> HTTPException:
        service = JobService(config, WebSettings(jobs_root=tmp_path / "jobs"), JobStore(tmp_path / "jobs"))
        with pytest.raises(HTTPException) as err:
            asyncio.run(service.submit(b"not an image", client_name=None, options={}, **{"query": None, "prompt": None, **text}))
        return err.value

    base = PipelineConfig()
    long_phrase = submit(base, prompt="red, " + "p" * 201)
    assert long_phrase.status_code == 422 and "is 201 characters long" in long_phrase.detail["error"]
    assert set(long_phrase.detail) == {"error", "hint"} and "run.limits" in long_phrase.detail["hint"]
    many = ",".join(f"p{i}" for i in range(20))
    assert "20 phrases given" in submit(base, prompt=many).detail["error"]
    assert "the query is 501" in submit(base, query="q" * 501).detail["error"]
    wider = PipelineConfig.model_validate({"run": {"limits": {"max_phrases": 32}}})
    past_limits = submit(wider, prompt=many)  # the config's limit, not a constant of the web app: the upload is next
    assert "phrases" not in past_limits.detail["error"]


# ---------------------------------------------------------------------------------------------- 4. --images


def test_images_dir_says_what_it_skipped_and_recursive_walks_subfolders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    (photos / "sub" / "deeper").mkdir(parents=True)
    for rel in ("a.png", "b.jpg", "sub/c.png", "sub/deeper/d.png"):
        draw_scene(photos / rel) if rel.endswith(".png") else (photos / rel).write_bytes((photos / "a.png").read_bytes())
    (photos / "notes.txt").write_text("x")
    (photos / "raw.cr2").write_text("x")
    (photos / "outside").symlink_to(tmp_path, target_is_directory=True)
    items = read_items(images=[str(photos)], prompts=["red"], out_root=tmp_path / "root")
    assert [Path(i.source).name for i in items] == ["a.png", "b.jpg"]
    err = capsys.readouterr().err
    assert err == f"note: {photos}: 2 images; skipped 2 subfolders (--recursive includes them), 2 files of another type (.cr2, .txt)\n"
    items = read_items(images=[str(photos)], prompts=["red"], out_root=tmp_path / "root", recursive=True)
    assert [str(Path(i.source).relative_to(photos)) for i in items] == ["a.png", "b.jpg", "sub/c.png", "sub/deeper/d.png"]
    assert "1 symlinked folder (not followed)" in capsys.readouterr().err
    code, out, _ = _main(capsys, "batch", "--images", str(photos), "--recursive", "--prompt", "red", "--out",
                         str(tmp_path / "root"), "--dry-run", *_here(tmp_path))
    assert code == 0 and out.count(" → ") == 4


def test_the_same_image_named_twice_runs_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    draw_scene(photos / "a.png")
    draw_scene(photos / "b.png")
    os.symlink(photos / "a.png", tmp_path / "link.png")
    items = read_items(images=[str(photos), str(photos / "a.png"), str(photos / "*.png"), str(tmp_path / "link.png")],
                       prompts=["red"], out_root=tmp_path / "root")
    assert [Path(i.source).name for i in items] == ["a.png", "b.png"]
    assert len({i.run_dir for i in items}) == 2
    err = capsys.readouterr().err
    assert err.startswith("note: 4 images named more than once, run once: ") and err.count("\n") == 1, err
    assert f"{tmp_path / 'link.png'} = {photos / 'a.png'}" in err or "; ..." in err
