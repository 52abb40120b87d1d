"""Write vLLM's own chat-completion request schema as a fixture for the vLLM test double.

Run by hand with a Python that has vLLM installed (vLLM needs no GPU to be imported)::

    /path/to/vllm-env/bin/python tests/doubles/make_vllm_schema.py [--out-dir tests/doubles/fixtures]

It writes two files, to commit (and bump ``SCHEMA_VERSION`` in :mod:`tests.doubles.vllm_server` when
``envs/vllm.yml`` pins another vLLM):

- ``vllm-<version>-chat-completion-request.schema.json``: the JSON schema (draft 2020-12, as pydantic writes it)
  of ``ChatCompletionRequest``, the model vLLM's ``/v1/chat/completions`` route validates bodies with, plus
  ``x-vllm-version``. The test double answers 400 to any body this schema rejects.
- ``vllm-<version>-chat-completion-verdicts.json``: :data:`PROBES` with vLLM's own verdict on each (``true`` when
  ``ChatCompletionRequest.model_validate`` accepts it), so that a test can show the double and vLLM agree.

Only the standard library and vLLM are imported, so the project need not be installed in the vLLM env.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# where ChatCompletionRequest lives: 0.33 moved it into a per-route package
_MODULES = ("vllm.entrypoints.openai.chat_completion.protocol", "vllm.entrypoints.openai.protocol")


_HI = [{"role": "user", "content": "hi"}]
_IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}

# bodies near the edges of what vLLM accepts: every field the agent sends, valid and not. None relies on pydantic's
# lax coercion ("yes" -> true, "5" -> 5), which vLLM accepts and a JSON schema (strict JSON types) cannot express
PROBES: list[object] = [
    {"model": "m", "messages": _HI, "max_completion_tokens": 64, "temperature": 0.6, "top_p": 0.95},
    {"model": "m", "messages": [{"role": "user", "content": [_IMAGE, {"type": "text", "text": "x"}]}]},
    {"model": "m", "messages": _HI, "response_format": {"type": "json_object"}},
    {"model": "m", "messages": _HI, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}},
    {"model": "m", "messages": [{"role": "system", "content": "s"}, *_HI, {"role": "assistant", "content": "a"}]},
    {"model": "m", "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": "m", "messages": []},
    {"model": "m", "messages": _HI, "max_completion_tokens": 0},
    {"model": "m", "messages": _HI, "max_tokens": None},
    {"model": "m", "messages": _HI, "n": 0, "top_p": 2},
    {"model": "m", "messages": _HI, "an_unknown_field": 1},
    {"model": "m"},
    {"model": "m", "messages": "hi"},
    {"model": "m", "messages": [{"content": "hi"}]},
    {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    {"model": "m", "messages": _HI, "max_completion_tokens": "x"},
    {"model": "m", "messages": _HI, "max_completion_tokens": 1.5},
    {"model": "m", "messages": _HI, "temperature": "hot"},
    {"model": "m", "messages": _HI, "response_format": {"type": "bogus"}},
    [1, 2],
    "a string",
]


def request_model() -> type:
    """vLLM's ChatCompletionRequest class, from whichever module this vLLM version keeps it in."""
    import importlib

    for name in _MODULES:
        try:
            return importlib.import_module(name).ChatCompletionRequest
        except (ImportError, AttributeError):
            continue
    raise SystemExit(f"ChatCompletionRequest is in none of {', '.join(_MODULES)}: is vLLM installed here?")


def verdicts(model: type) -> list[dict[str, object]]:
    """Each probe with ``accepted``: whether vLLM's request model validates it."""
    from pydantic import ValidationError

    out: list[dict[str, object]] = []
    for body in PROBES:
        try:
            model.model_validate(body)
            accepted = True
        except ValidationError:
            accepted = False
        out.append({"body": body, "accepted": accepted})
    return out


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "fixtures")
    args = parser.parse_args()
    import vllm

    model = request_model()
    schema = model.model_json_schema(mode="validation")
    schema["x-vllm-version"] = vllm.__version__
    stem = f"vllm-{vllm.__version__}-chat-completion"
    _write(args.out_dir / f"{stem}-request.schema.json", schema)
    _write(args.out_dir / f"{stem}-verdicts.json", {"x-vllm-version": vllm.__version__, "probes": verdicts(model)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
