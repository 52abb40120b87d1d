"""The one kaolin function SAM 3D's FlexiCubes calls: a tensor shape/dtype/device check."""

import torch


def check_tensor(tensor, shape=None, dtype=None, device=None, throw=True):
    """True if ``tensor`` matches; ``None`` entries of ``shape`` match any size (kaolin semantics)."""
    problem = None
    if not isinstance(tensor, torch.Tensor):
        problem = f"expected a torch.Tensor, got {type(tensor).__name__}"
    elif shape is not None and (len(shape) != tensor.ndim or any(s is not None and s != t for s, t in zip(shape, tensor.shape))):
        problem = f"tensor shape is {tuple(tensor.shape)}, should be {tuple(shape)}"
    elif dtype is not None and tensor.dtype != dtype:
        problem = f"tensor dtype is {tensor.dtype}, should be {dtype}"
    elif device is not None and tensor.device != torch.device(device):
        problem = f"tensor device is {tensor.device}, should be {device}"
    if problem and throw:
        raise ValueError(problem)
    return problem is None
