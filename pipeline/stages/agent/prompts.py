"""Our prompt texts for the agent and the pydantic schemas of the answers we accept.

Two questions are asked of the VLM:

- **propose**: query + photo → short noun phrases for the text-prompted segmenter (or none: nothing matches).
- **review**: query + photo + a numbered overlay of the candidates → ``keep`` some of them (with a reason per
  object), ``retry`` with new phrases, or ``none`` (nothing matches).

Each answer is requested as JSON through ``response_format`` (json_schema built from the models below) and is
always validated here again: vLLM may ignore a schema it does not understand, and reasoning models can run out
of tokens mid-answer. Candidate numbers are 1-based, as drawn on the overlay. Boxes are given to the model in
Qwen3-VL's native relative frame: integers 0–1000 for x and y, (x0, y0, x1, y1), origin top-left.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "SYSTEM_PROMPT",
    "MAX_PHRASE_WORDS",
    "ProposeAnswer",
    "KeptObject",
    "ReviewAnswer",
    "CandidateLine",
    "propose_text",
    "review_text",
    "json_schema_format",
    "retry_note",
]

MAX_PHRASE_WORDS = 6

SYSTEM_PROMPT = """\
You work with a text-prompted segmentation model (SAM 3) to find, in one photo, exactly the objects that a \
user's request refers to.

SAM 3 takes a short noun phrase such as "mug", "red car" or "wooden chair" and returns a mask for every \
instance of it that it can see. It does not understand relations, counts, positions or negations \
("the second cup from the left", "the dog that is not sleeping"): you resolve those yourself, by choosing \
among the candidates SAM 3 returns.

Reply with a single JSON object that follows the schema you are given. Put no text before or after it."""


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _clean_phrases(value: list[str]) -> list[str]:
    """Strip, drop case-insensitive duplicates, reject empty or over-long phrases."""
    out: list[str] = []
    seen: set[str] = set()
    for raw in value:
        phrase = " ".join(str(raw).split())
        if not phrase:
            raise ValueError("a phrase is empty")
        if len(phrase.split()) > MAX_PHRASE_WORDS:
            raise ValueError(f"phrase {phrase!r} is longer than {MAX_PHRASE_WORDS} words; use a short noun phrase")
        if phrase.lower() not in seen:
            seen.add(phrase.lower())
            out.append(phrase)
    return out


class ProposeAnswer(_Answer):
    """Noun phrases for the segmenter; an empty list means nothing in the photo matches the request."""

    phrases: list[str] = Field(description="short noun phrases for SAM 3; [] if nothing in the photo matches")
    reason: str = Field(description="one sentence: why these phrases, or why nothing matches")

    @field_validator("phrases")
    @classmethod
    def _clean(cls, value: list[str]) -> list[str]:
        return _clean_phrases(value)


class KeptObject(_Answer):
    """One candidate the VLM keeps: its 1-based number on the overlay and why."""

    id: int = Field(description="the candidate's number on the overlay")
    reason: str = Field(description="why this object is one the request refers to")


class ReviewAnswer(_Answer):
    """The VLM's verdict on one round of candidates."""

    decision: Literal["keep", "retry", "none"]
    keep: list[KeptObject] = Field(description="the candidates to keep (decision 'keep'), else []")
    new_phrases: list[str] = Field(description="new noun phrases to try (decision 'retry'), else []")
    reason: str = Field(description="one or two sentences explaining the decision")

    @field_validator("new_phrases")
    @classmethod
    def _clean(cls, value: list[str]) -> list[str]:
        return _clean_phrases(value)

    @model_validator(mode="after")
    def _consistent(self) -> ReviewAnswer:
        if self.decision == "keep" and not self.keep:
            raise ValueError("decision 'keep' needs at least one entry in 'keep' (or answer 'none')")
        if self.decision == "retry" and not self.new_phrases:
            raise ValueError("decision 'retry' needs at least one entry in 'new_phrases'")
        ids = [k.id for k in self.keep]
        if len(ids) != len(set(ids)):
            raise ValueError(f"'keep' lists a candidate twice: {ids}")
        return self

    def check_ids(self, n_candidates: int) -> None:
        """Raise ValueError when a kept id is not one of the ``n_candidates`` numbers drawn (1..n)."""
        bad = [k.id for k in self.keep if not 1 <= k.id <= n_candidates]
        if bad:
            raise ValueError(f"'keep' names candidate(s) {bad}, but only 1..{n_candidates} exist")


