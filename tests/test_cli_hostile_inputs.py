"""Property: whatever a config file, a ``--set`` value or a ``--list`` line holds (random bytes, deep nesting, huge
values, ``..``, absolute paths, symlinks out of the batch root), the CLI answers with exit code 0, 1 or 2, a short
stderr without a traceback, and writes nothing outside the batch root.

The CLI runs in-process (``cli.main``) with ``--dry-run``, both stages as env kind ``current`` and the doubles as
backends; each example gets a fresh folder: ``in/`` (photos, config, list), ``outside/`` and ``root/`` (the batch root,
with ``link_out`` → ``outside`` and ``link_in`` → ``root/inside``). Bounded to keep the three properties well under a
minute together.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.config import MAX_CONFIG_BYTES
from pipeline.driver import cli
from pipeline.driver.batch import MAX_LINE_BYTES
from tests.conftest import draw_scene

STDERR_LIMIT = 2048
SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])

# ---------------------------------------------------------------------------------------------- strategies

_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")  # argv cannot carry NUL
TEXT = st.text(_CHARS, max_size=40)
KEYS = ["segment.threshold", "segment.max_objects", "segment.device", "segment.options.x", "segment.backend",
        "reconstruct.backend", "reconstruct.exports", "reconstruct.frame", "reconstruct.seed", "run.limits.max_phrases",
        "run.limits.max_query_chars", "run.limits.max_phrase_chars", "run.max_pixels", "run.store_input",
        "envs.here.kind", "envs.here.prefix", "envs.other.variables", "vlm.port", "agent.max_rounds",
        "segment.sam3.graph_buckets", "slurm.extra_args", "segment", "envs", "run.limits"]
PATH_TRICKS = ["..", "../x", "../../etc", "a/../../x", "a/../b", ".", "./", "", "/", "{outside}/abs", "{root}/abs-in",
               "{root}", "link_out/x", "link_out", "link_in/x", "loop/x", "~", "~/x", "a" * 5000, "/".join(["a"] * 2000),
               "x\x00y", "kitchen/001", "{root}/../escape"]

JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | TEXT
NESTED = st.recursive(JSON_LEAVES, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=12)


def _deep(n: int, kind: str) -> str:
    return {"flow": "[" * n + "]" * n, "map": "{a: " * n + "1" + "}" * n, "json": '{"a": ' * n + "1" + "}" * n}[kind]


DEEP = st.builds(_deep, st.integers(1, 3000), st.sampled_from(["flow", "map", "json"]))
HUGE = st.integers(100, 200_000).map(lambda n: "x" * n)
DIGITS = st.builds(lambda n, hex_: ("0x" + "f" * n) if hex_ else "9" * n, st.integers(10, 6000), st.booleans())
YAMLISH = st.sampled_from(["[1, 2", "{a: b", "!!python/object:os.system", "*alias", "&a [*a]", "null", "~", "-1", ".nan",
                           "1e999", "'unterminated", "!!binary AAAA", "!!set {a, b}", "!!timestamp 2020-13-99", "? [a]\n: b",
                           "a: b: c", "\t", "%YAML 9.9\n---\n1", "---\n---", "!<" + "t" * 3000 + "> x"])
VALUES = TEXT | DEEP | HUGE | DIGITS | YAMLISH | st.sampled_from(PATH_TRICKS).filter(lambda p: "\x00" not in p) | \
    NESTED.map(json.dumps)
KNOWN_FLAG = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES)  # a real key, a hostile value
SET_FLAGS = st.lists(st.one_of(KNOWN_FLAG, KNOWN_FLAG, KNOWN_FLAG, st.builds(lambda k, v: f"{k}={v}", TEXT, VALUES), TEXT),
                     max_size=3)


def _tree(pairs: dict[str, object]) -> dict[str, object]:
    """Dotted keys → nested mapping (a later key that clashes with an earlier value replaces it)."""
    tree: dict[str, object] = {}
    for dotted, value in pairs.items():
        node = tree
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict) else node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[last] = value
    return tree


def _laughs(depth: int) -> bytes:
    names = "abcdefghij"[: depth + 1]
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [" + ", ".join([f"*{p}"] * 10) + "]\n" for p, n in zip(names, names[1:]))
    return (text + f"segment:\n  options:\n    boom: *{names[-1]}\n").encode()


def _with_bad_byte(data: bytes, where: int, byte: int) -> bytes:
    where %= len(data) + 1
    return data[:where] + bytes([byte]) + data[where:]


SECTIONS = st.sampled_from(["run", "segment", "reconstruct", "envs", "vlm", "agent", "engine_x", "slurm"]) | TEXT
CONFIG_TREE = st.dictionaries(SECTIONS, st.dictionaries(st.sampled_from([k.split(".")[-1] for k in KEYS]) | TEXT, NESTED,
                                                        max_size=4) | NESTED, max_size=4)
KNOWN_TREE = st.dictionaries(st.sampled_from(KEYS), NESTED | VALUES, max_size=4).map(_tree)
CONFIG_FILES = st.one_of(
    st.binary(max_size=3000),
    KNOWN_TREE.map(lambda tree: yaml.safe_dump(tree, allow_unicode=True).encode()),
    KNOWN_TREE.map(lambda tree: yaml.safe_dump(tree, allow_unicode=True).encode()),
    CONFIG_TREE.map(lambda tree: yaml.safe_dump(tree, allow_unicode=True).encode()),
    st.builds(_with_bad_byte, CONFIG_TREE.map(lambda t: yaml.safe_dump(t).encode()), st.integers(0, 10_000),
              st.integers(0x80, 0xff)),
    DEEP.map(lambda text: f"segment:\n  options:\n    x: {text}\n".encode()),
    st.integers(1, 1500).map(lambda n: "".join("  " * i + f"k{i}:\n" for i in range(n)).encode()),
    st.integers(MAX_CONFIG_BYTES - 40, MAX_CONFIG_BYTES + 40).map(lambda n: b"segment:\n  device: " + b"x" * n + b"\n"),
    st.integers(1, 7).map(_laughs),
    YAMLISH.map(lambda text: f"segment: {text}\n".encode()),
    DIGITS.map(lambda text: f"segment:\n  options:\n    n: {text}\n".encode()),
)

IMAGES = st.sampled_from(["a.png", "broken.jpg", "missing.png", "../in/a.png", "{root}/../in/a.png", "", "/", ".", "in",
                          "x\x00y", "a" * 5000]) | TEXT
OUTS = st.sampled_from(PATH_TRICKS) | TEXT | st.integers() | st.lists(TEXT, max_size=2) | st.none()
PROMPTS = TEXT | st.lists(TEXT, max_size=20) | HUGE | st.integers() | st.sampled_from([", ,", "red, red, Red", "red"])
LINE_OBJECTS = st.fixed_dictionaries(
    {"image": IMAGES},
    optional={"prompt": PROMPTS, "query": TEXT | HUGE, "out": OUTS, "threshold": NESTED, "seed": NESTED,
              "segment.options": NESTED, "run.limits.max_phrases": st.integers(), "engine.state_dir_x": TEXT},
)
LINES = st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ")),
    LINE_OBJECTS.map(lambda obj: json.dumps(obj).encode()),
    st.integers(MAX_LINE_BYTES - 60, MAX_LINE_BYTES + 60).map(
        lambda n: json.dumps({"image": "a.png", "prompt": "p" * n}).encode()),
    DEEP.map(lambda text: b'{"image": "a.png", "prompt": "red", "segment.options": ' + text.encode() + b"}"),
    st.builds(_with_bad_byte, LINE_OBJECTS.map(lambda o: json.dumps(o).encode()), st.integers(0, 500), st.integers(0x80, 0xff)),
)


# ---------------------------------------------------------------------------------------------- the harness


@contextlib.contextmanager
def _workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pipeline-fuzz-") as name:
        work = Path(name)
        (work / "in").mkdir()
        draw_scene(work / "in" / "a.png")
        (work / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        (work / "outside").mkdir()
        (work / "root" / "inside").mkdir(parents=True)
        (work / "root" / "link_out").symlink_to(work / "outside", target_is_directory=True)
        (work / "root" / "link_in").symlink_to(work / "root" / "inside", target_is_directory=True)
        (work / "root" / "loop").symlink_to(work / "root" / "loop")
        yield work


def _listing(work: Path) -> dict[str, int]:
    """Every path under ``work`` except the batch root, with its size (a file rewritten to new content shows)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(work):
        rel = Path(dirpath).relative_to(work)
        if rel.parts[:1] == ("root",):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(work))] = path.lstat().st_size if not path.is_dir() else -1
    return out


