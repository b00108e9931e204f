"""Page summaries of a layer's key cache, maintained as tokens are appended.

Per (batch, KV head, page of `page_size` tokens): the channel-wise max and min of the keys (Quest's
bound), side by side in one buffer [.., page, 2D] (so Quest's bound is one matmul), and their sum
(the mean is the learned gate's third key feature). `sync(summary, keys)` brings
a summary up to date with the cache's keys: it appends only the new tokens (the partial last page is
updated in place), and rebuilds from scratch when the keys are not a continuation of what it saw (a
new sequence, a cropped or reordered cache: checked by the length and the last summarised key).
Buffers grow by doubling, so an append costs O(new tokens), not O(cache)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sparse_core.estimators.blocks import block_max_min_sum


@dataclass
class PageSummaries:
    page_size: int
    bounds: torch.Tensor  # float32 [B, H, capacity, 2D]: [kmax | kmin]; pages [:n_pages] are live
    ksum: torch.Tensor  # float32 [B, H, capacity, D]
    length: int  # tokens summarised
    last_key: torch.Tensor  # [B, H, D]: the key at position length - 1, as given
    cache: dict = field(default_factory=dict)  # per-estimator derived page features (e.g. gate keys)

    @property
    def kmax(self) -> torch.Tensor:
        return self.bounds[..., : self.ksum.shape[-1]]

    @property
    def kmin(self) -> torch.Tensor:
        return self.bounds[..., self.ksum.shape[-1] :]

    @property
    def n_pages(self) -> int:
        return math.ceil(self.length / self.page_size)

    @property
    def n_full_pages(self) -> int:
        return self.length // self.page_size

    def live(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.n_pages
        return self.kmax[:, :, :n], self.kmin[:, :, :n], self.ksum[:, :, :n]

    def page_counts(self) -> torch.Tensor:
        """Tokens per live page, float32 [n_pages] (the last page may be partial)."""
        counts = torch.full((self.n_pages,), float(self.page_size), device=self.kmax.device)
        rem = self.length - self.n_full_pages * self.page_size
        if rem:
            counts[-1] = float(rem)
        return counts


def _alloc(like: torch.Tensor, capacity: int, width: int = 1) -> torch.Tensor:
    b, h, _, d = like.shape
    return torch.empty(b, h, capacity, width * d, dtype=torch.float32, device=like.device)


def summarize(keys: torch.Tensor, page_size: int) -> PageSummaries:
    """Summaries of all of `keys` [B, H, S, D] in one pass."""
    if keys.ndim != 4 or keys.shape[2] < 1:
        raise ValueError(f"keys must be [B, H, S>=1, D], got {tuple(keys.shape)}")
    mx, mn, sm = block_max_min_sum(keys, page_size)
    n = mx.shape[2]
    cap = max(16, 2 * n)
    s = PageSummaries(page_size, _alloc(mx, cap, 2), _alloc(mx, cap), keys.shape[2], keys[:, :, -1].clone())
    s.kmax[:, :, :n], s.kmin[:, :, :n], s.ksum[:, :, :n] = mx, mn, sm
    return s


def _grow(s: PageSummaries, pages: int) -> None:
    cap = s.ksum.shape[2]
    if pages <= cap:
        return
    new = max(2 * cap, pages)
    for name in ("bounds", "ksum"):
        old = getattr(s, name)
        buf = _alloc(old, new)  # same width as `old` ([kmax | kmin] or ksum)
        buf[:, :, :cap] = old
        setattr(s, name, buf)


def extend(s: PageSummaries, keys: torch.Tensor) -> PageSummaries:
    """Append keys[:, :, s.length:] (keys are the whole cache, a continuation of what `s` saw)."""
    total = keys.shape[2]
    if total <= s.length:
        return s
    p = s.page_size
    if total == s.length + 1 and s.length % p:  # the decode step: one token into the partial page
        # select/narrow, not indexing: this runs per layer and token, and Python indexing costs more
        head, i, d = keys.select(2, s.length), s.length // p, keys.shape[-1]
        row = s.bounds.select(2, i)
        kmax, kmin = row.narrow(-1, 0, d), row.narrow(-1, d, d)
        torch.maximum(kmax, head, out=kmax)
        torch.minimum(kmin, head, out=kmin)
        s.ksum.select(2, i).add_(head)
        s.last_key.copy_(head)
        s.length = total
        return s
    new = keys[:, :, s.length :].float()
    pos = s.length
    rem = pos % p
    if rem:  # fill the partial last page in place
        m = min(p - rem, new.shape[2])
        i = pos // p
        head = new[:, :, :m]
        torch.maximum(s.kmax[:, :, i], head.amax(2), out=s.kmax[:, :, i])
        torch.minimum(s.kmin[:, :, i], head.amin(2), out=s.kmin[:, :, i])
        s.ksum[:, :, i] += head.sum(2)
        new = new[:, :, m:]
        pos += m
    if new.shape[2]:
        mx, mn, sm = block_max_min_sum(new, p)
        first = pos // p
        _grow(s, first + mx.shape[2])
        s.kmax[:, :, first : first + mx.shape[2]] = mx
        s.kmin[:, :, first : first + mx.shape[2]] = mn
        s.ksum[:, :, first : first + mx.shape[2]] = sm
    s.length = total
    s.last_key = keys[:, :, -1].clone()
    return s


def is_continuation(s: PageSummaries | None, keys: torch.Tensor, page_size: int) -> bool:
    if s is None or s.page_size != page_size:
        return False
    b, h, total, d = keys.shape
    if s.ksum.shape[0] != b or s.ksum.shape[1] != h or s.ksum.shape[3] != d or s.ksum.device != keys.device:
        return False
    if total < s.length:
        return False
    return bool(torch.equal(keys.select(2, s.length - 1), s.last_key))


def sync(s: PageSummaries | None, keys: torch.Tensor, page_size: int) -> PageSummaries:
    """Summaries matching `keys` [B, H, S, D]: extended in place when `keys` continue what `s` saw,
    rebuilt otherwise."""
    if not is_continuation(s, keys, page_size):
        return summarize(keys, page_size)
    assert s is not None
    if keys.shape[2] == s.length:
        return s
    return extend(s, keys)
