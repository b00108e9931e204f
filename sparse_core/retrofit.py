"""Retrofit: switch a loaded transformers model to block-sparse attention and back.

Mechanism: one attention function registered in transformers' ``AttentionInterface`` (and the SDPA
mask builder under the same name in ``AttentionMaskInterface``, so the model builds the masks SDPA
would), selected with ``model.set_attn_implementation``. Each attention module gets a small state
attribute holding its layer's plan; weights and forward methods are untouched, and ``unsparsify``
restores the previous implementation and removes the attributes. ``with sparsified(model, plan):`` applies
a plan for the block's length and restores the dense model however the block ends.

Prefill (query length == key length, longer than one block) runs the sparse path. Cached decode steps
run sparse when the plan has a `decode` section (sparse_core.decode: page summaries kept beside the
cache, page selection per KV head, the decode kernel); without one they run dense, as do chunked
prefill against a cache, sliding-window layers longer than their window, attention dropout
in training, and masks that are not causal + key padding run dense SDPA, so results stay correct."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from sparse_core.decode.attention import DecodeStats, decode_attention_forward
from sparse_core.kernels import KERNELS, AttentionInfo, key_valid_from_mask, sparse_attention
from sparse_core.plan import PlanError, SparsePlan

IMPL_NAME = "sparsepilot_block_sparse"
_STATE_ATTR = "_sparsepilot_layer"
_MODEL_ATTR = "_sparsepilot"
_register_lock = threading.Lock()
_registered = False


@dataclass
class SparseStats:
    """What the sparse path did, per attention call (prefill calls only; dense fallbacks counted)."""

    calls: list[AttentionInfo] = field(default_factory=list)
    dense_fallbacks: int = 0

    def reset(self) -> None:
        self.calls.clear()
        self.dense_fallbacks = 0

    @property
    def density(self) -> float:
        """Share of causal blocks the sparse path computed: kept over causal blocks, summed over its
        calls (dense-layer calls keep all theirs), so a long call weighs by the blocks it covers and not
        as one call; NaN when none ran. Dense fallbacks (one-block prefills, unsupported masks) are not
        in it."""
        total = sum(c.causal_blocks for c in self.calls)
        if not total:
            return float("nan")
        return sum(c.density * c.causal_blocks for c in self.calls) / total

    @property
    def estimator_seconds(self) -> float:
        return sum(c.estimator_seconds for c in self.calls)

    @property
    def kernel_seconds(self) -> float:
        return sum(c.kernel_seconds for c in self.calls)

    def per_layer(self) -> dict[int, dict[str, Any]]:
        """Per layer: its calls ``n``, and its ``density`` and per-head ``heads`` densities weighted by
        causal blocks as `density` is."""
        out: dict[int, dict[str, Any]] = {}
        for c in self.calls:
            d = out.setdefault(
                c.layer_idx if c.layer_idx is not None else -1,
                {"n": 0, "density": 0.0, "heads": None, "blocks": 0},
            )
            w = c.causal_blocks
            d["n"] += 1
            d["blocks"] += w
            d["density"] += c.density * w
            if c.head_density:
                kept = [x * w for x in c.head_density]
                hd = d["heads"]
                d["heads"] = kept if hd is None else [a + b for a, b in zip(hd, kept, strict=True)]
        for d in out.values():
            blocks = d.pop("blocks")
            d["density"] = d["density"] / blocks if blocks else float("nan")
            if d["heads"] is not None:
                d["heads"] = [x / blocks if blocks else float("nan") for x in d["heads"]]
        return out


@dataclass
class _ModelState:
    plan: SparsePlan
    previous_impl: str | None
    kernel: str
    stats: SparseStats
    mask_cache: tuple[Any, Any] | None = None  # (mask tensor, key_valid or False if unsupported)
    decode_stats: DecodeStats = field(default_factory=DecodeStats)


@dataclass
class _LayerState:
    model_state: _ModelState
    layer_idx: int
    pages: Any = None  # sparse_core.decode.pages.PageSummaries of this layer's cached keys


def _ensure_registered() -> None:
    global _registered
    with _register_lock:
        if _registered:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(IMPL_NAME, block_sparse_attention_forward)
        AttentionMaskInterface.register(IMPL_NAME, sdpa_mask)
        _registered = True


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    mods = []
    for m in model.modules():
        if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "k_proj") and hasattr(m, "q_proj"):
            mods.append(m)
    return mods


def _check_decode_weights(plan: SparsePlan) -> None:
    """A learned decode scorer needs the plan's weights for its estimator (checked like a prefill
    layer's: no or misfit weights fail now) and pages pooled like its blocks."""
    from sparse_core.decode.scoring import decode_gate

    for name in sorted(plan.decode.estimators()):
        gate = decode_gate(plan, name)
        if gate is None:
            continue
        if (plan.decode.page_size or plan.block_size) != gate.block_size:
            raise PlanError(
                f"plan.decode.page_size {plan.decode.page_size} with estimator {name!r}: the gate's key "
                f"features are pooled over {gate.pooled_over} ({gate.block_size} tokens); use that page size"
            )


