"""`gate_v2`: the learned block scorer with SeerAttention's geometry (arXiv 2410.13276).

Differences from `gate` (which stays selectable; its plans load and run unchanged):

- **Pre-RoPE pooling + block-level RoPE.** The attention function receives post-rotary q/k, so the
  gate first undoes the rotation (exact: RoPE is a rotation per channel pair, with the model's own
  `inv_freq` and attention scaling, which the gate records in its tensors), pools Q by mean and K by
  max / min / mean per block, projects, and then rotates the projected block vectors at the position
  of each block's first token (as SeerAttention does). Scores then depend on block *offsets* only:
  the same text shifted by a whole number of blocks gets the same scores, and one gate serves every
  length.
- **Distillation target** (`sparse_core.scorer_training`, `target="maxpool"` by default): the dense
  attention map 2D max-pooled per (query block, key block) tile and row-normalised, instead of the
  block mass; the block mass stays available (`target="mass"`).
- A learned per-head weight on the log-visible-keys prior (initialised to 1 for the mass target, 0
  for the max-pooled one), so the diagonal block's half visibility is learned rather than fixed.

Initialised so that before training the gate is mean pooling of the pre-rotary q/k with block-level
RoPE (Wq = I, Wk reads the K mean). Its output, like every estimator's, is a distribution over the
causal key blocks; tau-mass selection ranks by it and calibration measures the mass each tau really
drops, so a max-pooled estimate is used exactly like a mass estimate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparse_core.estimators.learned_gate import (
    GateCache,
    GateShape,
    GateShapeError,
    check_call,
    check_fit,
    visible_log_counts,
)
from sparse_core.estimators.quest import key_block_bounds
from sparse_core.plan import PlanError

TENSOR_PREFIX = "gate_v2"
TARGETS = ("maxpool", "mass", "output")


# -- rotary helpers (pure) ------------------------------------------------------------------------


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [..., S] -> (cos, sin) [..., S, R/2] for the R = 2 * len(inv_freq) rotated channels."""
    ang = positions.float()[..., None] * inv_freq.float().to(positions.device)
    return ang.cos(), ang.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """transformers' RoPE (rotate-half layout) on the first R channels of x [..., S, D]; cos/sin
    [..., S, R/2] broadcast over the head dim. `scaling` multiplies the rotated channels."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    out = torch.cat([(x1 * cos - x2 * sin) * scaling, (x2 * cos + x1 * sin) * scaling, rest], dim=-1)
    return out


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """The inverse of `rotate`: the pre-rotary vectors from post-rotary ones (exact up to rounding)."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    inv = 1.0 / scaling
    return torch.cat([(x1 * cos + x2 * sin) * inv, (x2 * cos - x1 * sin) * inv, rest], dim=-1)


