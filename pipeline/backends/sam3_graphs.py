"""CUDA graphs of SAM3's per-image work (``segment.sam3.cuda_graphs``): the backbone and the grounding pass.

SAM3's grounding pass (fusion encoder, DETR decoder, heads, mask head) is about 2,800 small kernels for a few
milliseconds of arithmetic: launched one by one from Python it is bound by the launches. Replaying a captured
graph issues them all at once. Graphs need fixed shapes and fixed addresses, so:

- **backbone**: one graph for one image (input (1, 3, 1008, 1008) fp32, the resolution is fixed by the model);
  its output features stay in static tensors that the grounding graphs read directly;
- **grounding**: one graph per phrase-count *bucket* (default 1–6, 8, 12, 16): a call with P phrases runs the
  smallest bucket B ≥ P, its text rows P..B-1 filled with copies of the last phrase (valid inputs, results
  dropped). A call whose P is a bucket replays exactly the kernels of the op-by-op path (bit-identical in our
  H100 and H200 checks); a padded call runs GEMMs of another shape, whose bf16 rounding differs slightly. Text
  features are copied into the bucket's static buffers; outputs are views of static tensors, valid until the
  next replay.

Everything is captured **at worker start** (one dummy image; the cost is reported as ``graph_capture_s`` in the
worker's ready timings) rather than lazily, so the first request of each size is not the slow one and
out-of-memory shows at start, not in the middle of a batch. A worker started for a single run (the one-shot
commands, ``PIPELINE_SINGLE_RUN``) captures nothing: there the capture costs seconds and saves ~30 ms. The
graphs share one memory pool; the pass runs under the same bf16 autocast as the eager path (weight-cast cache
off, as capture requires). The text encoder stays eager (it runs only for phrases not yet in the text cache).
The torch-free helpers (:func:`bucket_for`, :func:`pad_rows`) are unit-tested on CPU.

One adaptation of sam3 0.1.4 is needed for capture (:func:`host_feature_sizes`): its fusion encoder builds the
feature-map sizes with ``torch.tensor(list, device="cuda")`` (a host→device copy that synchronises) and the
decoder then compares those sizes on the host in every layer (more synchronisations); a capture forbids both.
While capturing, that one ``torch.tensor`` call builds the sizes on the host instead: same values (the input is
always 1008×1008), and the code that reads them runs on the host, as it did after each synchronisation.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DEFAULT_BUCKETS", "GROUNDING_OUTPUTS", "Sam3Graphs", "bucket_for", "pad_rows"]

DEFAULT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16)
GROUNDING_OUTPUTS = ("pred_logits", "presence_logit_dec", "pred_boxes", "pred_masks")  # what the backend reads
_TEXT_DIMS = {"language_features": 1, "language_embeds": 1, "language_mask": 0}  # the phrase dimension
WARMUP_PASSES = 2  # eager passes on the capture stream before capturing (lazy inits, cuBLAS workspaces)


def bucket_for(n_phrases: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ≥ ``n_phrases``; ValueError when none is (the caller splits bigger calls)."""
    if n_phrases < 1:
        raise ValueError(f"need at least one phrase, got {n_phrases}")
    for bucket in sorted(buckets):
        if n_phrases <= bucket:
            return bucket
    raise ValueError(f"{n_phrases} phrases exceed the largest CUDA-graph bucket ({max(buckets)})")


def pad_rows(n_phrases: int, bucket: int) -> list[int]:
    """Row index per bucket slot: ``0..n-1``, then the last phrase repeated to fill ``bucket`` slots."""
    if not 1 <= n_phrases <= bucket:
        raise ValueError(f"cannot place {n_phrases} phrases in a bucket of {bucket}")
    return list(range(n_phrases)) + [n_phrases - 1] * (bucket - n_phrases)


