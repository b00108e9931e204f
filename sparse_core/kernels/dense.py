"""Dense causal SDPA: the reference every sparse kernel is measured and tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention, q [B, Hq, S, D], k/v [B, Hkv, S, D]; padded keys (key_valid False) masked.
    Rows with no visible key (padded queries) come out as zeros, never NaN."""
    gqa = q.shape[1] != k.shape[1]
    if key_valid is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    s = q.shape[2]
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril_()
    mask = causal[None, None] & key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return torch.nan_to_num(out, nan=0.0)
