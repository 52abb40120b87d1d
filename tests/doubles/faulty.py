"""Segmenter doubles that misbehave or report on purpose, for the engine's fault and grouping tests.

Both extend :class:`~tests.doubles.segmenters.ColorBlobSegmenterDouble` (same masks for the same image):

- :class:`HangingSegmenterDouble` sleeps for an hour when asked for the phrase ``hang`` (a stuck model);
- :class:`PrefetchLogSegmenterDouble` appends one line per :meth:`prefetch` call to the file named by
  ``segment.options.prefetch_log``: the number of images the engine handed over together;
- :class:`SingleRunHintSegmenterDouble` reports, as a start-up step ``single_run`` (1.0 or 0.0), whether the
  driver started its worker for one run (``PIPELINE_SINGLE_RUN``);
- :class:`MarkerFailSegmenterDouble` fails every image while the file named by ``segment.options.fail_if_exists``
  exists (a fault that the test can clear, as a user fixes a broken node);
- :class:`StartFailSegmenterDouble` fails at start (as a model load killed by the OOM killer) for each line of the
  file named by ``segment.options.start_failures`` (consuming one line per start; ``always`` never runs out) and
  appends one line per start to ``segment.options.start_log``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from PIL import Image

from pipeline.backends.base import Detections
from pipeline.stages.protocol import serves_single_run
from tests.doubles.segmenters import ColorBlobSegmenterDouble

__all__ = ["HangingSegmenterDouble", "PrefetchLogSegmenterDouble", "SingleRunHintSegmenterDouble",
           "MarkerFailSegmenterDouble", "StartFailSegmenterDouble"]


class SingleRunHintSegmenterDouble(ColorBlobSegmenterDouble):
    """Reports ``single_run`` (whether its worker serves one run) among its start-up timings."""

    def load_timings(self) -> dict[str, float]:
        return {"single_run": 1.0 if serves_single_run() else 0.0}


class HangingSegmenterDouble(ColorBlobSegmenterDouble):
    """Never returns for the phrase ``hang``."""

    def predict(self, phrases: Sequence[str]) -> list[Detections]:
        if "hang" in phrases:
            time.sleep(3600)
        return super().predict(phrases)


class PrefetchLogSegmenterDouble(ColorBlobSegmenterDouble):
    """Logs the size of each prefetched group of images; reports a made-up start-up step (``capture_s``)."""

    def load_timings(self) -> dict[str, float]:
        return {"capture_s": 0.125}

    def prefetch(self, images: Sequence[Image.Image]) -> None:
        with Path(self.config.options["prefetch_log"]).open("a") as log:
            log.write(f"{len(images)}\n")


class MarkerFailSegmenterDouble(ColorBlobSegmenterDouble):
    """Raises on every image while ``options.fail_if_exists`` names an existing file."""

    def predict(self, phrases: Sequence[str]) -> list[Detections]:
        marker = self.config.options.get("fail_if_exists")
        if marker and Path(marker).exists():
            raise RuntimeError(f"failing on purpose: {marker} exists")
        return super().predict(phrases)


class StartFailSegmenterDouble(ColorBlobSegmenterDouble):
    """Fails in ``__init__`` (before the worker is ready) while ``options.start_failures`` has lines left."""

    def __init__(self, config) -> None:  # noqa: ANN001 - SegmentConfig
        super().__init__(config)
        with Path(config.options["start_log"]).open("a") as log:
            log.write("start\n")
        failures = Path(config.options["start_failures"])
        lines = failures.read_text().splitlines() if failures.exists() else []
        if lines:
            if lines[0] != "always":
                failures.write_text("".join(f"{line}\n" for line in lines[1:]))
            raise RuntimeError("failing on purpose at start (a model load that was killed)")
