"""`sampled` (training-free): the exact attention of a few query rows of each block. One query row
in `stride` (the last of each group of `stride` rows: 4 rows of a 64-row block at the default stride
16) is scored exactly against every key it sees; its softmax is summed per key block, and a query
block's estimate is the mean over its sampled rows. No pooling stands between the estimate and the
model's own attention, so a peaky head's few heavy keys are seen where pooled keys blur them; what it
misses is a key block that only the unsampled rows attend to.

Cost: 1/stride of a dense causal QK^T and its softmax, as many FLOPs as `antidiagonal` at the same
stride (row chunks skip the key columns right of their last row, as antidiagonal's do), but a score and
an exp per key where antidiagonal has one per `stride` keys; nothing of P.V. docs/sparse_core.md ("What each
training-free scorer costs") has it timed, docs/calibration.md ("Four exact rows a block") where it
stands against the learned gate."""

from __future__ import annotations

import torch

from sparse_core.estimators import EstimatorContext
from sparse_core.estimators.blocks import num_blocks, strided_shape

DEFAULT_STRIDE = 16
_CAUSAL_CHUNKS = 8  # at least this many query-block chunks, so ~(1 + 1/8) / 2 of the sampled QK^T is computed
_ROW_CHUNK = 1024  # sampled rows per chunk at most (per query head); bounds memory at long contexts


def sampled_rows(seq_len: int, block_size: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions scored exactly, block by block, [nb * block_size / stride] int64: the last row of
    each group of `stride` rows (a short last group's: seq_len - 1); and which of those groups exist
    (bool: a short last block has fewer; the others stand in at seq_len - 1 and are left out)."""
    n = num_blocks(seq_len, block_size)
    last = torch.arange(stride - 1, n * block_size, stride)
    return last.clamp_max(seq_len - 1), last - (stride - 1) < seq_len


def sampled_scores(
    q: torch.Tensor, k: torch.Tensor, ctx: EstimatorContext, *, stride: int | None = None
) -> torch.Tensor:
    b, hq, hkv, g, s, d, bs, stride, n, scale = strided_shape("sampled", q, k, ctx, stride, DEFAULT_STRIDE)
    per_block = bs // stride
    rows, exists = (t.to(q.device) for t in sampled_rows(s, bs, stride))  # [n * per_block]
    # GQA: the query heads of a KV head stacked as rows against it (no K repeat)
    qs = (q[:, :, rows].float() * scale).view(b, hkv, g, n * per_block, d)
    kf = k.float()
    if n * bs != s:  # keys padded to whole blocks; no sampled row sees the padding (rows <= s - 1)
        kf = torch.nn.functional.pad(kf, (0, 0, 0, n * bs - s))
    key_pos = torch.arange(n * bs, device=q.device)
    key_ok = None
    if ctx.key_valid is not None:
        key_ok = ctx.key_valid.bool()
        if n * bs != s:
            key_ok = torch.nn.functional.pad(key_ok, (0, n * bs - s), value=False)
    out = torch.zeros(b, hq, n, n, dtype=torch.float32, device=q.device)
    blocks_per_chunk = max(1, min(_ROW_CHUNK // per_block, -(-n // _CAUSAL_CHUNKS)))
    # One logits buffer for every chunk, worked in place: a fresh large buffer per chunk costs its
    # page faults on the CPU (as much as the matmul at 8k).
    buf = torch.empty(
        b * hkv * g * blocks_per_chunk * per_block * n * bs, dtype=torch.float32, device=q.device
    )
    for c0 in range(0, n, blocks_per_chunk):
        c1 = min(n, c0 + blocks_per_chunk)
        kend, r0, r1 = c1 * bs, c0 * per_block, c1 * per_block
        # the chunk's rows see keys < kend only: the rest of QK^T is skipped
        chunk = qs[:, :, :, r0:r1].reshape(b, hkv, g * (r1 - r0), d)
        logits = buf[: b * hkv * g * (r1 - r0) * kend].view(b, hkv, g * (r1 - r0), kend)
        torch.matmul(chunk, kf[:, :, :kend].transpose(-1, -2), out=logits)
        logits = logits.view(b, hkv, g, r1 - r0, kend)
        # the causal edge lies in the chunk's own blocks; padding and missing groups anywhere
        own = slice(c0 * bs, kend)
        blocked = key_pos[None, own] > rows[r0:r1, None]
        logits[..., own].masked_fill_(blocked.view(1, 1, 1, r1 - r0, kend - c0 * bs), float("-inf"))
        if not bool(exists[r0:r1].all()):
            logits.masked_fill_(~exists[r0:r1].view(1, 1, 1, r1 - r0, 1), float("-inf"))
        if key_ok is not None:
            logits.masked_fill_(~key_ok[:, :kend].view(b, 1, 1, 1, kend), float("-inf"))
        # softmax by hand so it stays in the buffer: a row with no key it may see has max -inf
        top = logits.amax(-1, keepdim=True)
        logits.sub_(top.masked_fill_(torch.isinf(top), 0.0)).exp_()
        row_sum = logits.sum(-1, keepdim=True)  # [b, hkv, g, r, 1]
        per_key_block = logits.view(b, hkv, g, r1 - r0, c1, bs).sum(-1) / row_sum.clamp_min(1e-30)
        out[:, :, c0:c1, :c1] = (
            per_key_block.view(b, hkv, g, c1 - c0, per_block, c1).sum(4).reshape(b, hq, c1 - c0, c1)
        )
    # each sampled row's softmax sums to 1, a padding row's or a missing group's to 0: the mean over
    # the rows that count is the sum over what they hold
    return out / out.sum(-1, keepdim=True).clamp_min(1e-30)
