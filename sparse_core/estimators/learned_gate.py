"""`gate`: a learned block-importance scorer (SeerAttention-style), one small module per layer.

Features. Per block of `block_size` tokens, Q is mean-pooled and K is pooled three ways (max, min,
mean), so a block's keys are summarised by their centre and their extremes (outlier channels that
pooling by mean alone would wash out).

Rotary embedding. The gate pools the *post-rotary* q and k, the very tensors the attention function
receives. Mean-pooling rotated vectors over a block keeps the low-frequency rotary channels (their
phase barely moves within 64 tokens, so block-to-block relative position is still encoded) and
averages the high-frequency ones towards zero; the learned per-head projections are free to reweight
channels accordingly. Pooling pre-rotary q/k and re-applying RoPE at block centres would need the
rotary tables inside the estimator and would not be what the kernel scores, so we do not.

Scores. logit[i, j] = exp(t_h) * <Wq_h qbar_i, Wk_g kpool_j> * scaling + log n_visible(i, j), causal
over key blocks, softmax over j -> an estimate of the attention *mass* each key block receives from
query block i, which is what the tau-mass selection consumes. The log n_visible prior makes the
diagonal block (half visible) and a short last block comparable to full ones. Initialised so that
Wq = I and Wk reads only the K mean: before training the gate equals the `pooled` estimator (plus the
prior), so training can only start from the training-free baseline.

Training (`sparse_core.scorer_training`): self-distillation, KL(dense block mass || gate), base model
frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sparse_core.plan import PlanError

TENSOR_PREFIX = "gate"


@dataclass(frozen=True)
class GateShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    gate_dim: int

    @classmethod
    def from_config(cls, config, gate_dim: int | None = None) -> GateShape:
        n_heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
        return cls(
            num_layers=int(config.num_hidden_layers),
            num_heads=n_heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
            head_dim=head_dim,
            gate_dim=int(gate_dim or head_dim),
        )


def pool_features(
    query: torch.Tensor, key: torch.Tensor, block_size: int, key_valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,Hq,S,D] -> mean per block [B,Hq,nb,D]; k [B,Hkv,S,D] -> (max, min, mean) [B,Hkv,nb,3D].
    A short last block, and padded positions (key_valid False), are left out of every pool."""
    b, hq, s, d = query.shape
    hkv = key.shape[1]
    nb = math.ceil(s / block_size)
    pad = nb * block_size - s
    valid = torch.ones(b, s, dtype=torch.bool, device=query.device) if key_valid is None else key_valid.bool()
    valid = nn.functional.pad(valid, (0, pad), value=False) if pad else valid
    q = nn.functional.pad(query.float(), (0, 0, 0, pad)) if pad else query.float()
    k = nn.functional.pad(key.float(), (0, 0, 0, pad)) if pad else key.float()
    w = valid.view(b, 1, nb, block_size, 1)
    count = w.float().sum(3).clamp_min(1.0)
    qbar = (q.view(b, hq, nb, block_size, d) * w).sum(3) / count
    kb = k.view(b, hkv, nb, block_size, d)
    kmean = (kb * w).sum(3) / count
    kmx = kb.masked_fill(~w, float("-inf")).amax(3)
    kmn = kb.masked_fill(~w, float("inf")).amin(3)
    empty = ~w.any(3)  # blocks with no valid position: zero features
    kmx, kmn = kmx.masked_fill(empty, 0.0), kmn.masked_fill(empty, 0.0)
    return qbar, torch.cat([kmx, kmn, kmean], dim=-1)


