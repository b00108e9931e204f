"""Block helpers the estimators share: block counts, per-block max / min / sum (also sparse decode's page
summaries), the causal block mask, per-block mean pooling, the valid (non-padding) blocks of a batch,
the softmax scale and the softmax over causal valid blocks, and the shape of a strided estimator's call."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from sparse_core.estimators import EstimatorContext


def num_blocks(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


def block_max_min_sum(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, H, S>=1, D] -> float32 channel-wise max, min and sum per block [B, H, nb, D]; a short last
    block over its own rows. Whole blocks are one view (a few ops: sparse decode calls this per step)."""
    b, h, s, d = x.shape
    xf = x.float()
    full = s // block_size * block_size
    parts = []
    if full:
        xb = xf[:, :, :full].reshape(b, h, full // block_size, block_size, d)
        parts.append((xb.amax(3), xb.amin(3), xb.sum(3)))
    if full < s:
        t = xf[:, :, full:]
        parts.append((t.amax(2, keepdim=True), t.amin(2, keepdim=True), t.sum(2, keepdim=True)))
    if len(parts) == 1:
        return parts[0]
    mx, mn, sm = (torch.cat(z, dim=2) for z in zip(*parts, strict=True))
    return mx, mn, sm


def block_max_min_mean(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, H, S>=1, D] -> float32 (max, min, mean) per block side by side [B, H, nb, 3D]; a short last
    block over its own rows (the pooled keys of gate_v2 and of sparse decode's learned page scorers)."""
    mx, mn, sm = block_max_min_sum(x, block_size)
    s = x.shape[2]
    if s % block_size == 0:
        return torch.cat([mx, mn, sm / block_size], dim=-1)
    counts = torch.full((mx.shape[2], 1), float(block_size), device=x.device)
    counts[-1] = float(s - (mx.shape[2] - 1) * block_size)
    return torch.cat([mx, mn, sm / counts], dim=-1)


def block_stride(name: str, stride: int | None, block_size: int, default: int = 16) -> int:
    """The stride of an estimator that reads one row (or tile) in `stride` of each block (antidiagonal,
    sampled): the given one, else `default` capped at the block size; ValueError naming the estimator
    when it does not divide the block size."""
    stride = stride or min(default, block_size)
    if block_size % stride:
        raise ValueError(f"{name} stride {stride} must divide the block size {block_size}")
    return stride


class StridedShape(NamedTuple):
    """A strided estimator's call (antidiagonal, sampled), in the names their code uses: q [b, hq, s, d],
    k [b, hkv, s, d] with g = hq / hkv query heads to a KV head, the block size bs, the stride, the
    block count n and the softmax scale."""

    b: int
    hq: int
    hkv: int
    g: int
    s: int
    d: int
    bs: int
    stride: int
    n: int
    scale: float


def strided_shape(
    name: str, q: torch.Tensor, k: torch.Tensor, ctx: EstimatorContext, stride: int | None, default: int
) -> StridedShape:
    """The shape of a strided estimator's call on q/k under `ctx`, its stride by `block_stride` (ValueError
    naming the estimator when it does not divide the block size)."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    bs = ctx.block_size
    stride = block_stride(name, stride, bs, default)
    return StridedShape(
        b, hq, hkv, hq // hkv, s, d, bs, stride, num_blocks(s, bs), softmax_scale(ctx.scale, d)
    )


def causal_block_mask(n: int, device: Any = None) -> torch.Tensor:
    idx = torch.arange(n, device=device)
    return idx[None, :] <= idx[:, None]


def block_pool_mean(x: torch.Tensor, block_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over each block of the sequence dim: [B, H, S, D] -> float32 [B, H, nb, D]; a partial last
    block and padded positions (valid False) are excluded from the mean."""
    b, h, s, d = x.shape
    n = num_blocks(s, block_size)
    pad = n * block_size - s
    xf = x.float()
    if valid is None and pad == 0:
        return xf.view(b, h, n, block_size, d).mean(dim=3)
    w = torch.ones(b, s, device=x.device, dtype=torch.float32) if valid is None else valid.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
        w = torch.nn.functional.pad(w, (0, pad))
    w = w.view(b, 1, n, block_size, 1)
    total = (xf.view(b, h, n, block_size, d) * w).sum(dim=3)
    count = w.sum(dim=3).clamp_min(1.0)
    return total / count


def grouped_block_queries(
    q: torch.Tensor, kv_heads: int, block_size: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """q [B, Hq, S, D] -> the mean query of each block, grouped under its KV head: float32
    [B, Hkv, G * nb, D] (G = Hq / Hkv query heads share a KV head), so one matmul scores every query
    block against the key blocks of its KV head."""
    b, hq, _, d = q.shape
    qp = block_pool_mean(q, block_size, valid)  # [B, Hq, nb, D]
    return qp.view(b, kv_heads, (hq // kv_heads) * qp.shape[2], d)


def valid_blocks(key_valid: torch.Tensor | None, block_size: int, seq_len: int) -> torch.Tensor | None:
    """[B, S] bool -> [B, nb] bool: a block is valid when any of its positions is."""
    if key_valid is None:
        return None
    n = num_blocks(seq_len, block_size)
    pad = n * block_size - seq_len
    kv = torch.nn.functional.pad(key_valid, (0, pad), value=False) if pad else key_valid
    return kv.view(kv.shape[0], n, block_size).any(dim=-1)


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The attention's softmax scale: the given one, else 1/sqrt(head_dim)."""
    return scale if scale is not None else 1.0 / math.sqrt(head_dim)


def causal_block_softmax(
    logits: torch.Tensor, key_valid: torch.Tensor | None, block_size: int, seq_len: int
) -> torch.Tensor:
    """[B, H, nb, nb] block logits -> their softmax over the causal key blocks that hold a valid key
    (a row with none comes out as zeros, never NaN)."""
    n = logits.shape[-1]
    allowed = causal_block_mask(n, logits.device)[None, None]
    vb = valid_blocks(key_valid, block_size, seq_len)
    if vb is not None:
        allowed = allowed & vb[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)
