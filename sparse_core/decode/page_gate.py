"""`page_gate`: a learned decode page scorer, trained on what decode asks -- one query token against
the pages of the cache before it. SeerAttention-R (Gao et al., June 2025) trains its decode gate the
same way, with no query pooling; it projects a GQA group's queries down to one per KV head, where
this gate keeps gate_v2's per-head query projection and selection averages the heads' page masses.

gate_v2 scores decode pages with weights trained on 64-row query blocks; a decode query is a single
token, and its pages are Quest's 16-token ones, not the prefill blocks. `page_gate` has gate_v2's
geometry (per-head query projection, per-KV-head projection of each page's pre-rotary (max, min,
mean) keys, both rotated at their page's first position, temperature, learned log-tokens prior; the
same decode scoring path, `decode.scoring.gate_v2_page_logits`) but its own weights, trained at the
decode page size on single query rows: for rows t of a few calibration windows (one dense forward
each, q and k captured per layer), the target is each query head's exact attention mass per page of
keys 0..t, the newest page pooled over its keys so far, as decode pools it. Training minimises the
cross-entropy to that target per layer (Adam, full batch). The weights travel in the plan's tensors
as `page_gate.*` beside any prefill gate's.

Measured on SmolLM2 (docs/sparse_core.md, "A decode-trained page gate")."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sparse_core.estimators.blocks import block_max_min_mean
from sparse_core.estimators.learned_gate import GateCache, GateShape, GateShapeError
from sparse_core.estimators.learned_gate_v2 import BlockGateV2, LayerGateV2, rope_cos_sin, unrotate

TENSOR_PREFIX = "page_gate"
PAGE_SIZE_KEY = f"{TENSOR_PREFIX}.page_size"
# training defaults, decode calibration's (DecodeLimits.page_gate_*) and the decode benchmark's
WINDOWS, ROWS_PER_WINDOW, STEPS = 2, 256, 150


class PageGate(BlockGateV2):
    """All layers' page gates; `block_size` is the page size it was trained at (kept in the tensors)."""

    prefix = TENSOR_PREFIX
    pooled_over = "the page size it was trained at"

    def __init__(self, shape: GateShape, page_size: int, inv_freq: torch.Tensor, rope_scaling: float = 1.0):
        super().__init__(shape, page_size, inv_freq, rope_scaling, target="mass")

    @property
    def page_size(self) -> int:
        return self.block_size

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().to_tensors(), PAGE_SIZE_KEY: torch.tensor([self.page_size])}

    @classmethod
    def from_plan_tensors(cls, tensors: dict[str, torch.Tensor]) -> PageGate:
        if PAGE_SIZE_KEY not in tensors:
            raise GateShapeError(cls.missing_weights_message())
        return cls.from_tensors(tensors, int(tensors[PAGE_SIZE_KEY].reshape(-1)[0]))

    @classmethod
    def missing_weights_message(cls) -> str:
        return (
            "plan's decode uses estimator 'page_gate' but the plan carries no page_gate weights; "
            "calibrate decode with estimator 'page_gate' (it trains them) or load the plan with its "
            "plan_tensors.safetensors"
        )


_GATES = GateCache(f"{TENSOR_PREFIX}.0.wq")


def page_gate_for_plan(plan) -> PageGate:
    """The PageGate a plan carries (cached per plan tensors dict and weights); a PlanError when it has
    none."""
    tensors = getattr(plan, "tensors", None) or {}
    return _GATES.get(tensors, lambda: PageGate.from_plan_tensors(tensors))  # GateShapeError: a PlanError


# -- training rows (pure) ---------------------------------------------------------------------------


@dataclass
class PageRows:
    """One layer's decode rows of one window: what the gate sees and what it should predict."""

    query: torch.Tensor  # [Hq, R, D] pre-rotary query of each row
    page_pos: torch.Tensor  # [R] first position of each row's own (newest) page
    pages: torch.Tensor  # [Hkv, nF, 3D] pre-rotary (max, min, mean) keys of the window's complete pages
    newest: torch.Tensor  # [Hkv, R, 3D] the same over each row's newest page, up to the row
    newest_count: torch.Tensor  # [R] keys in that page
    target: torch.Tensor  # [Hq, R, nP] exact attention mass per page of keys 0..t (0 past the row's page)