def positions_for(
    batch: int, seq_len: int, key_valid: torch.Tensor | None, device, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Token positions [B, S]: given ones, else 0..S-1, else (left padding) what `generate` uses: the
    count of valid tokens before each one."""
    if positions is not None:
        return positions.to(device).long().expand(batch, seq_len)
    if key_valid is None:
        return torch.arange(seq_len, device=device).expand(batch, seq_len)
    return (key_valid.long().cumsum(-1) - 1).clamp_min(0)


def model_rope(model) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) of a transformers model's rotary embedding."""
    for m in model.modules():
        inv = getattr(m, "inv_freq", None)
        if isinstance(inv, torch.Tensor):
            return inv.detach().float().cpu().clone(), float(getattr(m, "attention_scaling", 1.0) or 1.0)
    raise GateShapeError(f"{type(model).__name__} has no rotary embedding (inv_freq); gate_v2 needs RoPE")


def pool_features(
    query: torch.Tensor,
    key: torch.Tensor,
    block_size: int,
    inv_freq: torch.Tensor,
    scaling: float = 1.0,
    *,
    key_valid: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-rotary q [B,Hq,S,D], k [B,Hkv,S,D] -> pre-rotary pooled features: q mean [B,Hq,nb,D],
    k (max, min, mean) [B,Hkv,nb,3D], and each block's first position [B, nb]. Padded positions
    (key_valid False) are left out of every pool."""
    from sparse_core.estimators.blocks import block_pool_mean

    b, _, s, _ = query.shape
    pos = positions_for(b, s, key_valid, query.device, positions)
    cos, sin = rope_cos_sin(pos, inv_freq)  # [B, S, R/2]
    cos, sin = cos[:, None], sin[:, None]
    if key_valid is None and s % block_size == 0:
        qbar, kpool = _pool_in_chunks(query, key, block_size, cos, sin, scaling)
        return qbar, kpool, pos[:, ::block_size]
    qbar = block_pool_mean(unrotate(query.float(), cos, sin, scaling), block_size, key_valid)
    return qbar, pool_keys(key, block_size, cos, sin, scaling, key_valid), pos[:, ::block_size]


def pool_keys(
    key: torch.Tensor,
    block_size: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scaling: float = 1.0,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Post-rotary k [B,Hkv,S,D] and its rotary tables [B,1,S,R/2] -> the pre-rotary (max, min, mean)
    of each block [B,Hkv,nb,3D], padded positions left out (what sparse decode pools a page by)."""
    from sparse_core.estimators.blocks import block_max_min_mean, block_pool_mean

    k = unrotate(key.float(), cos, sin, scaling)
    if key_valid is None:  # whole blocks as a view, a short last block over its own keys: few ops
        return block_max_min_mean(k, block_size)
    kmin, kmax = key_block_bounds(k, block_size, key_valid)
    return torch.cat([kmax, kmin, block_pool_mean(k, block_size, key_valid)], dim=-1)


_CHUNK_TOKENS = 256  # rows per chunk: the temporaries stay in cache (8x faster than whole-tensor ops)


def _pool_in_chunks(query, key, block_size: int, cos, sin, scaling: float):
    """`pool_features` for whole blocks without padding, a few hundred rows at a time. The query
    side never materialises the pre-rotary q: its block mean is summed straight from the products
    (x1 c + x2 s, x2 c - x1 s). Same numbers as the plain path (tested), a fraction of the time."""
    b, hq, s, d = query.shape
    half = cos.shape[-1]
    rows = max(block_size, _CHUNK_TOKENS // block_size * block_size)
    q_parts, k_parts = [], []
    for r0 in range(0, s, rows):
        r1 = min(s, r0 + rows)
        nb = (r1 - r0) // block_size
        c, sn = cos[:, :, r0:r1], sin[:, :, r0:r1]
        x = query[:, :, r0:r1].float()
        x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
        a = (x1 * c).addcmul_(x2, sn).view(b, hq, nb, block_size, half).sum(3)
        bb = (x2 * c).addcmul_(x1, sn, value=-1.0).view(b, hq, nb, block_size, half).sum(3)
        parts = [a / scaling, bb / scaling]
        if rest.shape[-1]:
            parts.append(rest.reshape(b, hq, nb, block_size, -1).sum(3))
        q_parts.append(torch.cat(parts, dim=-1) / block_size)
        kb = unrotate(key[:, :, r0:r1].float(), c, sn, scaling).view(b, key.shape[1], nb, block_size, d)
        k_parts.append(torch.cat([kb.amax(3), kb.amin(3), kb.mean(3)], dim=-1))
    return torch.cat(q_parts, dim=2), torch.cat(k_parts, dim=2)


def _rotate_at(
    x: torch.Tensor, block_pos: torch.Tensor | None, inv_freq: torch.Tensor | None
) -> torch.Tensor:
    """x [B,H,n,G] rotated at positions [B, n] (as is without rotary frequencies)."""
    if inv_freq is None:
        return x
    cos, sin = rope_cos_sin(block_pos, inv_freq)
    return rotate(x, cos[:, None], sin[:, None])


class LayerGateV2(nn.Module):
    """Per-head Q projection, per-KV-head K projection, block RoPE, per-head temperature and prior."""

    def __init__(self, shape: GateShape, target: str = "maxpool"):
        super().__init__()
        d, g = shape.head_dim, shape.gate_dim
        if g != d:
            raise GateShapeError(f"gate_v2 needs gate_dim == head_dim (block RoPE), got {g} vs {d}")
        self.n_rep = shape.num_heads // shape.num_kv_heads
        self.scaling = 1.0 / math.sqrt(d)
        wq = torch.eye(d, g).expand(shape.num_heads, d, g).clone()
        wk = torch.zeros(shape.num_kv_heads, 3 * d, g)
        wk[:, 2 * d :, :] = torch.eye(d, g)  # read the K mean only: mean pooling at init
        self.wq = nn.Parameter(wq)
        self.wk = nn.Parameter(wk)
        self.log_temp = nn.Parameter(torch.zeros(shape.num_heads))
        self.prior = nn.Parameter(torch.full((shape.num_heads,), 0.0 if target == "maxpool" else 1.0))

    def project_queries(
        self, qbar: torch.Tensor, block_pos: torch.Tensor | None, inv_freq: torch.Tensor | None
    ) -> torch.Tensor:
        """Pre-rotary block queries [B,Hq,n,D] -> projected, rotated at `block_pos` [B, n] [B,Hq,n,G]."""
        return _rotate_at(torch.matmul(qbar, self.wq), block_pos, inv_freq)

    def project_keys(
        self, kpool: torch.Tensor, block_pos: torch.Tensor | None, inv_freq: torch.Tensor | None
    ) -> torch.Tensor:
        """Pooled keys [B,Hkv,n,3D] -> projected, rotated at `block_pos` [B, n] [B,Hkv,n,G]."""
        return _rotate_at(torch.matmul(kpool, self.wk), block_pos, inv_freq)

    def temperature(self) -> torch.Tensor:
        """[Hq]: what the block logits q.k are multiplied by."""
        return self.scaling * self.log_temp.exp()

    def log_probs(
        self,
        qbar: torch.Tensor,
        kpool: torch.Tensor,
        seq_len: int,
        block_size: int,
        block_pos: torch.Tensor | None = None,
        inv_freq: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B,Hq,nb,D], [B,Hkv,nb,3D] -> log block scores [B,Hq,nb,nb] (-inf above the diagonal).
        `block_pos` [B, nb] defaults to each block's first position in a sequence starting at 0."""
        if inv_freq is not None and block_pos is None:
            nb = qbar.shape[2]
            block_pos = (torch.arange(nb, device=qbar.device) * block_size).expand(qbar.shape[0], nb)
        qp = self.project_queries(qbar, block_pos, inv_freq)
        kp = self.project_keys(kpool, block_pos, inv_freq)
        if self.n_rep > 1:
            kp = kp.repeat_interleave(self.n_rep, dim=1)
        temp = self.temperature()[:, None, None]
        prior = visible_log_counts(seq_len, block_size, qbar.device)
        causal = torch.isfinite(prior)
        # the learned weight multiplies only finite entries: -inf * w would put NaN in its gradient
        weighted = prior.masked_fill(~causal, 0.0) * self.prior[:, None, None]
        logits = torch.matmul(qp, kp.transpose(-1, -2)) * temp + weighted
        return torch.log_softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


class BlockGateV2(nn.Module):
    """All layers' gates plus the model's rotary frequencies; serialised into a plan's tensors as
    `gate_v2.{layer}.{wq,wk,log_temp,prior}` and `gate_v2.rope.{inv_freq,attention_scaling}` (a
    subclass with another `prefix` keeps its own weights beside these in the same plan)."""

    prefix = TENSOR_PREFIX
    pooled_over = "plan.block_size"  # what `block_size` is, for errors: the plan's, when loaded from one

    def __init__(
        self,
        shape: GateShape,
        block_size: int,
        inv_freq: torch.Tensor,
        rope_scaling: float = 1.0,
        target: str = "maxpool",
    ):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"gate_v2 target must be one of {TARGETS}, got {target!r}")
        if 2 * inv_freq.numel() > shape.head_dim:
            raise GateShapeError(
                f"rotary frequencies cover {2 * inv_freq.numel()} channels, head dim is {shape.head_dim}"
            )
        self.shape = shape
        self.block_size = block_size
        self.rope_scaling = float(rope_scaling)
        self.register_buffer("inv_freq", inv_freq.detach().float().clone(), persistent=False)
        self.layers = nn.ModuleList(LayerGateV2(shape, target) for _ in range(shape.num_layers))

    def features(self, query, key, key_valid=None, positions=None):
        return pool_features(
            query,
            key,
            self.block_size,
            self.inv_freq,
            self.rope_scaling,
            key_valid=key_valid,
            positions=positions,
        )

    def layer_log_probs(self, layer: int, query, key, key_valid=None, positions=None) -> torch.Tensor:
        qbar, kpool, bpos = self.features(query, key, key_valid, positions)
        return self.layers[layer].log_probs(qbar, kpool, query.shape[2], self.block_size, bpos, self.inv_freq)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {
            f"{self.prefix}.rope.inv_freq": self.inv_freq.detach().cpu().clone(),
            f"{self.prefix}.rope.attention_scaling": torch.tensor([self.rope_scaling]),
        }
        for i, layer in enumerate(self.layers):
            for name, p in layer.named_parameters():
                out[f"{self.prefix}.{i}.{name}"] = p.detach().cpu().clone().contiguous()
        return out

    @classmethod
    def shape_of(cls, tensors: dict[str, torch.Tensor]) -> GateShape | None:
        parts = [k.split(".") for k in tensors if k.startswith(cls.prefix + ".")]
        layers = sorted({int(p[1]) for p in parts if p[1].isdigit()})
        if not layers:
            return None
        wq, wk = tensors[f"{cls.prefix}.0.wq"], tensors[f"{cls.prefix}.0.wk"]
        return GateShape(layers[-1] + 1, wq.shape[0], wk.shape[0], wq.shape[1], wq.shape[2])

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], block_size: int) -> BlockGateV2:
        shape = cls.shape_of(tensors)
        inv_key, scaling_key = f"{cls.prefix}.rope.inv_freq", f"{cls.prefix}.rope.attention_scaling"
        if shape is None or inv_key not in tensors:
            raise GateShapeError(cls.missing_weights_message())
        gate = cls(shape, block_size, tensors[inv_key], float(tensors[scaling_key].reshape(-1)[0]))
        missing = []
        for i, layer in enumerate(gate.layers):
            for name, p in layer.named_parameters():
                t = tensors.get(f"{cls.prefix}.{i}.{name}")
                if t is None:
                    missing.append(f"{cls.prefix}.{i}.{name}")
                elif tuple(t.shape) != tuple(p.shape):
                    raise GateShapeError(
                        f"gate tensor {cls.prefix}.{i}.{name} has shape {tuple(t.shape)}, "
                        f"expected {tuple(p.shape)}"
                    )
                else:
                    with torch.no_grad():
                        p.copy_(t.float())
        if missing:
            raise GateShapeError(f"plan lacks {len(missing)} {cls.prefix} tensors (e.g. {missing[0]})")
        gate.requires_grad_(False)
        return gate

    @classmethod
    def missing_weights_message(cls) -> str:
        return (
            "plan uses estimator 'gate_v2' but carries no gate_v2 weights; calibrate with "
            "estimator='gate_v2' or load the plan with its plan_tensors.safetensors"
        )


