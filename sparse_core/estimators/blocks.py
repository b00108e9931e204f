"""Block helpers the estimators share: block counts, the causal block mask, per-block mean pooling and
the valid (non-padding) blocks of a batch."""

from __future__ import annotations

from typing import Any

import torch


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
