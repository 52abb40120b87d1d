"""A reconstruction backend double: the demo cube reconstructor plus a counter for the tests.

A small coloured cube of Gaussians and a box mesh per mask, posed from the mask (see
:mod:`pipeline.backends.demo`). ``prepare`` counts its calls so tests can check the per-image work happens
once per image; ``options.delay_s`` lets tests kill a worker mid-stage.
"""

from __future__ import annotations

import numpy as np

from pipeline.backends.demo import DemoCubeReconstructor

__all__ = ["CubeReconstructorDouble"]


class CubeReconstructorDouble(DemoCubeReconstructor):
    """Counts ``prepare`` calls in ``self.prepared``."""

    def __init__(self, config) -> None:  # noqa: ANN001 - ReconstructConfig
        super().__init__(config)
        self.prepared = 0

    def prepare(self, image: np.ndarray) -> dict:
        self.prepared += 1
        return super().prepare(image)
