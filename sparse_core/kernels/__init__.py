"""`sparse_attention`: the functional entry point (estimate -> select -> kernel), used by the model
retrofit and usable on its own.

Kernels: ``gather`` (plain PyTorch, no compiler), ``flex`` (compiled FlexAttention), ``dense``
(SDPA; ignores the selection). ``auto`` picks gather on CPU (as fast as compiled flex here, with
no compile latency; see docs/sparse_core.md) and flex on CUDA."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sparse_core.estimators import EstimatorContext, available_estimators, get_estimator
from sparse_core.plan import LayerParams, SparsePlan
from sparse_core.selection import BlockSelection, group_scores, select_blocks, selection_tensors, sharpen

KERNELS = ("auto", "gather", "flex", "dense")
GATHER_COUNT_LEVELS = 8


@dataclass
class AttentionInfo:
    density: float  # kept / causal blocks actually computed (1.0 when dense)
    estimator_seconds: float  # estimator + selection wall time
    kernel: str  # the kernel that ran
    kernel_seconds: float = 0.0
    seq_len: int = 0
    layer_idx: int | None = None
    head_density: list[float] = field(default_factory=list)  # per selection head
    selection: BlockSelection | None = field(default=None, repr=False)
    # causal blocks the call covers (batch x query heads x n(n+1)/2): density's denominator, so calls
    # of different lengths are summed by the blocks they stand for (`causal_block_count`)
    causal_blocks: int = 0


def causal_block_count(batch: int, heads: int, seq_len: int, block_size: int) -> int:
    """Causal key blocks of a prefill: `heads` x (n(n+1)/2, n = whole or partial blocks) per row."""
    n = -(-seq_len // block_size)
    return batch * heads * n * (n + 1) // 2


def available_kernels(device: torch.device | str = "cpu") -> list[str]:
    from sparse_core.kernels.flex import flex_available

    out = ["gather", "dense"]
    if flex_available(device):
        out.insert(1, "flex")
    return out


def resolve_kernel(kernel: str, device: torch.device) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    if kernel != "auto":
        return kernel
    return "flex" if device.type == "cuda" else "gather"


def key_valid_from_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """Accept a 2D key-padding mask [B, S] (1/True = token) or a 4D mask [B, 1|H, S, S] (bool
    True = attend, or additive float); return a contiguous [B, S] bool (the kernels and estimators
    reshape it into blocks) or None when nothing is padded. A 4D mask's key row is its diagonal, a
    strided view into the [S, S] mask, so it is copied out."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.ndim == 2:
        kv = m.bool() if m.dtype == torch.bool else m != 0
    elif m.ndim == 4:
        keep = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        kv = keep[:, 0].diagonal(dim1=-2, dim2=-1)
    else:
        raise ValueError(f"attention_mask must be 2D [B, S] or 4D [B, H, S, S], got {tuple(m.shape)}")
    if kv.shape[-1] != seq_len:
        raise ValueError(f"attention_mask covers {kv.shape[-1]} keys but the sequence has {seq_len}")
    return None if bool(kv.all()) else kv.contiguous()


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a host clock read after it times the work (CUDA is async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def _compiled_scores(name: str, groups_to: int | None):
    """A training-free estimator (and the head grouping) as one compiled function per estimator."""
    estimator = get_estimator(name)

    def scores(q: torch.Tensor, k: torch.Tensor, ctx: EstimatorContext) -> torch.Tensor:
        out = estimator(q, k, ctx)
        return group_scores(out, groups_to) if groups_to else out

    return torch.compile(scores)  # shapes specialised first, made dynamic on a second length


@functools.cache
def _compiled_selection():
    return torch.compile(selection_tensors)


def compiles_selection(device: torch.device, estimator: str) -> bool:
    """Whether `estimate_and_select` runs compiled by default: on CUDA, for training-free estimators.
    There the eager path is launch-bound (pooled's is 89 small ATen calls at any length, ~1.2 ms on an
    H200, more than dense bf16 attention up to 16k: docs/sparse_core.md, "On a GPU"); on the CPU the
    calls are not the cost, and learned estimators keep their own caches."""
    return device.type == "cuda" and estimator in available_estimators("training-free")


def estimate_and_select(
    q: torch.Tensor,
    k: torch.Tensor,
    plan: SparsePlan,
    params: LayerParams,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    module: Any = None,
    count_levels: int | None = None,
    compiled: bool | None = None,
) -> BlockSelection:
    """The layer's selection. ``compiled``: run the estimator and the selection rule through
    torch.compile (the same functions, fused; None = `compiles_selection`'s default)."""
    b, hq, s, _ = q.shape
    hkv = k.shape[1]
    if compiled is None:
        compiled = compiles_selection(q.device, params.estimator)
    ctx = EstimatorContext(
        block_size=plan.block_size,
        layer_idx=params.layer_idx,
        plan=plan,
        key_valid=key_valid,
        scale=scale,
        module=module,
    )
    grouped = plan.group_heads and hkv != hq
    with torch.no_grad():
        if compiled:
            scores = _compiled_scores(params.estimator, hkv if grouped else None)(q, k, ctx)
        else:
            scores = get_estimator(params.estimator)(q, k, ctx)
            if grouped:
                scores = group_scores(scores, hkv)
        scores = sharpen(scores, params.sharpen)
    tau: float | torch.Tensor = params.tau
    if params.head_tau:
        t = torch.full((hq,), params.tau)
        for h, v in params.head_tau.items():
            t[h] = v
        tau = t
    if grouped and isinstance(tau, torch.Tensor):
        tau = tau.view(hkv, hq // hkv).max(dim=1).values
    if isinstance(tau, torch.Tensor):
        tau = tau.to(q.device)
    return select_blocks(
        scores,
        block_size=plan.block_size,
        seq_len=s,
        tau=tau,
        sink_blocks=params.sink_blocks,
        local_blocks=params.local_blocks,
        top_k=params.top_k,
        min_density=params.min_density,
        count_levels=count_levels,
        core=_compiled_selection() if compiled else None,
    )


def run_kernel(
    kernel: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: BlockSelection | None,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    if kernel == "dense" or sel is None:
        from sparse_core.kernels.dense import dense_attention

        return dense_attention(q, k, v, key_valid=key_valid, scale=scale)
    if kernel == "gather":
        from sparse_core.kernels.gather import gather_attention

        return gather_attention(q, k, v, sel, key_valid=key_valid, scale=scale)
    if kernel == "flex":
        from sparse_core.kernels.flex import flex_sparse_attention

        return flex_sparse_attention(q, k, v, sel, key_valid=key_valid, scale=scale)
    raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SparsePlan,
    *,
    kernel: str = "auto",
    attention_mask: torch.Tensor | None = None,
    layer_idx: int = 0,
    scale: float | None = None,
    module: Any = None,
    keep_selection: bool = False,
    compiled_selection: bool | None = None,
) -> tuple[torch.Tensor, AttentionInfo]:
    """Causal block-sparse attention. q [B, Hq, S, D], k/v [B, Hkv, S, D] -> (out [B, Hq, S, D], info).

    ``attention_mask``: optional key-padding mask ([B, S], 1 = token) or a 4D causal+padding mask as
    transformers builds it. Outputs at padded query positions are zeros. ``compiled_selection``: see
    `estimate_and_select`'s ``compiled`` (None: compiled on CUDA for training-free estimators)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k, v must be 4D [B, H, S, D]")
    b, hq, s, d = q.shape
    if k.shape[2] != s or v.shape[2] != s:
        raise ValueError(
            f"sparse_attention is for prefill (q and k of equal length); got {s} vs {k.shape[2]}"
        )
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]})")
    dev = q.device
    kname = resolve_kernel(kernel, dev)
    key_valid = key_valid_from_mask(attention_mask, s)
    params = plan.layer_params(layer_idx)
    if kname == "dense" or params.dense or s <= plan.block_size:
        synchronize(dev)
        t0 = time.perf_counter()
        out = run_kernel("dense", q, k, v, None, key_valid=key_valid, scale=scale)
        synchronize(dev)
        blocks = causal_block_count(b, hq, s, plan.block_size)
        return out, AttentionInfo(
            1.0, 0.0, "dense", time.perf_counter() - t0, s, layer_idx, causal_blocks=blocks
        )
    synchronize(dev)
    t0 = time.perf_counter()
    # gather runs one call per distinct block count: round counts up to 8 sizes per octave
    levels = GATHER_COUNT_LEVELS if kname == "gather" else None
    sel = estimate_and_select(
        q,
        k,
        plan,
        params,
        key_valid=key_valid,
        scale=scale,
        module=module,
        count_levels=levels,
        compiled=compiled_selection,
    )
    synchronize(dev)
    t1 = time.perf_counter()
    out = run_kernel(kname, q, k, v, sel, key_valid=key_valid, scale=scale)
    synchronize(dev)
    t2 = time.perf_counter()
    info = AttentionInfo(
        density=sel.density,
        estimator_seconds=t1 - t0,
        kernel=kname,
        kernel_seconds=t2 - t1,
        seq_len=s,
        layer_idx=layer_idx,
        head_density=sel.head_density.tolist(),
        selection=sel if keep_selection else None,
        causal_blocks=causal_block_count(b, hq, s, plan.block_size),
    )
    return out, info


__all__ = [
    "KERNELS",
    "AttentionInfo",
    "available_kernels",
    "causal_block_count",
    "compiles_selection",
    "estimate_and_select",
    "key_valid_from_mask",
    "resolve_kernel",
    "synchronize",
    "run_kernel",
    "sparse_attention",
]
