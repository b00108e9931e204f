"""Why decode calibration's bound takes a prompt as its unit: `python docs/sparse_core/decode_bound_unit.py
OUT.json` (numpy and scipy, about 35 s on one core; writes OUT.json and prints a table).

Decode calibration judges a plan on the continuations of a few prompts. Its first bound
(session 15) took blocks of 8 consecutive generated tokens as the unit: right for the tokens of those
prompts, but the plan meets the next prompt of the use case, and prompts differ. This simulates the
bound as `sparse_core.fidelity_bound.fidelity_bound` computes it, with the unit either a block of 8
tokens or a whole prompt, and counts how often it passes a plan on the wrong side of its true mean
over prompts (KL's upper bound below it, agreement's lower bound above it).

The model is fitted to what SmolLM2 showed at 8k (docs/sparse_core/decode_token_correlation_8k.json:
a Quest plan, 4 prompts, 128 generated tokens each):
- a token's KL: lognormal with the measured skewness of the per-token KLs, lag-1 correlation of the
  log as measured (an AR(1) chain), times the prompt's own level: lognormal with the between-prompt
  coefficient of variation of the four prompts' mean KL, less what token noise alone explains;
- a token's agreement: Bernoulli at the prompt's own rate, the rates Beta around the measured
  mean with the between-prompt sd of the four prompts (less binomial noise), and at sd 0.03.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import optimize, stats

from sparse_core.fidelity import Fidelity
from sparse_core.fidelity_bound import fidelity_bound

DATA = Path("docs/sparse_core/decode_token_correlation_8k.json")
TRIALS = 10000
# (prompts, generated tokens each, tokens a block): the first two as session 15 judged, the rest over prompts
DESIGNS = [(2, 64, 8), (4, 64, 8), (10, 16, 16), (12, 32, 32), (16, 16, 16)]
LEVELS = (0.95, 0.99)


def fitted(path: Path = DATA) -> dict:
    windows = json.loads(path.read_text())["windows"]
    kl = np.array([w["kl"] for w in windows])
    agree = np.array([w["agree"] for w in windows], dtype=float)
    tok = kl.ravel()
    skew = float(stats.skew(tok))
    # lognormal sigma with that skewness: (e^s2 + 2) sqrt(e^s2 - 1) = skew
    sigma = optimize.brentq(lambda s: (np.exp(s * s) + 2) * np.sqrt(np.exp(s * s) - 1) - skew, 0.05, 3.0)
    logs = np.log(np.maximum(kl, 1e-12))
    rho = float(np.mean([np.corrcoef(x[:-1], x[1:])[0, 1] for x in logs]))
    means = kl.mean(1)
    # between-prompt variance of the mean KL: total less the token noise of one mean (block sums of 8)
    within = np.mean([np.var(x.reshape(-1, 8).sum(1), ddof=1) / 64 / (x.size / 8) for x in kl])
    cv = float(np.sqrt(max(np.var(means, ddof=1) - within, 0.0)) / means.mean())
    a_means = agree.mean(1)
    a_mean = float(a_means.mean())
    a_sd = float(np.sqrt(max(np.var(a_means, ddof=1) - a_mean * (1 - a_mean) / agree.shape[1], 0.0)))
    return {
        "token_kl_skewness": skew,
        "token_kl_lognormal_sigma": float(sigma),
        "log_kl_lag1_correlation": rho,
        "prompt_kl_cv": cv,
        "prompt_means_kl": means.tolist(),
        "agreement_mean": a_mean,
        "prompt_agreement_sd": a_sd,
        "prompt_means_agreement": a_means.tolist(),
    }


def draw_kl(rng, fit: dict, prompts: int, tokens: int) -> np.ndarray:
    """[TRIALS, prompts, tokens] KLs of mean 1 over prompts."""
    sigma, rho, cv = fit["token_kl_lognormal_sigma"], fit["log_kl_lag1_correlation"], fit["prompt_kl_cv"]
    z = rng.standard_normal((TRIALS, prompts, tokens))
    for t in range(1, tokens):
        z[..., t] = rho * z[..., t - 1] + np.sqrt(1 - rho * rho) * z[..., t]
    s2 = np.log(1 + cv * cv)
    level = np.exp(np.sqrt(s2) * rng.standard_normal((TRIALS, prompts, 1)) - s2 / 2)
    return np.exp(sigma * z - sigma * sigma / 2) * level


def draw_agree(rng, mean: float, sd: float, prompts: int, tokens: int) -> np.ndarray:
    k = mean * (1 - mean) / sd**2 - 1
    p = rng.beta(mean * k, (1 - mean) * k, (TRIALS, prompts, 1))
    return (rng.random((TRIALS, prompts, tokens)) < p).astype(float)


def misses(kl: np.ndarray, agree: np.ndarray, per_block: int, agree_mean: float, level: float) -> dict:
    """Share of samples whose bound is on the wrong side of the truth (KL mean 1, agreement_mean)."""
    t = kl.shape[0]
    kb = kl.reshape(t, -1, per_block).sum(-1)
    ab = agree.reshape(t, -1, per_block).sum(-1)
    kl_miss = agree_miss = 0
    for i in range(t):
        blocks = zip(kb[i], ab[i], strict=True)
        fid = Fidelity.from_blocks(
            [(per_block, float(k), float(a), per_block, 0.0, float(per_block)) for k, a in blocks]
        )
        b = fidelity_bound(fid, level)
        kl_miss += b.kl < 1.0
        agree_miss += b.agree > agree_mean
    return {"kl": _rate(kl_miss, t), "agree": _rate(agree_miss, t)}


def _rate(k: int, n: int) -> dict:
    ci = stats.binomtest(int(k), n).proportion_ci(0.95)
    return {"rate": k / n, "interval95": [ci.low, ci.high]}


def main(out: str) -> None:
    fit = fitted()
    rng = np.random.default_rng(0)
    rows = []
    for agree_sd in (max(fit["prompt_agreement_sd"], 0.005), 0.03):
        for prompts, tokens, per_block in DESIGNS:
            kl = draw_kl(rng, fit, prompts, tokens)
            agree = draw_agree(rng, 0.97, agree_sd, prompts, tokens)
            for level in LEVELS:
                m = misses(kl, agree, per_block, 0.97, level)
                rows.append(
                    {
                        "prompts": prompts,
                        "tokens": tokens,
                        "unit": "prompt" if per_block == tokens else f"{per_block} tokens",
                        "agreement_sd": agree_sd,
                        "level": level,
                        "misses": m,
                    }
                )
                r = rows[-1]
                print(
                    f"{prompts:>3} x {tokens:<3} unit {r['unit']:<9} agree sd {agree_sd:.3f} at {level}: "
                    f"KL misses {m['kl']['rate']:.3f}  agreement misses {m['agree']['rate']:.3f}",
                    flush=True,
                )
    with open(out, "w") as fh:
        json.dump({"fitted": fit, "trials": TRIALS, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