_GATES = GateCache(f"{TENSOR_PREFIX}.0.wq")


def check_weights_fit(plan, config) -> None:
    """Registry check: the plan carries `gate_v2` weights for this model (checked when a plan loads)."""
    have = BlockGateV2.shape_of(plan.tensors or {})
    if have is None:
        raise PlanError("plan uses the 'gate_v2' estimator but carries no gate_v2 weights")
    check_fit("gate_v2", have, GateShape.from_config(config, have.gate_dim))


def gate_for_plan(plan) -> BlockGateV2:
    """The BlockGateV2 a plan carries (cached per plan tensors dict and weights)."""
    tensors = getattr(plan, "tensors", None) or {}
    return _GATES.get(tensors, lambda: BlockGateV2.from_tensors(tensors, plan.block_size))


def gate_v2_scores(q: torch.Tensor, k: torch.Tensor, ctx) -> torch.Tensor:
    from sparse_core.estimators.blocks import valid_blocks

    if ctx.layer_idx is None or ctx.plan is None:
        raise GateShapeError("the gate_v2 estimator needs a layer index and a plan with gate_v2 weights")
    gate = gate_for_plan(ctx.plan)
    check_call("gate_v2", gate, ctx, q, k)
    if gate.inv_freq.device != q.device:
        gate.to(q.device)
    with torch.no_grad():
        logp = gate.layer_log_probs(ctx.layer_idx, q, k, ctx.key_valid, getattr(ctx, "positions", None))
        vb = valid_blocks(ctx.key_valid, ctx.block_size, q.shape[2])
        if vb is not None:
            logp = torch.log_softmax(logp.masked_fill(~vb[:, None, None, :], float("-inf")), dim=-1)
        return torch.nan_to_num(logp.exp(), nan=0.0)
