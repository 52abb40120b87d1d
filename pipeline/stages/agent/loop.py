"""The agent loop: a query and an image become masks, with the VLM choosing phrases and judging candidates.

Runs inside the segmentation worker (sam3 env), after ``segmenter.set_image(image)``: the image is encoded
once and every phrase reuses that encoding. One run:

1. **propose** — the VLM sees the photo and the query and names noun phrases (none: "no object matches").
2. **segment** — each new phrase goes to ``segmenter.predict``; all detections so far pass through
   :func:`~pipeline.stages.postprocess.select_objects` (``segment.*`` thresholds) into one numbered candidate list.
   No candidate at all → back to 1 with the failed phrases listed (this uses up a round).
3. **review** — the VLM sees the photo and a numbered overlay (``overlay_round<N>.png``) and answers ``keep``
   (which numbers, and why each), ``retry`` (new phrases → step 2) or ``none``.

At most ``agent.max_rounds`` rounds (a round = one segment step); the last review may only keep or say none.
Every request (purpose, model, token usage, latency, reasoning text, parsed decision or error) is appended to
``transcript.json`` in ``out_dir``, rewritten atomically after each request so a failed run still shows why.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from pipeline.atomic import write_json_atomic, write_with
from pipeline.backends.base import Detections, Segmenter
from pipeline.config import PipelineConfig
from pipeline.errors import VLMError
from pipeline.stages.postprocess import Candidate, select_objects
from pipeline.stages.agent.client import VLMClient
from pipeline.stages.agent.overlay import render_overlay
from pipeline.stages.agent.prompts import (
    SYSTEM_PROMPT,
    CandidateLine,
    ProposeAnswer,
    ReviewAnswer,
    propose_text,
    review_text,
)

__all__ = ["TRANSCRIPT_NAME", "NO_MATCH", "AgentOutcome", "Proposal", "propose_ahead", "run_agent"]

TRANSCRIPT_NAME = "transcript.json"
TRANSCRIPT_VERSION = 1
NO_MATCH = "no object matches"

Progress = Callable[[int, int, str], None]


@dataclass
class AgentOutcome:
    """What the agent settled on: kept candidates (``decision`` = the VLM's reason), or none and why."""

    candidates: list[Candidate]
    reason: str | None
    phrases: list[str] = field(default_factory=list)


@dataclass
class Proposal:
    """The first proposal of a run, asked ahead (see :func:`propose_ahead`): the answer to come and the request
    records for the run's transcript."""

    future: Future[ProposeAnswer]
    records: list[dict[str, Any]] = field(default_factory=list)

    def answer(self, transcript: _Transcript) -> ProposeAnswer:
        """Wait for the answer, then copy the request records into ``transcript``; raises the VLMError."""
        try:
            return self.future.result()
        finally:
            for record in self.records:
                transcript.add_request({**record, "asked_ahead": True})


def propose_ahead(pool: Executor, image: Image.Image, query: str, *, config: PipelineConfig, vlm_url: str) -> Proposal:
    """Ask the VLM for a run's first phrases on ``pool`` now, while the segmenter works on other images.

    The first proposal needs only the photo and the query, so a worker that holds several query-mode runs asks
    for all of them at once (vLLM batches concurrent requests) and SAM3 work overlaps the VLM's. Pass the
    result to :func:`run_agent` as ``proposal``.
    """
    records: list[dict[str, Any]] = []

    def ask() -> ProposeAnswer:
        with VLMClient(vlm_url, config.vlm, api_key=config.vlm.api_key(), on_attempt=records.append) as client:
            return _ask_propose(client, image.convert("RGB"), query, config, failed=[], round_=1)

    return Proposal(pool.submit(ask), records)


def _ask_propose(
    client: VLMClient, image: Image.Image, query: str, config: PipelineConfig, *, failed: list[str], round_: int
) -> ProposeAnswer:
    reply = client.ask(
        purpose="propose",
        system=SYSTEM_PROMPT,
        text=propose_text(query, max_phrases=config.agent.max_phrases, failed=failed),
        images=[image],
        answer=ProposeAnswer,
        meta={"round": round_},
    )
    return reply.answer


class _Transcript:
    """The JSON record of one agent run, rewritten atomically on every change."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"schema_version": TRANSCRIPT_VERSION, **header, "requests": [], "rounds": []}
        self.write()

    def add_request(self, record: dict[str, Any]) -> None:
        self.data["requests"].append(record)
        self.write()

    def add_round(self, entry: dict[str, Any]) -> None:
        self.data["rounds"].append(entry)
        self.write()

    def finish(self, outcome: dict[str, Any]) -> None:
        self.data["outcome"] = outcome
        self.write()

    def write(self) -> None:
        write_json_atomic(self.path, self.data)


def _candidate_lines(candidates: list[Candidate], width: int, height: int) -> list[CandidateLine]:
    lines = []
    for i, cand in enumerate(candidates, start=1):
        x0, y0, x1, y1 = cand.box_xyxy
        box = (
            round(1000 * x0 / width),
            round(1000 * y0 / height),
            round(1000 * x1 / width),
            round(1000 * y1 / height),
        )
        lines.append(
            CandidateLine(
                id=i,
                phrase=cand.label,
                score=cand.score,
                box_1000=box,
                area_pct=100.0 * cand.area / (width * height),
            )
        )
    return lines


def _candidate_record(line: CandidateLine, cand: Candidate) -> dict[str, Any]:
    return {
        "id": line.id,
        "phrases": list(cand.phrases),
        "score": round(cand.score, 4),
        "box_xyxy": [round(v, 1) for v in cand.box_xyxy],
        "area": cand.area,
    }


class _AgentRun:
    """State of one run: the growing detection pool and the phrases tried so far."""

    def __init__(
        self,
        segmenter: Segmenter,
        image: Image.Image,
        query: str,
        config: PipelineConfig,
        client: VLMClient,
        transcript: _Transcript,
        out_dir: Path,
        progress: Progress,
    ) -> None:
        self.segmenter = segmenter
        self.image = image
        self.query = query
        self.config = config
        self.client = client
        self.transcript = transcript
        self.out_dir = out_dir
        self.progress = progress
        self.detections: list[Detections] = []
        self.tried: list[str] = []
        self.round = 0

    def _new_phrases(self, phrases: list[str]) -> list[str]:
        tried = {p.lower() for p in self.tried}
        return [p for p in phrases if p.lower() not in tried][: self.config.agent.max_phrases]

    def propose(self, failed: list[str]) -> ProposeAnswer:
        return _ask_propose(self.client, self.image, self.query, self.config, failed=failed, round_=self.round + 1)

    def segment(self, phrases: list[str]) -> list[Candidate]:
        """Predict ``phrases`` (new ones only), add them to the pool, return all candidates after selection."""
        self.tried += phrases
        self.detections += self.segmenter.predict(phrases)
        seg = self.config.segment
        return select_objects(
            self.detections,
            threshold=seg.threshold,
            min_area_px=seg.min_area_px,
            dedup_iou=seg.dedup_iou,
            max_objects=seg.max_objects,
        )

    def review(self, candidates: list[Candidate], lines: list[CandidateLine], overlay: Image.Image) -> ReviewAnswer:
        last = self.round >= self.config.agent.max_rounds

        def check(answer: ReviewAnswer) -> None:
            answer.check_ids(len(candidates))
            if last and answer.decision == "retry":
                raise ValueError("this was the last round, so 'retry' is not allowed: answer 'keep' or 'none'")
            if answer.decision == "retry" and not self._new_phrases(answer.new_phrases):
                raise ValueError(f"every phrase in 'new_phrases' was already tried ({', '.join(self.tried)})")

        reply = self.client.ask(
            purpose="review",
            system=SYSTEM_PROMPT,
            text=review_text(
                self.query,
                lines,
                tried=self.tried,
                max_phrases=self.config.agent.max_phrases,
                last_round=last,
            ),
            images=[self.image, overlay],
            answer=ReviewAnswer,
            check=check,
            meta={"round": self.round},
        )
        return reply.answer

    def run(self, ahead: Proposal | None = None) -> AgentOutcome:
        max_rounds = self.config.agent.max_rounds
        self.progress(0, max_rounds, "asking the VLM for phrases")
        proposal = ahead.answer(self.transcript) if ahead is not None else self.propose(failed=[])
        phrases = proposal.phrases
        if not phrases:
            return self._no_match(proposal.reason)
        while True:
            new = self._new_phrases(phrases)
            if not new:
                return self._no_match(f"the VLM proposed only phrases already tried ({', '.join(phrases)})")
            self.round += 1
            self.progress(self.round - 1, max_rounds, f"round {self.round}: segmenting {', '.join(new)}")
            candidates = self.segment(new)
            if not candidates:
                self.transcript.add_round({"round": self.round, "phrases": new, "candidates": [], "overlay": None})
                if self.round >= max_rounds:
                    return self._no_match(f"the segmenter found nothing for {', '.join(self.tried)}")
                self.progress(self.round, max_rounds, "nothing found; asking the VLM for other phrases")
                proposal = self.propose(failed=new)
                if not proposal.phrases:
                    return self._no_match(proposal.reason)
                phrases = proposal.phrases
                continue
            lines = _candidate_lines(candidates, *self.image.size)
            overlay = render_overlay(self.image, [c.mask for c in candidates])
            overlay_name = f"overlay_round{self.round}.png"
            write_with(self.out_dir / overlay_name, lambda tmp: overlay.save(tmp, format="PNG"))
            entry: dict[str, Any] = {
                "round": self.round,
                "phrases": new,
                "candidates": [_candidate_record(line, c) for line, c in zip(lines, candidates)],
                "overlay": overlay_name,
            }
            self.progress(self.round - 1, max_rounds, f"round {self.round}: the VLM reviews {len(candidates)} candidate(s)")
            verdict = self.review(candidates, lines, overlay)
            entry["decision"] = verdict.model_dump(mode="json")
            self.transcript.add_round(entry)
            if verdict.decision == "none":
                return self._no_match(verdict.reason)
            if verdict.decision == "keep":
                kept = []
                for item in verdict.keep:
                    cand = candidates[item.id - 1]
                    cand.decision = item.reason
                    kept.append(cand)
                return AgentOutcome(candidates=kept, reason=None, phrases=list(self.tried))
            phrases = verdict.new_phrases  # retry

    def _no_match(self, why: str) -> AgentOutcome:
        return AgentOutcome(candidates=[], reason=f"{NO_MATCH}: {why.strip()}", phrases=list(self.tried))


def run_agent(
    segmenter: Segmenter,
    image: Image.Image,
    query: str,
    *,
    config: PipelineConfig,
    vlm_url: str,
    out_dir: Path,
    progress: Progress,
    proposal: Proposal | None = None,
) -> AgentOutcome:
    """Turn ``query`` into masks of ``image`` with the VLM at ``vlm_url`` (…/v1) choosing and judging.

    ``proposal``: the first proposal, already asked with :func:`propose_ahead` (else it is asked here).

    ``segmenter.set_image(image)`` must already have been called (the image is encoded once, here or not at
    all). ``image`` is the full-resolution RGB input; the VLM gets copies downscaled to ``vlm.image_max_side``.
    Writes ``transcript.json`` and ``overlay_round<N>.png`` into ``out_dir``. Returns the kept candidates
    (masks at input resolution, ``decision`` = the VLM's reason per object), or none with a reason that starts
    with "no object matches". Raises :class:`~pipeline.errors.VLMError` when the VLM gives no usable answer.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = image.convert("RGB")
    transcript = _Transcript(
        out_dir / TRANSCRIPT_NAME,
        {
            "query": query,
            "vlm_url": vlm_url,
            "served_name": config.vlm.served_name,
            "image_size": list(image.size),
            "settings": {
                "max_rounds": config.agent.max_rounds,
                "max_phrases": config.agent.max_phrases,
                "image_max_side": config.vlm.image_max_side,
                "max_tokens": config.vlm.max_tokens,
                "temperature": config.vlm.temperature,
                "top_p": config.vlm.top_p,
                "retries": config.vlm.retries,
            },
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    with VLMClient(vlm_url, config.vlm, api_key=config.vlm.api_key(), on_attempt=transcript.add_request) as client:
        run = _AgentRun(segmenter, image, query, config, client, transcript, out_dir, progress)
        try:
            outcome = run.run(proposal)
        except VLMError as exc:
            transcript.finish({"error": exc.message, "phrases": list(run.tried)})
            raise
    transcript.finish(
        {
            "kept": [
                {"phrases": list(c.phrases), "score": round(c.score, 4), "decision": c.decision}
                for c in outcome.candidates
            ],
            "reason": outcome.reason,
            "phrases": outcome.phrases,
        }
    )
    progress(config.agent.max_rounds, config.agent.max_rounds, f"{len(outcome.candidates)} object(s) kept")
    return outcome
