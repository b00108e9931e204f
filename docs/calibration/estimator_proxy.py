"""A quick proxy for the estimator comparison (issue 12): how many blocks each estimator keeps for a given
dense mass dropped, without the calibration search. gate_v2 training variants (distillation target,
tempered target, sub-block queries) are compared with pooled, antidiagonal and the exact block mass, on
windows of the corpus's calibration part that no gate trained on. Run from the worktree root:
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python docs/calibration/estimator_proxy.py \
        SEQ_LEN N_TRAIN N_EVAL STEPS OUT.json [VARIANT,...]
One dense forward per window with every target captured (~4 min per 8k window on one core), then ~40 s
(~2 min with sub-block queries) per variant for 200 training steps at 8k.

What it measures, per estimator, over every layer, KV-shared query head and query block >= 2 of the
evaluation windows:
- `kept` / `dropped` per tau: tau-mass selection on the estimator's own distribution (sink and diagonal
  blocks always kept), one tau for every head: the mean share of visible blocks kept and the mean dense
  mass dropped; `kept_at_dropped` interpolates the kept share at dropped mass 0.005-0.05.
- `cover`: the share of visible blocks needed to cover 95/98/99% of the dense mass when blocks are taken
  in the estimator's order (the best cut per row: what its ranking alone allows).
Calibration differs: it picks a tau per head (so a heuristic's poorly calibrated probabilities cost it
less than one global tau here) and judges the whole model's next-token output.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

from sparse_core import load_model
from sparse_core.capture import block_attention_mass, block_attention_maxpool, capture_attention
from sparse_core.corpus import corpus_texts, pack_token_windows
from sparse_core.estimators import EstimatorContext
from sparse_core.estimators.antidiagonal import antidiagonal_scores
from sparse_core.estimators.learned_gate import GateShape
from sparse_core.estimators.learned_gate_v2 import LayerGateV2, _rotate_at, model_rope, pool_features
from sparse_core.estimators.quest import quest_scores
from sparse_core.scorer_training import block_kl

BS = 64
SUB = 16


SAMPLED = (1, 2, 4)


def sampled_mass(q, k, s: int, scaling: float):
    """The block mass from s evenly spaced query rows of each block (the last of each 64/s): exact
    attention for those rows against every key they see, summed per key block, averaged over the s rows.
    [B, Hq, nb, nb]; costs s/64 of the dense QK^T."""
    b, hq, n, d = q.shape
    nb = n // BS
    step = BS // s
    rows = torch.arange(step - 1, n, step)  # [nb * s]
    kv = k.repeat_interleave(hq // k.shape[1], dim=1)
    logits = torch.matmul(q[:, :, rows].float(), kv.float().transpose(-1, -2)) * scaling
    logits = logits.masked_fill(torch.arange(n)[None, :] > rows[:, None], float("-inf"))
    p = torch.softmax(logits, dim=-1).view(b, hq, nb * s, nb, BS).sum(-1)
    return p.view(b, hq, nb, s, nb).mean(3)


def capture(model, ids, inv_freq, rope_scaling, want_anti: bool):
    feats = [None] * model.config.num_hidden_layers

    def on_layer(call):
        q, k = call.query[:1], call.key[:1]
        qbar, kpool, _ = pool_features(q, k, BS, inv_freq, rope_scaling)
        qsub, ksub, _ = pool_features(q, k, SUB, inv_freq, rope_scaling)
        mass = block_attention_mass(q, k, BS, call.scaling)[0]
        maxp = block_attention_maxpool(q, k, BS, call.scaling)[0]
        anti = quest = None
        if want_anti:
            ctx = EstimatorContext(block_size=BS, scale=call.scaling)
            anti = antidiagonal_scores(q, k, ctx)[0]
            quest = quest_scores(q, k, ctx)[0]
        samp = {s: sampled_mass(q, k, s, call.scaling)[0].cpu() for s in SAMPLED} if want_anti else {}
        feats[call.layer_idx] = dict(
            qbar=qbar[0].cpu(),
            qsub=qsub[0].cpu(),
            ksub=ksub[0].cpu(),
            kpool=kpool[0].cpu(),
            mass=mass.cpu(),
            maxp=maxp.cpu(),
            anti=None if anti is None else anti.cpu(),
            quest=None if quest is None else quest.cpu(),
            **{f"samp{s}": v for s, v in samp.items()},
        )

    with capture_attention(model, on_layer), torch.no_grad():
        model(input_ids=torch.tensor([ids]), logits_to_keep=1)
    return feats


def capture_windows(model, tok, seq_len: int, n_train: int, n_eval: int, t0: float):
    """Captures of n_train + 1 + n_eval windows of the corpus's calibration part (seed 0): the training
    windows, the early-stopping one, then the judged ones (with the training-free scores)."""
    inv_freq, rope_scaling = model_rope(model)
    texts = corpus_texts("calibration", seed=0)
    wins = pack_token_windows(tok, texts, seq_len, n_train + 1 + n_eval, seed=5)
    feats = []
    for i, w in enumerate(wins):
        feats.append(capture(model, w, inv_freq, rope_scaling, want_anti=i > n_train))
        print(f"captured {i + 1}/{len(wins)} at {time.time() - t0:.0f}s", flush=True)
    return feats


def sub_log_probs(layer: LayerGateV2, qsub, kpool, seq_len, inv_freq, sub=SUB):
    """Sub-block queries (sub tokens each), each a softmax over key blocks; the block's distribution is
    the mean of its sub-queries' distributions. -> log probs [Hq, nb, nb]."""
    nb = kpool.shape[1]
    r = BS // sub
    ns = qsub.shape[1]
    qpos = (torch.arange(ns) * sub)[None]
    kpos = (torch.arange(nb) * BS)[None]
    qp = _rotate_at(torch.matmul(qsub[None], layer.wq), qpos, inv_freq)[0]  # [Hq, ns, G]
    kp = _rotate_at(torch.matmul(kpool[None], layer.wk), kpos, inv_freq)[0]  # [Hkv, nb, G]
    if layer.n_rep > 1:
        kp = kp.repeat_interleave(layer.n_rep, dim=0)
    temp = layer.temperature()[:, None, None]
    qblock = torch.arange(ns) // r
    j = torch.arange(nb)
    counts = torch.full((ns, nb), float(BS))
    diag = (torch.arange(ns) % r) * sub + (sub + 1) / 2.0
    counts[torch.arange(ns), qblock] = diag
    prior = counts.log().masked_fill(j[None, :] > qblock[:, None], float("-inf"))
    causal = torch.isfinite(prior)
    weighted = prior.masked_fill(~causal, 0.0) * layer.prior[:, None, None]
    logits = torch.matmul(qp, kp.transpose(-1, -2)) * temp + weighted
    lp = torch.log_softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)  # [Hq, ns, nb]
    lp = lp.masked_fill(~causal, -1e4).view(lp.shape[0], nb, r, nb)  # finite: logsumexp's gradient
    out = torch.logsumexp(lp, dim=2) - math.log(r)
    above = j[None, :] > j[:, None]
    return out.masked_fill(above, float("-inf"))


