"""Block-gather kernel in plain PyTorch (no compiler).

The selected blocks of each (selection head, query block) "row" are attended with the CPU flash
kernel in equal-length batches, and the partial results are merged exactly by log-sum-exp. With
grouped heads (selection per KV head) the query heads of a group are stacked as one row against one
gathered K/V, which cuts the gather traffic by the group size -- on CPU the copy costs about as much
as the arithmetic at block 64.

Query blocks are taken `group` at a time (GATHER_GROUP, 4), because the flash kernel's throughput
grows with the queries of one call (torch tiles 64 query rows below 768 of them and 256 from 768 on:
measured ~58 GFLOP/s at 192 queries, ~80 at 768, one thread; docs/sparse_core.md). A group's work is
cut into three parts, each block of the selection in exactly one:

- its own blocks: when every block of the group keeps the group's earlier blocks (the local window
  covers the group, as in every default plan), one causal attention of `group` x 64 queries per
  query head over the group's keys; otherwise each block's diagonal apart, the rest below;
- the key blocks before the group that all of its blocks keep: one row of `group` x the queries
  against one gathered K/V;
- each block's remaining kept blocks: one row per block, as before grouping.

`group=1` is the kernel before grouping (kernel name `gather-rows`, kept for comparison). Rows of a
part are grouped by their number of blocks so every call is a dense, equal-length batch.

The flash call that also returns the log-sum-exp is ``aten._scaled_dot_product_flash_attention_for_cpu``
(private; no public op returns the LSE on CPU). On other devices the LSE comes from a plain
matmul/logsumexp path, which is correct but not fast -- use the flex kernel there."""

from __future__ import annotations

import torch

from sparse_core.kernels.padding import BlockKernel, on_whole_blocks
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


GATHER_GROUP = 4  # query blocks per group: 4 x 3 query heads x 64 = 768 queries, torch's wide tile


