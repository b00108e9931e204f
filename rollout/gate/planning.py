"""How many requests a step needs: before it starts (`planned_sample_size`, by simulation of the very
test `decide` runs) and while it runs (`projected_sample_size`, from the observations so far)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import optimize

from rollout.gate.quality import prior
from rollout.gate.sequences import Stream, ipw_stream, paired_stream, rejects
from rollout.gate.settings import GateSettings

PLANNING_REPLICATIONS = 400
PLANNING_SEED = 20261201
CHUNK_ELEMENTS = 1 << 16  # observations tested at once by `first_go` (its arrays stay in a core's cache)


@dataclass(frozen=True)
class SamplePlan:
    n_control: int | None  # None: no size up to the simulated horizon reaches the power
    n_treatment: int | None
    paired: bool
    treatment_share: float
    power: float  # the power asked for
    expected_requests: float  # mean requests (pairs) to a GO, capped at the horizon
    horizon: int  # requests (pairs) simulated
    model: str  # the score model the simulation drew from

    @property
    def n_total(self) -> int | None:
        if self.n_treatment is None:
            return None
        return self.n_treatment if self.paired else self.n_control + self.n_treatment

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_total": self.n_total}


def _beta(rng: np.random.Generator, mean: float, sd: float, size: tuple[int, int]) -> np.ndarray:
    k = mean * (1 - mean) / sd**2 - 1
    if k <= 0:  # more spread than a Beta with this mean allows: the extreme two-point law
        return (rng.random(size) < mean).astype(float)
    return rng.beta(mean * k, (1 - mean) * k, size=size)


@dataclass(frozen=True)
class PlanningDraws:
    """Simulated pilots (rows) before they become the GO test's streams: the paired differences, or the
    split step's scores (0/1 kept as bool) with the treatment flags."""

    values: np.ndarray
    treated: np.ndarray | None  # split only
    share: float

    def stream(self, rows: slice) -> Stream:
        """The quality stream of some of the pilots, as `decide` builds it (each row on its own)."""
        if self.treated is None:
            return paired_stream(self.values[rows])
        return ipw_stream(self.values[rows], self.treated[rows], self.share)


def planning_draws(
    settings: GateSettings, rng: np.random.Generator, *, paired: bool, share: float, reps: int, n: int
) -> tuple[PlanningDraws, str]:
    """`reps` simulated pilots of n requests (pairs), at the planned effect.
    binary: 0/1 scores; split: Bernoulli arms with variance sd^2; paired: differences in {-1, 0, +1} with
    sd^2 + effect^2 of the requests disagreeing. bounded: split, Beta arms (mean 0.8 where the sd allows);
    paired: a scaled Beta difference with the planned mean and sd."""
    sd, eff = settings.sd, settings.planned_effect
    if paired:
        if settings.score_type == "binary":
            r = min(1.0, sd**2 + eff**2)
            u = rng.random((reps, n))
            d = np.where(u < (r + eff) / 2, 1.0, np.where(u < r, -1.0, 0.0))
            return PlanningDraws(d, None, share), f"paired 0/1: {r:.1%} of requests disagree, mean {eff:+.3f}"
        d = 2 * _beta(rng, (1 + eff) / 2, sd / 2, (reps, n)) - 1
        return PlanningDraws(d, None, share), f"paired bounded: difference mean {eff:+.3f}, sd {sd:.3f}"
    treated = rng.random((reps, n)) < share
    if settings.score_type == "binary":
        mean_c = (1 + math.sqrt(max(0.0, 1 - 4 * min(sd, 0.5) ** 2))) / 2
        q = rng.random((reps, n)) < np.where(treated, mean_c + eff, mean_c)
        return PlanningDraws(q, treated, share), f"split 0/1: control {mean_c:.3f} correct"
    mean_c = 0.8 if sd**2 < 0.8 * 0.2 else 0.5
    q = np.where(treated, _beta(rng, mean_c + eff, sd, (reps, n)), _beta(rng, mean_c, sd, (reps, n)))
    return PlanningDraws(q, treated, share), f"split bounded: control mean {mean_c}, sd {sd:.3f}"


