"""Fidelity of a (sparsified) model against its own dense outputs on the same token windows.

Measured on the last `fraction` of each window's positions (default: the second half): that is where
a query sees the most key blocks and a sparse plan drops the most, and it halves the memory the dense
reference log-probabilities take (positions x vocabulary floats).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from sparse_core.prefill_bound import BLOCK_POSITIONS, blocks_per_window, scored_positions  # torch-free


@dataclass
class Fidelity:
    kl: float  # mean next-token KL(dense || sparse), nats
    agree: float  # top-1 agreement with dense
    nll_dense: float  # mean next-token NLL of the text under the dense model
    nll_sparse: float
    nll_delta: float  # (nll_sparse - nll_dense) / nll_dense
    n_positions: int
    # per block of BLOCK_POSITIONS consecutive scored positions of one window: (positions, KL sum,
    # agreements, next tokens, NLL(sparse) - NLL(dense) sum, NLL(dense) sum), what `fidelity_bound`
    # needs; not in to_dict
    blocks: list[tuple[int, float, float, int, float, float]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("blocks")
        return d

    @classmethod
    def identical(cls, ref: DenseReference) -> Fidelity:
        return cls(0.0, 1.0, ref.nll, ref.nll, 0.0, ref.n_positions)

    @classmethod
    def from_blocks(cls, blocks: list[tuple[int, float, float, int, float, float]]) -> Fidelity:
        """The point estimates of these blocks' positions together (means over positions; NLL over
        the positions with a next token), the blocks kept for `fidelity_bound`."""
        n = sum(b[0] for b in blocks)
        n_next = sum(b[3] for b in blocks)
        diff, dense = sum(b[4] for b in blocks), sum(b[5] for b in blocks)
        nll_dense = dense / max(n_next, 1)
        return cls(
            kl=sum(b[1] for b in blocks) / max(n, 1),
            agree=sum(b[2] for b in blocks) / max(n, 1),
            nll_dense=nll_dense,
            nll_sparse=nll_dense + diff / max(n_next, 1),
            nll_delta=diff / dense if dense > 0 else 0.0,
            n_positions=n,
            blocks=list(blocks),
        )


@dataclass
class DenseReference:
    windows: list[list[int]]
    keep: list[int]  # positions scored per window (the last `keep`)
    logprobs: list[torch.Tensor]  # [keep, V] float32
    nll: float
    n_positions: int


def _logits(model, ids: Sequence[int], keep: int) -> torch.Tensor:
    dev = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(ids)], device=dev), logits_to_keep=keep)
    return out.logits[0].float()


def _next_token_logprobs(logprobs: torch.Tensor, ids: Sequence[int], keep: int) -> torch.Tensor:
    """Log-probabilities of the next tokens of the scored positions that fall inside the window (keep - 1
    of them; the last scored position's next token is outside)."""
    targets = torch.tensor(list(ids[len(ids) - keep + 1 :]), device=logprobs.device, dtype=torch.long)
    return logprobs[:-1].gather(1, targets[:, None])[:, 0]


def block_count(window_lens: Sequence[int], fraction: float) -> int:
    """How many blocks of `BLOCK_POSITIONS` scored positions windows of these lengths give."""
    return sum(blocks_per_window(window_lens, fraction))


@torch.inference_mode()
def dense_reference(
    model,
    windows: Sequence[Sequence[int]],
    *,
    fraction: float = 0.5,
    progress: Callable[[int], None] | None = None,
) -> DenseReference:
    """Dense log-probabilities on the scored positions of each window (run with the model dense)."""
    keeps, lps, tot, n = [], [], 0.0, 0
    for w in windows:
        keep = scored_positions(len(w), fraction)
        lp = torch.log_softmax(_logits(model, w, keep), dim=-1)
        t = _next_token_logprobs(lp, w, keep)
        tot, n = tot - float(t.sum()), n + t.numel()
        keeps.append(keep)
        lps.append(lp)
        if progress:
            progress(1)
    return DenseReference([list(w) for w in windows], keeps, lps, tot / max(n, 1), sum(keeps))


@torch.inference_mode()
def measure_fidelity(
    model, ref: DenseReference, *, progress: Callable[[int], None] | None = None
) -> Fidelity:
    """Run the model as it is now (sparse or not) on the reference windows and compare."""
    kl_sum, agree_sum, pos, nll_sum, nll_n = 0.0, 0.0, 0, 0.0, 0
    blocks: list[tuple[int, float, float, int, float, float]] = []
    for w, keep, dlp in zip(ref.windows, ref.keep, ref.logprobs, strict=True):
        slp = torch.log_softmax(_logits(model, w, keep), dim=-1)
        kl = (dlp.exp() * (dlp - slp)).sum(-1).clamp_min(0)
        agree = (dlp.argmax(-1) == slp.argmax(-1)).double()
        kl_sum += float(kl.sum())
        agree_sum += float(agree.sum())
        pos += keep
        s_t = _next_token_logprobs(slp, w, keep)
        nll_sum, nll_n = nll_sum - float(s_t.sum()), nll_n + s_t.numel()
        d_t = _next_token_logprobs(dlp, w, keep).double()
        blocks += block_sums(kl, agree, d_t - s_t.double(), -d_t)  # NLL(sparse) - NLL(dense), NLL(dense)
        if progress:
            progress(1)
    nll_sparse = nll_sum / max(nll_n, 1)
    return Fidelity(
        kl=kl_sum / max(pos, 1),
        agree=agree_sum / max(pos, 1),
        nll_dense=ref.nll,
        nll_sparse=nll_sparse,
        nll_delta=(nll_sparse - ref.nll) / ref.nll if ref.nll > 0 else 0.0,
        n_positions=pos,
        blocks=blocks,
    )


def block_sums(
    kl: torch.Tensor,
    agree: torch.Tensor,
    nll_diff: torch.Tensor,
    nll_dense: torch.Tensor,
    size: int = BLOCK_POSITIONS,
) -> list[tuple[int, float, float, int, float, float]]:
    """`Fidelity.blocks` of one window's per-position values: KL, agreement (1/0), and for the
    positions whose next token is known NLL(sparse) - NLL(dense) and NLL(dense), by `size` positions."""
    out = []
    for b0 in range(0, kl.numel(), size):
        b1 = b0 + size
        d = nll_diff[b0:b1]
        out.append(
            (
                kl[b0:b1].numel(),
                float(kl[b0:b1].sum()),
                float(agree[b0:b1].sum()),
                d.numel(),
                float(d.sum()),
                float(nll_dense[b0:b1].sum()),
            )
        )
    return out
