"""Several objects of one image through SAM 3D Objects in one batch (torch side; needs sam3d_objects).

The two flow stages and the decoders run once for a group of objects instead of once per object:

- stage 1 (sparse-structure flow, fixed-size latents) and the sparse-structure decoder take a batch
  dimension B directly; the per-object occupied voxels are then pruned/downsampled object by object (upstream's
  helpers are not batch-aware) and each object's pose is decoded with its own pointmap scale/shift;
- stage 2 (sparse-latent flow) runs all objects as one sparse tensor whose first coordinate column is the
  object's index in the batch (variable voxel counts per object); conditioning tokens are (B, T, C);
- the Gaussian / mesh decoders take that sparse tensor and return one result per object.

Seeds: every object draws its noise (stage 1 latents, then stage 2 latents) from its own
``torch.Generator`` seeded with the object's seed, so its result does not depend on which objects share the
batch; a batch of one is the one-by-one run. The generators' ``_generate_noise_tensor`` hook is replaced only
for the duration of one call.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ObjectInput", "ObjectNoise", "reconstruct_batch"]


@dataclass
class ObjectInput:
    """One object of a batch: ``mask`` (H, W) bool at image resolution and its ``seed``."""

    mask: np.ndarray
    seed: int


class ObjectNoise:
    """Noise for a batch, each object's slice drawn from its own generator.

    ``sizes``: the extent of each object along ``dim`` (stage 1: 1 per object along dim 0; stage 2: the
    voxel counts along dim 1 of a (1, ΣN, C) latent).
    """

    def __init__(self, generators: Sequence[Any], sizes: Sequence[int], dim: int) -> None:
        self.generators, self.sizes, self.dim = list(generators), [int(s) for s in sizes], dim

    def __call__(self, x_shape: Sequence[int], x_device: Any) -> Any:
        import torch

        shape = list(x_shape)
        if shape[self.dim] != sum(self.sizes):
            raise RuntimeError(f"noise shape {shape} does not split into objects of sizes {self.sizes} on dim {self.dim}")
        parts = []
        for gen, size in zip(self.generators, self.sizes):
            shape[self.dim] = size
            parts.append(torch.randn(shape, generator=gen, device=x_device))
        return torch.cat(parts, dim=self.dim)


@contextlib.contextmanager
def _sampler(generator: Any, noise: ObjectNoise, *, steps: int, strength: float, no_shortcut: bool,
             strength_pm: float | None = None) -> Iterator[None]:  # fmt: skip
    """Set a flow generator's steps / guidance / shortcut mode and noise hook; restore them afterwards."""
    rev = generator.reverse_fn
    saved = (generator.inference_steps, rev.strength, getattr(generator, "no_shortcut", None),
             getattr(rev, "strength_pm", None))  # fmt: skip
    generator.inference_steps, rev.strength = steps, strength
    if hasattr(generator, "no_shortcut"):
        generator.no_shortcut = no_shortcut
    if strength_pm is not None:
        rev.strength_pm = strength_pm
    generator._generate_noise_tensor = noise  # instance attribute shadows the method
    try:
        yield
    finally:
        del generator._generate_noise_tensor
        generator.inference_steps, rev.strength = saved[0], saved[1]
        if saved[2] is not None:
            generator.no_shortcut = saved[2]
        if saved[3] is not None:
            rev.strength_pm = saved[3]


