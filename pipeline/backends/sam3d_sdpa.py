"""Variable-length attention on PyTorch SDPA for SAM 3D's sparse transformers (used when flash_attn is missing).

Upstream's SDPA fallback for several sequences in one call (the objects of a batch, or the windows of a swin
layer) builds a dense block-diagonal additive mask of ``(ΣL_q) × (ΣL_kv)`` elements: memory and compute grow
with the square of the whole batch (8 objects × 15 k voxels would need a 14 GB mask per layer). Here the
sequences are padded to the longest one and attend under a boolean key-padding mask instead, so the cost
grows with ``S · max(L)²``; equal-length sequences need no mask at all.
"""

from __future__ import annotations

from typing import Any

__all__ = ["install_varlen_sdpa", "varlen_sdpa"]


def _pad_index(lengths: Any, width: int) -> Any:
    """Flat index into an (S·width) padded layout of every token of the concatenated sequences."""
    import torch

    seg = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    return seg * width + torch.arange(seg.numel(), device=lengths.device) - starts[seg]


def varlen_sdpa(q: Any, k: Any, v: Any, q_seqlen: Any, kv_seqlen: Any) -> Any:
    """Attention of S concatenated sequences, each only within itself.

    ``q``: (1, ΣL_q, H, C); ``k``, ``v``: (1, ΣL_kv, H, C); ``q_seqlen``, ``kv_seqlen``: S lengths each.
    Returns (ΣL_q, H, C), the layout of upstream's ``masked_sdpa``.
    """
    import torch
    import torch.nn.functional as F

    q, k, v = q[0], k[0], v[0]
    q_lens = [int(n) for n in q_seqlen]
    kv_lens = [int(n) for n in kv_seqlen]
    n_seq, heads, dim = len(q_lens), q.shape[1], q.shape[2]
    if len(set(q_lens)) == 1 and len(set(kv_lens)) == 1:
        out = F.scaled_dot_product_attention(
            q.reshape(n_seq, q_lens[0], heads, dim).transpose(1, 2),
            k.reshape(n_seq, kv_lens[0], heads, k.shape[2]).transpose(1, 2),
            v.reshape(n_seq, kv_lens[0], heads, v.shape[2]).transpose(1, 2),
        )
        return out.transpose(1, 2).reshape(q.shape[0], heads, v.shape[2])
    q_len_t = torch.tensor(q_lens, device=q.device)
    kv_len_t = torch.tensor(kv_lens, device=q.device)
    lq, lk = max(q_lens), max(kv_lens)
    q_idx, kv_idx = _pad_index(q_len_t, lq), _pad_index(kv_len_t, lk)

    def pad(x: Any, index: Any, width: int) -> Any:
        padded = x.new_zeros((n_seq * width,) + tuple(x.shape[1:]))
        padded[index] = x
        return padded.view(n_seq, width, *x.shape[1:]).transpose(1, 2)

    mask = torch.arange(lk, device=q.device)[None, :] < kv_len_t[:, None]  # (S, Lk): True = attend
    out = F.scaled_dot_product_attention(
        pad(q, q_idx, lq), pad(k, kv_idx, lk), pad(v, kv_idx, lk), attn_mask=mask[:, None, None, :]
    )
    return out.transpose(1, 2).reshape(n_seq * lq, heads, v.shape[2])[q_idx]


def install_varlen_sdpa() -> str | None:
    """Route upstream's SDPA fallback (full, swin and serialized sparse attention) through :func:`varlen_sdpa`.

    Call after the attention modules were imported with ``SPARSE_ATTN_BACKEND=sdpa``; returns a note, or None
    when those modules use another backend (nothing to replace).
    """
    from sam3d_objects.model.backbone.tdfy_dit.modules.sparse.attention import (
        full_attn,
        serialized_attn,
        windowed_attn,
    )

    replaced = [m for m in (full_attn, serialized_attn, windowed_attn) if hasattr(m, "masked_sdpa")]
    for module in replaced:
        module.masked_sdpa = varlen_sdpa
    if not replaced:
        return None
    return "sparse attention on SDPA uses padded variable-length batches (no dense block-diagonal mask)"
