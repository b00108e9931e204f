"""Issue 12: why gate_v2's advantage on the proxy (`estimator_proxy.py`, one tau for every head) does not
carry to the bench, and whether cheap additions to the gate close the gap. Per estimator, on windows of
the corpus's calibration part that no gate trained on, over every layer, query head and query block >= 2:

- `kept_at_dropped`: the proxy's measure (tau-mass selection on the estimator's own distribution, sink
  and diagonal blocks always kept, one tau for every head; the mean share of visible blocks kept where
  the mean dense mass dropped is 0.005-0.05);
- `kept_at_dropped_per_head`: a tau for each (layer, query head), as calibration picks one: each head
  drops the level on average (interpolated on the tau grid; a head that drops more even at the highest
  tau counts as dense), then the mean kept share over heads;
- `kept_at_p99` / `kept_at_p999`: the tail, the kept share (one tau) at which the 99th / 99.9th
  percentile of the per-row dropped mass is 0.05-0.2; `over_0.1`: the share of rows dropping > 0.1.

Estimators: the exact block mass (`oracle`), antidiagonal, quest, gate_v2 on the max-pooled and block-mass
targets, gate_v2 variants (a per-head bias by block distance, a per-KV-head key-block salience, sub-block
keys: four 16-token pooled keys per block, the block's logit their log-mean-exp), **unions** (the gate's
selection with each row's top-m blocks of quest, antidiagonal or the exact mass forced in, as the sink and
diagonal blocks are), **log-linear mixes** (p_gate * p_h^b, renormalised) and, where the captures hold
them (`estimator_proxy.SAMPLED`), `sampled s` (the exact attention of s evenly spaced rows per query
block, summed per key block) alone and averaged with the gate. Run from the worktree root:
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python docs/calibration/estimator_tails.py \
        SEQ_LEN N_TRAIN N_EVAL STEPS OUT.json [FEATURES.pt]
FEATURES.pt caches the captures (written on the first run, read after). `VARIANTS=a,b` trains only
those gate variants; `NO_UNIONS=1` skips the unions and mixes. Results: docs/calibration.md, "Where the
gate's advantage goes: a tau per head".
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from estimator_proxy import LEVELS, SAMPLED, TAUS, block_log_probs, capture_windows, train  # noqa: E402

from sparse_core import load_model  # noqa: E402
from sparse_core.estimators.learned_gate import GateShape, visible_log_counts  # noqa: E402
from sparse_core.estimators.learned_gate_v2 import LayerGateV2, model_rope  # noqa: E402

TAIL_LEVELS = (0.05, 0.1, 0.2)
N_BUCKETS = 20  # block-distance buckets of LayerGateV2Bias
TAUS = torch.cat([TAUS, torch.tensor([0.99995, 0.99999, 0.999999])])  # flat heuristics need these per head


def distance_buckets(nb: int) -> torch.Tensor:
    """[nb, nb] bucket of the block distance i - j: 0-3 exact, then two buckets per octave."""
    d = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).clamp_min(0).float()
    far = 4 + torch.floor(2 * torch.log2(d.clamp_min(4) / 4)).long()
    return torch.where(d < 4, d.long(), far).clamp(max=N_BUCKETS - 1)


class LayerGateV2Bias(LayerGateV2):
    """gate_v2 plus a learned per-head bias by block distance and (optionally) a per-KV-head key-block
    salience (a linear read of the pooled keys), both zero at init."""

    def __init__(self, shape, target="maxpool", salience=True, distance=True):
        super().__init__(shape, target)
        self.dist = torch.nn.Parameter(torch.zeros(shape.num_heads, N_BUCKETS)) if distance else None
        sal = torch.zeros(shape.num_kv_heads, 3 * shape.head_dim)
        self.sal = torch.nn.Parameter(sal) if salience else None

    def log_probs(self, qbar, kpool, seq_len, block_size, block_pos=None, inv_freq=None):
        nb = qbar.shape[2]
        if inv_freq is not None and block_pos is None:
            block_pos = (torch.arange(nb) * block_size).expand(qbar.shape[0], nb)
        qp = self.project_queries(qbar, block_pos, inv_freq)
        kp = self.project_keys(kpool, block_pos, inv_freq)
        if self.n_rep > 1:
            kp = kp.repeat_interleave(self.n_rep, dim=1)
        prior = visible_log_counts(seq_len, block_size)
        causal = torch.isfinite(prior)
        logits = torch.matmul(qp, kp.transpose(-1, -2)) * self.temperature()[:, None, None]
        logits = logits + prior.masked_fill(~causal, 0.0) * self.prior[:, None, None]
        if self.dist is not None:
            logits = logits + self.dist[:, distance_buckets(nb)]
        if self.sal is not None:
            s = torch.matmul(kpool, self.sal[None, :, :, None])[..., 0]  # [B, Hkv, nb]
            if self.n_rep > 1:
                s = s.repeat_interleave(self.n_rep, dim=1)
            logits = logits + s[:, :, None, :]
        return torch.log_softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


class LayerGateV2SubKeys(LayerGateV2):
    """gate_v2 whose key block is r sub-blocks of 16 keys, each pooled (max, min, mean) and rotated at its
    own first position: the block's logit is the log-mean-exp of the query's logits against its
    sub-blocks (the block mass is a sum of exp over its keys; one pooled key washes the peaks out)."""

    def log_probs_sub(self, qbar, ksub, seq_len, block_size, inv_freq):
        nb, ns = qbar.shape[2], ksub.shape[2]
        r = ns // nb
        qpos = (torch.arange(nb) * block_size)[None]
        kpos = (torch.arange(ns) * (block_size // r))[None]
        qp = self.project_queries(qbar, qpos, inv_freq)
        kp = self.project_keys(ksub, kpos, inv_freq)
        if self.n_rep > 1:
            kp = kp.repeat_interleave(self.n_rep, dim=1)
        sub = torch.matmul(qp, kp.transpose(-1, -2)) * self.temperature()[:, None, None]  # [B,H,nb,ns]
        block = torch.logsumexp(sub.view(*sub.shape[:3], nb, r), dim=-1) - torch.log(torch.tensor(float(r)))
        prior = visible_log_counts(seq_len, block_size)
        causal = torch.isfinite(prior)
        logits = block + prior.masked_fill(~causal, 0.0) * self.prior[:, None, None]
        return torch.log_softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


def rows_of(m: torch.Tensor, p: torch.Tensor, extra: torch.Tensor | None):
    """m true block mass, p estimate, [H, nb, nb]; extra: bool blocks forced in besides sink and diagonal.
    -> per tau (kept share [rows], dropped mass [rows]) over query blocks >= 2."""
    m, p = m[:, 2:, :], p[:, 2:, :].float()
    h, n, nb = m.shape
    qi = torch.arange(2, nb)
    j = torch.arange(nb)
    visible = (j[None, :] <= qi[:, None])[None].expand(h, n, nb)
    forced = ((j[None, :] == 0) | (j[None, :] == qi[:, None]))[None].expand(h, n, nb)
    if extra is not None:
        forced = forced | (extra[:, 2:, :] & visible)
    nvis = visible.float().sum(-1)
    key = torch.where(forced, torch.full_like(p, 2.0), p.masked_fill(~visible, -1.0))
    order = key.argsort(-1, descending=True)
    ps = torch.gather(p.masked_fill(~visible, 0.0), -1, order)
    ms = torch.gather(m, -1, order)
    fs = torch.gather(forced, -1, order)
    vs = torch.gather(visible, -1, order)
    cum_before = ps.cumsum(-1) - ps
    out = []
    for tau in TAUS:
        keep = ((cum_before < tau) | fs) & vs
        kept = keep.float().sum(-1) / nvis
        dropped = (1.0 - (ms * keep).sum(-1)).clamp_min(0)
        out.append((kept, dropped))
    return out


def top_m(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Each row's m highest-scoring visible blocks (scores [H, nb, nb], causal: -inf / 0 above)."""
    nb = scores.shape[-1]
    j = torch.arange(nb)
    visible = j[None, :] <= j[:, None]
    s = scores.float().masked_fill(~visible, float("-inf"))
    idx = s.topk(min(m, nb), dim=-1).indices
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    return mask & visible


