"""See what each attention layer sees: post-rotary q/k, v and the output, per layer, per forward.

A capture registers an attention function through transformers' `AttentionInterface` (and the same
mask function as the implementation it wraps) and switches the model to it for the duration of a
`with` block. The function calls whatever implementation was active before (dense SDPA, or a sparse
plan's function after `sparsify`) and hands a `LayerCall` to a callback, so the same capture measures
dense targets and sparse outputs. No forward is patched; leaving the block restores the previous
implementation and unregisters the function.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from sparse_core.estimators.blocks import softmax_scale

_counter = itertools.count()


@dataclass
class LayerCall:
    layer_idx: int
    query: torch.Tensor  # [B, Hq, S, D], rotary applied
    key: torch.Tensor  # [B, Hkv, S, D], rotary applied
    value: torch.Tensor  # [B, Hkv, S, D]
    output: torch.Tensor  # [B, S, Hq, D] as the wrapped implementation returned it
    attention_mask: torch.Tensor | None
    scaling: float
    module: torch.nn.Module


def _impl_name(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def _set_impl(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except Exception:  # older/odd models: the config field is what the layers read
        model.config._attn_implementation = name


@contextmanager
def capture_attention(
    model,
    on_layer: Callable[[LayerCall], None],
    *,
    layers: set[int] | None = None,
    prefill_only: bool = True,
) -> Iterator[None]:
    """Call `on_layer` for every attention call (prefill only by default: q and k of equal length)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    prev = _impl_name(model)
    if prev == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        prev_fn = eager_attention_forward
    else:
        prev_fn = ALL_ATTENTION_FUNCTIONS[prev]
    prev_mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(prev) or ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    name = f"sparsepilot_capture_{next(_counter)}"

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        out, weights = prev_fn(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        idx = int(getattr(module, "layer_idx", -1))
        if (layers is None or idx in layers) and (not prefill_only or query.shape[2] == key.shape[2]):
            s = softmax_scale(scaling, query.shape[-1])
            on_layer(LayerCall(idx, query, key, value, out, attention_mask, float(s), module))
        return out, weights

    if prev_fn is sdpa_attention_forward or prev == "sdpa":
        prev_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, prev_mask)
    _set_impl(model, name)
    try:
        yield
    finally:
        _set_impl(model, prev)
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