def first_go(draws: PlanningDraws, settings: GateSettings, *, kind: str) -> np.ndarray:
    """Per simulated pilot, the request (pair) at which the GO test first rejects (inf: never), looking
    after every request. Pilots are tested a few at a time (~CHUNK_ELEMENTS observations), so that the
    test's working arrays stay in the CPU's cache; each pilot's stream and capital are the same numbers
    as on all pilots at once."""
    reps, n = draws.values.shape
    kw = prior(settings, kind, draws.share)
    target = math.log(1 / settings.alpha_go)
    first = np.full(reps, np.inf)
    per_chunk = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, reps, per_chunk):
        rows = slice(start, start + per_chunk)
        _, logk = rejects(draws.stream(rows), -settings.margin, "lower", settings.alpha_go, **kw)
        crossed = logk >= target  # the first crossing of log(1/alpha) is the first GO
        first[rows] = np.where(crossed.any(-1), crossed.argmax(-1) + 1, np.inf)
    return first


@lru_cache(maxsize=128)
def planned_sample_size(
    settings: GateSettings, *, treatment_share: float = 0.5, paired: bool = False, max_total: int = 65_536
) -> SamplePlan:
    """Smallest number of requests (pairs in a shadow step) by which the GO test has rejected in
    `settings.power` of simulated pilots at the planned effect (looked at after every request, so any
    schedule of looks needs at least this many), and the mean requests to that GO. Simulated with the
    same functions `decide` uses; cached per settings."""
    if not 0 < treatment_share < 1:
        raise ValueError(f"treatment_share must be in (0, 1), got {treatment_share!r}")
    share = 0.5 if paired else treatment_share
    rng = np.random.default_rng(PLANNING_SEED)
    n = 512
    while True:
        reps = max(100, min(PLANNING_REPLICATIONS, 20_000_000 // n))
        draws, model = planning_draws(settings, rng, paired=paired, share=share, reps=reps, n=n)
        first = first_go(draws, settings, kind="paired" if paired else "split")
        ranked = np.sort(first)
        need = float(ranked[min(len(ranked) - 1, math.ceil(settings.power * len(ranked)) - 1)])
        if math.isfinite(need) or n >= max_total:
            break
        n = min(max_total, n * 4)
    expected = float(np.minimum(first, n).mean())
    if not math.isfinite(need):
        return SamplePlan(None, None, paired, share, settings.power, expected, n, model)
    total = int(need)
    n_t = total if paired else max(1, round(total * share))
    n_c = total if paired else total - n_t
    return SamplePlan(n_c, n_t, paired, share, settings.power, expected, n, model)


def projected_sample_size(
    stream: Stream, *, m0: float, log_capital_now: float, alpha: float, max_total: int = 10_000_000
) -> int | None:
    """Requests in all (pairs when paired) by which the GO test would reject if the observations to come
    were drawn from those seen so far: the best constant bet's mean log-growth g* on them, and
    n + (log(1/alpha) - log K_n) / g*. None when no bet grows (the estimate is at or below -margin)."""
    z = stream.z
    if z.size == 0:
        return None
    lo = float(np.min(stream.lo)) if np.ndim(stream.lo) else float(stream.lo)
    top = stream.truncation / max(m0 - lo, 1e-12)

    def growth(lam: float) -> float:
        return float(np.mean(np.log1p(lam * (z - m0))))

    res = optimize.minimize_scalar(lambda lam: -growth(lam), bounds=(0.0, top), method="bounded")
    g = -float(res.fun)
    if g <= 1e-9:
        return None
    more = max(0.0, (math.log(1 / alpha) - log_capital_now) / g)
    total = stream.n + math.ceil(more)
    return total if total <= max_total else None
