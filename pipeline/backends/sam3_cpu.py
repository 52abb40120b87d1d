"""CPU compatibility for Meta's ``sam3`` 0.1.4 image model: the few CUDA-only spots, patched at run time.

Used only by :mod:`pipeline.backends.sam3` when ``segment.device`` resolves to ``cpu``. Nothing here is
needed on a GPU, and no installed file is edited. What is patched and why (upstream issues in brackets):

1. ``PositionEmbeddingSine.__init__`` precomputes its cache with tensors on ``device="cuda"`` → on a CPU-only
   torch the build fails with "Torch not compiled with CUDA enabled" (facebookresearch/sam3#587). During the
   build we construct it without precomputation and fill the same four strides on CPU.
2. ``TransformerDecoder.__init__`` builds the box-RPB coordinate cache with ``_get_coords(..., device="cuda")``
   (#550). During the build a request for "cuda" is served on CPU.
3. ``SequenceGeometryEncoder._encode_boxes`` calls ``Tensor.pin_memory()``, which needs an accelerator; it runs
   even for text-only prompts (the dummy prompt has 0 boxes). While it runs, ``pin_memory`` is the identity.
4. PyPI's ``torchvision`` wheel matching a CPU-only ``torch`` may be a CUDA build whose ``_C`` extension cannot
   load; its import then fails with "operator torchvision::nms does not exist". We define the ``nms``/``qnms``
   operator schemas (with a small greedy NMS on CPU) and import again; ``roi_align`` then falls back to its
   pure-PyTorch implementation. Not applied when torchvision imports normally.

Patches 1 and 2 are active only inside :func:`cpu_build_patches`; patch 3 wraps one method for the process
(idempotent); patch 4 is applied at most once. Import this module only where torch is installed.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Iterator

import torch

__all__ = ["ensure_torchvision", "cpu_build_patches", "patch_pin_memory", "greedy_nms"]

_PRECOMPUTE_STRIDES = (4, 8, 16, 32)


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (int64) of the boxes kept by greedy NMS, by descending score. ``boxes``: (N, 4) XYXY."""
    order = scores.argsort(descending=True)
    x0, y0, x1, y1 = boxes.float().unbind(1)
    areas = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep: list[int] = []
    for rank, i in enumerate(order.tolist()):
        if suppressed[rank]:
            continue
        keep.append(i)
        rest = order[rank + 1 :]
        w = (torch.minimum(x1[i], x1[rest]) - torch.maximum(x0[i], x0[rest])).clamp(min=0)
        h = (torch.minimum(y1[i], y1[rest]) - torch.maximum(y0[i], y0[rest])).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter).clamp(min=1e-12)
        suppressed[rank + 1 :] |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def _define_torchvision_ops() -> None:
    """Define the two operator schemas torchvision's fake-kernel registration expects (patch 4)."""
    lib = torch.library.Library("torchvision", "DEF")  # kept alive in _LIBS: dropping it undefines the ops
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", greedy_nms, "CPU")
    _LIBS.append(lib)


_LIBS: list[Any] = []


def ensure_torchvision() -> None:
    """Import torchvision; if its CUDA-only extension breaks the import on a CPU torch, apply patch 4 and retry."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc) or _LIBS:
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _define_torchvision_ops()
        import torchvision  # noqa: F401


@contextlib.contextmanager
def cpu_build_patches() -> Iterator[None]:
    """Patches 1 and 2, for the duration of ``build_sam3_image_model(..., device="cpu")``."""
    from sam3.model.decoder import TransformerDecoder
    from sam3.model.position_encoding import PositionEmbeddingSine

    original_init = PositionEmbeddingSine.__init__
    original_get_coords = TransformerDecoder.__dict__["_get_coords"]

    @functools.wraps(original_init)
    def init_on_cpu(self: Any, *args: Any, precompute_resolution: int | None = None, **kwargs: Any) -> None:
        original_init(self, *args, precompute_resolution=None, **kwargs)
        if precompute_resolution is not None:
            for stride in _PRECOMPUTE_STRIDES:
                size = (precompute_resolution // stride, precompute_resolution // stride)
                self.forward(torch.zeros((1, 1) + size))
                self.cache[size] = self.cache[size].clone().detach()

    def get_coords_on_cpu(H: int, W: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.device(device).type == "cuda":
            device = "cpu"
        return original_get_coords.__func__(H, W, device)

    PositionEmbeddingSine.__init__ = init_on_cpu  # type: ignore[method-assign]
    TransformerDecoder._get_coords = staticmethod(get_coords_on_cpu)  # type: ignore[method-assign]
    try:
        yield
    finally:
        PositionEmbeddingSine.__init__ = original_init  # type: ignore[method-assign]
        TransformerDecoder._get_coords = original_get_coords  # type: ignore[method-assign]


def patch_pin_memory() -> None:
    """Patch 3: ``SequenceGeometryEncoder._encode_boxes`` runs with ``Tensor.pin_memory`` as the identity."""
    from sam3.model.geometry_encoders import SequenceGeometryEncoder

    original = SequenceGeometryEncoder._encode_boxes
    if getattr(original, "_cpu_patched", False):
        return

    @functools.wraps(original)
    def encode_boxes_without_pinning(self: Any, *args: Any, **kwargs: Any) -> Any:
        pin = torch.Tensor.pin_memory
        torch.Tensor.pin_memory = lambda t, *a, **k: t  # type: ignore[method-assign]
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.Tensor.pin_memory = pin  # type: ignore[method-assign]

    encode_boxes_without_pinning._cpu_patched = True  # type: ignore[attr-defined]
    SequenceGeometryEncoder._encode_boxes = encode_boxes_without_pinning  # type: ignore[method-assign]