def visible_log_counts(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """log of the mean number of causally visible keys of block j for a query of block i; -inf above
    the diagonal. [nb, nb]."""
    nb = math.ceil(seq_len / block_size)
    counts = torch.full((nb,), float(block_size), device=device)
    last = seq_len - (nb - 1) * block_size
    counts[-1] = float(last)
    full = counts[None, :].expand(nb, nb).clone()
    diag = (counts + 1.0) / 2.0
    full[torch.arange(nb), torch.arange(nb)] = diag
    out = full.log()
    out = out.masked_fill(torch.triu(torch.ones(nb, nb, dtype=torch.bool, device=device), 1), float("-inf"))
    return out


class LayerGate(nn.Module):
    """Per-head query projection, per-KV-head key projection, per-head temperature."""

    def __init__(self, shape: GateShape):
        super().__init__()
        d, g = shape.head_dim, shape.gate_dim
        self.n_rep = shape.num_heads // shape.num_kv_heads
        self.scaling = 1.0 / math.sqrt(d)
        wq = torch.zeros(shape.num_heads, d, g)
        wk = torch.zeros(shape.num_kv_heads, 3 * d, g)
        eye = torch.eye(d, g)
        wq[:] = eye
        wk[:, 2 * d :, :] = eye  # read the K mean only: equals `pooled` at init
        self.wq = nn.Parameter(wq)
        self.wk = nn.Parameter(wk)
        self.log_temp = nn.Parameter(torch.zeros(shape.num_heads))

    def log_probs(
        self, qbar: torch.Tensor, kpool: torch.Tensor, seq_len: int, block_size: int
    ) -> torch.Tensor:
        """[B,Hq,nb,D], [B,Hkv,nb,3D] -> log block-mass estimate [B,Hq,nb,nb] (-inf above diagonal)."""
        qp = torch.einsum("bhnd,hdg->bhng", qbar, self.wq)
        kp = torch.einsum("bhnd,hdg->bhng", kpool, self.wk)
        if self.n_rep > 1:
            kp = kp.repeat_interleave(self.n_rep, dim=1)
        logits = torch.matmul(qp, kp.transpose(-1, -2)) * (self.scaling * self.log_temp.exp()[:, None, None])
        logits = logits + visible_log_counts(seq_len, block_size, qbar.device)
        return torch.log_softmax(logits, dim=-1)


class BlockGate(nn.Module):
    """All layers' gates; serialised into a plan's tensors as `gate.{layer}.{wq,wk,log_temp}`."""

    pooled_over = "plan.block_size"  # what `block_size` is, for errors: the plan's, when loaded from one

    def __init__(self, shape: GateShape, block_size: int):
        super().__init__()
        self.shape = shape
        self.block_size = block_size
        self.layers = nn.ModuleList(LayerGate(shape) for _ in range(shape.num_layers))

    def layer_log_probs(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        qbar, kpool = pool_features(query, key, self.block_size)
        return self.layers[layer].log_probs(qbar, kpool, query.shape[2], self.block_size)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, layer in enumerate(self.layers):
            for name, p in layer.named_parameters():
                out[f"{TENSOR_PREFIX}.{i}.{name}"] = p.detach().cpu().clone().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape: GateShape, block_size: int) -> BlockGate:
        """Rebuild from plan tensors; a shape mismatch with the model is a clear error."""
        gate = cls(shape, block_size)
        missing = []
        for i, layer in enumerate(gate.layers):
            for name, p in layer.named_parameters():
                key = f"{TENSOR_PREFIX}.{i}.{name}"
                t = tensors.get(key)
                if t is None:
                    missing.append(key)
                    continue
                if tuple(t.shape) != tuple(p.shape):
                    raise GateShapeError(
                        f"gate tensor {key} has shape {tuple(t.shape)} but this model needs {tuple(p.shape)} "
                        "(the plan was made for a different model)"
                    )
                with torch.no_grad():
                    p.copy_(t.float())
        if missing:
            raise GateShapeError(
                f"plan lacks gate tensors for this model ({len(missing)} missing, e.g. {missing[0]}); "
                "the plan was made for a different model or has no trained gate"
            )
        extra = [
            k
            for k in tensors
            if k.startswith(TENSOR_PREFIX + ".") and int(k.split(".")[1]) >= shape.num_layers
        ]
        if extra:
            raise GateShapeError(
                f"plan has gate tensors for layers this model lacks (e.g. {extra[0]}; model has "
                f"{shape.num_layers} layers): the plan was made for a different model"
            )
        gate.requires_grad_(False)
        return gate

    @staticmethod
    def shape_of(tensors: dict[str, torch.Tensor]) -> GateShape | None:
        """Infer the gate's shape from its tensors (None when the plan carries no gate)."""
        layers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith(TENSOR_PREFIX + ".")})
        if not layers:
            return None
        wq = tensors[f"{TENSOR_PREFIX}.0.wq"]
        wk = tensors[f"{TENSOR_PREFIX}.0.wk"]
        return GateShape(
            num_layers=layers[-1] + 1,
            num_heads=wq.shape[0],
            num_kv_heads=wk.shape[0],
            head_dim=wq.shape[1],
            gate_dim=wq.shape[2],
        )


class GateShapeError(PlanError):
    """Gate tensors that do not fit the model."""


# ----------------------------------------------------------------------------------------------------
# Registry entry: `gate` reads its weights from the plan's tensors (ctx.plan.tensors) by layer.


