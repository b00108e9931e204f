"""Decode page scoring and selection: pure functions from one query and the page summaries to the
pages a KV head reads.

- `quest_upper_bound`: Quest's bound on the largest q.k in a page, sum_d max(q_d kmax_d, q_d kmin_d)
  (computed as q+ . kmax + q- . kmin: two small matmuls). Training-free; the estimated page mass is
  softmax(scale * bound + log(tokens in page)), an upper-bound-flavoured estimate of each page's
  share of the attention mass.
- `gate_page_logits`: the learned gate's prefill scoring applied to one query: per-head projection of
  q, per-KV-head projection of the page's (max, min, mean) keys, temperature, + log(tokens in page).
  Projected keys of complete pages never change, so they are computed once and kept with the summary.
- `gate_v2_page_logits`: gate_v2's prefill scoring of a one-token query block: pre-rotary (max, min,
  mean) keys per page, projected and rotated at the page's first position, the query un-rotated and
  rotated at its page's; learned prior times log(tokens in page). Complete pages' projected keys are
  kept with the summary. `page_gate` (sparse_core.decode.page_gate) scores the same way with weights
  trained on single decode queries at the page size. `page_logits` dispatches on the estimator's name.
- `select_pages`: per (batch, KV head) the query heads' estimated masses are averaged (one choice per
  GQA group, SeerAttention-R style), the sink and local pages are always kept, and the best of the
  rest are kept up to the budget, or the fewest reaching tau of the estimated mass. One count per
  call (the largest any head needs), so the gather is a single equal-length batch."""

from __future__ import annotations

import math

import torch

from sparse_core.decode.pages import PageSummaries


