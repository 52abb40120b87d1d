"""The ``sam3`` segmentation backend: Meta's SAM3 image model (PyPI ``sam3`` 0.1.4) behind :class:`Segmenter`.

Built once per worker (the model stays resident). Per image, :meth:`Sam3Segmenter.set_image` runs the ViT
backbone once (1008×1008 input, features cached); :meth:`Sam3Segmenter.predict` then decodes all phrases of
the call in one batched pass of SAM3's grounding path (fusion encoder, DETR decoder, mask head) against the
cached image features: query *i* is (image 0, text *i*). Text features are cached per phrase, so a phrase
seen before (the agent re-asks often) skips the text encoder. On GPU every call runs under
``torch.inference_mode()`` + bf16 autocast with TF32 matmuls, and (``segment.sam3.cuda_graphs``, default on)
the backbone and the grounding pass are replayed CUDA graphs captured at start
(:mod:`pipeline.backends.sam3_graphs`); on CPU in fp32 with the patches of :mod:`pipeline.backends.sam3_cpu`.

Outputs per phrase (:class:`~pipeline.backends.base.Detections`): detections whose score
``sigmoid(logit) · sigmoid(presence)`` is at least ``segment.threshold`` (the same threshold
:func:`~pipeline.stages.postprocess.select_objects` applies; filtering here keeps full-resolution masks of the
~200 rejected queries off the host), masks upsampled bilinearly from 288×288 logits to the input H×W and
cut at logit 0, boxes XYXY in input pixels.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from pipeline.backends.base import Detections, Segmenter
from pipeline.backends.sam3_assets import checkpoint_load_error, locate_bpe, parse_device, resolve_checkpoint
from pipeline.errors import BackendError
from pipeline.stages.protocol import serves_single_run

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from pipeline.backends.sam3_graphs import Sam3Graphs

    from pipeline.config import SegmentConfig

__all__ = ["Sam3Segmenter", "MAX_PHRASES_PER_PASS", "TEXT_CACHE_SIZE", "UPSAMPLE_CHUNK"]

RESOLUTION = 1008  # fixed by the model: position tables and RoPE are built for 72×72 patches of 14 px
MAX_PHRASES_PER_PASS = 16  # phrases decoded together; bounds activation memory (each is one 200-query batch row)
UPSAMPLE_CHUNK = 16  # masks upsampled at once: 16 × H × W fp32 (100 MB at 1440×1080)
TEXT_CACHE_SIZE = 512  # encoded phrases kept (each ~32×256 + 32×1024 floats)
_TEXT_KEYS = ("language_features", "language_embeds")  # sequence-first: (32, B, C)


class Sam3Segmenter(Segmenter):
    """SAM3 text-prompted instance segmentation, one resident model per worker process."""

    def __init__(self, config: SegmentConfig) -> None:
        super().__init__(config)
        import torch

        self._torch = torch
        self.device = torch.device(parse_device(config.device, torch.cuda.device_count()))
        self.is_cuda = self.device.type == "cuda"
        self.use_bf16 = self.is_cuda and config.sam3.dtype == "bfloat16"
        self.timings: dict[str, float] = {}
        self._text_cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._image: dict[str, Any] | None = None
        self._prefetched: dict[str, dict[str, Any]] = {}
        t0 = time.perf_counter()
        self.model = self._build()
        self.timings["build_s"] = time.perf_counter() - t0
        self.graphs: Sam3Graphs | None = None
        # a worker started for one run (one-shot command) skips the capture: 3.5-7 s to save ~30 ms once
        if self.is_cuda and config.sam3.cuda_graphs and not config.sam3.compile and not serves_single_run():
            self.graphs = self._try_capture_graphs()
            if self.graphs is not None:
                self.timings.update(self.graphs.timings)

    def load_timings(self) -> dict[str, float]:
        """Seconds spent at start: ``build_s`` and, with CUDA graphs, ``graph_capture_s``."""
        return dict(self.timings)

    # ------------------------------------------------------------------------------------------ build

    def _build(self) -> Any:
        """Locate BPE + weights, build ``build_sam3_image_model`` on ``self.device``, eval mode."""
        torch = self._torch
        cfg = self.config.sam3
        bpe = locate_bpe(cfg.bpe_path)
        checkpoint: Path | None = None
        from_hub = False
        if not cfg.random_weights:
            checkpoint, from_hub = resolve_checkpoint(cfg.checkpoint, revision=cfg.revision, redownload=cfg.redownload)
        if self.is_cuda:
            # sam3 0.1.4 creates two caches on the *current* CUDA device and moves the model only for the
            # literal device "cuda" (sam3.md §4, §8): select the GPU first, then build with "cuda".
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            build_patches: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        else:
            from pipeline.backends import sam3_cpu

            sam3_cpu.ensure_torchvision()
            sam3_cpu.patch_pin_memory()
            build_patches = sam3_cpu.cpu_build_patches()
        try:
            from sam3.model_builder import build_sam3_image_model
        except ImportError as exc:
            raise BackendError(
                f"cannot import sam3 in this env ({exc})",
                hint="recreate the env from envs/sam3.yml (python -m pipeline envs create sam3)",
            ) from exc
        def build() -> Any:
            return build_sam3_image_model(
                bpe_path=str(bpe),
                device="cuda" if self.is_cuda else "cpu",
                checkpoint_path=None if checkpoint is None else str(checkpoint),
                load_from_HF=False,
                compile=cfg.compile,
            )

        with build_patches:
            try:
                # On GPU, allocate (and randomly initialise) the 840 M parameters on the device directly
                # instead of on CPU followed by model.cuda(): the CPU init dominated the build time.
                model = _build_on_device(build, self.device) if self.is_cuda else build()
            except (RuntimeError, EOFError, OSError, ValueError) as exc:
                if checkpoint is not None and _looks_like_bad_checkpoint(exc):
                    raise checkpoint_load_error(exc, checkpoint, from_hub=from_hub) from exc
                raise
        if cfg.random_weights:
            _init_random_text_tensors(model)
        return model.eval()

    def _capture_graphs(self) -> Sam3Graphs:
        """Capture the backbone and the grounding buckets (``segment.sam3.graph_buckets``) once, at start."""
        from pipeline.backends.sam3_graphs import Sam3Graphs

        with self._inference():
            text = self._encode_texts(["object"])
        return Sam3Graphs(self.model, self.device, text, buckets=self.config.sam3.graph_buckets,
                          autocast_dtype=self._torch.bfloat16 if self.use_bf16 else None, resolution=RESOLUTION)  # fmt: skip

    def _try_capture_graphs(self) -> Sam3Graphs | None:
        """:meth:`_capture_graphs`, or None (op by op) with the reason on stderr when this torch/sam3 cannot
        capture them; out of memory is raised (the model would not fit its batches either)."""
        import sys

        try:
            graphs = self._capture_graphs()
            # the capture's eager warm-ups leave ~4-8 GiB of cached blocks outside the graphs' pool: give them
            # back, so that a stage sharing the GPU (SAM 3D Objects, vLLM) can have them
            self._torch.cuda.empty_cache()
            return graphs
        except self._torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the eager path
            self._torch.cuda.synchronize(self.device)
            self._torch.cuda.empty_cache()
            print(f"sam3: CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:300]}); running op by op "
                  "(set segment.sam3.cuda_graphs: false to skip the attempt)", file=sys.stderr)  # fmt: skip
            return None

    # ------------------------------------------------------------------------------------------ per image

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        torch = self._torch
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            yield

    def set_image(self, image: Image.Image) -> None:
        """Run the ViT backbone on one RGB image (resized to 1008×1008); keep its features for ``predict``.
        An image handed to :meth:`prefetch` before reuses the features of that batched pass."""
        width, height = image.size
        # the pixel hash costs ~5 ms on a 1440×1080 photo: only when something was prefetched
        backbone_out = self._prefetched.pop(_image_key(image), None) if self._prefetched else None
        if self.graphs is not None:
            if backbone_out is None:
                backbone_out = self.graphs.set_image(self._pixels(image))
            else:
                backbone_out = self.graphs.load_features(backbone_out)
        elif backbone_out is None:
            with self._inference():
                backbone_out = self.model.backbone.forward_image(self._pixels(image).unsqueeze(0))
            # drop what the grounding path does not read (sam2_backbone_out is only for the interactive head)
            backbone_out.pop("sam2_backbone_out", None)
        self._image = {"backbone_out": backbone_out, "height": height, "width": width}

    def prefetch(self, images: Sequence[Image.Image]) -> None:
        """With ``segment.sam3.prefetch_batch`` = N > 1: run the backbone once over up to N images at a time and
        keep each image's features (keyed by its pixels) until :meth:`set_image` takes them; features of images
        never taken are dropped at the next call. Off by default: batched bf16 kernels may round differently
        from the one-image path (docs/segment.md has the measured differences and speed-up)."""
        self._prefetched = {}
        per_pass = self.config.sam3.prefetch_batch
        if len(images) < 2 or per_pass < 2:
            return
        keys = [_image_key(im) for im in images]
        for start in range(0, len(images), per_pass):
            chunk = images[start : start + per_pass]
            with self._inference():
                batch = self._torch.stack([self._pixels(im) for im in chunk])
                out = self.model.backbone.forward_image(batch)
            out.pop("sam2_backbone_out", None)
            for i, key in enumerate(keys[start : start + len(chunk)]):
                self._prefetched[key] = _select(out, i, len(chunk))

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """(3, 1008, 1008) float in [-1, 1] on the device, as upstream's Sam3Processor prepares an image:
        uint8 square resize (antialiased), then [0, 1] → [-1, 1]."""
        from torchvision.transforms import v2

        rgb = image if image.mode == "RGB" else image.convert("RGB")
        with self._inference():
            # (H, W, 3) uint8 copied once out of Pillow and moved as one contiguous block, then made (3, H, W) on
            # the device: pil_to_tensor's (3, H, W) view is strided, and copying it to the GPU first re-packs it on
            # the host (tens of ms for a 12 MP photo). Same values, same layout for the resize (a GPU test checks).
            hwc = self._torch.from_numpy(np.array(rgb)).to(self.device, non_blocking=True)
            pixels = hwc.permute(2, 0, 1).contiguous()
            pixels = v2.functional.resize(pixels, [RESOLUTION, RESOLUTION], antialias=True)
            return (pixels.float() / 255.0 - 0.5) / 0.5

    def predict(self, phrases: Sequence[str]) -> list[Detections]:
        """One :class:`Detections` per phrase, in order, against the image last given to :meth:`set_image`."""
        if self._image is None:
            raise BackendError("Sam3Segmenter.predict() called before set_image()", hint="call set_image(image) first")
        phrases = list(phrases)
        if not phrases:
            return []
        unique = list(dict.fromkeys(phrases))
        by_phrase: dict[str, Detections] = {}
        per_pass = max(self.graphs.buckets) if self.graphs is not None else MAX_PHRASES_PER_PASS
        for start in range(0, len(unique), per_pass):
            chunk = unique[start : start + per_pass]
            by_phrase.update(zip(chunk, self._ground(chunk)))
        return [by_phrase[p] for p in phrases]

    # ------------------------------------------------------------------------------------------ internals

    def _encode_texts(self, phrases: list[str]) -> dict[str, torch.Tensor]:
        """Text features for ``phrases`` (cached per phrase): language_features (32, P, 256),
        language_mask (P, 32) bool (True = padding), language_embeds (32, P, 1024)."""
        torch = self._torch
        missing = [p for p in phrases if p not in self._text_cache]
        if missing:
            out = self.model.backbone.forward_text(missing, device=self.device)
            for i, phrase in enumerate(missing):
                entry = {key: out[key][:, i : i + 1] for key in _TEXT_KEYS}
                entry["language_mask"] = out["language_mask"][i : i + 1]
                self._text_cache[phrase] = entry
        for phrase in phrases:
            self._text_cache.move_to_end(phrase)
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        entries = [self._text_cache[p] for p in phrases]
        text = {key: torch.cat([e[key] for e in entries], dim=1) for key in _TEXT_KEYS}
        text["language_mask"] = torch.cat([e["language_mask"] for e in entries], dim=0)
        return text

    def _ground(self, phrases: list[str]) -> list[Detections]:
        """One batched grounding pass: P queries (image 0, text i) over the cached image features."""
        with self._inference():
            return self._to_detections(phrases, self.grounding_outputs(phrases))

    def grounding_outputs(self, phrases: list[str], *, eager: bool = False) -> dict[str, Any]:
        """The model's raw grounding outputs for ``phrases`` against the current image (see
        :meth:`_to_detections` for the shapes); public for the GPU equivalence checks. With CUDA graphs the
        outputs are views of static buffers, valid until the next call; ``eager=True`` runs the model op by op."""
        from sam3.model.data_misc import FindStage

        torch = self._torch
        assert self._image is not None
        n = len(phrases)
        if self.graphs is not None and not eager:
            with self._inference():
                return self.graphs.ground(self._encode_texts(phrases), n)
        with self._inference():
            backbone_out = {**self._image["backbone_out"], **self._encode_texts(phrases)}
            find = FindStage(
                img_ids=torch.zeros(n, dtype=torch.long, device=self.device),
                text_ids=torch.arange(n, dtype=torch.long, device=self.device),
                input_boxes=None,
                input_boxes_mask=None,
                input_boxes_label=None,
                input_points=None,
                input_points_mask=None,
            )
            return self.model.forward_grounding(
                backbone_out=backbone_out,
                find_input=find,
                find_target=None,
                geometric_prompt=self.model._get_dummy_prompt(num_prompts=n),
            )

    def _to_detections(self, phrases: list[str], out: dict[str, Any]) -> list[Detections]:
        """Scores, threshold, boxes to pixels, masks to input resolution; one host copy per phrase."""
        torch = self._torch
        height, width = self._image["height"], self._image["width"]  # type: ignore[index]
        # pred_logits (P, 200, 1), presence_logit_dec (P, 1), pred_boxes (P, 200, 4) cxcywh in [0, 1],
        # pred_masks (P, 200, 288, 288) logits
        scores = out["pred_logits"].float().sigmoid().squeeze(-1) * out["presence_logit_dec"].float().sigmoid()
        keep = scores >= self.config.threshold
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=scores.device)
        results = []
        for i, phrase in enumerate(phrases):
            idx = keep[i].nonzero().squeeze(1)
            if idx.numel():
                idx = idx[scores[i, idx].argsort(descending=True)]
            cx, cy, w, h = out["pred_boxes"][i, idx].float().unbind(-1)
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * scale
            masks = np.zeros((len(idx), height, width), bool)
            for start in range(0, len(idx), UPSAMPLE_CHUNK):  # chunks bound the fp32 H×W temporaries
                low = out["pred_masks"][i, idx[start : start + UPSAMPLE_CHUNK]].unsqueeze(1).float()
                full = torch.nn.functional.interpolate(low, (height, width), mode="bilinear", align_corners=False)
                masks[start : start + len(low)] = (full[:, 0] > 0).cpu().numpy()
            results.append(
                Detections(
                    phrase,
                    masks,
                    boxes.cpu().numpy().astype(np.float32).reshape(-1, 4),
                    scores[i, idx].cpu().numpy().astype(np.float32),
                )
            )
        return results


# ---------------------------------------------------------------------------------------------- helpers


def _image_key(image: Image.Image) -> str:
    """Identity of an image's pixels (size, mode and a hash of the RGB bytes): a re-read file matches."""
    rgb = image.convert("RGB")
    return f"{rgb.size}:" + hashlib.blake2b(rgb.tobytes(), digest_size=16).hexdigest()