def judge(prob_fn, extra_fn, evals):
    per_tau = [([], []) for _ in TAUS]
    for wi, feats in enumerate(evals):
        for li, f in enumerate(feats):
            extra = extra_fn(wi, li) if extra_fn else None
            for ti, (k, d) in enumerate(rows_of(f["mass"], prob_fn(wi, li), extra)):
                per_tau[ti][0].append(k)
                per_tau[ti][1].append(d)
    kept, mean_drop, p99, p999, over = [], [], [], [], []
    for ks, ds in per_tau:
        k, d = torch.cat([x.flatten() for x in ks]), torch.cat([x.flatten() for x in ds])
        kept.append(float(k.mean()))
        mean_drop.append(float(d.mean()))
        p99.append(float(torch.quantile(d, 0.99)))
        p999.append(float(torch.quantile(d, 0.999)))
        over.append(float((d > 0.1).float().mean()))
    res = {
        "taus": TAUS.tolist(),
        "kept": kept,
        "dropped": mean_drop,
        "p99": p99,
        "p999": p999,
        "over_0.1": over,
    }
    res["kept_at_dropped"] = {str(lv): interp(mean_drop, kept, lv) for lv in LEVELS}
    res["kept_at_p99"] = {str(lv): interp(p99, kept, lv) for lv in TAIL_LEVELS}
    res["kept_at_p999"] = {str(lv): interp(p999, kept, lv) for lv in TAIL_LEVELS}
    res["kept_at_dropped_per_head"] = {str(lv): per_head(per_tau, len(evals), lv) for lv in LEVELS}
    return res