def _here(work: Path) -> list[str]:
    return ["--set=envs.here.kind=current", "--set=segment.env=here", "--set=reconstruct.env=here",
            "--set=segment.backend=tests.doubles.segmenters:ColorBlobSegmenterDouble",
            "--set=reconstruct.backend=tests.doubles.reconstructors:CubeReconstructorDouble",
            f"--set=engine.state_dir={work / 'root' / 'state'}"]


def _cli(work: Path, *argv: str) -> tuple[int, str]:
    """``cli.main(argv)``: the exit code and stderr; checks the property's invariants."""
    before = _listing(work)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    stderr = err.getvalue()
    assert code in (0, 1, 2), (code, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-4000:]
    assert len(stderr.encode()) < STDERR_LIMIT, stderr[:3000]
    assert _listing(work) == before, "written outside the batch root"
    event(f"exit {code}" + (f": {stderr.split(':')[1].strip()[:30]}" if stderr.startswith("error:") else ""))
    return code, stderr


def _fill(text: str, work: Path) -> str:
    return text.replace("{root}", str(work / "root")).replace("{outside}", str(work / "outside"))


# ---------------------------------------------------------------------------------------------- the properties


@SETTINGS
@given(data=CONFIG_FILES, flags=SET_FLAGS, command=st.sampled_from(["run", "batch"]))
def test_any_config_file_and_set_values_give_a_short_answer(data: bytes, flags: list[str], command: str) -> None:
    with _workspace() as work:
        config = work / "in" / "config.yaml"
        config.write_bytes(data)
        sets = [f"--set={_fill(f, work)}" for f in flags]
        if command == "run":
            argv = ["run", "--image", str(work / "in" / "a.png"), "--prompt", "red", "--out", str(work / "root" / "run")]
        else:
            argv = ["batch", "--images", str(work / "in"), "--prompt", "red", "--out", str(work / "root")]
        _cli(work, *argv, "--dry-run", "--config", str(config), *sets, *_here(work))