@torch.no_grad()
def block_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    block_size: int,
    scaling: float | None = None,
    *,
    chunk_blocks: int = 8,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense causal attention mass per (query block, key block): [B, Hq, nb, nb], rows sum to 1.

    Entry (i, j) is the mean over the queries of block i of the attention probability that falls on
    the keys of block j -- exactly the quantity a tau-mass selection tries to cover. Computed in query
    chunks so memory stays at O(chunk * S) per head. ``key_valid`` [B, S] (False = padding) leaves
    padded keys out of every softmax."""
    return _block_attention_map(
        query, key, block_size, scaling, "mass", chunk_blocks=chunk_blocks, key_valid=key_valid
    )


@torch.no_grad()
def block_attention_maxpool(
    query: torch.Tensor, key: torch.Tensor, block_size: int, scaling: float | None = None, **options: Any
) -> torch.Tensor:
    """SeerAttention's distillation target: the dense causal attention map max-pooled over each
    (query block, key block) tile -- the largest attention probability any query of block i gives
    any key of block j -- then normalised so each row sums to 1. [B, Hq, nb, nb]. Unlike the block
    mass it does not grow with the number of keys a block holds: a block with one key that a query
    needs scores as high as a block full of them. `options`: `chunk_blocks`, `key_valid`, as for
    `block_attention_mass`."""
    peak = _block_attention_map(query, key, block_size, scaling, "max", **options)
    return peak / peak.sum(-1, keepdim=True).clamp_min(1e-30)


@torch.no_grad()
def block_attention_contribution(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_size: int,
    scaling: float | None = None,
    **options: Any,
) -> torch.Tensor:
    """What each key block contributes to the attention output's error when dropped: per (query
    block i, key block j) the mean over the queries r of block i of sum over the keys k of block j of
    p_rk |v_k - o_r|, with o_r the dense output; rows normalised to sum to 1. [B, Hq, nb, nb].

    Dropping a set D of key blocks moves o_r by exactly |sum_{k in D} p_rk (v_k - o_r)| / (1 - m_D)
    (m_D the dropped mass; `selection_drop`), so this map bounds the first-order output error per
    block, where the block mass counts probability alone: a block whose values sit near the output
    costs little to drop even when it holds mass. `options`: `chunk_blocks`, `key_valid`."""
    part = _block_attention_map(query, key, block_size, scaling, "contribution", value=value, **options)
    return part / part.sum(-1, keepdim=True).clamp_min(1e-30)


def _block_attention_map(
    query,
    key,
    block_size,
    scaling,
    reduce: str,
    *,
    value: torch.Tensor | None = None,
    chunk_blocks: int = 8,
    key_valid: torch.Tensor | None = None,
):
    b, hq, s, d = query.shape
    k = repeat_kv(key, hq // key.shape[1]).float()
    q = query.float()
    if reduce == "contribution":
        v = repeat_kv(value, hq // value.shape[1]).float()
        v = v - v.mean(2, keepdim=True)  # |v_k - o_r| is shift-invariant; centring avoids cancellation
        v_sq = v.pow(2).sum(-1)  # [B, H, S]
    scale = softmax_scale(scaling, d)
    nb = math.ceil(s / block_size)
    out = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=query.device)
    pos = torch.arange(s, device=query.device)
    for qb0 in range(0, nb, chunk_blocks):
        qb1 = min(nb, qb0 + chunk_blocks)
        r0, r1 = qb0 * block_size, min(s, qb1 * block_size)
        scores = torch.matmul(q[:, :, r0:r1], k[:, :, :r1].transpose(-1, -2)) * scale
        allowed = (pos[r0:r1, None] >= pos[None, :r1]).expand(b, 1, r1 - r0, r1)
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, None, :r1].bool()
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # [B, H, rows, r1]
        if reduce == "contribution":  # weight each probability by |v_k - o_r|
            o = torch.matmul(probs, v[:, :, :r1])  # [B, H, rows, D]
            dist = v_sq[:, :, None, :r1] - 2 * torch.matmul(o, v[:, :, :r1].transpose(-1, -2))
            probs = probs * (dist + o.pow(2).sum(-1, keepdim=True)).clamp_min(0.0).sqrt()
        kpad = qb1 * block_size - r1
        if kpad:
            probs = torch.nn.functional.pad(probs, (0, kpad))
        tiles = probs.view(b, hq, r1 - r0, qb1, block_size)
        kb = tiles.amax(-1) if reduce == "max" else tiles.sum(-1)  # [B, H, rows, qb1]
        rpad = (qb1 - qb0) * block_size - (r1 - r0)
        counts = torch.full((qb1 - qb0,), float(block_size), device=query.device)
        if rpad:
            kb = torch.nn.functional.pad(kb, (0, 0, 0, rpad))
            counts[-1] = block_size - rpad
        rows = kb.view(b, hq, qb1 - qb0, block_size, qb1)
        if reduce == "max":
            per_block = rows.amax(3)
        else:
            per_block = rows.sum(3) / counts[None, None, :, None]
        out[:, :, qb0:qb1, :qb1] = per_block
    return out


@torch.no_grad()
def selection_drop(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_size: int,
    keeps: Sequence[torch.Tensor],
    scaling: float | None = None,
    *,
    chunk_blocks: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What each block selection changes in one layer's causal attention, from one pass over the
    dense map: (dropped mass, relative output error), each [K, Hq, nb] (batch 1; K = len(keeps)).

    `keeps[m]` is a [Hq, nb, nb] boolean block mask (True = computed). Per query row r the sparse
    kernel's output is the softmax over the kept keys only, o'_r = sum_kept p_rk v_k / m_r with m_r the
    kept dense mass; entry (m, h, i) is the mean over the rows of query block i of 1 - m_r (the mass
    dropped) and of |o'_r - o_r|, divided by the head's root-mean-square |o_r| over the whole sequence
    (the output error, exact: no bound, the same numbers as running the kernel). Cost: one dense
    map plus a per-block P.V product per layer, then O(S * nb * D) per mask."""
    _, hq, s, d = query.shape
    q = query[0].float()
    k = repeat_kv(key[:1], hq // key.shape[1])[0].float()
    v = repeat_kv(value[:1], hq // value.shape[1])[0].float()
    scale = softmax_scale(scaling, d)
    nb = math.ceil(s / block_size)
    pad = nb * block_size - s
    if pad:
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    vb = v.view(hq, nb, block_size, v.shape[-1])
    dev, K = query.device, len(keeps)
    masks = torch.stack([m.to(dev, torch.bool) for m in keeps]).float() if K else torch.zeros(0, hq, nb, nb)
    dropped = torch.zeros(K, hq, nb, device=dev)
    err = torch.zeros(K, hq, nb, device=dev)
    out_sq = torch.zeros(hq, device=dev)
    pos = torch.arange(nb * block_size, device=dev)
    for qb0 in range(0, nb, chunk_blocks):
        qb1 = min(nb, qb0 + chunk_blocks)
        r0, r1 = qb0 * block_size, min(s, qb1 * block_size)
        n_k = qb1 * block_size
        scores = torch.matmul(q[:, r0:r1], k[:, :n_k].transpose(-1, -2)) * scale  # [H, R, n_k]
        allowed = (pos[r0:r1, None] >= pos[None, :n_k]) & (pos[None, :n_k] < s)
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(hq, r1 - r0, qb1, block_size)
        tile_mass = probs.sum(-1)  # [H, R, qb1]
        # per (row, key block): sum over the block's keys of p_rk v_k
        tile_out = torch.matmul(probs.transpose(1, 2), vb[:, :qb1]).transpose(1, 2)  # [H, R, qb1, D]
        full = tile_out.sum(2)  # [H, R, D]: the dense output
        out_sq += full.pow(2).sum(-1).sum(-1)
        row_block = torch.div(torch.arange(r0, r1, device=dev), block_size, rounding_mode="floor")
        counts = torch.bincount(row_block - qb0, minlength=qb1 - qb0).float()
        for m in range(K):
            keep = masks[m][:, row_block, :qb1]  # [H, R, qb1]
            kept = (tile_mass * keep).sum(-1)  # [H, R]
            sparse = torch.matmul(keep.unsqueeze(-2), tile_out).squeeze(-2) / kept.clamp_min(1e-30)[..., None]
            e = (sparse - full).norm(dim=-1)  # [H, R]
            for val, acc in (((1.0 - kept).clamp_min(0.0), dropped), (e, err)):
                sums = torch.zeros(hq, qb1 - qb0, device=dev).index_add_(1, row_block - qb0, val)
                acc[m, :, qb0:qb1] = sums / counts
    rms = (out_sq / s).sqrt().clamp_min(1e-30)
    return dropped, err / rms[None, :, None]