def quest_upper_bound(q: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, D], kmax/kmin [B, Hkv, P, D] -> [B, Hq, P] upper bound of q.k over each page's keys."""
    b, hq, d = q.shape
    hkv = kmax.shape[1]
    qg = q.float().reshape(b, hkv, hq // hkv, d)
    ub = torch.matmul(qg.clamp_min(0.0), kmax.transpose(-1, -2)) + torch.matmul(
        qg.clamp_max(0.0), kmin.transpose(-1, -2)
    )
    return ub.reshape(b, hq, -1)


def _add_log_counts(logits: torch.Tensor, s: PageSummaries) -> torch.Tensor:
    """+ log(tokens in page), up to a constant: only a partial last page differs (in place)."""
    rem = s.length - s.n_full_pages * s.page_size
    if rem:
        logits.select(-1, -1).add_(math.log(rem / s.page_size))
    return logits


def quest_page_logits(q: torch.Tensor, s: PageSummaries, scale: float) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, P]: scale * Quest's bound + log(tokens in page), as one matmul of
    [scale q+ | scale q-] against the summary's [kmax | kmin] pages."""
    b, hq, d = q.shape
    hkv, cap = s.bounds.shape[1], s.bounds.shape[2]
    qs = q.float().reshape(b * hkv, hq // hkv, d) * scale
    qq = torch.cat([qs.clamp_min(0.0), qs.clamp_max(0.0)], dim=-1)  # [B*Hkv, g, 2D]
    pages = s.bounds.view(b * hkv, cap, 2 * d).narrow(1, 0, s.n_pages)
    return _add_log_counts(torch.bmm(qq, pages.transpose(1, 2)).view(b, hq, -1), s)


def _gate_page_keys(s: PageSummaries, layer_gate, layer_idx: int) -> torch.Tensor:
    """Projected page keys [B, Hkv, P, G]; complete pages cached on the summary."""
    n, full = s.n_pages, s.n_full_pages
    kmax, kmin, ksum = s.live()
    counts = s.page_counts()
    key = ("gate", layer_idx, id(layer_gate))
    cached = s.cache.get(key)
    done = 0 if cached is None else cached.shape[2]
    if done < full:
        sl = slice(done, full)
        pool = torch.cat([kmax[:, :, sl], kmin[:, :, sl], ksum[:, :, sl] / counts[sl, None]], dim=-1)
        fresh = torch.einsum("bhnd,hdg->bhng", pool, layer_gate.wk)
        cached = fresh if cached is None else torch.cat([cached, fresh], dim=2)
        s.cache[key] = cached
        done = full
    if n > full:  # the partial last page: recomputed every step
        sl = slice(full, n)
        pool = torch.cat([kmax[:, :, sl], kmin[:, :, sl], ksum[:, :, sl] / counts[sl, None]], dim=-1)
        tail = torch.einsum("bhnd,hdg->bhng", pool, layer_gate.wk)
        return tail if cached is None else torch.cat([cached, tail], dim=2)
    return cached


def gate_page_logits(q: torch.Tensor, s: PageSummaries, layer_gate, layer_idx: int) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, P] gate logits (log-mass up to a constant) over the live pages."""
    b, hq, d = q.shape
    kp = _gate_page_keys(s, layer_gate, layer_idx)  # [B, Hkv, P, G]
    hkv = kp.shape[1]
    qp = torch.einsum("bhd,hdg->bhg", q.float(), layer_gate.wq)  # [B, Hq, G]
    temp = layer_gate.scaling * layer_gate.log_temp.exp()  # [Hq]
    logits = torch.matmul(qp.view(b, hkv, hq // hkv, -1), kp.transpose(-1, -2)).reshape(b, hq, -1)
    return _add_log_counts(logits * temp[None, :, None], s)


def gate_v2_page_logits(
    q: torch.Tensor,
    key: torch.Tensor,
    s: PageSummaries,
    gate,
    layer_idx: int,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, D] (post-rotary, the newest token's query) and the layer's cached keys [B, Hkv, L, D]
    -> [B, Hq, P] gate_v2 logits over the live pages: gate_v2's prefill scoring of a query block that
    holds this one token. Pages pool the pre-rotary keys (un-rotated at their positions: 0..L-1, or
    with left padding the valid tokens before each), are projected and rotated at their first
    position, and get the learned prior times log(valid tokens in page); the query is un-rotated at
    its position and rotated at its page's first one. Projected keys of complete pages never change,
    so they are computed once (from the raw keys: the Quest bounds are of post-rotary keys) and kept
    on the summary; a step recomputes only the newest, partial page."""
    from sparse_core.estimators.learned_gate_v2 import pool_keys, positions_for, rope_cos_sin, unrotate

    b, hq, d = q.shape
    length, ps = key.shape[2], s.page_size
    n, full = s.n_pages, s.n_full_pages
    layer = gate.layers[layer_idx]
    pos = None if key_valid is None else positions_for(b, length, key_valid, key.device)  # [B, L]

    def positions(t0: int, t1: int, step: int = 1) -> torch.Tensor:  # [B, m]: tokens t0, t0+step, .. < t1
        if pos is None:
            return torch.arange(t0, t1, step, device=key.device).expand(b, -1)
        return pos[:, t0:t1:step]

    def project(p0: int, p1: int, rot: tuple | None = None) -> torch.Tensor:  # pages [p0, p1) -> [B,Hkv,m,G]
        t0, t1 = p0 * ps, min(length, p1 * ps)
        cos, sin = rope_cos_sin(positions(t0, t1), gate.inv_freq)
        kv = key_valid[:, t0:t1] if key_valid is not None else None
        pooled = pool_keys(key[:, :, t0:t1], ps, cos[:, None], sin[:, None], gate.rope_scaling, kv)
        return layer.project_keys(pooled, positions(t0, t1, ps), gate.inv_freq)

    cache_key = ("gate_v2", layer_idx, id(layer))
    kp = s.cache.get(cache_key)
    done = 0 if kp is None else kp.shape[2]
    if done < full:
        fresh = project(done, full)
        kp = fresh if kp is None else torch.cat([kp, fresh], dim=2)
        s.cache[cache_key] = kp
    temp, weight = _gate_constants(gate, layer_idx)  # [1, Hq, 1] each
    if key_valid is None:  # positions 0..L-1: rotary tables by slicing, the newest page scored apart
        return _unpadded_gate_v2_logits(q, key, kp, gate, layer, temp, weight, ps, full, n)
    if n > full:  # the partial newest page: recomputed every step
        tail = project(full, n)
        kp = tail if kp is None else torch.cat([kp, tail], dim=2)
    cos, sin = rope_cos_sin(positions(length - 1, length), gate.inv_freq)  # the query's own position
    qbar = unrotate(q.float()[:, :, None], cos[:, None], sin[:, None], gate.rope_scaling)  # [B, Hq, 1, D]
    qp = layer.project_queries(qbar, positions((n - 1) * ps, (n - 1) * ps + 1), gate.inv_freq)
    hkv = kp.shape[1]
    logits = torch.matmul(qp.view(b, hkv, hq // hkv, -1), kp.transpose(-1, -2)).reshape(b, hq, n)
    logits = logits * temp
    kv = torch.nn.functional.pad(key_valid, (0, n * ps - length), value=False)
    counts = kv.view(b, n, ps).sum(-1).float()  # [B, P]
    logits = logits + counts.clamp_min(1.0).log()[:, None, :] * weight
    return logits.masked_fill((counts == 0)[:, None, :], float("-inf"))


def _gate_constants(gate, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(temperature, prior weight) [1, Hq, 1] of a layer, computed once per gate (inference weights)."""
    consts = gate.__dict__.setdefault("_decode_constants", {})
    hit = consts.get(layer_idx)
    if hit is None:
        layer = gate.layers[layer_idx]
        with torch.no_grad():
            hit = (layer.temperature()[None, :, None].float(), layer.prior.float()[None, :, None])
        consts[layer_idx] = hit
    return hit


def _rope_table(gate, length: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotary tables [N, D] of positions 0..N-1 >= length, kept on the gate (grown by doubling), in
    the form `_turn` uses: (cos, sin) of the plain rotation the gate applies to its projections,
    (cos, sin) / attention scaling of the inverse the model's q/k need; 1 / 0 on unrotated channels."""
    from sparse_core.estimators.learned_gate_v2 import rope_cos_sin

    table = gate.__dict__.get("_rope_table")
    if table is None or table[0].shape[0] < length or table[0].device != torch.device(device):
        n = max(length, 2 * table[0].shape[0] if table is not None else 4096)
        cos, sin = rope_cos_sin(torch.arange(n, device=device), gate.inv_freq.to(device))
        pad = gate.shape.head_dim - 2 * cos.shape[-1]
        c = torch.nn.functional.pad(torch.cat([cos, cos], -1), (0, pad), value=1.0)
        sn = torch.nn.functional.pad(torch.cat([sin, sin], -1), (0, pad), value=0.0)
        inv = 1.0 / gate.rope_scaling
        c_inv = torch.cat([c[:, : 2 * cos.shape[-1]] * inv, c[:, 2 * cos.shape[-1] :]], -1)
        table = (c, sn, c_inv, -sn * inv)
        gate.__dict__["_rope_table"] = table
    return table


def _turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin over [.., D] with `_rope_table`'s full-width tables (`half`:
    rotated channel pairs): transformers' rotation, or its inverse, in 7 ops instead of ~12."""
    turned = torch.cat([-x[..., half : 2 * half], x[..., :half], x[..., 2 * half :]], dim=-1)
    return torch.addcmul(x * cos, turned, sin)


def _unpadded_gate_v2_logits(q, key, kp, gate, layer, temp, weight, ps: int, full: int, n: int):
    """`gate_v2_page_logits` without padding (positions 0..L-1), in fewer ops: rotations from one
    table per gate, the newest page pooled and projected apart from the cached complete pages (no
    copy of those), the layer's temperature and prior computed once."""
    b, hq, _ = q.shape
    hkv, length = key.shape[1], key.shape[2]
    cos, sin, cos_inv, sin_inv = _rope_table(gate, length, key.device)
    half = gate.inv_freq.numel()
    own = (n - 1) * ps  # the query's page: rotated at its first position
    qbar = _turn(q.float()[:, :, None], cos_inv[length - 1], sin_inv[length - 1], half)  # pre-rotary
    qp = _turn(torch.matmul(qbar, layer.wq), cos[own], sin[own], half)  # [B, Hq, 1, G]
    qg = qp.view(b, hkv, hq // hkv, -1)
    parts = [] if kp is None else [torch.matmul(qg, kp.transpose(-1, -2))]
    if n > full:  # the partial newest page: pooled over its keys so far, every step
        t0 = full * ps
        k = _turn(key[:, :, t0:length].float(), cos_inv[t0:length], sin_inv[t0:length], half)
        # the one page's (max, min, mean) directly: blocks.block_max_min_mean costs 4 more ops per step
        pooled = torch.cat([k.amax(2, keepdim=True), k.amin(2, keepdim=True), k.mean(2, keepdim=True)], -1)
        tail = _turn(torch.matmul(pooled, layer.wk), cos[t0], sin[t0], half)
        parts.append(torch.matmul(qg, tail.transpose(-1, -2)))
    logits = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).reshape(b, hq, n) * temp
    if n > full:  # log(tokens in page): a constant per head but for the partial newest page
        logits[..., -1:].add_(weight * math.log((length - full * ps) / ps))
    return logits


def page_logits(
    estimator: str,
    plan,
    layer_idx: int,
    q: torch.Tensor,
    key: torch.Tensor,
    s: PageSummaries,
    scale: float,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decode estimator's page logits [B, Hq, P] for query q [B, Hq, D] (`plan` carries a learned
    estimator's weights)."""
    gate = decode_gate(plan, estimator)
    if estimator == "gate":
        return gate_page_logits(q, s, gate.layers[layer_idx], layer_idx)
    if estimator in ("gate_v2", "page_gate"):  # same geometry; page_gate's weights are decode-trained
        if gate.inv_freq.device != q.device:
            gate.to(q.device)
        return gate_v2_page_logits(q, key, s, gate, layer_idx, key_valid)
    return quest_page_logits(q, s, scale)


def decode_gate(plan, estimator: str):
    """The learned gate a decode estimator reads from `plan` (PlanError: no or misfit weights);
    None for a training-free one."""
    if estimator == "gate":
        from sparse_core.estimators.learned_gate import gate_for_plan

        return gate_for_plan(plan)
    if estimator == "gate_v2":
        from sparse_core.estimators.learned_gate_v2 import gate_for_plan

        return gate_for_plan(plan)
    if estimator == "page_gate":
        from sparse_core.decode.page_gate import page_gate_for_plan

        return page_gate_for_plan(plan)
    return None


def page_mass(
    logits: torch.Tensor, num_kv_heads: int, page_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, Hq, P] logits -> [B, Hkv, P] estimated mass, averaged over each KV head's query heads."""
    b, hq, p = logits.shape
    if page_valid is None:
        probs = torch.softmax(logits, dim=-1)
    else:
        probs = torch.softmax(logits.masked_fill(~page_valid[:, None, :], float("-inf")), -1).nan_to_num_(0.0)
    if hq == num_kv_heads:
        return probs
    return probs.view(b, num_kv_heads, hq // num_kv_heads, p).mean(2)


def select_pages(
    mass: torch.Tensor,
    *,
    sink_pages: int,
    local_pages: int,
    keep_pages: int | None,
    tau: float | None,
) -> torch.Tensor:
    """mass [B, H, P] -> ascending page indices [B, H, m] to gather, among the pages before the local
    window (the last `local_pages` pages are read contiguously by the kernel). Sink pages come first;
    `keep_pages` (sink and local included) caps the count; `tau` keeps the fewest pages whose mass,
    with the forced pages', reaches tau of the total."""
    b, h, p = mass.shape
    local = min(local_pages, p)
    n_before = p - local  # pages outside the local window
    sink = min(sink_pages, n_before)
    mid = n_before - sink
    if n_before <= 0:
        return torch.zeros(b, h, 0, dtype=torch.long, device=mass.device)
    cap = mid if keep_pages is None else max(0, min(mid, keep_pages - sink - local))
    want = cap
    mid_mass = mass[:, :, sink:n_before]
    if tau is not None and tau < 1.0 and cap > 0:
        sorted_mass, _ = torch.sort(mid_mass, dim=-1, descending=True)
        forced = mass[:, :, :sink].sum(-1) + mass[:, :, n_before:].sum(-1)  # [B, H]
        total = mass.sum(-1).clamp_min(1e-30)
        before = forced[..., None] + torch.cumsum(sorted_mass, -1) - sorted_mass
        need = (before < tau * total[..., None]).sum(-1)  # pages of the middle each head needs
        want = min(cap, int(need.max()))
    sink_idx = torch.arange(sink, device=mass.device).expand(b, h, sink)
    if want <= 0:
        return sink_idx.contiguous()
    if want >= mid:
        return torch.arange(n_before, device=mass.device).expand(b, h, n_before).contiguous()
    top = torch.topk(mid_mass, want, dim=-1, sorted=False).indices + sink
    top = torch.sort(top, dim=-1).values
    return torch.cat([sink_idx, top], dim=-1)


def select_pages_forced(
    mass: torch.Tensor, *, sink_pages: int, local_pages: int, keep_pages: int
) -> torch.Tensor:
    """mass [B, H, P] (any finite scores ranking the pages, e.g. `group_page_scores`) -> page
    indices [B, H, k] to gather, the local window included: the newest page (the only one that may
    be partial) first, then the other forced pages (sink, local), then the best-scored rest,
    k = max(keep_pages, forced pages) capped at P. One topk: forced pages score above any estimate.
    `mass` is overwritten."""
    p = mass.shape[-1]
    local = min(local_pages, p)
    sink = min(sink_pages, p - local)
    k = min(p, max(keep_pages, sink + local))
    forced = torch.finfo(mass.dtype).max
    if sink:
        mass.narrow(-1, 0, sink).fill_(forced)
    mass.narrow(-1, p - local, local).fill_(forced)
    mass.select(-1, p - 1).fill_(float("inf"))
    return torch.topk(mass, k, dim=-1, sorted=True).indices


def group_page_scores(logits: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, P] logits -> [B, Hkv, P]: the query heads' softmax masses summed per KV head -- the
    ranking of `page_mass` (its mean, without padding) in one op fewer."""
    b, hq, p = logits.shape
    return torch.softmax(logits.view(b, num_kv_heads, hq // num_kv_heads, p), -1).sum(2)


def local_start(n_tokens: int, page_size: int, local_pages: int) -> int:
    """First token of the local window: the last `local_pages` pages (the newest may be partial)."""
    n_pages = math.ceil(n_tokens / page_size)
    return max(0, (n_pages - local_pages) * page_size)