def per_head(per_tau, n_windows: int, level: float) -> float:
    """A tau per (layer, head), as calibration picks one: for each head the largest tau step below which
    its mean dropped mass (over the judged windows and rows) stays <= level (interpolated between grid
    points), then the mean kept share over heads."""
    # per_tau[ti] = (kept list, dropped list), one [H, n] tensor per (window, layer), window-major
    n_layers = len(per_tau[0][0]) // n_windows
    kept = torch.stack(
        [
            torch.stack(
                [
                    torch.stack([ks[w * n_layers + li].mean(-1) for w in range(n_windows)]).mean(0)
                    for li in range(n_layers)
                ]
            )
            for ks, _ in per_tau
        ]
    )  # [T, L, H]
    drop = torch.stack(
        [
            torch.stack(
                [
                    torch.stack([ds[w * n_layers + li].mean(-1) for w in range(n_windows)]).mean(0)
                    for li in range(n_layers)
                ]
            )
            for _, ds in per_tau
        ]
    )
    t, layers, heads = kept.shape
    out = []
    for li in range(layers):
        for h in range(heads):
            v = interp(drop[:, li, h].tolist(), kept[:, li, h].tolist(), level)
            if v is None:  # even the lowest tau drops less than level, or even the highest more: dense
                v = float(kept[0, li, h]) if drop[0, li, h] <= level else 1.0
            out.append(v)
    return sum(out) / len(out)


def interp(xs, ys, x):
    """ys at x along the tau curve (xs falls as tau rises; not always monotone in a tail: the first
    crossing from above)."""
    for i in range(1, len(xs)):
        a, b = xs[i - 1], xs[i]
        if a >= x >= b:
            w = (a - x) / max(a - b, 1e-12)
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    return None