def sample_rows(seq_len: int, n: int, page_size: int, generator: torch.Generator) -> torch.Tensor:
    """Up to `n` distinct rows, ascending, among those with at least 4 pages of keys before them."""
    low = min(seq_len - 1, 4 * page_size)
    span = seq_len - low
    pick = torch.randperm(span, generator=generator)[: min(n, span)]
    return torch.sort(pick + low).values


@torch.no_grad()
def page_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: torch.Tensor,
    page_size: int,
    scale: float,
    inv_freq: torch.Tensor,
    rope_scaling: float = 1.0,
) -> PageRows:
    """Post-rotary q [Hq, S, D], k [Hkv, S, D] of one window (positions 0..S-1) -> the rows' features
    and targets. The newest page of a row is pooled over its keys up to the row (running max / min /
    sum within each page), as decode pools a partial page."""
    hq, s, d = query.shape
    hkv = key.shape[0]
    ps = page_size
    n_pages, n_full = math.ceil(s / ps), s // ps
    cos, sin = rope_cos_sin(torch.arange(s, device=key.device), inv_freq)
    ku = unrotate(key.float(), cos, sin, rope_scaling)  # [Hkv, S, D]
    padded = torch.nn.functional.pad(ku, (0, 0, 0, n_pages * ps - s)).view(hkv, n_pages, ps, d)
    run_max = padded.cummax(2).values.view(hkv, -1, d)
    run_min = padded.cummin(2).values.view(hkv, -1, d)
    run_sum = padded.cumsum(2).view(hkv, -1, d)
    within = (rows % ps).float() + 1.0  # keys of the row's page up to the row
    newest = torch.cat([run_max[:, rows], run_min[:, rows], run_sum[:, rows] / within[None, :, None]], -1)
    pages = block_max_min_mean(ku[None, :, : n_full * ps], ps)[0]
    qu = unrotate(query.float()[:, rows], cos[rows], sin[rows], rope_scaling)
    # exact per-head page mass of each row over keys 0..t
    g = hq // hkv
    logits = torch.matmul(
        query.float()[:, rows].view(hkv, g, len(rows), d), key.float()[:, None].transpose(-1, -2)
    )
    logits = logits.view(hq, len(rows), s) * scale
    logits.masked_fill_(torch.arange(s, device=key.device)[None, :] > rows[:, None], float("-inf"))
    probs = torch.nn.functional.pad(torch.softmax(logits, -1), (0, n_pages * ps - s))
    target = probs.view(hq, len(rows), n_pages, ps).sum(-1)
    return PageRows(qu, rows - rows % ps, pages, newest, within, target)