def _cat_inputs(dicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-object input dicts (tensors with a leading 1) → one dict with a leading B."""
    import torch

    return {key: torch.cat([d[key] for d in dicts], dim=0) for key in dicts[0]}


def _object_slice(batch: dict[str, Any], index: int, size: int) -> dict[str, Any]:
    """Entries of a batched dict that carry the batch dimension, cut to object ``index`` (leading 1 kept)."""
    import torch

    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == size:
            out[key] = value[index : index + 1]
        elif isinstance(value, dict):
            out[key] = _object_slice(value, index, size)
    return out


def _object_coords(pipeline: Any, occupied: Any) -> tuple[Any, float]:
    """(N, 4) int32 voxels ``[0, x, y, z]`` of one object's (64, 64, 64) occupancy, pruned/downsampled."""
    import torch

    hook = getattr(pipeline, "object_structure", None)  # random-weight mode replaces the structure
    coords = torch.argwhere(occupied).int()
    coords = torch.cat([torch.zeros_like(coords[:, :1]), coords], dim=1)
    if hook is not None:
        return hook(coords)
    from sam3d_objects.pipeline.inference_utils import downsample_sparse_structure, prune_sparse_structure

    if pipeline.downsample_ss_dist > 0 and coords.shape[0] > 0:
        coords = prune_sparse_structure(coords, max_neighbor_axes_dist=pipeline.downsample_ss_dist)
    return downsample_sparse_structure(coords)


def _stage1(pipeline: Any, ss_in: dict[str, Any], noise: ObjectNoise, steps: int, distill: bool) -> dict[str, Any]:
    """Sparse-structure flow + decoder for a batch; returns the generator's dict plus ``occupied`` (B,64,64,64)."""
    import torch

    gen, decoder = pipeline.models["ss_generator"], pipeline.models["ss_decoder"]
    size = ss_in["image"].shape[0]
    strength = 0.0 if distill else pipeline.ss_cfg_strength
    strength_pm = 0.0 if distill else pipeline.ss_cfg_strength_pm
    with _sampler(gen, noise, steps=steps, strength=strength, no_shortcut=not distill, strength_pm=strength_pm):
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=pipeline.shape_model_dtype):
            if pipeline.is_mm_dit():
                mapping = gen.reverse_fn.backbone.latent_mapping
                shape: Any = {k: (size, v.pos_emb.shape[0], v.input_layer.in_features) for k, v in mapping.items()}
            else:
                shape = (size, 4096, 8)
            args, kwargs = pipeline.get_condition_input(
                pipeline.condition_embedders["ss_condition_embedder"], ss_in, pipeline.ss_condition_input_mapping
            )
            out = gen(shape, ss_in["image"].device, *args, **kwargs)
            if not pipeline.is_mm_dit():
                out = {"shape": out}
            latent = out["shape"]
            grid = decoder(latent.permute(0, 2, 1).contiguous().view(size, 8, 16, 16, 16))
    out["occupied"] = grid[:, 0] > 0
    return out


def _stage2(pipeline: Any, slat_in: dict[str, Any], coords: Sequence[Any], noise: ObjectNoise, steps: int,
            distill: bool) -> Any:  # fmt: skip
    """Sparse-latent flow for a batch; ``coords[j]`` (N_j, 4) of object j. Returns a B-batch SparseTensor."""
    import torch
    from sam3d_objects.model.backbone.tdfy_dit.modules import sparse as sp

    device = slat_in["image"].device
    batched = torch.cat([torch.cat([torch.full_like(c[:, :1], j), c[:, 1:]], 1) for j, c in enumerate(coords)])
    gen = pipeline.models["slat_generator"]
    strength = 0.0 if distill else pipeline.slat_cfg_strength
    with _sampler(gen, noise, steps=steps, strength=strength, no_shortcut=not distill):
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=pipeline.dtype):
            args, kwargs = pipeline.get_condition_input(
                pipeline.condition_embedders["slat_condition_embedder"], slat_in, pipeline.slat_condition_input_mapping
            )
            args = (*args, batched.cpu().numpy())
            feats = gen((1, batched.shape[0], 8), device, *args, **kwargs)
            slat = sp.SparseTensor(coords=batched, feats=feats[0]).to(device)
            return slat * pipeline.slat_std.to(device) + pipeline.slat_mean.to(device)


