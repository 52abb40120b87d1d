"""Talking to an OpenAI-compatible VLM endpoint (vLLM or any other): images, reasoning, JSON answers, retries.

- Images go as base64 ``data:image/jpeg`` URLs, encoded once without line breaks (vLLM decodes strictly and
  answers HTTP 400 "Non-base64 digit found" otherwise), downscaled so the longest side is at most
  ``vlm.image_max_side`` px (a full-resolution photo costs ~ceil(h/32)·ceil(w/32) visual tokens).
- Reasoning is read from ``message.reasoning`` (vLLM ≥ late 2025), else ``message.reasoning_content`` (older
  vLLM), else the text before ``</think>`` in ``content`` (reasoning parser missing or unable to split).
- Answers are requested with ``response_format`` json_schema and always validated with pydantic; an invalid
  answer or a truncated one (``finish_reason == "length"``) is asked again, at most ``vlm.retries`` more times,
  as are timeouts, refused connections and HTTP 5xx. HTTP 4xx fails at once. Every failure is a
  :class:`~pipeline.errors.VLMError`; there is no silent default answer.

Every attempt is reported to ``on_attempt`` as a JSON-ready dict (purpose, model, usage, latency, reasoning,
content, parsed answer or error) so the agent can write a transcript. The API key is never part of it.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Sequence, TypeVar

import openai
from PIL import Image
from pydantic import BaseModel, ValidationError

from pipeline.config import VLMConfig
from pipeline.errors import VLMError
from pipeline.stages.agent.prompts import json_schema_format, retry_note

__all__ = [
    "DUMMY_API_KEY",
    "VLMReply",
    "VLMClient",
    "encode_image",
    "split_reasoning",
    "parse_answer",
]

DUMMY_API_KEY = "EMPTY"  # vLLM without --api-key accepts any key; the openai client insists on one
THINK_END = "</think>"
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)

A = TypeVar("A", bound=BaseModel)


@dataclass(frozen=True)
class VLMReply(Generic[A]):
    """A validated answer and what came with it."""

    answer: A
    reasoning: str | None
    content: str
    model: str
    usage: dict[str, int]
    latency_s: float
    attempts: int


def encode_image(image: Image.Image, max_side: int, *, quality: int = 90) -> tuple[str, tuple[int, int]]:
    """RGB JPEG data URL of ``image`` with its longest side ≤ ``max_side`` px; returns (url, (width, height)).

    The aspect ratio is kept; images already small enough are not resized. The base64 text has no whitespace.
    """
    img = image.convert("RGB")
    w, h = img.size
    scale = min(1.0, max_side / max(w, h))
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"data:image/jpeg;base64,{b64}", img.size


def _field(message: Any, name: str) -> str | None:
    value = getattr(message, name, None)
    if value is None:
        extra = getattr(message, "model_extra", None) or {}
        value = extra.get(name)
    return value if isinstance(value, str) and value.strip() else None


def split_reasoning(message: Any) -> tuple[str | None, str | None]:
    """(reasoning, answer text) of a chat completion message, whichever way the server delivered them."""
    content = message.content if isinstance(getattr(message, "content", None), str) else None
    reasoning = _field(message, "reasoning") or _field(message, "reasoning_content")
    if content is not None and THINK_END in content:
        before, _, after = content.rpartition(THINK_END)
        before = before.replace("<think>", "").strip()
        if reasoning is None and before:
            reasoning = before
        content = after
    return reasoning, (content.strip() if content is not None else None)


def parse_answer(text: str, answer: type[A]) -> A:
    """Validate the JSON answer ``text`` against ``answer``; tolerates a ```json fence around it.

    Raises ValueError with a one-line description of the problem.
    """
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at char {exc.pos}): {body[:120]!r}") from None
    try:
        return answer.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "answer"
        raise ValueError(f"does not match the {answer.__name__} schema: {where}: {first['msg']}") from None


def _usage(response: Any) -> dict[str, int]:
    usage = getattr(response, "usage", None)
    if usage is None:
        return {}
    return {
        k: int(getattr(usage, k))
        for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        if isinstance(getattr(usage, k, None), int)
    }


def _status_hint(status: int, message: str) -> str:
    if status == 401:
        return "the endpoint wants an API key: export it and name the variable in vlm.api_key_env"
    if status == 404:
        return "check vlm.served_name against the names the endpoint lists at /v1/models"
    if "base64" in message.lower():
        return "the image data URL was not clean base64; this is a bug in the client, please report it"
    if "maximum model length" in message.lower() or "max_tokens" in message.lower():
        return "lower vlm.max_tokens or vlm.image_max_side, or raise vlm.max_model_len"
    return "see the server log for the full error"


class VLMClient:
    """One OpenAI-compatible endpoint (``base_url`` ends in ``/v1``) and the request settings from ``config``."""

    def __init__(
        self,
        base_url: str,
        config: VLMConfig,
        *,
        api_key: str | None = None,
        on_attempt: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.config = config
        self.on_attempt = on_attempt
        # Retries are ours (bounded by vlm.retries and logged); the SDK's own backoff would hide them.
        self._client = openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key or DUMMY_API_KEY,
            timeout=config.request_timeout_s,
            max_retries=0,
        )
        self._model: str | None = None

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> VLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model(self) -> str:
        """The model name to send: ``vlm.served_name`` or ``vlm.model``, whichever the endpoint lists."""
        if self._model is None:
            self._model = self._resolve_model()
        return self._model

    def _resolve_model(self) -> str:
        try:
            listed = [m.id for m in self._client.models.list()]
        except openai.APIStatusError as exc:
            raise VLMError(
                f"VLM endpoint {self.base_url} refused GET /models: HTTP {exc.status_code}",
                hint=_status_hint(exc.status_code, str(exc)),
            ) from None
        except openai.APIError as exc:
            raise VLMError(
                f"cannot reach the VLM endpoint {self.base_url}: {type(exc).__name__}",
                hint="start it with `python -m pipeline vlm serve`, or fix vlm.url",
            ) from None
        for name in (self.config.served_name, self.config.model):
            if name in listed:
                return name
        raise VLMError(
            f"VLM endpoint {self.base_url} serves {listed}, not {self.config.served_name!r} "
            f"(vlm.served_name) or {self.config.model!r} (vlm.model)",
            hint="set vlm.served_name to the name the endpoint serves, or point vlm.url at the right server",
        )

    # ------------------------------------------------------------------------------------------ requests

    def ask(
        self,
        *,
        purpose: str,
        system: str,
        text: str,
        images: Sequence[Image.Image],
        answer: type[A],
        check: Callable[[A], None] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> VLMReply[A]:
        """Ask one question with images (downscaled, in order) before ``text``; return a validated answer.

        ``check`` may raise ValueError for answers that are valid JSON but unusable (e.g. an id out of range);
        that counts as invalid and is asked again. ``meta`` is copied into each attempt record.
        """
        parts: list[dict[str, Any]] = []
        sizes = []
        for image in images:
            url, size = encode_image(image, self.config.image_max_side)
            parts.append({"type": "image_url", "image_url": {"url": url}})
            sizes.append(list(size))
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": [*parts, {"type": "text", "text": text}]},
        ]
        return self.request(
            purpose=purpose, messages=messages, answer=answer, check=check, meta={**(meta or {}), "image_sizes": sizes}
        )

    def request(
        self,
        *,
        purpose: str,
        messages: list[dict[str, Any]],
        answer: type[A],
        check: Callable[[A], None] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> VLMReply[A]:
        """Send ``messages`` as they are (the last one a user message) with the retry policy of this module."""
        attempts = self.config.retries + 1
        problem = ""
        for attempt in range(1, attempts + 1):
            sent = messages if attempt == 1 else _with_note(messages, retry_note(problem))
            record: dict[str, Any] = {"purpose": purpose, "attempt": attempt, **(meta or {})}
            try:
                reply = self._attempt(sent, answer, check, record)
            except _Retryable as exc:
                problem = str(exc)
                record["error"] = problem
                self._report(record)
                continue
            except VLMError as exc:
                record["error"] = exc.message
                self._report(record)
                raise
            self._report(record)
            return VLMReply(
                answer=reply[0],
                reasoning=reply[1],
                content=reply[2],
                model=self.model,
                usage=record.get("usage", {}),
                latency_s=record["latency_s"],
                attempts=attempt,
            )
        raise VLMError(
            f"the VLM gave no usable {purpose} answer in {attempts} attempt(s); last problem: {problem}",
            hint="raise vlm.retries or vlm.max_tokens, or read the reasoning in the agent transcript",
        )

    def _attempt(
        self,
        messages: list[dict[str, Any]],
        answer: type[A],
        check: Callable[[A], None] | None,
        record: dict[str, Any],
    ) -> tuple[A, str | None, str]:
        record["model"] = self.model
        t0 = time.perf_counter()
        try:
            response = self._client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                max_completion_tokens=self.config.max_tokens,  # vLLM ≥ 0.33: max_tokens is deprecated
                temperature=self.config.temperature,
                top_p=self.config.top_p,
                response_format=json_schema_format(answer),  # type: ignore[arg-type]
            )
        except openai.APIStatusError as exc:
            record["latency_s"] = round(time.perf_counter() - t0, 3)
            detail = _error_detail(exc)
            if exc.status_code >= 500:
                raise _Retryable(f"HTTP {exc.status_code} from the endpoint: {detail}") from None
            raise VLMError(
                f"VLM endpoint {self.base_url} refused the request: HTTP {exc.status_code}: {detail}",
                hint=_status_hint(exc.status_code, detail),
            ) from None
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            record["latency_s"] = round(time.perf_counter() - t0, 3)
            raise _Retryable(f"{type(exc).__name__} talking to {self.base_url}") from None
        record["latency_s"] = round(time.perf_counter() - t0, 3)
        record["usage"] = _usage(response)
        if not response.choices:
            raise _Retryable("the response has no choices")
        choice = response.choices[0]
        reasoning, content = split_reasoning(choice.message)
        record.update(finish_reason=choice.finish_reason, reasoning=reasoning, content=content)
        if choice.finish_reason == "length":
            raise _Retryable(f"the answer was cut off at max_tokens={self.config.max_tokens} (finish_reason 'length')")
        if not content:
            raise _Retryable("the answer has no content after the reasoning")
        try:
            parsed = parse_answer(content, answer)
            if check is not None:
                check(parsed)
        except ValueError as exc:
            raise _Retryable(f"the answer {exc}") from None
        record["answer"] = parsed.model_dump(mode="json")
        return parsed, reasoning, content

    def _report(self, record: dict[str, Any]) -> None:
        if self.on_attempt is not None:
            self.on_attempt(record)


class _Retryable(Exception):
    """An attempt failed in a way another attempt may fix (invalid, truncated, 5xx, timeout)."""


def _error_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
        if body.get("message"):
            return str(body["message"])[:300]
    return str(exc.message)[:300]


def _with_note(messages: list[dict[str, Any]], note: str) -> list[dict[str, Any]]:
    """A copy of ``messages`` whose last (user) message ends with ``note``."""
    out = [dict(m) for m in messages]
    last = out[-1]
    content = last["content"]
    if isinstance(content, str):
        last["content"] = content + note
    else:
        parts = [dict(p) for p in content]
        texts = [i for i, p in enumerate(parts) if p.get("type") == "text"]
        if texts:
            parts[texts[-1]]["text"] = parts[texts[-1]]["text"] + note
        else:
            parts.append({"type": "text", "text": note.strip()})
        last["content"] = parts
    return out
