"""Self-distillation of the learned gate from the dense model's own block-pooled attention maps.

Two phases, both resumable from `checkpoint_dir`:

1. capture: one dense forward per calibration sequence; for every layer the attention function's
   post-rotary q/k are pooled into gate features and the target is computed (the dense block mass,
   or for `gate_v2` by default the 2D max-pooled attention map, or with `target="output"` each
   block's contribution to the output error, `capture.block_attention_contribution`), then q/k/v
   are dropped. Only pooled tensors are kept (~0.5 MB per layer per 4k sequence), one safetensors
   file per sequence, so an interrupted capture restarts at the first missing sequence.
2. train: Adam on the gate parameters only (the base model is frozen and never in the graph), on
   the model's device (the pooled features are kept on the CPU between the phases), loss =
   KL(target || gate) averaged over heads and query blocks >= 1 (block 0 has one choice).
   A checkpoint (gate + optimiser + step + losses) is written every `checkpoint_every` steps.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sparse_core.capture import (
    block_attention_contribution,
    block_attention_mass,
    block_attention_maxpool,
    capture_attention,
)
from sparse_core.estimators.learned_gate import BlockGate, GateShape, pool_features
from sparse_core.estimators.learned_gate_v2 import TARGETS as GATE_V2_TARGETS

KINDS = ("gate", "gate_v2")


@dataclass
class GateTrainConfig:
    block_size: int = 64
    gate_dim: int | None = None  # default: head_dim (identity init == pooled)
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    eval_every: int = 20  # held-out loss evaluation interval (early stopping)
    max_seconds: float | None = None  # wall-clock cap for the training phase (capture always completes)
    kind: str = "gate"  # "gate" (post-rotary pooling) or "gate_v2" (pre-rotary pooling + block RoPE)
    # "mass" | "maxpool" | "output" (gate_v2 only); default: mass for gate, maxpool for gate_v2
    target: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"gate kind must be one of {KINDS}, got {self.kind!r}")
        if self.target is None:
            self.target = "mass" if self.kind == "gate" else "maxpool"
        allowed = ("mass", "maxpool") if self.kind == "gate" else GATE_V2_TARGETS
        if self.target not in allowed:
            raise ValueError(f"{self.kind} target must be one of {allowed}, got {self.target!r}")


@dataclass
class GateTrainReport:
    n_sequences: int
    seq_lens: list[int]
    steps: int
    initial_loss: float  # mean distillation KL over all sequences/layers before training
    final_loss: float  # same, after training
    initial_heldout_loss: float | None
    final_heldout_loss: float | None
    loss_curve: list[float] = field(default_factory=list)
    capture_seconds: float = 0.0
    train_seconds: float = 0.0
    resumed_from_step: int = 0
    kept_step: int = 0  # the step whose weights were kept (early stopping on held-out loss)
    device: str = "cpu"  # where the training phase ran: the model's device

    def to_dict(self) -> dict:
        return asdict(self)


Features = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per layer (qbar, kpool, target)


@torch.no_grad()
def capture_features(
    model, input_ids: Sequence[int], block_size: int, *, kind: str = "gate", target: str = "mass"
) -> Features:
    """One dense forward; per layer (qbar [Hq,nb,D], kpool [Hkv,nb,3D], target [Hq,nb,nb]): the
    features of the gate `kind` and the dense `target` map (`target_map`: block mass, max-pooled,
    or each block's contribution to the output error)."""
    n_layers = int(model.config.num_hidden_layers)
    feats: list = [None] * n_layers
    if kind == "gate_v2":
        from sparse_core.estimators import learned_gate_v2 as gate_v2

        inv_freq, rope_scaling = gate_v2.model_rope(model)

    def on_layer(call):
        q, k = call.query[:1], call.key[:1]
        if kind == "gate_v2":
            qbar, kpool, _ = gate_v2.pool_features(q, k, block_size, inv_freq.to(q.device), rope_scaling)
        else:
            qbar, kpool = pool_features(q, k, block_size)
        t = target_map(target, call, block_size)
        feats[call.layer_idx] = (qbar[0].cpu(), kpool[0].cpu(), t[0].cpu())

    dev = next(model.parameters()).device
    with capture_attention(model, on_layer):
        model(input_ids=torch.tensor([list(input_ids)], device=dev), logits_to_keep=1)
    if any(f is None for f in feats):
        raise RuntimeError("capture missed some layers (is the model using a custom attention path?)")
    return feats


def target_map(target: str, call, block_size: int) -> torch.Tensor:
    """The dense distillation target of one captured layer call, [1, Hq, nb, nb]."""
    q, k = call.query[:1], call.key[:1]
    if target == "output":
        return block_attention_contribution(q, k, call.value[:1], block_size, call.scaling)
    fn = block_attention_mass if target == "mass" else block_attention_maxpool
    return fn(q, k, block_size, call.scaling)


def distill_loss(gate, layer: int, qbar, kpool, target, seq_len: int) -> torch.Tensor:
    """KL(target || gate) per query block, mean over heads and query blocks >= 1."""
    extra = (None, gate.inv_freq) if hasattr(gate, "inv_freq") else ()
    logp = gate.layers[layer].log_probs(qbar[None], kpool[None], seq_len, gate.block_size, *extra)[0]
    nb = target.shape[-1]
    if nb < 2:
        return logp.new_zeros(())
    if torch.isnan(logp).any():  # a diverged gate must not pass for a perfect one (its KL would read 0)
        raise FloatingPointError(f"gate layer {layer} produced NaN scores (training diverged)")
    return block_kl(target, logp)


def block_kl(target: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(target || exp(logp)) per query block over the causal key blocks, mean over heads and query
    blocks >= 1 (block 0 has one key block: nothing to learn). target, logp [Hq, nb, nb]."""
    t = target[:, 1:, :]
    lp = logp[:, 1:, :]
    causal = torch.isfinite(lp)
    t_safe = t.clamp_min(1e-12)
    kl = torch.where(causal & (t > 0), t * (t_safe.log() - lp.masked_fill(~causal, 0.0)), torch.zeros_like(t))
    return kl.sum(-1).mean()


def _save_features(path: Path, feats: Features, seq_len: int) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, (q, k, t) in enumerate(feats):
        tensors[f"{i}.q"], tensors[f"{i}.k"], tensors[f"{i}.t"] = (
            q.contiguous(),
            k.contiguous(),
            t.contiguous(),
        )
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"seq_len": str(seq_len)})
    tmp.replace(path)


def _load_features(path: Path) -> tuple[Features, int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        seq_len = int(fh.metadata()["seq_len"])
        n = len({k.split(".")[0] for k in fh.keys()})
        feats = [
            (fh.get_tensor(f"{i}.q"), fh.get_tensor(f"{i}.k"), fh.get_tensor(f"{i}.t")) for i in range(n)
        ]
    return feats, seq_len


def _on_device(data: list[tuple[Features, int]], dev: torch.device) -> list[tuple[Features, int]]:
    return [([tuple(x.to(dev) for x in layer) for layer in feats], s) for feats, s in data]


def _mean_loss(gate, data: list[tuple[Features, int]]) -> float:
    if not data:
        return float("nan")
    with torch.no_grad():
        tot = [
            float(distill_loss(gate, li, q, k, t, s))
            for feats, s in data
            for li, (q, k, t) in enumerate(feats)
        ]
    return sum(tot) / len(tot)


def _new_gate(model, shape: GateShape, cfg: GateTrainConfig):
    if cfg.kind == "gate_v2":
        from sparse_core.estimators.learned_gate_v2 import BlockGateV2, model_rope

        inv_freq, rope_scaling = model_rope(model)
        return BlockGateV2(shape, cfg.block_size, inv_freq, rope_scaling, target=cfg.target)
    return BlockGate(shape, cfg.block_size)


def train_gate(
    model,
    windows: Sequence[Sequence[int]],
    config: GateTrainConfig | None = None,
    *,
    heldout_windows: Sequence[Sequence[int]] = (),
    progress: Callable[[str, int, int], None] | None = None,
):
    """Distil a gate (`config.kind`: `BlockGate` or `BlockGateV2`) for `model` from dense attention on
    `windows` (token id lists); returns (gate, GateTrainReport).

    `progress(phase, done, total)` is called as work completes (phase: 'capture' or 'train').
    """
    cfg = config or GateTrainConfig()
    if not windows:
        raise ValueError("gate training needs at least one token window")
    shape = GateShape.from_config(model.config, cfg.gate_dim)
    ckdir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ckdir:
        ckdir.mkdir(parents=True, exist_ok=True)
        _check_checkpoint_dir(ckdir, shape, cfg, windows)

    t0 = time.perf_counter()
    data: list[tuple[Features, int]] = []
    held: list[tuple[Features, int]] = []
    all_windows = [("train", i, w) for i, w in enumerate(windows)] + [
        ("heldout", i, w) for i, w in enumerate(heldout_windows)
    ]
    for n_done, (part, i, w) in enumerate(all_windows, start=1):
        fpath = ckdir / f"features_{part}_{i:03d}.safetensors" if ckdir else None
        if fpath and fpath.is_file():
            feats, s = _load_features(fpath)
        else:
            feats = capture_features(model, w, cfg.block_size, kind=cfg.kind, target=cfg.target)
            s = len(w)
            if fpath:
                _save_features(fpath, feats, s)
        (data if part == "train" else held).append((feats, s))
        if progress:
            progress("capture", n_done, len(all_windows))
    capture_seconds = time.perf_counter() - t0

    dev = next(model.parameters()).device
    data, held = _on_device(data, dev), _on_device(held, dev)
    torch.manual_seed(cfg.seed)
    gate = _new_gate(model, shape, cfg).to(dev)  # initialised on the CPU: the same start on any device
    opt = torch.optim.Adam(gate.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step, curve = 0, []
    ckpt = ckdir / "gate_checkpoint.pt" if ckdir else None
    initial = _mean_loss(gate, data)
    initial_held = _mean_loss(gate, held) if held else None
    if ckpt and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True, map_location=dev)
        gate.load_state_dict(state["gate"])
        opt.load_state_dict(state["opt"])
        start_step, curve = int(state["step"]), list(state["curve"])
        initial = float(state.get("initial", initial))

    rng = random.Random(cfg.seed)
    order = [rng.randrange(len(data)) for _ in range(cfg.steps)]
    t1 = time.perf_counter()
    done = start_step
    # Early stopping on the held-out windows: few sequences and ~70k parameters per layer can
    # overfit, so the weights with the lowest held-out loss seen at an evaluation point are kept.
    best = (initial_held, 0, {k: v.clone() for k, v in gate.state_dict().items()}) if held else None
    if best is not None and start_step and ckpt and ckpt.is_file():
        st = torch.load(ckpt, weights_only=True, map_location=dev)
        if "best_state" in st:
            best = (float(st["best_loss"]), int(st["best_step"]), st["best_state"])
    for step in range(start_step, cfg.steps):
        if cfg.max_seconds is not None and time.perf_counter() - t1 > cfg.max_seconds:
            break
        feats, s = data[order[step]]
        opt.zero_grad(set_to_none=True)
        loss = sum(distill_loss(gate, li, q, k, t, s) for li, (q, k, t) in enumerate(feats)) / len(feats)
        loss.backward()
        opt.step()
        curve.append(loss.item())
        done = step + 1
        if best is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            hl = _mean_loss(gate, held)
            if hl < best[0]:
                best = (hl, done, {k: v.clone() for k, v in gate.state_dict().items()})
        if ckpt and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            tmp = ckpt.with_suffix(".tmp")
            state = {"gate": gate.state_dict(), "opt": opt.state_dict(), "step": done, "curve": curve}
            state["initial"] = initial
            if best is not None:
                state.update(best_loss=best[0], best_step=best[1], best_state=best[2])
            torch.save(state, tmp)
            tmp.replace(ckpt)
        if progress:
            progress("train", done, cfg.steps)
    best_step = done
    if best is not None and best[0] < _mean_loss(gate, held):
        gate.load_state_dict(best[2])
        best_step = best[1]
    gate.requires_grad_(False)
    report = GateTrainReport(
        n_sequences=len(data),
        seq_lens=[s for _, s in data],
        steps=done,
        kept_step=best_step,
        initial_loss=initial,
        final_loss=_mean_loss(gate, data),
        initial_heldout_loss=initial_held,
        final_heldout_loss=_mean_loss(gate, held) if held else None,
        loss_curve=curve,
        capture_seconds=capture_seconds,
        train_seconds=time.perf_counter() - t1,
        resumed_from_step=start_step,
        device=str(dev),
    )
    return gate, report


def _check_checkpoint_dir(ckdir: Path, shape: GateShape, cfg: GateTrainConfig, windows) -> None:
    """A checkpoint dir belongs to one (model shape, block size, data): refuse to mix runs."""
    import hashlib

    h = hashlib.sha256(json.dumps([list(map(int, w)) for w in windows]).encode()).hexdigest()
    ident = {
        "shape": asdict(shape),
        "block_size": cfg.block_size,
        "data": h,
        "steps": cfg.steps,
        "seed": cfg.seed,
    }
    if cfg.kind != "gate" or cfg.target != "mass":  # old checkpoint dirs keep their identity
        ident.update(kind=cfg.kind, target=cfg.target)
    f = ckdir / "run.json"
    if f.is_file():
        prev = json.loads(f.read_text())
        if prev != ident:
            raise ValueError(
                f"checkpoint dir {ckdir} holds a different gate-training run "
                f"(model shape, block size, data, steps or seed differ); use a fresh directory"
            )
    else:
        f.write_text(json.dumps(ident, indent=2))


def _calibration_hook(kind: str):
    """The registry's training hook for the learned estimator `kind` (see sparse_core.estimators)."""

    def train(model, windows, *, heldout_windows, limits, seed, progress):
        ckdir = limits.gate_checkpoint_dir
        if ckdir and kind != "gate":
            ckdir = f"{ckdir}/{kind}"
        gate, rep = train_gate(
            model,
            windows,
            GateTrainConfig(
                block_size=limits.block_size,
                steps=limits.gate_steps,
                lr=limits.gate_lr,
                seed=seed,
                checkpoint_dir=ckdir,
                max_seconds=limits.gate_max_seconds,
                kind=kind,
                target=limits.gate_target if kind == "gate_v2" else None,
            ),
            heldout_windows=heldout_windows,
            progress=progress,
        )
        return gate.to_tensors(), rep.to_dict()

    return train


train_gate_v1_hook = _calibration_hook("gate")
train_gate_v2_hook = _calibration_hook("gate_v2")