@SETTINGS
@given(flags=SET_FLAGS, prompt=TEXT, query=st.none() | TEXT | HUGE)
def test_any_set_values_and_request_text_give_a_short_answer(flags: list[str], prompt: str, query: str | None) -> None:
    with _workspace() as work:
        request = ["--query", query] if query is not None else ["--prompt", prompt]
        _cli(work, "run", "--image", str(work / "in" / "a.png"), f"--out={work / 'root' / 'run'}", "--dry-run",
             *[f"--{request[0][2:]}={request[1]}"], *_here(work), *[f"--set={_fill(f, work)}" for f in flags])


@SETTINGS
@given(lines=st.lists(LINES, min_size=1, max_size=5), csv=st.booleans(),
       flags=st.just([]) | st.just([]) | st.lists(KNOWN_FLAG, max_size=1))
def test_any_list_lines_give_a_short_answer_and_plan_only_inside_the_root(lines: list[bytes], csv: bool,
                                                                          flags: list[str]) -> None:
    with _workspace() as work:
        listing = work / "in" / ("list.csv" if csv else "list.jsonl")
        body = [_fill(line.decode("utf-8", "surrogateescape"), work).encode("utf-8", "surrogateescape") for line in lines]
        listing.write_bytes((b"image,prompt,out,threshold\n" if csv else b"") + b"\n".join(body) + b"\n")
        code, _ = _cli(work, "batch", "--list", str(listing), "--out", str(work / "root"), "--prompt", "red", "--dry-run",
                       *_here(work), *[f"--set={_fill(f, work)}" for f in flags])
        assert code in (0, 2)  # a dry run fails no stage


TRICK_LINES = st.fixed_dictionaries({"image": st.sampled_from(["a.png", "broken.jpg", "missing.png"]),
                                     "prompt": st.sampled_from(["red", "red, red", "blue"]),
                                     "out": st.sampled_from(PATH_TRICKS) | TEXT})


@settings(SETTINGS, max_examples=30)
@given(lines=st.lists(TRICK_LINES, min_size=1, max_size=4))
def test_a_real_batch_writes_only_inside_the_root(lines: list[dict[str, str]]) -> None:
    with _workspace() as work:
        listing = work / "in" / "list.jsonl"
        listing.write_text("".join(json.dumps({**line, "out": _fill(line["out"], work)}) + "\n" for line in lines))
        code, _ = _cli(work, "batch", "--list", str(listing), "--out", str(work / "root"), "--stages", "segment",
                       *_here(work))
        assert (work / "root" / "batch.json").exists()