def block_log_probs(layer, f, seq_len, inv_freq, variant):
    if variant.get("ksub"):
        return layer.log_probs_sub(f["qbar"][None], f["ksub"][None], seq_len, BS, inv_freq)[0]
    if variant.get("sub"):
        return sub_log_probs(layer, f["qsub"], f["kpool"], seq_len, inv_freq, variant["sub"])
    return layer.log_probs(f["qbar"][None], f["kpool"][None], seq_len, BS, None, inv_freq)[0]


def target_of(f, variant):
    t = f["maxp"] if variant["target"] == "maxpool" else f["mass"]
    if variant.get("temper", 1.0) != 1.0:
        t = t.clamp_min(0) ** (1.0 / variant["temper"])
        t = t / t.sum(-1, keepdim=True).clamp_min(1e-30)
    return t


def train(shape, data, held, seq_len, inv_freq, variant, steps, seed=0):
    torch.manual_seed(seed)
    make = variant.get("cls", LayerGateV2)
    layers = torch.nn.ModuleList(make(shape, variant["target"]) for _ in range(shape.num_layers))
    opt = torch.optim.Adam(layers.parameters(), lr=3e-3)
    rng = torch.Generator().manual_seed(seed)

    def loss_on(feats):
        return sum(
            block_kl(target_of(f, variant), block_log_probs(layers[i], f, seq_len, inv_freq, variant))
            for i, f in enumerate(feats)
        ) / len(feats)

    best = (float("inf"), None)
    for step in range(steps):
        feats = data[int(torch.randint(len(data), (1,), generator=rng))]
        opt.zero_grad()
        loss = loss_on(feats)
        loss.backward()
        opt.step()
        if (step + 1) % 20 == 0 or step + 1 == steps:
            with torch.no_grad():
                hl = float(loss_on(held))
            if hl < best[0]:
                best = (hl, {k: v.clone() for k, v in layers.state_dict().items()})
    layers.load_state_dict(best[1])
    return layers, best[0]


TAUS = torch.tensor(
    [
        0.5,
        0.7,
        0.8,
        0.85,
        0.9,
        0.93,
        0.95,
        0.97,
        0.98,
        0.99,
        0.993,
        0.995,
        0.997,
        0.998,
        0.999,
        0.9995,
        0.9999,
    ]
)
LEVELS = (0.005, 0.01, 0.02, 0.05)
COVER = (0.95, 0.98, 0.99)