def sparsify(model: torch.nn.Module, plan: SparsePlan, *, kernel: str = "auto") -> torch.nn.Module:
    """Switch `model` to block-sparse prefill attention following `plan`. Reversible with
    `unsparsify`; calling it again replaces the plan. Returns the model."""
    if not isinstance(plan, SparsePlan):
        raise TypeError(f"plan must be a SparsePlan, got {type(plan).__name__}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    config = model.config
    plan.validate_for(config)
    from sparse_core.estimators import get_estimator

    for layer in range(int(config.num_hidden_layers)):
        get_estimator(plan.layer_params(layer).estimator)  # unknown estimator: fail now, not mid-forward
    if plan.decode is not None:
        _check_decode_weights(plan)
    mods = _attention_modules(model)
    if not mods:
        raise PlanError(f"{type(model).__name__} has no attention modules with q_proj/k_proj and a layer_idx")
    _refuse_unsupported_attention(model, mods)
    _ensure_registered()
    existing: _ModelState | None = getattr(model, _MODEL_ATTR, None)
    previous = existing.previous_impl if existing else getattr(config, "_attn_implementation", None)
    state = _ModelState(plan=plan, previous_impl=previous, kernel=kernel, stats=SparseStats())
    for m in mods:
        setattr(m, _STATE_ATTR, _LayerState(state, m.layer_idx))
    object.__setattr__(model, _MODEL_ATTR, state)
    model.set_attn_implementation(IMPL_NAME)
    return model


# Attention inputs the block-sparse kernels do not implement. Dropping one changes the answers even at
# density 1.0 (gpt-oss's per-head sink logits `s_aux`), and the dense fallback (SDPA) drops them too, so
# a model whose attention uses them is refused, never run on a silently different attention.
UNSUPPORTED_ATTENTION_INPUTS = ("s_aux", "sinks")


def _refuse_unsupported_attention(model: torch.nn.Module, mods: list[torch.nn.Module]) -> None:
    kind = getattr(model.config, "model_type", type(model).__name__)
    for m in mods:
        for attr in UNSUPPORTED_ATTENTION_INPUTS:
            if getattr(m, attr, None) is not None:
                raise PlanError(
                    f"{kind}: attention layer {m.layer_idx} ({type(m).__name__}) has {attr!r} (attention "
                    "sinks), which the block-sparse kernels do not implement; this model cannot be sparsified"
                )


def unsparsify(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `sparsify`: previous attention implementation back, our attributes removed."""
    state: _ModelState | None = getattr(model, _MODEL_ATTR, None)
    if state is None:
        return model
    for m in _attention_modules(model):
        if hasattr(m, _STATE_ATTR):
            delattr(m, _STATE_ATTR)
    object.__delattr__(model, _MODEL_ATTR)
    model.set_attn_implementation(state.previous_impl or "sdpa")
    return model


@contextmanager
def sparsified(
    model: torch.nn.Module, plan: SparsePlan, *, kernel: str = "auto"
) -> Iterator[torch.nn.Module]:
    """`sparsify(model, plan, kernel=kernel)` for the length of a ``with`` block, then `unsparsify`
    whether the block ends normally or raises (its exception goes on). A plan `sparsify` refuses
    raises before the block runs, and leaves the model as it was."""
    sparsify(model, plan, kernel=kernel)
    try:
        yield model
    finally:
        unsparsify(model)


def is_sparsified(model: torch.nn.Module) -> bool:
    return getattr(model, _MODEL_ATTR, None) is not None


def sparse_stats(model: torch.nn.Module) -> SparseStats:
    state: _ModelState | None = getattr(model, _MODEL_ATTR, None)
    if state is None:
        raise ValueError("model is not sparsified")
    return state.stats


def decode_stats(model: torch.nn.Module) -> DecodeStats:
    """What sparse decode did since `sparsify` (or the last `reset()`)."""
    state: _ModelState | None = getattr(model, _MODEL_ATTR, None)
    if state is None:
        raise ValueError("model is not sparsified")
    return state.decode_stats


def _padding_only(state: _ModelState, mask: torch.Tensor, seq_len: int) -> torch.Tensor | None | bool:
    """key_valid [B, S] when `mask` is exactly causal + key padding (on the rows of real tokens),
    None when it is plain causal, False when it is something else (sliding window, packing...).
    Cached per mask tensor: every layer of one forward receives the same mask object."""
    if state.mask_cache is not None and state.mask_cache[0] is mask:
        return state.mask_cache[1]
    result: Any = False
    if mask.ndim == 4 and mask.shape[-1] == seq_len and mask.shape[-2] == seq_len:
        keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        kv = key_valid_from_mask(mask, seq_len)
        kv_full = (
            kv if kv is not None else torch.ones(mask.shape[0], seq_len, dtype=torch.bool, device=mask.device)
        )
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).tril_()
        expected = causal[None, None] & kv_full[:, None, None, :]
        rows = kv_full[:, None, :, None]  # compare only rows of real tokens
        if bool(((keep == expected) | ~rows).all()):
            result = kv
    state.mask_cache = (mask, result)
    return result


def block_sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer: _LayerState | None = getattr(module, _STATE_ATTR, None)

    def dense() -> tuple[torch.Tensor, None]:
        if layer is not None:
            layer.model_state.stats.dense_fallbacks += 1
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    if layer is None:
        return dense()
    unknown = [k for k in UNSUPPORTED_ATTENTION_INPUTS if kwargs.get(k) is not None]
    if unknown:  # an attention module `sparsify` could not tell apart: refuse rather than answer wrongly
        raise PlanError(
            f"attention layer {layer.layer_idx} passes {unknown}, which the block-sparse kernels "
            "do not implement; this model cannot be sparsified"
        )
    state = layer.model_state
    if state.plan.decode is not None:
        done = decode_attention_forward(
            layer, module, query, key, value, attention_mask, scaling, dropout, kwargs
        )
        if done is not None:
            return done
    q_len, kv_len = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")
    if (
        q_len != kv_len
        or q_len <= state.plan.block_size
        or (dropout > 0.0 and module.training)
        or (window is not None and kv_len > window)
        or kwargs.get("softcap") is not None
        or not getattr(module, "is_causal", True)
    ):
        return dense()
    key_valid = None
    if attention_mask is not None:
        kv = _padding_only(state, attention_mask, q_len)
        if kv is False:
            return dense()
        key_valid = kv
    out, info = sparse_attention(
        query,
        key,
        value,
        state.plan,
        kernel=state.kernel,
        attention_mask=None if key_valid is None else key_valid,
        layer_idx=layer.layer_idx,
        scale=scaling,
        module=module,
    )
    state.stats.calls.append(info)
    return out.transpose(1, 2).contiguous(), None