@contextlib.contextmanager
def _phase(phases: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the wall time of the block (GPU synchronised at both ends) to ``phases[name]`` when given."""
    if phases is None:
        yield
        return
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    yield
    torch.cuda.synchronize()
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0


def reconstruct_batch(pipeline: Any, image: np.ndarray, pointmap: Any, objects: Sequence[ObjectInput], *,
                      settings: Any, flags: dict[str, bool],
                      phases: dict[str, float] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Reconstruct ``objects`` of one ``image`` ((H, W, 3) uint8) in one batch.

    ``pointmap``: (H, W, 3) shared pointmap (PyTorch3D camera frame); ``settings``: a
    :class:`~pipeline.backends.sam3d_presets.SamplerSettings`; ``flags``: the mesh post-processing flags of
    upstream's ``run()``. Returns one dict per object with the keys of upstream's ``run()`` output that the
    backend reads (``rotation``, ``translation``, ``scale``, ``coords``, ``gs``, ``gs_4``, ``glb``) plus
    ``ss_occupied`` ((64, 64, 64) bool, the decoded sparse structure before pruning). ``phases``, when given,
    accumulates seconds per phase: ``inputs``, ``stage1``, ``structure``, ``stage2``, ``decode``, ``to_glb``.
    """
    import torch

    device = torch.device(pipeline.device)
    size = len(objects)
    with torch.device(device), _phase(phases, "inputs"):
        ss_list, slat_list = [], []
        for obj in objects:
            rgba = pipeline.merge_image_and_mask(image, np.where(obj.mask, 255, 0).astype(np.uint8))
            points = pipeline.compute_pointmap(rgba, pointmap)["pointmap"]
            ss_list.append(pipeline.preprocess_image(rgba, pipeline.ss_preprocessor, pointmap=points))
            slat_list.append(pipeline.preprocess_image(rgba, pipeline.slat_preprocessor))
        ss_in = _cat_inputs(ss_list)
        slat_in = _cat_inputs(slat_list)
    with torch.device(device):
        generators = [torch.Generator(device=device).manual_seed(int(o.seed)) for o in objects]
        with _phase(phases, "stage1"):
            out = _stage1(pipeline, ss_in, ObjectNoise(generators, [1] * size, 0), settings.stage1_steps,
                          settings.stage1_distillation)  # fmt: skip
        with _phase(phases, "structure"):
            results, coords = _structures(pipeline, out, ss_list, size)
        noise2 = ObjectNoise(generators, [c.shape[0] for c in coords], 1)
        with _phase(phases, "stage2"):
            slat = _stage2(pipeline, slat_in, coords, noise2, settings.stage2_steps, settings.stage2_distillation)
        with _phase(phases, "decode"):
            decoded, note = _decode(pipeline, slat, list(settings.decode_formats), size)
        if note:
            for one in results:
                one.setdefault("notes", []).append(note)
        for key, values in decoded.items():
            if len(values) != size:
                raise RuntimeError(f"decoder {key!r} returned {len(values)} results for {size} objects")
        with _phase(phases, "to_glb"):
            for j, one in enumerate(results):
                per_object = {key: [values[j]] for key, values in decoded.items()}
                one.update(pipeline.postprocess_slat_output(
                    per_object, flags["with_mesh_postprocess"], flags["with_texture_baking"], flags["use_vertex_color"]
                ))  # fmt: skip
    return results


def _decode(pipeline: Any, slat: Any, formats: list[str], size: int) -> tuple[dict[str, list], str | None]:
    """Decoders on the whole batch; on CUDA OOM, object by object (the flows' work is kept). Returns a note then."""
    import gc

    import torch

    try:
        return pipeline.decode_slat(slat, formats), None
    except torch.cuda.OutOfMemoryError:
        pass
    gc.collect()
    torch.cuda.empty_cache()
    decoded: dict[str, list] = {}
    for j in range(size):
        for key, values in pipeline.decode_slat(slat[j], formats).items():
            decoded.setdefault(key, []).extend(values)
    return decoded, f"decoders ran object by object (CUDA out of memory decoding {size} objects at once)"


def _structures(pipeline: Any, out: dict[str, Any], ss_list: Sequence[dict[str, Any]],
                size: int) -> tuple[list[dict[str, Any]], list[Any]]:  # fmt: skip
    """Per object: voxels (pruned/downsampled) and the decoded pose, from the batched stage-1 output."""
    results, coords = [], []
    for j in range(size):
        obj_coords, factor = _object_coords(pipeline, out["occupied"][j])
        one = _object_slice(out, j, size)
        one.pop("occupied", None)
        one.update(pipeline.pose_decoder(one, scene_scale=ss_list[j].get("pointmap_scale"),
                                         scene_shift=ss_list[j].get("pointmap_shift")))  # fmt: skip
        one["scale"] = one["scale"] * factor
        one["coords"], one["downsample_factor"] = obj_coords, factor
        one["ss_occupied"] = out["occupied"][j]
        coords.append(obj_coords)
        results.append(one)
    return results, coords
