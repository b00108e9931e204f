"""Monte-Carlo checks of the gate's error rates. The pilots are simulated with numpy and judged by the
same vectorised functions `decide` uses (difference_cs / paired_cs / running_intersection /
classify_interval); a small subset also goes through `decide` itself to prove both paths agree."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rollout.gate import (
    GateHistory,
    GateSettings,
    classify_interval,
    decide,
    difference_cs,
    paired_cs,
    planned_rho,
    planned_sample_size,
    running_intersection,
)

PILOTS = 2000
LOOKS = 5
SETTINGS = GateSettings(alpha=0.05, margin=0.03, planned_sd=0.15, planned_effect=0.0, power=0.8)
CONTROL_MEAN = 0.80


def beta_params(mean: float, sd: float) -> tuple[float, float]:
    """Beta(a, b) with this mean and sd: quality scores live in [0, 1] and are skewed, not normal."""
    k = mean * (1 - mean) / sd**2 - 1
    return mean * k, (1 - mean) * k


def simulate_split(rng: np.random.Generator, effect: float, share: float, sd: float = 0.15):
    """Quality of PILOTS pilots, each observed at LOOKS equally spaced looks up to the planned size."""
    plan = planned_sample_size(SETTINGS, treatment_share=share)
    qc = rng.beta(*beta_params(CONTROL_MEAN, sd), size=(PILOTS, plan.n_control))
    qt = rng.beta(*beta_params(CONTROL_MEAN + effect, sd), size=(PILOTS, plan.n_treatment))
    return plan, qc, qt


def split_outcomes(qc: np.ndarray, qt: np.ndarray, share: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pilot: did any look say non-inferior (GO), and the look-by-look running verdicts."""
    rho = planned_rho(SETTINGS, treatment_share=share, paired=False)
    low = np.full(qc.shape[0], -np.inf)
    high = np.full(qc.shape[0], np.inf)
    verdicts = []
    for k in range(1, LOOKS + 1):
        nc, nt = qc.shape[1] * k // LOOKS, qt.shape[1] * k // LOOKS
        c, t = qc[:, :nc], qt[:, :nt]
        _, _, lo, hi = difference_cs(
            nc,
            c.mean(1),
            c.var(1, ddof=1),
            nt,
            t.mean(1),
            t.var(1, ddof=1),
            alpha=SETTINGS.alpha,
            rho=rho,
            prior_sd=SETTINGS.planned_sd,
        )
        low, high = running_intersection(lo, hi, low, high)
        verdicts.append(classify_interval(low, high, SETTINGS.margin))
    verdicts = np.stack(verdicts, axis=1)
    return (verdicts == "non-inferior").any(axis=1), verdicts


@pytest.mark.parametrize("share", [0.5, 0.2])
def test_false_go_rate_at_the_margin_with_five_looks(share: float) -> None:
    rng = np.random.default_rng(20260501 + int(share * 100))
    _, qc, qt = simulate_split(rng, effect=-SETTINGS.margin, share=share)
    go, _ = split_outcomes(qc, qt, share)
    false_go = go.mean()
    print(f"split share={share}: false-GO rate {false_go:.4f} over {PILOTS} pilots x {LOOKS} looks")
    assert false_go <= SETTINGS.alpha + 0.01


def test_power_at_the_planned_effect() -> None:
    rng = np.random.default_rng(7)
    plan, qc, qt = simulate_split(rng, effect=SETTINGS.planned_effect, share=0.5)
    go, _ = split_outcomes(qc, qt, 0.5)
    print(f"split: power {go.mean():.4f} with {plan.n_control}+{plan.n_treatment} at the last look")
    assert go.mean() >= SETTINGS.power


def test_paired_false_go_and_power() -> None:
    """Shadow steps: per-request differences (skewed: most requests equal, a few much worse)."""
    rng = np.random.default_rng(11)
    plan = planned_sample_size(SETTINGS, paired=True)
    rho = planned_rho(SETTINGS, treatment_share=0.5, paired=True)
    n = plan.n_treatment

    def run(effect: float) -> float:
        # 70% of requests identical answers (d ~ 0 with small jitter), 30% differ a lot; mean = effect.
        differs = rng.random((PILOTS, n)) < 0.3
        d = np.where(differs, rng.normal(-0.15, 0.2, (PILOTS, n)), rng.normal(0.0, 0.01, (PILOTS, n)))
        d = d - d.mean() + effect  # population mean exactly `effect` (mean of the mixture, empirically)
        low, high = np.full(PILOTS, -np.inf), np.full(PILOTS, np.inf)
        go = np.zeros(PILOTS, bool)
        for k in range(1, LOOKS + 1):
            nk = n * k // LOOKS
            x = d[:, :nk]
            _, _, lo, hi = paired_cs(
                nk, x.mean(1), x.var(1, ddof=1), alpha=SETTINGS.alpha, rho=rho, prior_sd=SETTINGS.planned_sd
            )
            low, high = running_intersection(lo, hi, low, high)
            go |= classify_interval(low, high, SETTINGS.margin) == "non-inferior"
        return go.mean()

    false_go, power = run(-SETTINGS.margin), run(SETTINGS.planned_effect)
    print(f"paired: false-GO {false_go:.4f}, power {power:.4f} with {n} pairs")
    assert false_go <= SETTINGS.alpha + 0.01
    assert power >= SETTINGS.power


def test_naive_peeking_would_inflate_false_go() -> None:
    """The harness can see the problem the CS solves: a fixed-sample one-sided z bound checked at each of
    the 5 looks says GO far more often than alpha on the same simulated pilots."""
    rng = np.random.default_rng(3)
    _, qc, qt = simulate_split(rng, effect=-SETTINGS.margin, share=0.5)
    z = stats.norm.ppf(1 - SETTINGS.alpha)
    go = np.zeros(PILOTS, bool)
    for k in range(1, LOOKS + 1):
        n = qc.shape[1] * k // LOOKS
        c, t = qc[:, :n], qt[:, :n]
        se = np.sqrt(c.var(1, ddof=1) / n + t.var(1, ddof=1) / n)
        go |= (t.mean(1) - c.mean(1) - z * se) > -SETTINGS.margin
    cs_go, _ = split_outcomes(qc, qt, 0.5)
    print(f"naive peeking false-GO {go.mean():.4f} vs confidence sequence {cs_go.mean():.4f}")
    assert go.mean() > SETTINGS.alpha + 0.01
    assert cs_go.mean() < go.mean()


def test_decide_agrees_with_the_vectorised_path() -> None:
    rng = np.random.default_rng(5)
    share = 0.5
    _, qc, qt = simulate_split(rng, effect=-0.01, share=share)
    _, verdicts = split_outcomes(qc, qt, share)
    settings = SETTINGS
    for p in range(12):
        history = GateHistory()
        for k in range(1, LOOKS + 1):
            nc, nt = qc.shape[1] * k // LOOKS, qt.shape[1] * k // LOOKS
            df = pd.DataFrame(
                {
                    "request_id": [f"c{i}" for i in range(nc)] + [f"t{i}" for i in range(nt)],
                    "arm": ["control"] * nc + ["treatment"] * nt,
                    "quality": np.concatenate([qc[p, :nc], qt[p, :nt]]),
                    "latency_ms": 100.0,
                    "error": False,
                }
            )
            d = decide(df, settings, history, planned_treatment_share=share)
            assert d.quality.verdict == verdicts[p, k - 1]
            expected = {"non-inferior": "GO", "futile": "NO-GO", "inconclusive": "EXTEND"}[verdicts[p, k - 1]]
            assert d.outcome == expected
            history = d.next_history(history)
