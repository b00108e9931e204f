"""Monte-Carlo check of the gate's promises, vectorised: simulated pilots judged by the very functions
`decide` uses (the streams of `rollout.gate.sequences`, the priors of `rollout.gate.quality`).

A scenario is a design (shadow = paired, or a split step at a treatment share), a score distribution, a
number of requests per look (pairs, or treatment rows in a split step), a number of looks, and the true
difference of the means. Every score distribution comes with a way to make the sparse arm worse by an exact
amount, so the truth is known: false GO is measured at truth = -margin and below; power at truth = 0.
`tests/rollout/test_gate_simulation.py` asserts the error rates; `sparsepilot bench gate --simulate` prints
the full table that docs/gate.md carries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from rollout.gate.quality import prior
from rollout.gate.sequences import ipw_stream, paired_stream, rejects
from rollout.gate.settings import GateSettings


@dataclass(frozen=True)
class ScoreModel:
    """Control scores, and how the sparse arm turns a control score into its own with mean shift `delta`."""

    name: str
    control: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]
    degrade: Callable[[np.random.Generator, np.ndarray, float], np.ndarray]
    score_type: str


def _binary(p: float) -> ScoreModel:
    """0/1 scores, p correct. The sparse answer differs on 7% of requests (as measured on pilots): it loses
    on a share of the correct ones and wins on a share of the wrong ones, so E[sparse - dense] = delta."""
    disagree = 0.07

    def control(rng, shape):
        return (rng.random(shape) < p).astype(float)

    def degrade(rng, q, delta):
        lose = max(0.0, (disagree - delta) / 2) / p  # P(lose | correct)
        win = max(0.0, (disagree + delta) / 2) / (1 - p)  # P(win | wrong)
        u = rng.random(q.shape)
        return np.where(q == 1, (u >= lose).astype(float), (u < win).astype(float))

    return ScoreModel(f"0/1 at {p:.0%} correct", control, degrade, "binary")


def _beta(a: float, b: float, degraded: float = 0.12) -> ScoreModel:
    """Beta(a, b) scores; on `degraded` of the requests the sparse answer is a fresh draw (same
    concentration, mean shifted by delta / degraded): at delta = 0 the answers differ but no worse."""
    mean = a / (a + b)

    def control(rng, shape):
        return rng.beta(a, b, shape)

    def degrade(rng, q, delta):
        m = mean + delta / degraded
        worse = rng.beta(m * (a + b), (1 - m) * (a + b), q.shape)
        return np.where(rng.random(q.shape) < degraded, worse, q)

    return ScoreModel(f"Beta({a:g}, {b:g}), {degraded:.0%} degraded", control, degrade, "bounded")


def _losses(a: float = 8.0, b: float = 2.0) -> ScoreModel:
    """Identical answers except that the sparse arm fails outright (score 0) on a few % of requests."""
    mean = a / (a + b)

    def control(rng, shape):
        return rng.beta(a, b, shape)

    def degrade(rng, q, delta):
        return np.where(rng.random(q.shape) < -delta / mean, 0.0, q)

    return ScoreModel(
        f"identical but sparse loses {0.03 / mean:.1%}-ish at the margin", control, degrade, "bounded"
    )


SCORE_MODELS = {
    "binary80": _binary(0.80),
    "binary95": _binary(0.95),
    "beta0.5": _beta(0.5, 0.5),
    "beta8_2": _beta(8.0, 2.0),
    "losses": _losses(),
}
DESIGNS = {"paired": None, "split50": 0.5, "split10": 0.10, "split5": 0.05}


@dataclass(frozen=True)
class Result:
    design: str
    scores: str
    per_look: int  # pairs, or treatment rows in a split step
    looks: int
    truth: float
    replications: int
    go_by_look: tuple[float, ...]  # share of pilots with GO at or before look k (k = 1..looks)
    upper95: tuple[float, ...]  # upper end of the 95% Clopper-Pearson interval of go_by_look
    mean_units_to_go: float  # mean requests (pairs) until GO, counting non-GO pilots at the last look
    first_go_look: tuple[int, ...] = ()  # per pilot (keep_runs only): look of the first GO, 0 = none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def simulate(
    settings: GateSettings,
    *,
    design: str,
    scores: str,
    per_look: int,
    looks: int,
    truth: float,
    replications: int,
    seed: int = 0,
    chunk_elements: int = 262_144,
    keep_runs: bool = False,
) -> Result:
    """GO rate by each look of `replications` simulated pilots (min sample = one look's worth).
    keep_runs: also return, per pilot, the look of its first GO (0 = none)."""
    model = SCORE_MODELS[scores]
    share = DESIGNS[design]
    units = per_look * looks if share is None else int(math.ceil(per_look * looks / share))
    look_at = np.array([units * k // looks - 1 for k in range(1, looks + 1)])
    rng = np.random.default_rng(seed)
    kw = prior(settings, "paired" if share is None else "split", 0.5 if share is None else share)
    go_counts = np.zeros(looks)
    units_sum = 0.0
    first_go: list[np.ndarray] = []
    per_chunk = max(1, chunk_elements // units)
    done = 0
    while done < replications:
        r = min(per_chunk, replications - done)
        q = model.control(rng, (r, units))
        if share is None:
            stream = paired_stream(model.degrade(rng, q, truth) - q)
        else:
            treated = rng.random((r, units)) < share
            q[treated] = model.degrade(rng, q[treated], truth)
            stream = ipw_stream(q, treated, share)
        _, logk = rejects(stream, -settings.margin, "lower", settings.alpha, **kw)
        crossed = np.maximum.accumulate(logk, axis=-1)[:, look_at] >= math.log(1 / settings.alpha)
        go = np.logical_or.accumulate(crossed, axis=1)
        go_counts += go.sum(axis=0)
        first_go.append(np.where(go.any(axis=1), go.argmax(axis=1) + 1, 0))
        first = np.where(go.any(axis=1), look_at[go.argmax(axis=1)] + 1, units)
        units_sum += float(first.sum())
        done += r
    rates = go_counts / replications
    upper = tuple(clopper_pearson_upper(int(c), replications) for c in go_counts)
    return Result(
        design,
        scores,
        per_look,
        looks,
        truth,
        replications,
        tuple(float(x) for x in rates),
        upper,
        units_sum / replications,
        tuple(int(x) for x in np.concatenate(first_go)) if keep_runs else (),
    )


def clopper_pearson_upper(successes: int, trials: int, level: float = 0.95) -> float:
    """Upper end of the two-sided Clopper-Pearson interval of a binomial proportion."""
    if successes >= trials:
        return 1.0
    return float(stats.beta.ppf(1 - (1 - level) / 2, successes + 1, trials - successes))


def draw_pilot(
    *, design: str, scores: str, per_look: int, looks: int, truth: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One simulated pilot as `simulate` draws it with replications=1 and the same seed: the control
    scores, the sparse scores (paired: per request; split: NaN where the request went to control) and
    the treatment flags, in arrival order. Lets a test replay a simulated pilot through `decide`."""
    model = SCORE_MODELS[scores]
    share = DESIGNS[design]
    units = per_look * looks if share is None else int(math.ceil(per_look * looks / share))
    rng = np.random.default_rng(seed)
    q = model.control(rng, (1, units))
    if share is None:
        return q[0], model.degrade(rng, q, truth)[0], np.ones(units, bool)
    treated = rng.random((1, units)) < share
    sparse = q.copy()
    sparse[treated] = model.degrade(rng, q[treated], truth)
    return np.where(treated, np.nan, q)[0], np.where(treated, sparse, np.nan)[0], treated[0]