def _select(value: Any, i: int, n: int) -> Any:
    """Image ``i`` of a batched backbone output: tensors with a leading batch dim of ``n`` are sliced to
    ``[i:i+1]`` (kept 4-D, as the one-image path makes them); lists, tuples and dicts are walked."""
    if isinstance(value, dict):
        return {k: _select(v, i, n) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_select(v, i, n) for v in value)
    if hasattr(value, "shape") and len(value.shape) and value.shape[0] == n:
        return value[i : i + 1]
    return value


def _build_on_device(build: Any, device: torch.device) -> Any:
    """``build()`` with ``device`` as torch's default device; if some constructor cannot run there, build
    again the upstream way (on CPU, then ``.cuda()``) and say so on stderr."""
    import sys

    import torch

    try:
        with torch.device(device):
            return build()
    except (RuntimeError, TypeError) as exc:
        if "checkpoint" in str(exc).lower():
            raise
        print(f"sam3: building on {device} directly failed ({type(exc).__name__}: {exc}); building on CPU first",
              file=sys.stderr)
        return build()


def _looks_like_bad_checkpoint(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, (EOFError, OSError)) or any(
        marker in text
        for marker in ("PytorchStreamReader", "failed finding central directory", "invalid load key", "Weights only")
    )


def _init_random_text_tensors(model: Any) -> None:
    """FOR RANDOM-WEIGHT RUNS ONLY (benchmarks, tests; ``segment.sam3.random_weights``).

    sam3 0.1.4 creates the text encoder's ``positional_embedding`` (32×1024) and ``text_projection``
    (1024×512) with ``torch.empty`` and relies on the checkpoint to fill them; without one their garbage/NaN
    content makes every output NaN (sam3.md §8). Fill them with small normal values, CLIP-style.
    """
    import torch

    encoder = model.backbone.language_backbone.encoder
    with torch.no_grad():
        torch.nn.init.normal_(encoder.positional_embedding, std=0.01)
        projection = encoder.text_projection
        if isinstance(projection, torch.nn.Parameter):
            torch.nn.init.normal_(projection, std=encoder.width**-0.5)