class CandidateLine(BaseModel):
    """What the review prompt says about one candidate (id is 1-based; box in 0–1000 relative units)."""

    id: int
    phrase: str
    score: float
    box_1000: tuple[int, int, int, int]
    area_pct: float


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def propose_text(query: str, *, max_phrases: int, failed: Sequence[str] = ()) -> str:
    """The user text of a propose request; ``failed`` are phrases SAM 3 already found nothing for."""
    lines = [f"Request: {_quote(query)}", ""]
    if failed:
        lines += [
            "SAM 3 found nothing for these phrases: " + ", ".join(_quote(p) for p in failed) + ".",
            "Propose different wording (often a more general category name works better).",
            "",
        ]
    lines += [
        f"Look at the photo and propose at most {max_phrases} short noun phrases (1-4 words: a category name, "
        "optionally with one attribute such as a colour or material) that SAM 3 should search for to find "
        "every object the request refers to. Put the plainest category name first; add alternatives only if "
        "the object could reasonably be called something else. Do not put positions, counts or relations "
        "into a phrase.",
        'If nothing in the photo can match the request, return an empty "phrases" list and say why in "reason".',
        "",
        'Fields: "phrases" (list of strings), "reason" (one sentence).',
    ]
    return "\n".join(lines)


def review_text(
    query: str,
    candidates: Sequence[CandidateLine],
    *,
    tried: Sequence[str],
    max_phrases: int,
    last_round: bool,
) -> str:
    """The user text of a review request (the photo and the overlay are attached before it)."""
    lines = [
        f"Request: {_quote(query)}",
        "",
        "The first image is the photo. The second is the same photo with the candidate objects SAM 3 found, "
        "each filled with a colour and labelled with its number.",
        "",
        "Candidates (box = x0, y0, x1, y1 in 0-1000 relative coordinates, origin top-left):",
    ]
    for c in candidates:
        lines.append(
            f"  {c.id}. {_quote(c.phrase)}  score {c.score:.2f}  box {list(c.box_1000)}  "
            f"{c.area_pct:.1f}% of the image"
        )
    lines += [
        "",
        "Phrases tried so far: " + ", ".join(_quote(p) for p in tried) + ".",
        "",
        "Decide:",
        '- "keep": the request refers to some of these candidates. List every candidate it refers to in "keep" '
        '(its number as "id", a short reason each) and none that it does not. A plural request may need several.',
    ]
    if not last_round:
        lines.append(
            f'- "retry": an object the request refers to is missing or was merged with another: give at most '
            f'{max_phrases} new noun phrases, not tried before, in "new_phrases". Candidates you would keep stay '
            "available in the next round."
        )
    lines.append('- "none": nothing in the photo matches the request; say why in "reason".')
    if last_round:
        lines.append('This is the last round: answer "keep" or "none".')
    lines += ["", 'Fill the fields you do not use with []. Fields: "decision", "keep", "new_phrases", "reason".']
    return "\n".join(lines)


def retry_note(problem: str) -> str:
    """The text appended to a request that is sent again because the previous answer was unusable."""
    return (
        f"\n\nYour previous answer could not be used: {problem}. Reply again with one JSON object that follows "
        "the schema, and keep your thinking short."
    )


def json_schema_format(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAI ``response_format`` value asking for JSON that validates against ``model``."""
    return {
        "type": "json_schema",
        "json_schema": {"name": model.__name__, "schema": model.model_json_schema(), "strict": True},
    }