def gather_kernel(group: int = GATHER_GROUP) -> BlockKernel:
    """The gather kernel taking `group` query blocks at a time (1: one row per query block)."""
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")

    @on_whole_blocks(lambda nb: -(-nb // group) * group)
    def gather(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        sel: BlockSelection,
        key_valid: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        return _grouped(q, k, v, sel, key_valid, scale, group)

    return gather


def _grouped(q, k, v, sel: BlockSelection, key_valid, scale: float, m: int) -> torch.Tensor:
    b, hq, sp, d = q.shape
    hkv = k.shape[1]
    hs = sel.heads
    if hs not in (hq, hkv):
        raise ValueError(f"selection has {hs} heads; expected {hq} (query) or {hkv} (KV)")
    gs = hq // hs  # query heads per selection head
    bs = sel.block_size
    n0, n = sel.num_blocks, sp // sel.block_size  # n: padded to whole groups
    ng = n // m
    dev = q.device
    kv_of = (torch.arange(hs, device=dev) * gs) // (hq // hkv)  # kv head of each selection head
    # Rows (b, sel head, block) x (group member, position): [B*Hs*n, gs*bs, D]
    qr = q.reshape(b, hs, gs, n, bs, d).permute(0, 1, 3, 2, 4, 5).reshape(b * hs * n, gs * bs, d)
    kb = k.reshape(b, hkv, n, bs, d)
    vb = v.reshape(b, hkv, n, bs, d)
    # the (batch, kv head) block offset of each (batch, selection head), and its batch's
    head_kv = (torch.arange(b, device=dev)[:, None] * hkv + kv_of[None, :]).reshape(-1)  # [B*Hs]
    head_b = torch.arange(b, device=dev).repeat_interleave(hs)  # [B*Hs]

    # Leading query blocks that keep every causal block in every head are one dense causal SDPA over
    # the prefix at the end (exact, and one call instead of one per block count): nothing else for them.
    full = sel.kv_counts.reshape(b * hs, n0) == torch.arange(1, n0 + 1, device=dev, dtype=torch.int32)
    prefix = int(full.all(0).int().cumprod(0).sum())
    kept = torch.nn.functional.pad(sel.mask(), (0, n - n0, 0, n - n0))  # [B, Hs, n, n]
    kept |= torch.eye(n, dtype=torch.bool, device=dev)  # padded blocks: their own diagonal only
    member = torch.arange(n, device=dev) // m
    same = member[:, None] == member[None, :]
    inner = kept.view(b, hs, ng, m, ng, m).diagonal(dim1=2, dim2=4).permute(0, 1, 4, 2, 3)  # [B,Hs,G,m,m]
    tri = torch.ones(m, m, dtype=torch.bool, device=dev).tril_()
    banded = (inner | ~tri).flatten(-2).all(-1)  # [B, Hs, G]: the group's own triangle is all kept

    out = torch.zeros(b * hs * n, gs * bs, d, dtype=q.dtype, device=dev)
    lse = torch.full((b * hs * n, gs * bs), float("-inf"), dtype=torch.float32, device=dev)
    _own_blocks(q, kb, vb, key_valid, head_kv, head_b, banded, out, lse, m, scale)

    if prefix >= 2:
        kept[:, :, :prefix] = False
    ingroup = kept & same & ~torch.eye(n, dtype=torch.bool, device=dev)
    before = kept & ~same
    common = before.view(b, hs, ng, m, n).all(3)  # [B, Hs, G, n]
    rest = (before & ~common.repeat_interleave(m, dim=2)) | (
        ingroup & ~banded.repeat_interleave(m, dim=2)[..., None]
    )
    kflat, vflat = kb.reshape(-1, bs, d), vb.reshape(-1, bs, d)
    valid_flat = None if key_valid is None else key_valid.reshape(-1, bs)
    parts = [(out, lse)]
    for rows_q, sets, per_row in (
        (qr.view(b * hs * ng, m * gs * bs, d), common.reshape(-1, n), ng),
        (qr, rest.reshape(-1, n), n),
    ):
        if bool(sets.any()):
            base = (head_kv * n).repeat_interleave(per_row)
            valid_base = (head_b * n).repeat_interleave(per_row)
            o, l1 = _attend_sets(rows_q, sets, base, valid_base, kflat, vflat, valid_flat, bs, scale)
            parts.append((o.view(-1, gs * bs, d), l1.view(-1, gs * bs)))
    merged = parts[0][0] if len(parts) == 1 else _merge(parts).to(q.dtype)
    full_out = _unpack(merged, b, hs, n, gs, bs, d, hq)
    return _with_dense_prefix(full_out, q, k, v, key_valid, prefix, bs, scale)


def _own_blocks(q, kb, vb, key_valid, head_kv, head_b, banded, out, lse, m: int, scale: float) -> None:
    """Each block against its own group's kept blocks at and before it, into `out` / `lse` (rows
    (b, sel head, block) x (group member, position)): a banded group as one causal attention of its
    m blocks per query head, any other group's blocks each against its diagonal alone."""
    b, hkv, n, bs, d = kb.shape
    hs = head_kv.numel() // b
    gs = q.shape[1] // hs
    ng = n // m
    dev = q.device
    # per (b, sel head, group): queries [gs, m*bs, D]; its keys at row kv_group of [B*Hkv*G, m*bs, D]
    qg = q.reshape(b, hs, gs, ng, m * bs, d).permute(0, 1, 3, 2, 4, 5).reshape(b * hs * ng, gs, m * bs, d)
    kg, vg = kb.reshape(b * hkv * ng, m * bs, d), vb.reshape(b * hkv * ng, m * bs, d)
    g_idx = torch.arange(ng, device=dev)
    kv_group = (head_kv[:, None] * ng + g_idx).reshape(-1)
    valid = None if key_valid is None else key_valid.reshape(b * ng, m * bs)
    valid_group = (head_b[:, None] * ng + g_idx).reshape(-1)
    out_g = out.view(b * hs * ng, m, gs, bs, d)
    lse_g = lse.view(b * hs * ng, m, gs, bs)
    flags = banded.reshape(-1)
    for width, groups in ((m, flags.nonzero().view(-1)), (1, (~flags).nonzero().view(-1))):
        if groups.numel() == 0:
            continue
        r, calls, span = groups.numel(), m // width, width * bs  # span: queries and keys of one call
        qs = qg.index_select(0, groups).view(r, gs, calls, span, d).transpose(1, 2)
        at = kv_group.index_select(0, groups)
        ks = kg.index_select(0, at).view(r, calls, 1, span, d).expand(r, calls, gs, span, d)
        vs = vg.index_select(0, at).view(r, calls, 1, span, d).expand(r, calls, gs, span, d)
        mask = None
        if valid is not None:
            tri = torch.ones(span, span, dtype=torch.bool, device=dev).tril_()
            kv = valid.index_select(0, valid_group.index_select(0, groups)).view(r, calls, 1, 1, span)
            mask = (tri & kv).expand(r, calls, gs, span, span).reshape(-1, 1, span, span)
        o, l1 = _attend(
            qs.reshape(-1, 1, span, d),
            ks.reshape(-1, 1, span, d),
            vs.reshape(-1, 1, span, d),
            causal=True,
            scale=scale,
            mask=mask,
        )
        # [r, calls, gs, width, bs] -> [r, m, gs, bs]: the width blocks of one call are consecutive members
        out_g[groups] = o.view(r, calls, gs, width, bs, d).transpose(2, 3).reshape(r, m, gs, bs, d)
        lse_g[groups] = l1.view(r, calls, gs, width, bs).transpose(2, 3).reshape(r, m, gs, bs)


def _attend_sets(rows_q, sets, base, valid_base, kflat, vflat, valid_flat, bs: int, scale: float):
    """Each row's queries [R, Lq, D] against its set of key blocks (`sets` bool [R, n]; block j of row
    r at kflat[base[r] + j], its key validity at valid_flat[valid_base[r] + j]) -> (out [R, Lq, D],
    lse [R, Lq]; -inf where a row has no visible key).
    Rows are taken in order of their block count, so every call is one equal-length batch."""
    r_total, lq, d = rows_q.shape
    n = sets.shape[1]
    dev = rows_q.device
    j = torch.arange(n, device=dev)
    idx = torch.sort(torch.where(sets, j, j + n), dim=-1).values  # kept blocks first, ascending
    out = torch.zeros(r_total, lq, d, dtype=rows_q.dtype, device=dev)
    lse = torch.full((r_total, lq), float("-inf"), dtype=torch.float32, device=dev)
    sorted_counts, order = torch.sort(sets.sum(-1))
    uniq, sizes = torch.unique_consecutive(sorted_counts, return_counts=True)
    elem = kflat.element_size()
    start = 0
    for c, size in zip(uniq.tolist(), sizes.tolist(), strict=True):
        g0 = start
        start += size
        if c <= 0:
            continue
        # Chunk rows so the gathered K/V of one call stays cache-resident for the flash kernel
        # that reads it right after.
        chunk = max(1, min(size, GATHER_CHUNK_BYTES // (2 * c * bs * d * elem)))
        for c0 in range(g0, g0 + size, chunk):
            rows = order[c0 : min(g0 + size, c0 + chunk)]
            r = rows.numel()
            blocks = idx[rows, :c]
            flat = (base[rows, None] + blocks).reshape(-1)
            kg = kflat.index_select(0, flat).view(r, 1, c * bs, d)
            vg = vflat.index_select(0, flat).view(r, 1, c * bs, d)
            qg = rows_q.index_select(0, rows).view(r, 1, lq, d)
            mask = None
            if valid_flat is not None:
                at = (valid_base[rows, None] + blocks).reshape(-1)
                mask = valid_flat.index_select(0, at).view(r, 1, 1, c * bs)
            o, l1 = _attend(qg, kg, vg, causal=False, scale=scale, mask=mask)
            l1 = l1.view(r, lq)
            if mask is not None:  # no visible key in the gathered blocks: contributes nothing
                l1 = l1.masked_fill(~mask.view(r, -1).any(-1, keepdim=True), float("-inf"))
            out[rows] = o.view(r, lq, d)
            lse[rows] = l1
    return out, lse


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Partial attention results over disjoint key sets -> the exact whole (float32), by log-sum-exp."""
    top = parts[0][1]
    for _, l1 in parts[1:]:
        top = torch.maximum(top, l1)
    top = torch.where(torch.isinf(top), 0.0, top)
    weights = [torch.exp(l1 - top) for _, l1 in parts]
    total = weights[0]
    for w in weights[1:]:
        total = total + w
    merged = parts[0][0].float() * (weights[0] / total)[..., None]
    for (o, _), w in zip(parts[1:], weights[1:], strict=True):
        merged.addcmul_(o.float(), (w / total)[..., None])
    return merged


gather_attention = gather_kernel(GATHER_GROUP)
gather_rows_attention = gather_kernel(1)


def _with_dense_prefix(out, q, k, v, key_valid, prefix, bs, scale):
    if prefix >= 2:
        from sparse_core.kernels.dense import dense_attention

        p = prefix * bs
        kv = None if key_valid is None else key_valid[:, :p]
        out[:, :, :p] = dense_attention(q[:, :, :p], k[:, :, :p], v[:, :, :p], key_valid=kv, scale=scale)
    return out


def _unpack(out, b, hs, n, gs, bs, d, hq):
    return out.view(b, hs, n, gs, bs, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hq, n * bs, d)