def evaluate(prob_fn, evals):
    """prob_fn(window_index, layer) -> estimated probs [Hq, nb, nb] (rows sum to 1 over visible blocks).
    Returns per tau: mean kept fraction and mean true dropped mass (sink + diagonal always kept), and
    per coverage level: mean fraction of visible blocks needed when ranked by the estimate."""
    kept_sum = torch.zeros(len(TAUS))
    drop_sum = torch.zeros(len(TAUS))
    cover_sum = torch.zeros(len(COVER))
    rows = 0
    for wi, feats in enumerate(evals):
        for li, f in enumerate(feats):
            m = f["mass"][:, 2:, :]  # query blocks >= 2 (something to choose)
            p = prob_fn(wi, li)[:, 2:, :].float()
            h, n, nb = m.shape
            qi = torch.arange(2, nb)
            j = torch.arange(nb)
            visible = (j[None, :] <= qi[:, None]).float()[None].expand(h, n, nb)
            forced = ((j[None, :] == 0) | (j[None, :] == qi[:, None]))[None].expand(h, n, nb)
            nvis = visible.sum(-1)
            # tau-mass on the estimate: forced blocks first, then by estimate
            key = torch.where(forced, torch.full_like(p, 2.0), p.masked_fill(visible == 0, -1.0))
            order = key.argsort(-1, descending=True)
            ps = torch.gather(p.masked_fill(visible == 0, 0.0), -1, order)
            ms = torch.gather(m, -1, order)
            fs = torch.gather(forced.float(), -1, order)
            cum_before = ps.cumsum(-1) - ps
            for ti, tau in enumerate(TAUS):
                keep = (cum_before < tau) | (fs > 0)
                keep = keep & (torch.gather(visible, -1, order) > 0)
                kept_sum[ti] += (keep.float().sum(-1) / nvis).sum()
                drop_sum[ti] += (1.0 - (ms * keep).sum(-1)).clamp_min(0).sum()
            # ranking coverage: blocks needed (forced first) to cover c of the true mass
            cm = ms.cumsum(-1)
            for ci, c in enumerate(COVER):
                need = (cm < c).float().sum(-1) + 1
                cover_sum[ci] += (need.clamp(max=nvis) / nvis).sum()
            rows += h * n
    kept, drop = kept_sum / rows, drop_sum / rows
    out = {"taus": TAUS.tolist(), "kept": kept.tolist(), "dropped": drop.tolist()}
    # kept fraction at each dropped-mass level (interpolated along the tau curve; dropped falls as tau rises)
    at = {}
    for lv in LEVELS:
        d, k = drop.flip(0), kept.flip(0)  # dropped ascending
        if lv < d[0] or lv > d[-1]:
            at[str(lv)] = None
            continue
        i = int(torch.searchsorted(d, torch.tensor(lv)))
        i = min(max(i, 1), len(d) - 1)
        w = (lv - d[i - 1]) / max(float(d[i] - d[i - 1]), 1e-12)
        at[str(lv)] = float(k[i - 1] + w * (k[i] - k[i - 1]))
    out["kept_at_dropped"] = at
    out["cover"] = {str(c): float(v) for c, v in zip(COVER, cover_sum / rows, strict=True)}
    return out


def main():
    torch.set_num_threads(1)
    seq_len, n_train, n_eval, steps = (int(x) for x in sys.argv[1:5])
    out = sys.argv[5]
    t0 = time.time()
    model, tok = load_model("smollm2-135m")
    inv_freq, _ = model_rope(model)
    feats = capture_windows(model, tok, seq_len, n_train, n_eval, t0)
    data, held, evals = feats[:n_train], feats[n_train], feats[n_train + 1 :]
    shape = GateShape.from_config(model.config, None)
    results = {}
    results["oracle"] = evaluate(lambda wi, li: evals[wi][li]["mass"], evals)
    results["antidiagonal"] = evaluate(lambda wi, li: evals[wi][li]["anti"], evals)
    pooled = torch.nn.ModuleList(LayerGateV2(shape, "mass") for _ in range(shape.num_layers))
    with torch.no_grad():
        results["pooled"] = evaluate(
            lambda wi, li: block_log_probs(pooled[li], evals[wi][li], seq_len, inv_freq, {}).exp(), evals
        )
    variants = {
        "gate_v2 maxpool": {"target": "maxpool"},
        "gate_v2 mass": {"target": "mass"},
        "gate_v2 mass temper2": {"target": "mass", "temper": 2.0},
        "gate_v2 mass sub16": {"target": "mass", "sub": 16},
        "gate_v2 mass sub16 temper2": {"target": "mass", "sub": 16, "temper": 2.0},
    }
    only = sys.argv[6].split(",") if len(sys.argv) > 6 else None
    for name, v in variants.items():
        if only and name not in only:
            continue
        t1 = time.time()
        layers, hl = train(shape, data, held, seq_len, inv_freq, v, steps)
        with torch.no_grad():
            res = evaluate(
                lambda wi, li, layers=layers, v=v: block_log_probs(
                    layers[li], evals[wi][li], seq_len, inv_freq, v
                ).exp(),
                evals,
            )
        res["heldout_loss"], res["train_seconds"] = hl, time.time() - t1
        results[name] = res
        print(
            name,
            json.dumps({k: res[k] for k in ("kept_at_dropped", "cover")}),
            f"{time.time() - t1:.0f}s",
            flush=True,
        )
        json.dump(results, open(out, "w"), indent=1)
    for name in ("oracle", "antidiagonal", "pooled"):
        print(name, json.dumps({k: results[name][k] for k in ("kept_at_dropped", "cover")}), flush=True)
    json.dump(results, open(out, "w"), indent=1)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
