"""Torch-free batching logic of the SAM 3D Objects backend: group objects, run groups, halve on OOM.

The objects of one image are reconstructed in groups of at most ``reconstruct.sam3d.max_batch_objects``
(in object order). A group that runs out of GPU memory is retried as groups of half the size, down to one
object; the smaller size then sticks for the rest of the image and a note says so. Each object keeps its own
seed, so a result does not depend on which objects shared its group (the torch side,
:mod:`pipeline.backends.sam3d_batch`, draws every object's noise from its own generator).

Nothing here imports torch: ``run_group`` and ``is_oom`` are supplied by the caller (the real backend or a
test double), which keeps this logic testable on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["BatchRun", "plan_groups", "run_in_groups"]

R = TypeVar("R")


def plan_groups(n_objects: int, max_batch: int) -> list[list[int]]:
    """Object indices ``0..n_objects-1`` split, in order, into groups of at most ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return [list(range(i, min(i + max_batch, n_objects))) for i in range(0, n_objects, max_batch)]


@dataclass
class BatchRun(Generic[R]):
    """Results of :func:`run_in_groups`: ``results[i]`` belongs to object ``i``; ``batch_sizes`` as run."""

    results: list[R]
    batch_sizes: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run_in_groups(
    n_objects: int,
    run_group: Callable[[list[int]], Sequence[R]],
    max_batch: int,
    *,
    is_oom: Callable[[BaseException], bool],
    on_oom: Callable[[], None] | None = None,
    on_done: Callable[[list[int], Sequence[R]], None] | None = None,
) -> BatchRun[R]:
    """Run ``run_group(indices)`` over all objects in groups of ≤ ``max_batch``; halve the size on OOM.

    ``run_group`` must return one result per index, in order. ``is_oom(exc)`` tells an out-of-memory error
    from any other (re-raised at once); an OOM of a single object is re-raised too. ``on_oom`` runs after
    each OOM (e.g. to free the allocator cache); ``on_done(indices, results)`` after each finished group.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out: list[R | None] = [None] * n_objects
    run = BatchRun[R](results=[])
    size = max_batch
    start = 0
    while start < n_objects:
        group = list(range(start, min(start + size, n_objects)))
        results: list[R] | None = None
        try:
            results = list(run_group(group))
        except BaseException as exc:  # noqa: BLE001 - classified just below
            if len(group) == 1 or not is_oom(exc):
                raise
        if results is None:  # out of memory; the failed group's frames are released by now
            if on_oom is not None:
                on_oom()
            size = max(1, len(group) // 2)
            run.notes.append(
                f"CUDA out of memory with {len(group)} objects in one batch: retrying with batches of {size} "
                "(lower reconstruct.sam3d.max_batch_objects to skip this)"
            )
            continue
        if len(results) != len(group):
            raise RuntimeError(f"batched reconstruction returned {len(results)} results for {len(group)} objects")
        for index, result in zip(group, results):
            out[index] = result
        run.batch_sizes.append(len(group))
        if on_done is not None:
            on_done(group, results)
        start += len(group)
    run.results = [r for r in out if r is not None] if n_objects else []
    if len(run.results) != n_objects:  # a result of None would mean a lost object
        raise RuntimeError("batched reconstruction lost an object result")
    return run
