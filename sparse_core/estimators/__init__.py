"""Block-importance estimators: pure functions from (q, k) to per-block attention-mass estimates.

Contract of an estimator ``fn(q, k, ctx) -> Tensor``:
- q ``[B, Hq, S, D]`` and k ``[B, Hkv, S, D]`` are the post-RoPE queries/keys of one layer
  (Hq a multiple of Hkv);
- returns float32 ``[B, Hq, nb, nb]`` with ``nb = ceil(S / ctx.block_size)``: for each query head and
  query block, an estimate of the share of attention mass on each key block. Entries above the
  diagonal (non-causal) must be 0 and each row should sum to ~1 over the causal key blocks.

Estimators register by name (`register_estimator`); `get_estimator(name)` imports a built-in's module
(the `_BUILTIN_MODULES` table) on first use, so a module that registers itself on import is found by
name from a plan.

Training-free: ``pooled``, ``antidiagonal``, ``quest``; learned: ``gate``, ``gate_v2`` (weights in the
plan's tensors); ``oracle`` (exact block mass, as costly as dense attention) is the ceiling the
benchmark compares against."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sparse_core.plan import PlanError


@dataclass(frozen=True)
class EstimatorContext:
    block_size: int
    layer_idx: int | None = None
    plan: Any = None  # the SparsePlan (carries plan.tensors, e.g. learned gate weights)
    key_valid: torch.Tensor | None = None  # [B, S] bool, False = padding; None = all valid
    scale: float | None = None  # softmax scale of the attention (default 1/sqrt(D))
    module: Any = None  # the attention module when called from a model (None in the functional API)
    positions: torch.Tensor | None = None  # [B, S] token positions (None: 0..S-1, or derived from padding)


Estimator = Callable[[torch.Tensor, torch.Tensor, EstimatorContext], torch.Tensor]

_REGISTRY: dict[str, Estimator] = {}
# name -> the module that registers it on import (the learned scorers' modules are named so they cannot
# be taken for rollout's statistical gate; their registered names stay, so old plans load)
_BUILTIN_MODULES = {
    "pooled": "sparse_core.estimators.pooled",
    "antidiagonal": "sparse_core.estimators.antidiagonal",
    "quest": "sparse_core.estimators.quest",
    "gate": "sparse_core.estimators.learned_gate",
    "gate_v2": "sparse_core.estimators.learned_gate_v2",
    "oracle": "sparse_core.estimators.oracle",
}


def register_estimator(name: str, fn: Estimator, *, overwrite: bool = False) -> Estimator:
    if not name or not isinstance(name, str):
        raise ValueError("estimator name must be a non-empty string")
    if name in _REGISTRY and _REGISTRY[name] is not fn and not overwrite:
        raise ValueError(f"estimator {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn


def get_estimator(name: str) -> Estimator:
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        raise PlanError(f"unknown estimator {name!r}; available: {available_estimators()}")
    return _REGISTRY[name]


def available_estimators() -> list[str]:
    for mod in _BUILTIN_MODULES.values():
        importlib.import_module(mod)
    return sorted(_REGISTRY)


def num_blocks(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


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


def valid_blocks(key_valid: torch.Tensor | None, block_size: int, seq_len: int) -> torch.Tensor | None:
    """[B, S] bool -> [B, nb] bool: a block is valid when any of its positions is."""
    if key_valid is None:
        return None
    n = num_blocks(seq_len, block_size)
    pad = n * block_size - seq_len
    kv = torch.nn.functional.pad(key_valid, (0, pad), value=False) if pad else key_valid
    return kv.view(kv.shape[0], n, block_size).any(dim=-1)


__all__ = [
    "Estimator",
    "EstimatorContext",
    "available_estimators",
    "block_pool_mean",
    "causal_block_mask",
    "get_estimator",
    "num_blocks",
    "register_estimator",
    "valid_blocks",
]
