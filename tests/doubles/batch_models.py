"""A stand-in for SAM 3D's batched flow model, with the interface :func:`run_in_groups` drives.

``BatchedFlowDouble.run_group(indices)`` "reconstructs" a group of objects in one call the way the real
batched path does: one noise generator per object, seeded with that object's seed (here numpy's), a shared
deterministic "network" applied to the whole stacked batch, and one result per object split back out.
Objects have different voxel counts (like stage 2's variable-size sparse tensors). A group larger than
``capacity`` raises :class:`FakeOutOfMemory`, like CUDA running out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["BatchedFlowDouble", "FakeOutOfMemory", "is_fake_oom"]


class FakeOutOfMemory(RuntimeError):
    """Raised by the double when a group exceeds its capacity (message as CUDA's)."""

    def __init__(self, n: int) -> None:
        super().__init__(f"CUDA out of memory. Tried to allocate a batch of {n} objects")


def is_fake_oom(exc: BaseException) -> bool:
    return isinstance(exc, FakeOutOfMemory)


@dataclass
class BatchedFlowDouble:
    """``seeds[i]``: object i's seed; ``voxels[i]``: its voxel count; ``capacity``: largest group that fits."""

    seeds: list[int]
    voxels: list[int]
    capacity: int = 1_000
    calls: list[list[int]] = field(default_factory=list)

    def run_group(self, indices: list[int]) -> list[np.ndarray]:
        self.calls.append(list(indices))
        if len(indices) > self.capacity:
            raise FakeOutOfMemory(len(indices))
        gens = [np.random.default_rng(self.seeds[i]) for i in indices]
        sizes = [self.voxels[i] for i in indices]
        # stage 1: fixed-size latents, batch on axis 0
        latents = np.concatenate([g.standard_normal((1, 8)) for g in gens], axis=0)
        # stage 2: variable-size latents concatenated on axis 0, each object's slice from its own generator
        noise = np.concatenate([g.standard_normal((n, 4)) for g, n in zip(gens, sizes)], axis=0)
        batch_index = np.repeat(np.arange(len(indices)), sizes)
        feats = np.tanh(noise + latents[batch_index, :4])  # the "network": per-voxel, batch-independent
        bounds = np.cumsum([0, *sizes])
        return [feats[bounds[j] : bounds[j + 1]] for j in range(len(indices))]