def row_log_probs(layer: LayerGateV2, r: PageRows, page_size: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """[Hq, R, nP] the gate's log page distribution for each row: complete pages before the row's
    own, its newest page (partial or not), nothing after -- `gate_v2_page_logits` for these rows."""
    hq, n_rows, _ = r.query.shape
    hkv, n_full = r.pages.shape[0], r.pages.shape[1]
    n_pages = r.target.shape[-1]
    starts = torch.arange(n_full, device=r.pages.device) * page_size
    kp = layer.project_keys(r.pages[None], starts[None], inv_freq)[0]  # [Hkv, nF, G]
    kn = layer.project_keys(r.newest[None], r.page_pos[None], inv_freq)[0]  # [Hkv, R, G]
    qp = layer.project_queries(r.query[None], r.page_pos[None], inv_freq)[0]  # [Hq, R, G]
    qg = qp.view(hkv, hq // hkv, n_rows, -1)
    before = torch.matmul(qg, kp[:, None].transpose(-1, -2)).reshape(hq, n_rows, n_full)
    own = (qg * kn[:, None]).sum(-1).reshape(hq, n_rows)
    before = torch.nn.functional.pad(before, (0, n_pages - n_full))
    page = torch.arange(n_pages, device=before.device)[None, :]
    own_page = (r.page_pos // page_size)[:, None]
    logits = torch.where(page == own_page, own[:, :, None], before)
    logits = logits * layer.temperature()[:, None, None]
    prior = (r.newest_count / page_size).log()  # 0 for a complete page
    logits = logits + (page == own_page) * prior[:, None] * layer.prior.float()[:, None, None]
    return torch.log_softmax(logits.masked_fill(page > own_page, float("-inf")), dim=-1)


def row_loss(layer: LayerGateV2, rows: Sequence[PageRows], page_size: int, inv_freq: torch.Tensor):
    """Mean cross-entropy of the target page masses under the gate (KL up to a constant)."""
    total = 0.0
    for r in rows:
        lp = row_log_probs(layer, r, page_size, inv_freq)
        total = total - (r.target * lp.masked_fill(~torch.isfinite(lp), 0.0)).sum(-1).mean()
    return total / len(rows)


# -- training (one dense forward per window, then each layer on its rows) ---------------------------


@dataclass
class PageGateReport:
    page_size: int
    windows: int
    rows: int  # per layer, all windows
    steps: int
    loss_before: float  # mean over layers, at the gate's initialisation (mean pooling)
    loss_after: float
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def train_page_gate(
    model,
    windows: Sequence[Sequence[int]],
    *,
    page_size: int,
    rows_per_window: int = ROWS_PER_WINDOW,
    steps: int = STEPS,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[PageGate, PageGateReport]:
    """Train a PageGate for `model` on token windows (each one dense forward)."""
    from sparse_core.capture import capture_attention
    from sparse_core.estimators.learned_gate_v2 import model_rope

    if not windows:
        raise ValueError("page_gate training needs at least one token window")
    t_start = time.perf_counter()
    shape = GateShape.from_config(model.config)
    inv_freq, rope_scaling = model_rope(model)
    gen = torch.Generator().manual_seed(seed)
    n_layers = shape.num_layers
    data: list[list[PageRows]] = [[] for _ in range(n_layers)]
    dev = next(model.parameters()).device
    n_rows = 0
    for wi, ids in enumerate(windows, start=1):
        rows = sample_rows(len(ids), rows_per_window, page_size, gen)
        n_rows += len(rows)

        def on_layer(call, rows=rows) -> None:
            q, k = call.query[0].detach(), call.key[0].detach()
            r = page_rows(
                q, k, rows.to(q.device), page_size, call.scaling, inv_freq.to(q.device), rope_scaling
            )
            data[call.layer_idx].append(PageRows(**{name: t.cpu() for name, t in vars(r).items()}))

        with torch.no_grad(), capture_attention(model, on_layer):
            model(input_ids=torch.tensor([list(ids)], device=dev), logits_to_keep=1)
        if progress:
            progress("page gate capture", wi, len(windows))
    if any(len(d) != len(windows) for d in data):
        raise RuntimeError("capture missed some layers (is the model using a custom attention path?)")
    gate = PageGate(shape, page_size, inv_freq, rope_scaling)
    before, after = [], []
    for li, layer in enumerate(gate.layers):
        with torch.no_grad():
            before.append(float(row_loss(layer, data[li], page_size, gate.inv_freq)))
        opt = torch.optim.Adam(layer.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = row_loss(layer, data[li], page_size, gate.inv_freq)
            loss.backward()
            opt.step()
        with torch.no_grad():
            after.append(float(row_loss(layer, data[li], page_size, gate.inv_freq)))
        data[li] = []  # free the layer's rows
        if progress:
            progress("page gate training", li + 1, n_layers)
    gate.requires_grad_(False)
    report = PageGateReport(
        page_size=page_size,
        windows=len(windows),
        rows=n_rows,
        steps=steps,
        loss_before=sum(before) / n_layers,
        loss_after=sum(after) / n_layers,
        seconds=time.perf_counter() - t_start,
    )
    return gate, report
