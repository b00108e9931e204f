"""`oracle`: the exact dense attention mass per (query block, key block), computed from q and k.

It costs a full causal QK^T (as much as dense attention), so it never makes anything faster: it is
the ceiling every other estimator is compared with (`sparsepilot bench quality`). With it, tau-mass
selection keeps exactly the blocks that carry the most attention."""

from __future__ import annotations

import torch

from sparse_core.estimators import EstimatorContext
from sparse_core.estimators.blocks import valid_blocks


def oracle_scores(q: torch.Tensor, k: torch.Tensor, ctx: EstimatorContext) -> torch.Tensor:
    from sparse_core.capture import block_attention_mass

    if ctx.key_valid is None:
        return block_attention_mass(q, k, ctx.block_size, ctx.scale)
    # padded keys: drop them from every row, then renormalise over the valid causal blocks
    mass = block_attention_mass(q, k, ctx.block_size, ctx.scale, key_valid=ctx.key_valid)
    vb = valid_blocks(ctx.key_valid, ctx.block_size, q.shape[2])
    mass = mass.masked_fill(~vb[:, None, None, :], 0.0)
    return mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
