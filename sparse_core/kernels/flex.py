"""FlexAttention kernel: a BlockMask built directly from the selection's block-index tensors,
run through ``torch.compile(flex_attention)`` (CPU Inductor here, Triton on CUDA).

Compiled once per shape: the index tensors always have a fixed last dimension (the number of
blocks), so a new selection with other contents reuses the compiled graph. Off-diagonal kept blocks
are "full" blocks (no mask_mod evaluated); the diagonal block is the one "partial" block per row
that applies the causal mask_mod. Never run flex_attention uncompiled: eager flex ignores the block
indices and materialises S x S scores."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from sparse_core.selection import BlockSelection


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_available(device: torch.device | str = "cpu") -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError:
        return False
    return True


def build_block_mask(sel: BlockSelection, num_q_heads: int, key_valid: torch.Tensor | None = None):
    from torch.nn.attention.flex_attention import BlockMask

    n = sel.num_blocks
    bs = sel.block_size
    reps = num_q_heads // sel.heads
    idx = sel.kv_indices
    counts = sel.kv_counts
    if reps > 1:
        idx = idx.repeat_interleave(reps, dim=1)
        counts = counts.repeat_interleave(reps, dim=1)
    b, h = idx.shape[:2]
    dev = idx.device
    diag = torch.arange(n, device=dev, dtype=torch.int32).view(1, 1, n, 1)
    if key_valid is None:
        partial_idx = torch.zeros(b, h, n, n, dtype=torch.int32, device=dev)
        partial_idx[..., :1] = diag
        partial_cnt = torch.ones(b, h, n, dtype=torch.int32, device=dev)
        full_cnt = (counts - 1).contiguous()  # the diagonal is the last kept index; drop it
        full_idx = idx.contiguous()
        mask_mod = _causal
        return BlockMask.from_kv_blocks(
            partial_cnt,
            partial_idx,
            full_cnt,
            full_idx,
            BLOCK_SIZE=bs,
            mask_mod=mask_mod,
            seq_lengths=(n * bs, n * bs),
            compute_q_blocks=False,
        )
    valid = key_valid

    def padded_causal(bi, hi, q_idx, kv_idx):
        return (q_idx >= kv_idx) & valid[bi, kv_idx]

    return BlockMask.from_kv_blocks(
        counts.contiguous(),
        idx.contiguous(),
        BLOCK_SIZE=bs,
        mask_mod=padded_causal,
        seq_lengths=(n * bs, n * bs),
        compute_q_blocks=False,
    )


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: BlockSelection,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    b, hq, s, d = q.shape
    n = sel.num_blocks
    sp = n * sel.block_size
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if sp != s:
        q = F.pad(q, (0, 0, 0, sp - s))
        k = F.pad(k, (0, 0, 0, sp - s))
        v = F.pad(v, (0, 0, 0, sp - s))
        if key_valid is not None:
            key_valid = F.pad(key_valid, (0, sp - s), value=False)
    if key_valid is not None and bool(key_valid.all()):
        key_valid = None
    mask = build_block_mask(sel, hq, key_valid)
    out = _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=hq != k.shape[1])
    if key_valid is not None:
        out = torch.nan_to_num(out, nan=0.0)
    return out[:, :, :s] if sp != s else out
