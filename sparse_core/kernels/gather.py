"""Block-gather kernel in plain PyTorch (no compiler).

For each query block the selected off-diagonal key/value blocks are gathered into one contiguous
sequence and attended with the CPU flash kernel (no mask, so the fast path); the diagonal block is
attended separately with ``is_causal``; the two partial results are merged exactly by log-sum-exp.
Rows are grouped by their number of selected blocks so every call is a dense, equal-length batch.
With grouped heads (selection per KV head) the query heads of a group are stacked as one query
block against one gathered K/V, which cuts the gather traffic by the group size -- on CPU the copy
costs about as much as the arithmetic at block 64.

The flash call that also returns the log-sum-exp is ``aten._scaled_dot_product_flash_attention_for_cpu``
(private; no public op returns the LSE on CPU). On other devices the LSE comes from a plain
matmul/logsumexp path, which is correct but not fast -- use the flex kernel there."""

from __future__ import annotations

import torch

from sparse_core.kernels.padding import on_whole_blocks
from sparse_core.selection import BlockSelection

GATHER_CHUNK_BYTES = 32 << 20  # gathered K+V per flash call (fewer, larger calls win on a busy machine)


def _attend(q, k, v, *, causal: bool, scale: float, mask: torch.Tensor | None):
    """q [N, 1, Lq, D], k/v [N, 1, Lk, D] -> (out [N, 1, Lq, D], lse float32 [N, 1, Lq])."""
    if q.device.type == "cpu":
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        if mask is not None:
            add = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            return op(q, k, v, 0.0, False, attn_mask=add, scale=scale)
        return op(q, k, v, 0.0, causal, scale=scale)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        lq, lk = s.shape[-2], s.shape[-1]
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril_(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num_(0.0)
    return torch.matmul(p, v.float()).to(q.dtype), torch.where(torch.isinf(lse), 0.0, lse)


@on_whole_blocks()
def gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: BlockSelection,
    key_valid: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    hs = sel.heads
    if hs not in (hq, hkv):
        raise ValueError(f"selection has {hs} heads; expected {hq} (query) or {hkv} (KV)")
    gs = hq // hs  # query heads per selection head
    bs = sel.block_size
    n = sel.num_blocks

    # kv head of each selection head
    kv_of = (torch.arange(hs, device=q.device) * gs) // g
    # Query rows laid out as (b, sel head, block) x (group member, position): [B*Hs*n, gs*bs, D]
    qr = q.reshape(b, hs, gs, n, bs, d).permute(0, 1, 3, 2, 4, 5).reshape(b * hs * n, gs * bs, d)
    kb = k.reshape(b, hkv, n, bs, d)
    vb = v.reshape(b, hkv, n, bs, d)

    # Diagonal blocks, causal, one query head at a time: [(b, hs, i, t), bs, D]
    kd = kb.index_select(1, kv_of) if hs != hkv else kb
    vd = vb.index_select(1, kv_of) if hs != hkv else vb
    kd = kd.unsqueeze(3).expand(b, hs, n, gs, bs, d).reshape(-1, 1, bs, d)
    vd = vd.unsqueeze(3).expand(b, hs, n, gs, bs, d).reshape(-1, 1, bs, d)
    qd = qr.view(-1, 1, bs, d)
    dmask = None
    if key_valid is not None:
        kvb = key_valid.view(b, 1, n, 1, 1, bs)
        tri = torch.ones(bs, bs, dtype=torch.bool, device=q.device).tril_()
        dmask = (tri & kvb).expand(b, hs, n, gs, bs, bs).reshape(-1, 1, bs, bs)
    out_d, lse_d = _attend(qd, kd, vd, causal=True, scale=scale, mask=dmask)
    out = out_d.view(b * hs * n, gs * bs, d)
    lse = lse_d.view(b * hs * n, gs * bs)

    counts = sel.kv_counts.reshape(-1).long() - 1  # off-diagonal blocks per row
    # Leading query blocks that keep every causal block in every head are one dense causal SDPA
    # over the prefix (exact, and one call instead of one per block count).
    full = sel.kv_counts.reshape(b * hs, n) == torch.arange(1, n + 1, device=q.device, dtype=torch.int32)
    prefix = int(full.all(0).int().cumprod(0).sum())
    if prefix >= 2:
        counts = counts.view(b * hs, n).clone()
        counts[:, :prefix] = 0
        counts = counts.view(-1)
    if int(counts.max()) <= 0:
        return _with_dense_prefix(
            _unpack(out, b, hs, n, gs, bs, d, hq), q, k, v, key_valid, prefix, bs, scale
        )
    idx_rows = sel.kv_indices.reshape(b * hs * n, n).long()
    row_base = ((torch.arange(b, device=q.device)[:, None] * hkv + kv_of[None, :]) * n).reshape(-1)
    row_base = row_base.repeat_interleave(n)  # flat (b, kvh) block offset per row
    kflat = kb.reshape(-1, bs, d)
    vflat = vb.reshape(-1, bs, d)
    kvalid_flat = key_valid.view(-1, bs) if key_valid is not None else None
    kv_batch_base = (torch.arange(b, device=q.device) * n).repeat_interleave(hs * n)

    # Off-diagonal partial results, written in count-sorted row order and merged once at the end:
    # few large ops rather than many small ones (each parallel region costs a thread barrier,
    # which is expensive on a busy machine).
    sorted_counts, order = torch.sort(counts)
    uniq, sizes = torch.unique_consecutive(sorted_counts, return_counts=True)
    rows_total = order.numel()
    off_out = torch.zeros(rows_total, gs * bs, d, dtype=q.dtype, device=q.device)
    off_lse = torch.full((rows_total, gs * bs), float("-inf"), dtype=torch.float32, device=q.device)
    elem = k.element_size()
    start = 0
    for c, size in zip(uniq.tolist(), sizes.tolist(), strict=True):
        g0 = start
        start += size
        if c <= 0:
            continue
        # Chunk rows so the gathered K/V of one call stays cache-resident for the flash kernel
        # that reads it right after.
        per_row = 2 * c * bs * d * elem
        chunk = max(1, min(size, GATHER_CHUNK_BYTES // per_row))
        for c0 in range(g0, g0 + size, chunk):
            c1 = min(g0 + size, c0 + chunk)
            rows = order[c0:c1]
            r = c1 - c0
            blocks = idx_rows[rows, :c]  # [R, c]
            flat = (row_base[rows, None] + blocks).reshape(-1)
            kg = kflat.index_select(0, flat).view(r, 1, c * bs, d)
            vg = vflat.index_select(0, flat).view(r, 1, c * bs, d)
            qg = qr.index_select(0, rows).view(r, 1, gs * bs, d)
            mask = None
            if kvalid_flat is not None:
                vm = kvalid_flat.index_select(0, (kv_batch_base[rows, None] + blocks).reshape(-1))
                mask = vm.view(r, 1, 1, c * bs)
            o, l1 = _attend(qg, kg, vg, causal=False, scale=scale, mask=mask)
            l1 = l1.view(r, gs * bs)
            if mask is not None:  # no visible key in the gathered blocks: contributes nothing
                l1 = l1.masked_fill(~mask.view(r, -1).any(-1, keepdim=True), float("-inf"))
            off_out[c0:c1] = o.view(r, gs * bs, d)
            off_lse[c0:c1] = l1
    # back to row order, then one exact log-sum-exp merge with the diagonal part
    inv = torch.empty_like(order)
    inv[order] = torch.arange(rows_total, device=q.device)
    off_out = off_out.index_select(0, inv)
    off_lse = off_lse.index_select(0, inv)
    m = torch.maximum(lse, off_lse)
    w0 = torch.exp(lse - m)
    w1 = torch.exp(off_lse - m)
    tot = w0 + w1
    merged = torch.addcmul(out.float() * (w0 / tot)[..., None], off_out.float(), (w1 / tot)[..., None])
    full_out = _unpack(merged.to(q.dtype), b, hs, n, gs, bs, d, hq)
    return _with_dense_prefix(full_out, q, k, v, key_valid, prefix, bs, scale)


def _with_dense_prefix(out, q, k, v, key_valid, prefix, bs, scale):
    if prefix >= 2:
        from sparse_core.kernels.dense import dense_attention

        p = prefix * bs
        kv = None if key_valid is None else key_valid[:, :p]
        out[:, :, :p] = dense_attention(q[:, :, :p], k[:, :, :p], v[:, :, :p], key_valid=kv, scale=scale)
    return out


def _unpack(out, b, hs, n, gs, bs, d, hq):
    return out.view(b, hs, n, gs, bs, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hq, n * bs, d)
