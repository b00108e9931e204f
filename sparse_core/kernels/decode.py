"""Decode kernel: one query token per sequence attends only to selected pages of the KV cache.

The selected pages of each (batch, KV head) are gathered into one contiguous K/V by `index_select`
over whole pages (rows of page_size * D values: one index per page, not per token); the local window
(the newest pages) is read in place. Each part is
attended with the CPU flash kernel, the query heads of a GQA group stacked as query rows against
their KV head (no repeat of K/V), and the two partial results are merged exactly by log-sum-exp.
Keys may be a view into a larger preallocated buffer (sparse_core.decode.cache.PagedCache): rows are
then addressed in the buffer, so nothing is copied but the gathered pages. With every page selected
this is dense attention (tested)."""

from __future__ import annotations

import functools

import torch

from sparse_core.estimators.blocks import softmax_scale
from sparse_core.kernels.gather import _attend


def _rows(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A [rows, D] view of the storage behind k [B, H, L, D] and the row stride of one (b, h)."""
    b, h, length, d = k.shape
    s0, s1, s2, s3 = k.stride()
    if s3 == 1 and s2 == d and s0 == h * s1 and k.storage_offset() == 0 and s1 >= length * d and s1 % d == 0:
        row_len = s1 // d
        return k.as_strided((b * h * row_len, d), (d, 1)), row_len
    kc = k.contiguous()
    return kc.view(-1, d), length


def page_token_index(pages: torch.Tensor, page_size: int, row_len: int) -> torch.Tensor:
    """[B, H, m] page indices -> flat token rows [B*H*m*page_size] into storage whose (b, h) rows
    are `row_len` tokens apart."""
    b, h, m = pages.shape
    dev = pages.device
    tok = (pages * page_size)[..., None] + torch.arange(page_size, device=dev)  # [B, H, m, P]
    rows = (torch.arange(b * h, device=dev) * row_len).view(b, h, 1, 1)
    return (rows + tok).reshape(-1)


# above this many (batch, KV head) pairs one token-row index_select beats a per-pair page loop
MAX_PAGE_LOOP = 16


def _page_rows(x: torch.Tensor, page_size: int) -> tuple[torch.Tensor, int] | None:
    """x [B, H, L, D] -> (a [rows, page_size * D] view of its storage whose rows are whole pages,
    pages per (b, h)), or None when pages are not rows of the storage."""
    b, h, _, d = x.shape
    s0, s1, s2, s3 = x.stride()
    row = page_size * d
    if s3 == 1 and s2 == d and s0 == h * s1 and x.storage_offset() == 0 and s1 % row == 0:
        return x.as_strided((b * h * (s1 // row), row), (row, 1)), s1 // row
    return None


_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # returns the LSE too


@functools.lru_cache(maxsize=64)
def _row_base(b: int, h: int, per: int, device: torch.device) -> torch.Tensor:
    """[B, H, 1]: the first page row of each (b, h) in storage of `per` pages per (b, h)."""
    return (torch.arange(b * h, device=device) * per).view(b, h, 1)


def _page_index(pages: torch.Tensor, per: int) -> torch.Tensor:
    b, h, _ = pages.shape
    return (pages + _row_base(b, h, per, pages.device)).reshape(-1)


@functools.lru_cache(maxsize=256)
def _tail_mask(n: int, page_size: int, tail: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, 1, n] additive mask hiding the first page's last `tail` rows (read-only, shared)."""
    mask = torch.zeros(1, 1, 1, n, dtype=dtype, device=device)
    mask[..., page_size - tail : page_size] = float("-inf")
    return mask


def gather_pages(x: torch.Tensor, pages: torch.Tensor, page_size: int) -> torch.Tensor:
    """x [B, H, L, D] (possibly a view into a larger buffer), pages [B, H, m] of whole pages
    -> [B, H, m * page_size, D] contiguous: the pages' keys (or values) in the given order."""
    b, h, length, d = x.shape
    m = pages.shape[-1]
    s2, s3 = x.stride()[2:]
    row = page_size * d
    rows = _page_rows(x, page_size)
    if rows is not None:  # whole pages are rows of the storage: one index_select (PagedCache, aligned)
        flat, per = rows
        return flat.index_select(0, _page_index(pages, per)).view(b, h, m * page_size, d)
    if s3 == 1 and s2 == d and b * h <= MAX_PAGE_LOOP:
        n_full = length // page_size
        out = torch.empty(b, h, m, row, dtype=x.dtype, device=x.device)
        for bi in range(b):
            for hi in range(h):
                src = x[bi, hi, : n_full * page_size].view(n_full, row)
                torch.index_select(src, 0, pages[bi, hi], out=out[bi, hi])
        return out.view(b, h, m * page_size, d)
    xr, row_len = _rows(x)
    return xr.index_select(0, page_token_index(pages, page_size, row_len)).view(b, h, m * page_size, d)


def gather_kv(
    k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gather_pages` of keys and values; one index for both when their storage is laid out alike."""
    rows = paged_rows(k, v, page_size)
    if rows is not None:
        idx = _page_index(pages, rows[2])
        shape = (*pages.shape[:2], pages.shape[-1] * page_size, k.shape[-1])
        return rows[0].index_select(0, idx).view(shape), rows[1].index_select(0, idx).view(shape)
    return gather_pages(k, pages, page_size), gather_pages(v, pages, page_size)


def paged_rows(
    k: torch.Tensor, v: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(K rows, V rows, pages per (b, h)) when whole pages of k and v are rows of their storage laid
    out alike (PagedCache buffers); None otherwise."""
    rk, rv = _page_rows(k, page_size), _page_rows(v, page_size)
    if rk is None or rv is None or rk[1] != rv[1] or k.shape != v.shape:
        return None
    return rk[0], rv[0], rk[1]


def decode_attention_pages(
    q: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor, int],
    pages: torch.Tensor,
    page_size: int,
    length: int,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """One flash call over whole gathered pages, the local window among them: q [B, Hq, 1, D]; `rows`
    from `paged_rows` of the cache's K/V [B, Hkv, length, D]; pages [B, Hkv, m] with the newest page
    (index ceil(length / page_size) - 1, possibly partial) first. The partial page's rows past
    `length` are masked (PagedCache zero-fills its buffers, so they are finite). Returns
    [B, Hq, 1, D]. With every page given this is dense attention in another key order."""
    b, hq, lq, d = q.shape
    if lq != 1:
        raise ValueError(f"decode attention takes one query token, got {lq}")
    kr, vr, per = rows
    hkv, m = pages.shape[1], pages.shape[2]
    idx = _page_index(pages, per)
    shape = (b, hkv, m * page_size, d)
    kg, vg = kr.index_select(0, idx).view(shape), vr.index_select(0, idx).view(shape)
    qg = q.reshape(b, hkv, hq // hkv, d)
    scale = softmax_scale(scale, d)
    tail = -length % page_size  # rows of the newest page past the cache's end
    mask = _tail_mask(m * page_size, page_size, tail, q.dtype, q.device) if tail else None
    if q.device.type == "cpu":
        out = _CPU_FLASH(qg, kg, vg, 0.0, False, attn_mask=mask, scale=scale)[0]
    else:
        out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, 1, d)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pages: torch.Tensor,
    page_size: int,
    local_start: int,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q [B, Hq, 1, D]; k/v [B, Hkv, L, D]; pages [B, Hkv, m] ascending, each page wholly before
    `local_start` (a multiple of page_size); key_valid [B, L] bool (False = padding) or None.
    Returns [B, Hq, 1, D]: attention over the selected pages plus keys [local_start, L)."""
    b, hq, lq, d = q.shape
    if lq != 1:
        raise ValueError(f"decode_attention takes one query token, got {lq}")
    hkv, length = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = softmax_scale(scale, d)
    qg = q.reshape(b, hkv, g, d)
    lmask = None
    if key_valid is not None:
        lmask = key_valid[:, None, None, local_start:].expand(b, hkv, g, length - local_start)
    kl, vl = k[:, :, local_start:], v[:, :, local_start:]
    out_l, lse_l = _attend(qg, kl, vl, causal=False, scale=scale, mask=lmask)
    m = pages.shape[-1]
    if m == 0:
        return out_l.reshape(b, hq, 1, d)
    n = m * page_size
    kg, vg = gather_kv(k, v, pages, page_size)
    gmask = None
    if key_valid is not None:
        tok = ((pages * page_size)[..., None] + torch.arange(page_size, device=q.device)).view(b, hkv, n)
        gvalid = torch.gather(key_valid[:, None, :].expand(b, hkv, length), 2, tok)
        gmask = gvalid[:, :, None, :].expand(b, hkv, g, n)
    out_g, lse_g = _attend(qg, kg, vg, causal=False, scale=scale, mask=gmask)
    if gmask is not None:  # pages with no visible key contribute nothing
        lse_g = lse_g.masked_fill(~gmask.any(-1), float("-inf"))
    # exact merge: the gathered part's share of the softmax mass is sigmoid(lse_g - lse_l)
    w_g = torch.sigmoid(lse_g - lse_l)[..., None]
    out_l = out_l.float()
    out = torch.addcmul(out_l, out_g.float() - out_l, w_g)
    return out.to(q.dtype).reshape(b, hq, 1, d)
