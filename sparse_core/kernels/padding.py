"""Padding a sequence to whole blocks for the block-sparse kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, padded_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q/k/v [B, H, S, D] zero-padded to `padded_len` positions (a padded key marked invalid when
    `key_valid` is given; causal attention keeps it from every real query anyway); a `key_valid` with
    every key valid becomes None, the kernels' unmasked path."""
    s = q.shape[2]
    if padded_len != s:
        q, k, v = (F.pad(x, (0, 0, 0, padded_len - s)) for x in (q, k, v))
        if key_valid is not None:
            key_valid = F.pad(key_valid, (0, padded_len - s), value=False)
    if key_valid is not None and bool(key_valid.all()):
        key_valid = None
    return q, k, v, key_valid
