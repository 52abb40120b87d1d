"""SAM 3D Objects reconstruction backend: image + one mask → canonical Gaussians, mesh and pose.

Calls Meta's ``InferencePipelinePointMap`` directly, built from the checkpoint folder's ``pipeline.yaml`` with
Hydra (not through the demo notebook's ``inference.py``, which imports UI packages). Models load once per
worker; the pointmap (MoGe depth, PyTorch3D camera frame: x left, y up, z forward) is computed once per image in
:meth:`Sam3dReconstructor.prepare` and passed to every object, which also puts every pose in one frame.

Per object (:meth:`Sam3dReconstructor.reconstruct`) the result is an :class:`ObjectReconstruction` with
Gaussians in the canonical object frame (z-up, inside [-0.5, 0.5]³; exactly the values SAM 3D's ``save_ply``
writes), the mesh as a trimesh in the canonical GLB frame (y-up) or None, and the pose
``p_cam = s · R(q)ᵀ · p + t`` in the ``pytorch3d_camera`` frame, in pointmap units.

Knobs: ``reconstruct.sam3d`` (see docs/reconstruct.md). torch, hydra and sam3d_objects are imported only when
the backend is built, inside the sam3d-objects env.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from pipeline.backends.base import GaussianSet, ObjectReconstruction, Reconstructor
from pipeline.backends.sam3d_batching import run_in_groups
from pipeline.backends.sam3d_presets import resolve_settings
from pipeline.errors import BackendError, InputError
from pipeline.handoff import Pose

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import ReconstructConfig, Sam3dConfig

__all__ = [
    "PIPELINE_YAML",
    "Sam3dContext",
    "Sam3dReconstructor",
    "required_checkpoint_files",
    "check_checkpoint_dir",
    "gaussians_from_sam3d",
    "pose_from_output",
    "OOM_HINT",
]

PIPELINE_YAML = "pipeline.yaml"
# Hydra targets a pipeline.yaml may name (the upstream notebook enforces the same allow-list).
_ALLOWED_TARGET_PREFIXES = ("sam3d_objects.", "torch.", "torchvision.", "moge.")
OOM_HINT = (
    "reconstruct fewer objects (segment.max_objects) or fewer at once (reconstruct.sam3d.max_batch_objects: 1), "
    "skip the mesh decoder (reconstruct.sam3d.preset: preview), or run on another GPU with more free "
    "memory (reconstruct.device: cuda:N; 32 GB or more is recommended)"
)
_CHECKPOINT_HINT = (
    "download the gated Hugging Face repo facebook/sam-3d-objects (request access first) and point "
    "reconstruct.sam3d.checkpoint_dir at its checkpoints folder (the one holding pipeline.yaml); see docs/reconstruct.md"
)


@dataclass
class Sam3dContext:
    """Per-image state shared by all objects of one image.

    ``image``: (H, W, 3) uint8 RGB; ``pointmap``: torch (H, W, 3) float32 on the model device, PyTorch3D camera
    frame; ``notes``: things every object of this image should report (e.g. a synthetic pointmap).
    """

    image: np.ndarray
    pointmap: Any
    notes: list[str]
    pointmap_s: float


# ---------------------------------------------------------------------------------------------- checkpoints


def required_checkpoint_files(pipeline_yaml: Path, *, random_weights: bool) -> list[str]:
    """File names ``pipeline.yaml`` refers to (sub-configs always; ``*.ckpt`` unless ``random_weights``)."""
    import yaml

    data = yaml.safe_load(Path(pipeline_yaml).read_text(encoding="utf-8")) or {}
    names = []
    for key, value in data.items():
        if not isinstance(value, str) or not value:
            continue
        if key.endswith("_config_path") or (key.endswith("_ckpt_path") and not random_weights):
            names.append(value)
    return names


def check_checkpoint_dir(directory: Path, *, random_weights: bool) -> Path:
    """Return ``directory/pipeline.yaml`` after checking every file it needs exists.

    Raises:
        BackendError: naming each missing file and the folder where it is expected.
    """
    directory = Path(directory).expanduser().resolve()
    pipeline_yaml = directory / PIPELINE_YAML
    if not pipeline_yaml.is_file():
        raise BackendError(
            f"SAM 3D Objects checkpoint config missing: {PIPELINE_YAML} is expected in {directory}",
            hint=_CHECKPOINT_HINT,
        )
    missing = [n for n in required_checkpoint_files(pipeline_yaml, random_weights=random_weights) if not (directory / n).is_file()]
    if missing:
        raise BackendError(
            f"SAM 3D Objects checkpoint files missing in {directory}: {', '.join(missing)}",
            hint=_CHECKPOINT_HINT,
        )
    return pipeline_yaml


def _check_targets(node: Any, path: str = "") -> None:
    """Refuse Hydra ``_target_`` values outside the allow-list (a yaml must not run arbitrary callables)."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if isinstance(target, str) and not target.startswith(_ALLOWED_TARGET_PREFIXES):
            raise BackendError(
                f"{PIPELINE_YAML}: _target_ {target!r} at '{path or '<root>'}' is not allowed",
                hint=f"only {', '.join(p.rstrip('.') for p in _ALLOWED_TARGET_PREFIXES)} targets are instantiated",
            )
        for key in node.keys():
            _check_targets(node[key], f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _check_targets(item, f"{path}[{i}]")


# ---------------------------------------------------------------------------------------------- conversion


def gaussians_from_sam3d(gs: Any) -> GaussianSet:
    """Convert SAM 3D's ``Gaussian`` object into the exact values its ``save_ply`` writes.

    ``xyz`` = ``get_xyz`` (aabb de-normalised); ``f_dc`` = ``_features_dc`` (N,1,3) flattened to (N,3);
    ``opacity`` = inverse-sigmoid of the activated opacity (logit); ``log_scale`` = log of ``get_scaling``
    (activation plus the filter kernel, √(s² + k²)); ``rot_wxyz`` = ``_rotation + rots_bias`` (not normalised).
    """
    import torch
    from sam3d_objects.model.backbone.tdfy_dit.representations.gaussian.general_utils import inverse_sigmoid

    def np32(t: Any) -> np.ndarray:
        return t.detach().float().cpu().numpy().astype(np.float32)

    with torch.no_grad():
        return GaussianSet(
            xyz=np32(gs.get_xyz),
            f_dc=np32(gs._features_dc.transpose(1, 2).flatten(start_dim=1)),
            opacity=np32(inverse_sigmoid(gs.get_opacity)).reshape(-1),
            log_scale=np32(torch.log(gs.get_scaling)),
            rot_wxyz=np32(gs._rotation + gs.rots_bias[None, :]),
        )


def pose_from_output(output: dict[str, Any]) -> Pose:
    """The pose of a ``run()`` output: ``rotation`` (1,4) wxyz, ``translation`` (1,3), ``scale`` (1,3)."""

    def vec(key: str, n: int) -> tuple[float, ...]:
        value = np.asarray(output[key].detach().float().cpu()).reshape(-1)
        if value.shape != (n,) or not np.all(np.isfinite(value)):
            raise BackendError(f"SAM 3D returned an invalid {key}: {value.tolist()}", hint="rerun with another seed")
        return tuple(float(x) for x in value)

    return Pose(
        quat_wxyz=vec("rotation", 4), translation=vec("translation", 3), scale=vec("scale", 3),
        frame="pytorch3d_camera", units="pointmap",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- backend


def _missing_modules(*names: str) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise BackendError(
            f"SAM 3D Objects needs a CUDA GPU (reconstruct.device={device!r}, CUDA available: {torch.cuda.is_available()})",
            hint="run the reconstruct stage on a machine with an NVIDIA GPU (32 GB or more recommended)",
        )
    return device


def _select_attention_backend() -> str | None:
    """Fall back to PyTorch SDPA when flash_attn is missing; returns a note when it does.

    Upstream forces flash_attn on A100/H100/H200 when ``inference_pipeline`` is imported; the attention modules
    read the backend once, at their own import, so importing them first with SDPA selected makes it stick.
    """
    # sam3d_objects/__init__ imports training-only init code unless this is set (upstream's notebook does the same)
    os.environ.setdefault("LIDRA_SKIP_INIT", "true")
    if not _missing_modules("flash_attn"):
        return None
    os.environ["ATTN_BACKEND"] = "sdpa"
    os.environ["SPARSE_ATTN_BACKEND"] = "sdpa"
    import sam3d_objects.model.backbone.tdfy_dit.modules.attention  # noqa: F401
    import sam3d_objects.model.backbone.tdfy_dit.modules.sparse  # noqa: F401

    from pipeline.backends.sam3d_sdpa import install_varlen_sdpa

    install_varlen_sdpa()
    return (
        "flash_attn is not installed: attention runs on PyTorch SDPA (slower than the official setup; "
        "sparse attention as padded variable-length batches)"
    )


class Sam3dReconstructor(Reconstructor):
    """Meta SAM 3D Objects behind the :class:`Reconstructor` interface (one resident pipeline per worker)."""

    def __init__(self, config: ReconstructConfig) -> None:
        super().__init__(config)
        cfg: Sam3dConfig = config.sam3d
        self.device = _resolve_device(config.device)
        pipeline_yaml = check_checkpoint_dir(cfg.checkpoint_dir, random_weights=cfg.random_weights)
        self.notes: list[str] = []
        note = _select_attention_backend()
        if note:
            self.notes.append(note)
        self.flags = self._decide_postprocess(cfg)
        self.settings = resolve_settings(cfg)
        self.phases: dict[str, float] | None = None  # set to {} to collect per-phase seconds of batched runs
        t0 = time.perf_counter()
        try:
            self.pipeline = self._build(pipeline_yaml, cfg)
        except Exception as exc:
            self._raise_if_oom(exc, "loading the SAM 3D Objects models")
            raise
        self.load_s = time.perf_counter() - t0

    # -- construction ---------------------------------------------------------------------------------------

    def _decide_postprocess(self, cfg: Sam3dConfig) -> dict[str, bool]:
        """Mesh post-processing / texture baking flags, switched off (with a note) when their deps are missing."""
        mesh_post, bake = cfg.mesh_postprocess, cfg.texture_baking
        if mesh_post:
            missing = _missing_modules("pyvista", "pymeshfix", "igraph", "nvdiffrast")
            if missing:
                mesh_post = False
                self.notes.append(f"mesh post-processing unavailable (missing: {', '.join(missing)}): raw mesh kept")
        if bake:
            missing = _missing_modules("xatlas", "diff_gaussian_rasterization", "cv2")
            if missing:
                bake = False
                self.notes.append(
                    f"texture baking unavailable (missing: {', '.join(missing)}): vertex colours used instead"
                )
        if cfg.layout_postprocess:
            self.notes.append(
                "layout post-optimisation requested: runs only if this sam3d_objects version configures a method "
                "(the Nov-2025 release has none, so the pose stays as predicted)"
            )
        return {
            "with_mesh_postprocess": mesh_post,
            "with_texture_baking": bake,
            "use_vertex_color": not bake,
            "with_layout_postprocess": cfg.layout_postprocess,
        }

    def _build(self, pipeline_yaml: Path, cfg: Sam3dConfig) -> Any:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        conf = OmegaConf.load(pipeline_yaml)
        _check_targets(conf)
        conf.rendering_engine = "pytorch3d"  # as upstream's notebook: no nvdiffrast needed by default
        conf.compile_model = cfg.compile
        conf.workspace_dir = str(pipeline_yaml.parent)
        conf.device = self.device
        if cfg.random_weights:
            from pipeline.backends import sam3d_random

            conf = sam3d_random.adjust_config(conf)
            self.notes.append(sam3d_random.RANDOM_NOTE)
        factory = instantiate(conf, _partial_=True)  # nested parts built by Hydra; the pipeline class by us
        cls = factory.func
        if cfg.random_weights:
            cls = sam3d_random.random_weight_pipeline_class(cls)
        return cls(*factory.args, **factory.keywords)

    # -- errors ---------------------------------------------------------------------------------------------

    def _raise_if_oom(self, exc: BaseException, doing: str) -> None:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
            torch.cuda.empty_cache()
            raise BackendError(
                f"CUDA out of memory while {doing} on {self.device} (peak {peak:.1f} GiB allocated of {total:.1f} GiB)",
                hint=OOM_HINT,
            ) from exc

    # -- per image / per object -----------------------------------------------------------------------------

    def prepare(self, image: np.ndarray) -> Sam3dContext:
        """Compute the pointmap of ``image`` ((H, W, 3) uint8 RGB) once; every object of the image reuses it."""
        import torch

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), torch.device(self.device):
                pointmap = self.pipeline.compute_pointmap(rgba)["pointmap"].permute(1, 2, 0).contiguous()
        except Exception as exc:
            self._raise_if_oom(exc, "computing the pointmap")
            raise
        notes = list(self.notes)
        if self.config.sam3d.random_weights:
            from pipeline.backends import sam3d_random

            pointmap, note = sam3d_random.usable_pointmap(pointmap, image.shape[:2])
            if note:
                notes.append(note)
        torch.cuda.synchronize(self.device)
        return Sam3dContext(image=image, pointmap=pointmap, notes=notes, pointmap_s=time.perf_counter() - t0)

    def run_object(self, context: Sam3dContext, mask: np.ndarray, seed: int, *, pointmap: Any = "shared") -> dict:
        """One upstream ``run()``; ``pointmap=None`` makes it recompute the pointmap (for benchmarks only)."""
        st = self.settings
        mask_u8 = np.where(mask, 255, 0).astype(np.uint8)
        shared = context.pointmap if isinstance(pointmap, str) else pointmap
        try:
            return self.pipeline.run(
                context.image,
                mask_u8,
                seed=seed,
                stage1_inference_steps=st.stage1_steps,
                stage2_inference_steps=st.stage2_steps,
                use_stage1_distillation=st.stage1_distillation,
                use_stage2_distillation=st.stage2_distillation,
                decode_formats=list(st.decode_formats),
                pointmap=shared,
                **self.flags,
            )
        except Exception as exc:
            self._raise_if_oom(exc, f"reconstructing an object (seed {seed})")
            raise

    @staticmethod
    def _check_mask(context: Sam3dContext, mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != context.image.shape[:2]:
            raise InputError(f"mask is {mask.shape[::-1]} but the image is {context.image.shape[1::-1]} (W×H)")
        if not mask.any():
            raise InputError("mask is empty: nothing to reconstruct", hint="drop the object or lower segment.min_area_px")
        return mask

    def reconstruct(self, context: Sam3dContext, mask: np.ndarray, seed: int) -> ObjectReconstruction:
        """Reconstruct the object under ``mask`` ((H, W) bool at image resolution) with ``seed``, alone.

        This is upstream's own ``run()`` (global-RNG seeding); :meth:`reconstruct_many` is the batched path.
        """
        mask = self._check_mask(context, mask)
        t0 = time.perf_counter()
        output = self.run_object(context, mask, seed)
        return self._to_reconstruction(context, output, time.perf_counter() - t0, [])

    def batch_supported(self) -> bool:
        """False when layout post-optimisation would run (it needs upstream's per-object ``run()``)."""
        return not (self.flags["with_layout_postprocess"] and self.pipeline.layout_post_optimization_method is not None)

    def run_batch(self, context: Sam3dContext, masks: Sequence[np.ndarray], seeds: Sequence[int]) -> list[dict]:
        """Upstream-format outputs of a group of objects run as one batch (see :mod:`sam3d_batch`)."""
        from pipeline.backends.sam3d_batch import ObjectInput, reconstruct_batch

        objects = [ObjectInput(mask=m, seed=int(s)) for m, s in zip(masks, seeds, strict=True)]
        return reconstruct_batch(
            self.pipeline, context.image, context.pointmap, objects, settings=self.settings, flags=self.flags,
            phases=self.phases,
        )  # fmt: skip

    def reconstruct_many(
        self,
        context: Sam3dContext,
        masks: Sequence[np.ndarray],
        seeds: Sequence[int],
        on_done: Callable[[int, ObjectReconstruction], None] | None = None,
    ) -> list[ObjectReconstruction]:
        """All objects of one image in batches of ≤ ``reconstruct.sam3d.max_batch_objects``; OOM halves it.

        Every object draws its noise from its own generator seeded with ``seeds[i]``, so a result does not
        depend on the batch it ran in. ``timings["run_s"]`` of an object is its batch's wall time divided by
        the batch size.
        """
        import torch

        if not self.batch_supported():
            return super().reconstruct_many(context, masks, seeds, on_done)
        masks = [self._check_mask(context, m) for m in masks]

        def run_group(indices: list[int]) -> list[ObjectReconstruction]:
            t0 = time.perf_counter()
            outputs = self.run_batch(context, [masks[i] for i in indices], [seeds[i] for i in indices])
            torch.cuda.synchronize(self.device)
            per_object = (time.perf_counter() - t0) / len(indices)
            extra = [f"reconstructed in a batch of {len(indices)} object(s)"]
            return [self._to_reconstruction(context, out, per_object, extra) for out in outputs]

        def on_oom() -> None:
            import gc

            gc.collect()
            torch.cuda.empty_cache()

        def is_oom(exc: BaseException) -> bool:
            return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()

        def done(indices: list[int], recs: Sequence[ObjectReconstruction]) -> None:
            for i, rec in zip(indices, recs):
                if on_done is not None:
                    on_done(i, rec)

        try:
            run = run_in_groups(
                len(masks), run_group, self.config.sam3d.max_batch_objects, is_oom=is_oom, on_oom=on_oom,
                on_done=done,
            )  # fmt: skip
        except Exception as exc:
            self._raise_if_oom(exc, "reconstructing one object (batch of 1)")
            raise
        for rec in run.results:
            rec.notes.extend(n for n in run.notes if n not in rec.notes)
        return run.results

    def _to_reconstruction(
        self, context: Sam3dContext, output: dict, run_s: float, extra_notes: list[str]
    ) -> ObjectReconstruction:
        gs = output.get("gs")
        gaussians = gaussians_from_sam3d(gs) if gs is not None else None
        if gaussians is None and "gaussian_4" in self.settings.decode_formats and output.get("gs_4") is not None:
            gaussians = gaussians_from_sam3d(output["gs_4"])
        notes = list(context.notes) + list(extra_notes) + list(output.get("notes", []))
        if "iou" in output:
            notes.append(f"layout post-optimisation: IoU {float(output['iou']):.3f}")
        voxels = int(output["coords"].shape[0]) if "coords" in output else -1
        return ObjectReconstruction(
            gaussians=gaussians,
            mesh=output.get("glb"),
            pose=pose_from_output(output),
            notes=notes,
            timings={"run_s": run_s, "voxels": float(voxels)},
        )
