"""Monte-Carlo check of the gate's promises, vectorised: simulated pilots judged by the very functions
`decide` uses (the streams of `rollout.gate.sequences`, the priors of `rollout.gate.quality`).

A scenario is a design (shadow = paired, or a split step at a treatment share), a score distribution, a
number of requests per look (pairs, or treatment rows in a split step), a number of looks, and the true
difference of the means. Every score distribution comes with a way to make the sparse arm worse by an exact
amount, so the truth is known: false GO is measured at truth = -margin and below; power at truth = 0.
`tests/rollout/test_gate_simulation.py` asserts the error rates; `sparsepilot bench gate --simulate` prints
the full table that docs/gate.md carries. With `nogo=True` the futility test runs on the same bets and a
step ends NO-GO as `decide` ends it (`nogo_ends`): false NO-GO is measured at truth = -margin and at 0
(`sparsepilot bench gate --nogo`).

The excess-over-control guardrail (`simulate_excess`) is simulated the same way: rare 0/1 errors with a
known excess of the sparse arm's rate over the dense arm's, judged by the guardrail's own breach test
(`tests/rollout/test_gate_excess.py`, `sparsepilot bench gate --excess`).

The monitor's change detector (`simulate_monitor`, `simulate_monitor_quality`): look after look of the
champion's traffic, a breach from some look on, judged by the detector the monitor runs and, for the rate
checks, by the two tests it replaced (`tests/rollout/test_gate_detection.py`,
`docs/gate/monitor_detection.py`; `rollout.pilot_plan.plan_monitor` uses them to say how fast it reacts),
and the monitor's excess check (`simulate_monitor_excess`).

The interval `decide` reports (`simulate_coverage`): the share of pilots whose running interval missed the
true difference at some look (`tests/rollout/test_gate_coverage.py`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from rollout.gate.guardrails import (
    breach_log_capital,
    guardrail_checks,
    paired_excess_stream,
    split_excess_stream,
)
from rollout.gate.quality import prior
from rollout.gate.sequences import ipw_stream, log_capital, paired_stream, rejects, two_sided_bets
from rollout.gate.settings import GateSettings


@dataclass(frozen=True)
class ScoreModel:
    """Control scores, and how the sparse arm turns a control score into its own with mean shift `delta`."""

    name: str
    control: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]
    degrade: Callable[[np.random.Generator, np.ndarray, float], np.ndarray]
    score_type: str


def _binary(p: float, disagree: float = 0.07) -> ScoreModel:
    """0/1 scores, p correct. The sparse answer differs on `disagree` of the requests (7% as measured on
    pilots): it loses on a share of the correct ones and wins on a share of the wrong ones, so
    E[sparse - dense] = delta."""

    def control(rng, shape):
        return (rng.random(shape) < p).astype(float)

    def degrade(rng, q, delta):
        lose = (disagree - delta) / 2 / p  # P(lose | correct)
        win = (disagree + delta) / 2 / (1 - p)  # P(win | wrong)
        if not (0 <= lose <= 1 and 0 <= win <= 1):
            raise ValueError(
                f"0/1 at {p:.0%} with {disagree:.0%} differing cannot shift the mean by {delta:+g}"
            )
        u = rng.random(q.shape)
        return np.where(q == 1, (u >= lose).astype(float), (u < win).astype(float))

    differ = "" if disagree == 0.07 else f", {disagree:.0%} of answers differ"
    return ScoreModel(f"0/1 at {p:.0%} correct{differ}", control, degrade, "binary")


def _beta(a: float, b: float, degraded: float = 0.12) -> ScoreModel:
    """Beta(a, b) scores; on `degraded` of the requests the sparse answer is a fresh draw (same
    concentration, mean shifted by delta / degraded): at delta = 0 the answers differ but no worse."""
    mean = a / (a + b)

    def control(rng, shape):
        return rng.beta(a, b, shape)

    def degrade(rng, q, delta):
        m = mean + delta / degraded
        if not 0 < m < 1:
            raise ValueError(
                f"Beta({a:g}, {b:g}) with {degraded:.0%} redrawn cannot shift the mean by {delta:+g}"
            )
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
    # nogo=True only: share of pilots whose step ends NO-GO by futility at or before look k, as `decide`
    # ends it (a look where the futility test has rejected and the step holds its minimum sample, the GO
    # test's verdict whatever it is: a crossing), pilots that ended GO at an earlier look not counted
    nogo_by_look: tuple[float, ...] = ()
    nogo_upper95: tuple[float, ...] = ()  # upper end of the 95% Clopper-Pearson interval of nogo_by_look
    nogo_look: tuple[int, ...] = ()  # per pilot (nogo and keep_runs): look of that NO-GO, 0 = none

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
    nogo: bool = False,
) -> Result:
    """GO rate by each look of `replications` simulated pilots: the GO test alone, whatever the futility
    test says and whatever the step's minimum sample (an upper bound of `decide`'s GO, which needs both).
    keep_runs: also return, per pilot, the look of its first GO (0 = none).
    nogo: also the futility test (`quality.judge_quality`'s, at `settings.alpha`, on the same bets), and
    the NO-GO rate by look as `decide` ends a step (`nogo_ends`); with keep_runs, each pilot's NO-GO look.
    Not simulated (none of them can make a futility NO-GO): guardrails (no errors, one latency), the
    sample-ratio check, the look limit's NO-GO, and a look whose reported bounds cross while only the GO
    test rejects (INVALID in `decide`, counted GO here)."""
    cell = {"design": design, "scores": scores, "per_look": per_look, "looks": looks, "truth": truth}
    run = _Simulation(settings, cell, seed, chunk_elements, keep_runs=keep_runs, nogo=nogo)
    return run.result(replications)


def simulate_until(
    settings: GateSettings,
    decided: Callable[[Result], bool],
    *,
    design: str,
    scores: str,
    per_look: int,
    looks: int,
    truth: float,
    replications: int,
    max_replications: int,
    seed: int = 0,
    chunk_elements: int = 262_144,
    nogo: bool = False,
) -> Result:
    """`simulate` at `replications` pilots, then twice as many, and so on, until `decided(result)` or
    `max_replications` is reached: each size's Result is the one `simulate` returns for it (same seed,
    same pilots, to the last bit), but the pilots a size shares with the next are simulated once, not
    again (doubling from 400 to 6,400 simulated 12,400 pilots; it simulates 6,400 and a chunk per size)."""
    cell = {"design": design, "scores": scores, "per_look": per_look, "looks": looks, "truth": truth}
    run = _Simulation(settings, cell, seed, chunk_elements, nogo=nogo)
    n = replications
    while True:
        result = run.result(n)
        if decided(result) or n >= max_replications:
            return result
        n *= 2


class _Tally:
    """What the pilots judged so far add up to (`simulate`'s counts), per chunk in draw order."""

    def __init__(self, looks: int) -> None:
        self.go, self.nogo = np.zeros(looks), np.zeros(looks)
        self.units = 0.0
        self.first_go: list[np.ndarray] = []
        self.nogo_at: list[np.ndarray] = []

    def copy(self) -> _Tally:
        other = _Tally(len(self.go))
        other.go, other.nogo, other.units = self.go.copy(), self.nogo.copy(), self.units
        other.first_go, other.nogo_at = list(self.first_go), list(self.nogo_at)
        return other


class _Pilots:
    """The simulated pilots of one cell, drawn from `seed` in chunks of `chunk_elements` values, and what
    they add up to: a run of n pilots is the full chunks that fit in n and one last, smaller chunk. The full
    chunks are judged once and kept, so a larger run (`result` with a larger n) goes on from them; the last
    chunk is drawn from a copy of the generator, so the next run draws that chunk again in full, as a fresh
    run would. One draw order for `simulate` (`_Simulation`) and `simulate_coverage` (`_Coverage`), so the
    same seed gives the same pilots; each judges a chunk (`_judge`) into its tally (`_tally`, with a
    `copy`) and reads its result from the tally (`_result`)."""

    def __init__(self, settings: GateSettings, cell: dict, seed: int, chunk_elements: int) -> None:
        self.settings, self.cell = settings, cell
        self.model, self.share, self.units = _cell_pilots(
            cell["design"], cell["scores"], cell["per_look"], cell["looks"]
        )
        looks = cell["looks"]
        self.look_at = np.array([self.units * k // looks - 1 for k in range(1, looks + 1)])
        self.kw = prior(
            settings, "paired" if self.share is None else "split", 0.5 if self.share is None else self.share
        )
        self.rng = np.random.default_rng(seed)
        self.per_chunk = max(1, chunk_elements // self.units)
        self.done = 0
        self.tally = self._tally()

    def result(self, replications: int) -> Any:
        if replications < self.done:
            raise ValueError(f"{replications} pilots: {self.done} are already judged")
        while replications - self.done >= self.per_chunk:
            self._judge(self.rng, self.per_chunk, self.tally)
            self.done += self.per_chunk
        tally = self.tally
        if replications > self.done:
            tally = self.tally.copy()
            self._judge(copy.deepcopy(self.rng), replications - self.done, tally)
        return self._result(tally, replications)

    def _streams(self, rng: np.random.Generator, r: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(stream, treated) of `r` pilots drawn from `rng` (`_pilot_streams`)."""
        return _pilot_streams(self.model, self.share, rng, (r, self.units), self.cell["truth"])

    def _tally(self) -> Any:
        raise NotImplementedError

    def _judge(self, rng: np.random.Generator, r: int, tally: Any) -> None:
        raise NotImplementedError

    def _result(self, tally: Any, replications: int) -> Any:
        raise NotImplementedError


class _Simulation(_Pilots):
    """`simulate`'s pilots of one cell: the GO test's verdicts by look (and the futility test's, `nogo`)."""

    def __init__(
        self,
        settings: GateSettings,
        cell: dict,
        seed: int,
        chunk_elements: int,
        *,
        keep_runs=False,
        nogo=False,
    ) -> None:
        self.keep_runs, self.nogo = keep_runs, nogo
        super().__init__(settings, cell, seed, chunk_elements)

    def _tally(self) -> _Tally:
        return _Tally(self.cell["looks"])

    def _judge(self, rng: np.random.Generator, r: int, tally: _Tally) -> None:
        """Draw `r` pilots from `rng` and add their verdicts to `tally`."""
        s, look_at, kw, units = self.settings, self.look_at, self.kw, self.units
        m0 = -s.margin
        stream, treated = self._streams(rng, r)
        lam = two_sided_bets(stream, m0, **kw, sides=("lower", "upper") if self.nogo else ("lower",))
        go = _crossed_by_look(log_capital(stream, lam["lower"], m0, "lower"), look_at, s.alpha_go)
        tally.go += go.sum(axis=0)
        tally.first_go.append(np.where(go.any(axis=1), go.argmax(axis=1) + 1, 0))
        first = np.where(go.any(axis=1), look_at[go.argmax(axis=1)] + 1, units)
        tally.units += float(first.sum())
        if self.nogo:
            futile = _crossed_by_look(log_capital(stream, lam["upper"], m0, "upper"), look_at, s.alpha)
            enough = _has_minimum(treated, look_at, s.min_samples_per_arm, r)
            ended = nogo_ends(go, futile, enough)
            tally.nogo += ended.sum(axis=0)
            tally.nogo_at.append(np.where(ended.any(axis=1), ended.argmax(axis=1) + 1, 0))

    def _result(self, tally: _Tally, replications: int) -> Result:
        keep, nogo, c = self.keep_runs, self.nogo, self.cell
        return Result(
            c["design"],
            c["scores"],
            c["per_look"],
            c["looks"],
            c["truth"],
            replications,
            tuple(float(x) for x in tally.go / replications),
            tuple(clopper_pearson_upper(int(n), replications) for n in tally.go),
            tally.units / replications,
            tuple(int(x) for x in np.concatenate(tally.first_go)) if keep else (),
            tuple(float(x) for x in tally.nogo / replications) if nogo else (),
            tuple(clopper_pearson_upper(int(n), replications) for n in tally.nogo) if nogo else (),
            tuple(int(x) for x in np.concatenate(tally.nogo_at)) if nogo and keep else (),
        )


def _cell_pilots(design: str, scores: str, per_look: int, looks: int) -> tuple[ScoreModel, float | None, int]:
    """A cell's score model, treatment share (None: a shadow step) and requests per simulated pilot."""
    share = DESIGNS[design]
    return SCORE_MODELS[scores], share, requests(share, per_look, looks)


def _pilot_scores(
    model: ScoreModel, share: float | None, rng: np.random.Generator, shape: tuple[int, int], truth: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(control, sparse, treated) of `shape` simulated pilots in arrival order, the one draw order of every
    simulator of the gate's grid: both arms' scores per request in a shadow step (share None; treated
    None); in a split step the sparse arm's score where the request went to it, the control's elsewhere."""
    q = model.control(rng, shape)
    if share is None:
        return q, model.degrade(rng, q, truth), None
    treated = rng.random(shape) < share
    sparse = q.copy()
    sparse[treated] = model.degrade(rng, q[treated], truth)
    return q, sparse, treated


def _pilot_streams(
    model: ScoreModel, share: float | None, rng: np.random.Generator, shape: tuple[int, int], truth: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """(stream, treated) of `shape` simulated pilots as `decide` builds the quality stream: the paired
    difference in a shadow step (share None; treated None), the inverse-propensity stream in a split one."""
    control, sparse, treated = _pilot_scores(model, share, rng, shape, truth)
    if treated is None:
        return paired_stream(sparse - control), None
    return ipw_stream(sparse, treated, share), treated


def _crossed_by_look(logk: np.ndarray, look_at: np.ndarray, alpha: float) -> np.ndarray:
    """(replications, looks): whether the test's capital had crossed log(1/alpha) by each look (its
    running maximum: a rejection stays one, as `rejects` reads it at every look). The maximum of each
    look's rows, then the running maximum over the looks: the same numbers as the running maximum over
    every row read at the looks, for a pass over the rows that writes no array of their size."""
    return _peak_by_look(logk, look_at) >= math.log(1 / alpha)


def _peak_by_look(logk: np.ndarray, look_at: np.ndarray) -> np.ndarray:
    """(replications, looks): the running maximum of the capital over the rows, read at each look's last
    row `look_at`: each look's own peak, then the running maximum over the looks (the same numbers, for a
    pass over the rows that writes no array of their size)."""
    if look_at[0] < 0 or np.any(np.diff(look_at) <= 0):
        return np.maximum.accumulate(logk, axis=-1)[:, look_at]
    firsts = np.concatenate(([0], look_at[:-1] + 1))
    return np.maximum.accumulate(np.maximum.reduceat(logk[:, : look_at[-1] + 1], firsts, axis=-1), axis=-1)


def _has_minimum(treated: np.ndarray | None, look_at: np.ndarray, min_n: int, r: int) -> np.ndarray:
    """(replications, looks): whether the step holds its minimum sample at each look, as `decide` counts
    it: pairs in a shadow step (`treated` None), the smaller arm's rows in a split step."""
    if treated is None:
        return np.broadcast_to(look_at + 1 >= min_n, (r, len(look_at)))
    n_t = np.cumsum(treated, axis=-1)[:, look_at]
    return np.minimum(n_t, look_at + 1 - n_t) >= min_n


def nogo_ends(go: np.ndarray, futile: np.ndarray, enough: np.ndarray) -> np.ndarray:
    """(replications, looks): whether the step has ended NO-GO by futility at or before each look, by
    `decide`'s order at a look (`decide._outcome`; no guardrail breached, no bad data): a look where the
    futility test has rejected and the step holds its minimum sample is NO-GO, whether the GO test has
    rejected too (a crossing, NO-GO at once) or not; one where only the GO test has rejected, with the
    minimum, is GO and ends the step. Each flag is the test's state by that look (running maxima)."""
    nogo_now = futile & enough
    go_now = go & ~futile & enough
    ends = nogo_now | go_now
    first = np.where(ends.any(axis=1), ends.argmax(axis=1), go.shape[1])
    rows = np.arange(go.shape[0])
    by_nogo = np.zeros(go.shape[0], bool)
    has = first < go.shape[1]
    by_nogo[has] = nogo_now[rows[has], first[has]]
    return by_nogo[:, None] & (np.arange(go.shape[1]) >= first[:, None])


def requests(share: float | None, per_look: int, looks: int) -> int:
    """Requests a simulated pilot draws: `per_look` pairs per look in a shadow step (share None), or as
    many requests as give `per_look` treatment rows per look in expectation in a split step."""
    return per_look * looks if share is None else int(math.ceil(per_look * looks / share))


def clopper_pearson_upper(successes: int, trials: int, level: float = 0.95) -> float:
    """Upper end of the two-sided Clopper-Pearson interval of a binomial proportion."""
    if successes >= trials:
        return 1.0
    return float(stats.beta.ppf(1 - (1 - level) / 2, successes + 1, trials - successes))


def clopper_pearson_lower(successes: int, trials: int, level: float = 0.95) -> float:
    """Lower end of the two-sided Clopper-Pearson interval of a binomial proportion."""
    if successes <= 0:
        return 0.0
    return float(stats.beta.ppf((1 - level) / 2, successes, trials - successes + 1))


@dataclass(frozen=True)
class CoverageResult:
    design: str
    scores: str
    per_look: int
    looks: int
    truth: float
    replications: int
    missed: float  # share of pilots whose reported interval missed the truth at some look
    missed_upper95: float  # upper end of the 95% Clopper-Pearson interval of `missed`
    lower_above: float  # of which the lower end above the truth (level alpha_go) at some look
    upper_below: float  # the upper end below the truth (level alpha) at some look
    missed_runs: tuple[bool, ...] = ()  # per pilot (keep_runs only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def simulate_coverage(
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
) -> CoverageResult:
    """Does the interval `decide` reports (lower end at `settings.alpha_go`, upper end at `settings.alpha`,
    the running intersection over the step's looks) hold the true difference at every look? Its lower end
    is the largest m whose "mean <= m" the GO test's bets (tuned to -margin) rejected at some row so far,
    so it lies above the truth at some look of the step exactly when the capital at m = truth crossed
    log(1 / alpha_go) by the last look; the upper end likewise. The pilots are `simulate`'s (same seed,
    same draws): `draw_pilot` replays one through `decide`."""
    cell = {"design": design, "scores": scores, "per_look": per_look, "looks": looks, "truth": truth}
    return _Coverage(settings, cell, seed, chunk_elements, keep_runs=keep_runs).result(replications)


class _Misses:
    """What the pilots judged so far add up to (`simulate_coverage`'s), per chunk in draw order: whether
    each pilot's interval had its lower end above the truth at some look, its upper end below it."""

    def __init__(self) -> None:
        self.low: list[np.ndarray] = []
        self.high: list[np.ndarray] = []

    def copy(self) -> _Misses:
        other = _Misses()
        other.low, other.high = list(self.low), list(self.high)
        return other


class _Coverage(_Pilots):
    """`simulate_coverage`'s pilots of one cell: whether the interval `decide` reports missed the truth."""

    def __init__(
        self, settings: GateSettings, cell: dict, seed: int, chunk_elements: int, *, keep_runs: bool
    ) -> None:
        self.keep_runs = keep_runs
        super().__init__(settings, cell, seed, chunk_elements)

    def _tally(self) -> _Misses:
        return _Misses()

    def _judge(self, rng: np.random.Generator, r: int, tally: _Misses) -> None:
        s, kw, truth = self.settings, self.kw, self.cell["truth"]
        stream, _ = self._streams(rng, r)
        lam = two_sided_bets(stream, -s.margin, **kw)
        tally.low.append(rejects(stream, truth, "lower", s.alpha_go, lam=lam["lower"], **kw)[0])
        tally.high.append(rejects(stream, truth, "upper", s.alpha, lam=lam["upper"], **kw)[0])

    def _result(self, tally: _Misses, replications: int) -> CoverageResult:
        lo, hi = np.concatenate(tally.low), np.concatenate(tally.high)
        missed = int((lo | hi).sum())
        return CoverageResult(
            **self.cell,
            replications=replications,
            missed=missed / replications,
            missed_upper95=clopper_pearson_upper(missed, replications),
            lower_above=float(lo.mean()),
            upper_below=float(hi.mean()),
            missed_runs=tuple(bool(x) for x in lo | hi) if self.keep_runs else (),
        )


def draw_pilot(
    *, design: str, scores: str, per_look: int, looks: int, truth: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One simulated pilot as `simulate` draws it with replications=1 and the same seed: the control
    scores, the sparse scores (paired: per request; split: NaN where the request went to control) and
    the treatment flags, in arrival order. Lets a test replay a simulated pilot through `decide`."""
    model, share, units = _cell_pilots(design, scores, per_look, looks)
    control, sparse, treated = _pilot_scores(model, share, np.random.default_rng(seed), (1, units), truth)
    if treated is None:
        return control[0], sparse[0], np.ones(units, bool)
    return np.where(treated, np.nan, control)[0], np.where(treated, sparse, np.nan)[0], treated[0]


# ---------------------------------------------------------------- the excess-over-control guardrail

# Designs of the excess check: (treatment share, None for a shadow step; in a shadow step, P(the sparse arm
# fails | the dense arm failed on the same request) - None: the arms fail independently).
EXCESS_DESIGNS: dict[str, tuple[float | None, float | None]] = {
    "paired": (None, None),
    "paired_correlated": (None, 0.5),
    "split50": (0.5, None),
    "split10": (0.10, None),
    "split5": (0.05, None),
}


@dataclass(frozen=True)
class ExcessResult:
    design: str
    control_rate: float
    excess: float  # true sparse-arm error rate minus the dense arm's
    per_look: int  # treatment rows per look (pairs in a shadow step; expected rows in a split step)
    looks: int
    replications: int
    stop_by_look: tuple[float, ...]  # share of pilots with the check breached at or before look k
    upper95: tuple[float, ...]  # upper end of the 95% Clopper-Pearson interval of stop_by_look
    first_stop_look: tuple[int, ...] = ()  # per pilot (keep_runs only): look of the first breach, 0 = none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def draw_errors(
    rng: np.random.Generator,
    *,
    design: str,
    control_rate: float,
    excess: float,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Error flags of `shape` (replications, requests) in arrival order. Shadow step: (sparse, dense) per
    request; split step: (flag of the arm the request went to, treated). The sparse arm's rate is
    control_rate + excess; a correlated shadow design makes a request the dense arm fails on fail in the
    sparse arm with the design's probability."""
    share, joint = EXCESS_DESIGNS[design]
    p_t = control_rate + excess
    if not 0 <= control_rate <= 1 or not 0 <= p_t <= 1:
        raise ValueError(f"error rates must be in [0, 1]: control {control_rate!r}, sparse {p_t!r}")
    u = rng.random(shape)
    if share is not None:
        treated = rng.random(shape) < share
        return (u < np.where(treated, p_t, control_rate)).astype(float), treated
    both = control_rate * (p_t if joint is None else joint)
    if both > p_t:
        raise ValueError(f"{design}: the sparse arm's rate {p_t!r} is below the failures it shares")
    dense_only, sparse_only = control_rate - both, p_t - both
    sparse = (u < both) | ((u >= both + dense_only) & (u < both + dense_only + sparse_only))
    return sparse.astype(float), (u < both + dense_only).astype(float)


def simulate_excess(
    settings: GateSettings,
    *,
    design: str,
    control_rate: float,
    excess: float,
    per_look: int,
    looks: int,
    replications: int,
    seed: int = 0,
    chunk_elements: int = 1 << 20,
    keep_runs: bool = False,
) -> ExcessResult:
    """Share of `replications` simulated pilots whose `error_rate_increase` check is breached by each look,
    judged by the very test `decide` runs (`guardrails.breach_log_capital` on the stream `judge` builds).
    A breach counts at any sample size (a breach shown is a breach: `decide` returns NO-GO whatever the
    check's minimum rows), and the capital's running maximum covers every row, so looks only set the
    horizon: the share stopped by look k of a 10-look pilot is the false stop of a k-look pilot."""
    check = next(c for c in guardrail_checks(settings) if c.comparison == "excess")
    share = EXCESS_DESIGNS[design][0]
    units = requests(share, per_look, looks)
    look_at = np.array([units * k // looks - 1 for k in range(1, looks + 1)])
    rng = np.random.default_rng(seed)
    target = math.log(1 / settings.alpha)
    stops = np.zeros(looks)
    first: list[np.ndarray] = []
    per_chunk = max(1, chunk_elements // units)
    done = 0
    while done < replications:
        r = min(per_chunk, replications - done)
        a, b = draw_errors(rng, design=design, control_rate=control_rate, excess=excess, shape=(r, units))
        stream = paired_excess_stream(a, b) if share is None else split_excess_stream(a, b, share)
        peak = _peak_by_look(breach_log_capital(stream, check), look_at)
        stopped = peak >= target
        stops += stopped.sum(axis=0)
        first.append(np.where(stopped.any(axis=1), stopped.argmax(axis=1) + 1, 0))
        done += r
    return ExcessResult(
        design,
        control_rate,
        excess,
        per_look,
        looks,
        replications,
        tuple(float(x) for x in stops / replications),
        tuple(clopper_pearson_upper(int(c), replications) for c in stops),
        tuple(int(x) for x in np.concatenate(first)) if keep_runs else (),
    )


# ---------------------------------------------------------------- the monitor's change detector

MONITOR_METHODS = ("detector", "per_look", "since_promotion")


@dataclass(frozen=True)
class MonitorResult:
    """Simulated monitors of one check: `looks` batches of `batch` rows (pairs for the quality check) of
    the champion's traffic, at `before` up to look `change_look` - 1 and at `after` from it on
    (change_look 1: the whole life at `after`). Per method (or mixture of bets), the share of monitors
    that had raised an alarm by each look."""

    check: str  # what was simulated: the rate check's ceiling, or the quality check's scores and margin
    threshold: float
    batch: int
    looks: int
    before: float
    after: float
    change_look: int
    replications: int
    alarm_by_look: dict[str, tuple[float, ...]]  # method -> share alarmed at or before look k
    upper95: dict[str, tuple[float, ...]]  # upper end of the 95% Clopper-Pearson interval of the above

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def looks_to_detect(self, method: str, share: float = 0.5) -> int | None:
        """Looks after the change by which `share` of the monitors had raised an alarm (None: not within
        the simulated looks)."""
        by = np.asarray(self.alarm_by_look[method])
        hit = np.flatnonzero(by >= share)
        return None if hit.size == 0 else int(hit[0]) + 1 - (self.change_look - 1)


def simulate_monitor(
    ceiling: float,
    *,
    batch: int,
    looks: int,
    before: float,
    after: float,
    change_look: int = 1,
    replications: int,
    alpha: float = 0.05,
    seed: int = 0,
    methods: tuple[str, ...] = MONITOR_METHODS,
) -> MonitorResult:
    """Share of simulated monitors of a rate check alarmed by each look, for the detector the monitor runs
    (`detection.change_log_capital`, candidates at every look's first row) and, for comparison, the two
    ways of reusing the step's rate test that it replaced: a fresh test on each look's batch (`per_look`)
    and one test over every row since the promotion (`since_promotion`)."""
    from rollout.gate.detection import change_log_capital
    from rollout.gate.sequences import rate_log_capital, rate_stream

    unknown = [m for m in methods if m not in MONITOR_METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; known: {', '.join(MONITOR_METHODS)}")
    starts = np.arange(0, batch * looks, batch)

    def draw(rng: np.random.Generator, shape: tuple[int, int], rate: float) -> np.ndarray:
        return (rng.random(shape) < rate).astype(float)

    judges = {
        "detector": lambda x: change_log_capital(x, starts, ceiling),
        "since_promotion": lambda x: rate_log_capital(rate_stream(x), ceiling),
        # a fresh test per batch: its peak within the look, carried as the look's value
        "per_look": lambda x: np.repeat(
            rate_log_capital(rate_stream(x.reshape(len(x), looks, batch)), ceiling).max(axis=-1),
            batch,
            axis=-1,
        ),
    }
    return _simulate_looks(
        f"rate, ceiling {ceiling:g}",
        ceiling,
        draw,
        {m: judges[m] for m in methods},
        batch=batch,
        looks=looks,
        before=before,
        after=after,
        change_look=change_look,
        replications=replications,
        alpha=alpha,
        seed=seed,
    )


def simulate_monitor_excess(
    ceiling: float,
    *,
    dense: float,
    correlated: bool = False,
    batch: int,
    looks: int,
    excess: float,
    replications: int,
    alpha: float = 0.05,
    seed: int = 0,
) -> MonitorResult:
    """The monitor's `error_rate_increase` check (`guardrails.judge_monitor`: the change detector on the
    paired difference of the arms' error flags, `detection.mean_factors_of` with `EXCESS_MIXTURE`,
    candidates at every look's first row), the champion failing `dense` + `excess` of the requests dense
    fails `dense` of, independently given the request or (`correlated`) failing half of the requests dense
    fails (`draw_errors`' shadow designs). Method "detector"."""
    from rollout.gate.detection import log_capital, mean_factors_of
    from rollout.gate.guardrails import EXCESS_MIXTURE

    design = "paired_correlated" if correlated else "paired"
    starts = np.arange(0, batch * looks, batch)

    def draw(rng: np.random.Generator, shape: tuple[int, int], level: float) -> np.ndarray:
        sparse, control = draw_errors(rng, design=design, control_rate=dense, excess=level, shape=shape)
        return sparse - control

    def judge(z: np.ndarray) -> np.ndarray:
        return log_capital(mean_factors_of(z, ceiling, mixture=EXCESS_MIXTURE)(None), starts)

    return _simulate_looks(
        f"error_rate_increase, dense {dense:g}{', correlated' if correlated else ''}, ceiling {ceiling:g}",
        ceiling,
        draw,
        {"detector": judge},
        batch=batch,
        looks=looks,
        before=excess,
        after=excess,
        change_look=1,
        replications=replications,
        alpha=alpha,
        seed=seed,
    )


# Noisier scores than the gate's grid, for the monitor: half the answers right and the arms disagreeing on
# 20% / 40% of the requests, where bold constant bets lose (the quality mixture is chosen against these too).
NOISY_SCORE_MODELS = {"noisy20": _binary(0.5, 0.20), "noisy40": _binary(0.5, 0.40)}


def monitor_score_model(score_type: str, loss: float) -> ScoreModel:
    """The score model the monitor's plan simulates a mean quality loss `loss` with
    (`rollout.pilot_plan.plan_monitor`): 0/1 scores at 80% right with at least 20% of the answers
    differing, or Beta(8, 2) scores with at least 30% redrawn -- noisier than the gate's grid, so the looks
    the plan shows are on the safe side -- and more where the loss needs it. A loss of 0.8 or more (the
    whole mean score) cannot be expressed: ValueError."""
    if not 0 <= loss < 0.8:
        raise ValueError(f"a mean quality loss of {loss:g} is beyond what scores averaging 0.8 can lose")
    if score_type == "binary":
        return _binary(0.80, max(0.20, loss))
    return _beta(8.0, 2.0, max(0.30, loss / 0.7))


def simulate_monitor_quality(
    scores: str | ScoreModel,
    *,
    margin: float,
    batch: int,
    looks: int,
    before: float,
    after: float,
    change_look: int = 1,
    replications: int,
    mixtures: dict[str, tuple[tuple[float, float], ...]] | None = None,
    alpha: float = 0.05,
    seed: int = 0,
) -> MonitorResult:
    """The monitor's quality check (`detection.mean_factors_of` on the paired loss q_dense - q_sparse,
    candidates at every look's first row), the champion losing `before` / `after` on average, simulated
    with the gate's score models (`SCORE_MODELS`, `NOISY_SCORE_MODELS`: the sparse answer made worse by
    an exact mean loss), for one or more mixtures of bets (default: `detection.LOSS_MIXTURE`)."""
    from rollout.gate.detection import LOSS_MIXTURE, log_capital, mean_factors_of

    model = scores if isinstance(scores, ScoreModel) else {**SCORE_MODELS, **NOISY_SCORE_MODELS}[scores]
    starts = np.arange(0, batch * looks, batch)

    def draw(rng: np.random.Generator, shape: tuple[int, int], loss: float) -> np.ndarray:
        q = model.control(rng, shape)
        return q - model.degrade(rng, q, -loss)

    judges = {
        name: (
            lambda z, mixture=mixture: log_capital(mean_factors_of(z, margin, mixture=mixture)(None), starts)
        )
        for name, mixture in (mixtures or {"loss": LOSS_MIXTURE}).items()
    }
    return _simulate_looks(
        f"quality_loss, {model.name}, margin {margin:g}",
        margin,
        draw,
        judges,
        batch=batch,
        looks=looks,
        before=before,
        after=after,
        change_look=change_look,
        replications=replications,
        alpha=alpha,
        seed=seed,
    )


def _simulate_looks(
    check: str,
    threshold: float,
    draw: Callable[[np.random.Generator, tuple[int, int], float], np.ndarray],
    judges: dict[str, Callable[[np.ndarray], np.ndarray]],
    *,
    batch: int,
    looks: int,
    before: float,
    after: float,
    change_look: int,
    replications: int,
    alpha: float,
    seed: int,
    chunk_elements: int = 1 << 21,
) -> MonitorResult:
    """Draw the monitors' streams (`draw(rng, shape, level)`: rows before the change at `before`, after it
    at `after`), let each judge turn them into log-capital over the rows, and count the monitors whose
    running peak has crossed log(1/alpha) by the end of each look."""
    if not 1 <= change_look <= looks:
        raise ValueError(f"change_look must be in 1..{looks}, got {change_look}")
    n = batch * looks
    cut = (change_look - 1) * batch
    ends = np.arange(batch - 1, n, batch)
    target = math.log(1 / alpha)
    rng = np.random.default_rng(seed)
    counts = {name: np.zeros(looks) for name in judges}
    per_chunk = max(1, chunk_elements // n)
    done = 0
    while done < replications:
        r = min(per_chunk, replications - done)
        x = np.concatenate((draw(rng, (r, cut), before), draw(rng, (r, n - cut), after)), axis=1)
        for name, judge in judges.items():
            counts[name] += (_peak_by_look(judge(x), ends) >= target).sum(axis=0)
        done += r
    return MonitorResult(
        check,
        threshold,
        batch,
        looks,
        before,
        after,
        change_look,
        replications,
        {k: tuple(float(c) for c in v / replications) for k, v in counts.items()},
        {k: tuple(clopper_pearson_upper(int(c), replications) for c in v) for k, v in counts.items()},
    )
