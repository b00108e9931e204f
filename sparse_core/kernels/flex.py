"""FlexAttention kernel: a BlockMask built directly from the selection's block-index tensors,
run through ``torch.compile(flex_attention)`` (CPU Inductor here, Triton on CUDA).

Compiled once per shape: the index tensors always have a fixed last dimension (the number of
blocks), so a new selection with other contents reuses the compiled graph. Off-diagonal kept blocks
are "full" blocks (no mask_mod evaluated); the diagonal block is the one "partial" block per row
that applies the causal mask_mod. Never run flex_attention uncompiled: eager flex ignores the block
indices and materialises S x S scores."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sparse_core.kernels.padding import on_whole_blocks
from sparse_core.selection import BlockSelection


@functools.cache
def _compiled_flex():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # Past the recompile limit dynamo would fall back to eager flex, which silently computes
    # dense S x S attention; bucketed shapes keep us far below this raised limit.
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))
    return torch.compile(flex_attention, dynamic=False)


def bucket_blocks(n: int) -> int:
    """Round a block count up to one of 4 sizes per octave (16, 20, 24, 28, 32, 40, ...), so a
    server seeing many prompt lengths compiles a bounded number of shapes (extra blocks are
    padding with no work assigned)."""
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


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
        partial_cnt = (counts > 0).to(torch.int32)  # padded query blocks (count 0) get no work
        full_cnt = (counts - 1).clamp_min(0).contiguous()  # the diagonal is the last kept index
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


def triton_tiles(device: torch.device, dtype: torch.dtype, block_size: int) -> dict[str, int] | None:
    """Tile sizes for the Triton kernel when the default does not fit the selection's blocks.

    Inductor's one default tile on Hopper (and A100) is 128 query rows, and it refuses a BlockMask
    whose blocks that tile does not divide ("Q and KV block size must be divisible by BLOCK_M and
    BLOCK_N"): with smaller blocks, tile each block exactly (keys in 32-wide tiles for fp32, whose
    registers run out sooner, 64 for 16-bit types). None (the defaults) on the CPU and from 128 up."""
    if device.type != "cuda" or block_size >= 128:
        return None
    return {"BLOCK_M": block_size, "BLOCK_N": min(block_size, 32 if dtype == torch.float32 else 64)}


def _pad_selection(sel: BlockSelection, n: int) -> BlockSelection:
    """Extend a selection to n blocks: the extra query blocks get no key blocks at all."""
    extra = n - sel.num_blocks
    idx = F.pad(sel.kv_indices, (0, extra, 0, extra))
    counts = F.pad(sel.kv_counts, (0, extra))
    return BlockSelection(sel.block_size, sel.seq_len, idx, counts, sel.density, sel.head_density)


@on_whole_blocks(bucket_blocks)
def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: BlockSelection,
    key_valid: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The selection padded to the bucketed block count (its extra query blocks do no work), run through
    the compiled flex_attention; rows with no visible key come out as zeros."""
    hq = q.shape[1]
    n = q.shape[2] // sel.block_size
    if n != sel.num_blocks:
        sel = _pad_selection(sel, n)
    mask = build_block_mask(sel, hq, key_valid)
    out = _compiled_flex()(
        q,
        k,
        v,
        block_mask=mask,
        scale=scale,
        enable_gqa=hq != k.shape[1],
        kernel_options=triton_tiles(q.device, q.dtype, sel.block_size),
    )
    return torch.nan_to_num(out, nan=0.0) if key_valid is not None else out