class Sam3Graphs:
    """Captured backbone + grounding graphs of one SAM3 image model on one CUDA device.

    ``model``: the built ``Sam3Image`` (eval, on ``device``); ``text``: encoded text features of one phrase
    (language_features (32, 1, 256), language_mask (1, 32) bool, language_embeds (32, 1, 1024)), used as the
    dummy input of the capture; ``autocast_dtype``: ``torch.bfloat16`` or None (fp32).
    """

    def __init__(self, model: Any, device: torch.device, text: dict[str, torch.Tensor], *,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, autocast_dtype: Any = None,
                 resolution: int = 1008) -> None:  # fmt: skip
        import torch

        self._torch = torch
        self.model, self.device, self.autocast_dtype = model, device, autocast_dtype
        self.buckets = tuple(sorted(set(buckets)))
        self.timings: dict[str, float] = {}
        self._stream = torch.cuda.Stream(device=device)
        self._pool = torch.cuda.graph_pool_handle()
        self._row_index: dict[tuple[int, int], torch.Tensor] = {}
        t0 = time.perf_counter()
        with self._capture_mode(), host_feature_sizes():
            self.pixels = torch.zeros((1, 3, resolution, resolution), dtype=torch.float32, device=device)
            self._backbone_graph, self.features = self._capture(self._backbone_pass)
            self._backbone_graph.replay()  # real features for the grounding warm-ups (capture computes nothing)
            self._grounding: dict[int, tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
            for bucket in sorted(self.buckets, reverse=True):  # largest first: the pool grows once
                static_text = {key: value.index_select(_TEXT_DIMS[key], self._rows(1, bucket)).clone()
                               for key, value in text.items() if key in _TEXT_DIMS}  # fmt: skip
                graph, outputs = self._capture(lambda b=bucket, t=static_text: self._grounding_pass(b, t))
                self._grounding[bucket] = (graph, static_text, outputs)
        torch.cuda.synchronize(device)
        self.timings["graph_capture_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------ replay

    def set_image(self, pixels: torch.Tensor) -> dict[str, Any]:
        """Replay the backbone on ``pixels`` ((3, 1008, 1008) or (1, 3, 1008, 1008), fp32 in [-1, 1]); returns
        the static features (valid until the next :meth:`set_image` / :meth:`load_features`)."""
        with self._torch.inference_mode():
            self.pixels.copy_(pixels.reshape(self.pixels.shape))
            self._backbone_graph.replay()
        return self.features

    def load_features(self, backbone_out: dict[str, Any]) -> dict[str, Any]:
        """Copy features computed elsewhere (one image of a batched backbone pass) into the static ones."""
        with self._torch.inference_mode():
            _copy_nested(self.features, backbone_out)
        return self.features

    def ground(self, text: dict[str, torch.Tensor], n_phrases: int) -> dict[str, torch.Tensor]:
        """Replay the grounding graph of the bucket for ``n_phrases`` against the current image features.

        ``text``: the phrases' features (phrase dimension = ``n_phrases``). Returns views ``[:n_phrases]`` of
        the static outputs (pred_logits (P, 200, 1), presence_logit_dec (P, 1), pred_boxes (P, 200, 4) cxcywh
        in [0, 1], pred_masks (P, 200, 288, 288) logits), valid until the next replay.
        """
        bucket = bucket_for(n_phrases, self.buckets)
        graph, static_text, outputs = self._grounding[bucket]
        rows = self._rows(n_phrases, bucket)
        with self._torch.inference_mode():
            for key, buffer in static_text.items():
                buffer.copy_(text[key].index_select(_TEXT_DIMS[key], rows))
            graph.replay()
        return {key: value[:n_phrases] for key, value in outputs.items()}

    # ------------------------------------------------------------------------------------------ capture

    @contextlib.contextmanager
    def _capture_mode(self) -> Iterator[None]:
        torch = self._torch
        amp: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.autocast_dtype is not None:
            amp = torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)
        with torch.inference_mode(), amp:
            yield

    def _capture(self, fn: Any) -> tuple[Any, Any]:
        """Warm ``fn`` up on the side stream, then capture it into a graph of the shared pool."""
        torch = self._torch
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for _ in range(WARMUP_PASSES):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            outputs = fn()
        return graph, outputs

    def _backbone_pass(self) -> dict[str, Any]:
        out = self.model.backbone.forward_image(self.pixels)
        out.pop("sam2_backbone_out", None)
        return out

    def _grounding_pass(self, bucket: int, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from sam3.model.data_misc import FindStage

        torch = self._torch
        find = FindStage(
            img_ids=torch.zeros(bucket, dtype=torch.long, device=self.device),
            text_ids=torch.arange(bucket, dtype=torch.long, device=self.device),
            input_boxes=None, input_boxes_mask=None, input_boxes_label=None, input_points=None, input_points_mask=None,
        )  # fmt: skip
        out = self.model.forward_grounding(
            backbone_out={**self.features, **text},
            find_input=find,
            find_target=None,
            geometric_prompt=self.model._get_dummy_prompt(num_prompts=bucket),
        )
        return {key: out[key] for key in GROUNDING_OUTPUTS}

    def _rows(self, n_phrases: int, bucket: int) -> torch.Tensor:
        """(bucket,) int64 row indices on the device (see :func:`pad_rows`), made once per (P, bucket)."""
        key = (n_phrases, bucket)
        if key not in self._row_index:
            self._row_index[key] = self._torch.tensor(pad_rows(n_phrases, bucket), dtype=self._torch.long,
                                                      device=self.device)  # fmt: skip
        return self._row_index[key]


class _TorchWithHostTensors:
    """``torch`` for one sam3 module, except that ``tensor(data, ..., device=...)`` stays on the host."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def tensor(self, data: Any, *args: Any, device: Any = None, **kwargs: Any) -> Any:
        return self._real.tensor(data, *args, **kwargs)


@contextlib.contextmanager
def host_feature_sizes() -> Iterator[None]:
    """Within the block, sam3's fusion encoder keeps its feature-map sizes (``spatial_shapes``) on the host."""
    import sam3.model.encoder as encoder

    real = encoder.torch
    encoder.torch = _TorchWithHostTensors(real)
    try:
        yield
    finally:
        encoder.torch = real


def _copy_nested(dst: Any, src: Any) -> None:
    """``dst.copy_(src)`` for every tensor of two same-shaped nests of dicts/lists/tuples."""
    if isinstance(dst, dict):
        for key, value in dst.items():
            _copy_nested(value, src[key])
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src, strict=True):
            _copy_nested(d, s)
    elif hasattr(dst, "copy_"):
        dst.copy_(src)
