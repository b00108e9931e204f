"""Padding a sequence to whole blocks for the block-sparse kernels, and `on_whole_blocks`, which gives a
kernel's body its padded inputs and cuts its output back."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparse_core.estimators.blocks import softmax_scale
from sparse_core.selection import BlockSelection

# A kernel's body: q/k/v [B, H, S', D] and key_valid padded to whole blocks, the selection, the softmax
# scale -> out [B, Hq, S', D].
BlockBody = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, BlockSelection, torch.Tensor | None, float], torch.Tensor
]
# The kernel run_kernel calls: (q, k, v, sel, *, key_valid=None, scale=None) -> out [B, Hq, S, D].
BlockKernel = Callable[..., torch.Tensor]


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


def on_whole_blocks(blocks: Callable[[int], int] | None = None) -> Callable[[BlockBody], BlockKernel]:
    """A block-sparse kernel from its body: the kernel resolves the softmax scale, pads q/k/v and
    key_valid (pad_to_blocks) to `blocks(sel.num_blocks)` whole blocks (default: the selection's own
    count), runs the body on them and cuts its output back to the sequence's length."""

    def wrap(body: BlockBody) -> BlockKernel:
        @functools.wraps(body)
        def kernel(
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            sel: BlockSelection,
            *,
            key_valid: torch.Tensor | None = None,
            scale: float | None = None,
        ) -> torch.Tensor:
            s = q.shape[2]
            sp = (blocks(sel.num_blocks) if blocks else sel.num_blocks) * sel.block_size
            scale = softmax_scale(scale, q.shape[3])
            q, k, v, key_valid = pad_to_blocks(q, k, v, key_valid, sp)
            out = body(q, k, v, sel, key_valid, scale)
            return out[:, :, :s] if sp != s else out

        return kernel

    return wrap