class GateCache:
    """Gates built from plans' tensors, kept per tensors dict (a plan's scoring asks every layer and
    step) and rebuilt when the dict's weights are replaced: one of them (`sentinel`) is checked by
    identity, so a dict updated in place with retrained weights is not served the old gate. At most
    8 kept."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel
        self._gates: dict[int, tuple[dict, object, nn.Module]] = {}

    def get(self, tensors: dict, build):
        hit = self._gates.get(id(tensors))
        if hit is not None and hit[0] is tensors and hit[1] is tensors.get(self.sentinel):
            return hit[2]
        gate = build()
        if len(self._gates) > 8:
            self._gates.clear()
        self._gates[id(tensors)] = (tensors, tensors.get(self.sentinel), gate)
        return gate


_GATES = GateCache(f"{TENSOR_PREFIX}.0.wq")


def gate_for_plan(plan, shape: GateShape | None = None) -> BlockGate:
    """The BlockGate a plan carries (cached per plan tensors dict and weights)."""
    tensors = getattr(plan, "tensors", None) or {}

    def build() -> BlockGate:
        inferred = BlockGate.shape_of(tensors)
        if inferred is None:
            raise GateShapeError(
                "plan uses estimator 'gate' but carries no gate weights; calibrate with estimator='gate' "
                "or load the plan with its plan_tensors.safetensors"
            )
        if shape is not None and shape != inferred:
            raise GateShapeError(f"gate weights have shape {inferred} but this model needs {shape}")
        return BlockGate.from_tensors(tensors, inferred, plan.block_size)

    return _GATES.get(tensors, build)


def check_fit(name: str, have: GateShape, need: GateShape) -> None:
    """PlanError unless a plan's `name` weights have the model's layers, heads and head dim."""
    if have != need:
        raise PlanError(
            f"plan's {name} weights are for a different model: layers/heads/kv heads/head dim "
            f"{have.num_layers}/{have.num_heads}/{have.num_kv_heads}/{have.head_dim} vs model "
            f"{need.num_layers}/{need.num_heads}/{need.num_kv_heads}/{need.head_dim}"
        )


def check_weights_fit(plan, config) -> None:
    """Registry check: the plan carries `gate` weights for this model (checked when a plan loads)."""
    if not plan.tensors:
        raise PlanError("plan uses the 'gate' estimator but carries no gate weights")
    have = BlockGate.shape_of(plan.tensors)
    check_fit("gate", have, GateShape.from_config(config, have.gate_dim if have else None))


def check_call(name: str, gate, ctx, q: torch.Tensor, k: torch.Tensor) -> None:
    """A learned gate fits this call: block size, layer index and head counts (clear errors)."""
    if ctx.block_size != gate.block_size:
        raise GateShapeError(f"{name} trained for block size {gate.block_size}, plan asks {ctx.block_size}")
    if ctx.layer_idx >= gate.shape.num_layers:
        raise GateShapeError(f"{name} has {gate.shape.num_layers} layers; asked for layer {ctx.layer_idx}")
    if q.shape[1] != gate.shape.num_heads or k.shape[1] != gate.shape.num_kv_heads:
        raise GateShapeError(
            f"{name} expects {gate.shape.num_heads} query / {gate.shape.num_kv_heads} kv heads, "
            f"got {q.shape[1]} / {k.shape[1]}"
        )


def gate_scores(q: torch.Tensor, k: torch.Tensor, ctx) -> torch.Tensor:
    if ctx.layer_idx is None or ctx.plan is None:
        raise GateShapeError("the gate estimator needs a layer index and a plan with gate weights")
    gate = gate_for_plan(ctx.plan)
    check_call("gate", gate, ctx, q, k)
    layer = gate.layers[ctx.layer_idx]
    if layer.wq.device != q.device:
        gate.to(q.device)
    with torch.no_grad():
        qbar, kpool = pool_features(q, k, ctx.block_size, ctx.key_valid)
        logp = layer.log_probs(qbar, kpool, q.shape[2], ctx.block_size)
        if ctx.key_valid is not None:
            from sparse_core.estimators.blocks import valid_blocks

            vb = valid_blocks(ctx.key_valid, ctx.block_size, q.shape[2])
            logp = logp.masked_fill(~vb[:, None, None, :], float("-inf"))
            logp = torch.log_softmax(logp, dim=-1)
        return torch.nan_to_num(logp.exp(), nan=0.0)