def main():
    torch.set_num_threads(1)
    seq_len, n_train, n_eval, steps = (int(x) for x in sys.argv[1:5])
    out = sys.argv[5]
    cache = sys.argv[6] if len(sys.argv) > 6 else None
    t0 = time.time()
    model, tok = load_model("smollm2-135m")
    inv_freq, _ = model_rope(model)
    if cache and os.path.exists(cache):
        feats = torch.load(cache)
    else:
        feats = capture_windows(model, tok, seq_len, n_train, n_eval, t0)
        if cache:
            torch.save(feats, cache)
    data, held, evals = feats[:n_train], feats[n_train], feats[n_train + 1 :]
    shape = GateShape.from_config(model.config, None)
    results = {}

    def report(name, res):
        results[name] = res
        show = {k: res[k] for k in ("kept_at_dropped", "kept_at_dropped_per_head", "kept_at_p99")}
        print(name, json.dumps(show), flush=True)
        json.dump(results, open(out, "w"), indent=1)

    report("oracle", judge(lambda wi, li: evals[wi][li]["mass"], None, evals))
    for h in ("antidiagonal", "quest"):
        key = "anti" if h == "antidiagonal" else "quest"
        report(h, judge(lambda wi, li, key=key: evals[wi][li][key], None, evals))
    for n in SAMPLED if "samp1" in evals[0][0] else ():
        report(f"sampled {n}", judge(lambda wi, li, n=n: evals[wi][li][f"samp{n}"], None, evals))
    variants = {
        "maxpool": {"target": "maxpool"},
        "mass": {"target": "mass"},
        "mass +dist": {"target": "mass", "cls": lambda sh, t: LayerGateV2Bias(sh, t, salience=False)},
        "mass +sal": {"target": "mass", "cls": lambda sh, t: LayerGateV2Bias(sh, t, distance=False)},
        "mass +dist+sal": {"target": "mass", "cls": LayerGateV2Bias},
        "maxpool +dist+sal": {"target": "maxpool", "cls": LayerGateV2Bias},
        "mass subkeys": {"target": "mass", "cls": LayerGateV2SubKeys, "ksub": True},
        "maxpool subkeys": {"target": "maxpool", "cls": LayerGateV2SubKeys, "ksub": True},
    }
    only = os.environ.get("VARIANTS")
    for target, v in variants.items():
        if only and target not in only.split(","):
            continue
        t1 = time.time()
        layers, hl = train(shape, data, held, seq_len, inv_freq, v, steps)
        print(f"trained gate_v2 {target} in {time.time() - t1:.0f}s (held-out loss {hl:.4f})", flush=True)
        with torch.no_grad():
            probs = [
                [block_log_probs(layers[li], f, seq_len, inv_freq, v).exp() for li, f in enumerate(feats_w)]
                for feats_w in evals
            ]
        name = f"gate_v2 {target}"
        results.setdefault("heldout_loss", {})[name] = hl
        report(name, judge(lambda wi, li, probs=probs: probs[wi][li], None, evals))
        if v.get("cls") or os.environ.get("NO_UNIONS"):
            continue
        for h in ("quest", "anti", "mass"):  # each row's top-m blocks of h forced in
            for m in (1, 2, 4) if h != "mass" else (1,):
                report(
                    f"{name} + top{m} {h}",
                    judge(
                        lambda wi, li, probs=probs: probs[wi][li],
                        lambda wi, li, h=h, m=m: top_m(evals[wi][li][h], m),
                        evals,
                    ),
                )
        for n in SAMPLED if "samp1" in evals[0][0] else ():  # average with the sampled rows' mass
            for w in (0.25, 0.5):
                report(
                    f"{name} avg sampled {n} w{w}",
                    judge(
                        lambda wi, li, probs=probs, n=n, w=w: (
                            (1 - w) * probs[wi][li] + w * evals[wi][li][f"samp{n}"]
                        ),
                        None,
                        evals,
                    ),
                )
        for h in ("quest", "anti"):  # log-linear mix: p_gate * p_h^b, renormalised
            for b in (0.1, 0.25, 0.5, 1.0):
                report(
                    f"{name} x {h}^{b}",
                    judge(
                        lambda wi, li, probs=probs, h=h, b=b: torch.softmax(
                            probs[wi][li].clamp_min(1e-30).log()
                            + b * evals[wi][li][h].float().clamp_min(1e-30).log(),
                            dim=-1,
                        ),
                        None,
                        evals,
                    ),
                )
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
