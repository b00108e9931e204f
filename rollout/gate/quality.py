"""Quality non-inferiority of one step: the observations as a bounded stream, and the two tests on it.

GO needs the test of H0: difference <= -margin to reject (false GO <= alpha at any number of looks);
futility (NO-GO) needs the test of H0: difference >= -margin to reject. Both bets are tuned to -margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rollout.gate.sequences import (
    Stream,
    confidence_bound,
    ipw_stream,
    paired_stream,
    rejects,
    two_sided_bets,
)
from rollout.gate.settings import GateSettings


@dataclass(frozen=True)
class Arms:
    """The step's observations as the quality stream, with the plain summaries shown beside it."""

    stream: Stream
    control_mean: float | None
    treatment_mean: float | None
    estimate: float | None
    std_error: float | None
    n_pairs: int | None  # paired only
    unpaired_rows: int
    pairs: pd.DataFrame | None  # paired only: one row per complete request, in completion order (`row`)


def paired_arms(frame: pd.DataFrame) -> Arms:
    """Pairs in the order they became complete (the later of their two rows), so the look before is
    always a prefix of this one; a request missing one arm is left out. `frame`: checked rows
    (`inputs.check_observations`), whose `request_code` numbers the requests."""
    codes = frame["request_code"].to_numpy()
    n_req = int(codes.max()) + 1 if len(codes) else 0
    pos = np.arange(len(frame))
    treated = frame["treated"].to_numpy()
    where = {arm: np.full(n_req, -1) for arm in ("control", "treatment")}
    where["control"][codes[~treated]] = pos[~treated]
    where["treatment"][codes[treated]] = pos[treated]
    complete = (where["control"] >= 0) & (where["treatment"] >= 0)
    order = np.argsort(np.maximum(where["control"], where["treatment"])[complete], kind="stable")
    rows = {arm: where[arm][complete][order] for arm in ("control", "treatment")}
    pairs = pd.DataFrame(
        {
            f"{col}_{arm}": frame[col].to_numpy()[rows[arm]]
            for arm in ("control", "treatment")
            for col in ("quality", "error", "latency_ms")
        }
    )
    pairs["row"] = np.maximum(rows["control"], rows["treatment"])  # the row that completed the pair
    d = pairs["quality_treatment"].to_numpy() - pairs["quality_control"].to_numpy()
    n = len(d)
    return Arms(
        stream=paired_stream(d),
        control_mean=float(pairs["quality_control"].mean()) if n else None,
        treatment_mean=float(pairs["quality_treatment"].mean()) if n else None,
        estimate=float(d.mean()) if n else None,
        std_error=float(d.std(ddof=1) / math.sqrt(n)) if n >= 2 else None,
        n_pairs=n,
        unpaired_rows=int(len(frame) - 2 * n),
        pairs=pairs,
    )


def split_arms(frame: pd.DataFrame, share: float) -> Arms:
    """Every request in arrival order, weighted by its known assignment probability."""
    q = frame["quality"].to_numpy()
    treated = frame["treated"].to_numpy()
    qc, qt = q[~treated], q[treated]
    both = len(qc) >= 2 and len(qt) >= 2
    return Arms(
        stream=ipw_stream(q, treated, share),
        control_mean=float(qc.mean()) if len(qc) else None,
        treatment_mean=float(qt.mean()) if len(qt) else None,
        estimate=float(qt.mean() - qc.mean()) if len(qc) and len(qt) else None,
        std_error=float(math.sqrt(qc.var(ddof=1) / len(qc) + qt.var(ddof=1) / len(qt))) if both else None,
        n_pairs=None,
        unpaired_rows=0,
        pairs=None,
    )


@dataclass(frozen=True)
class QualityTests:
    go: bool
    futile: bool
    log_capital_go: float
    log_capital_futility: float
    log_capital_go_now: float  # where the GO test's capital stands now (not its maximum)
    low: float
    high: float


def prior(settings: GateSettings, stream_kind: str, share: float) -> dict[str, float]:
    """The bets' starting point (one pseudo-observation): the planned effect and the planned spread of
    the stream (an inverse-propensity stream has the arms' variances scaled by 1/share and 1/(1-share))."""
    var = settings.sd**2 if stream_kind == "paired" else settings.sd**2 * (1 / share + 1 / (1 - share))
    return {"prior_mean": settings.planned_effect, "prior_var": var}


def judge_quality(arms: Arms, settings: GateSettings, *, mode: str, share: float) -> QualityTests:
    kw = prior(settings, mode, share)
    m0 = -settings.margin
    lam = two_sided_bets(arms.stream, m0, **kw)
    go, logk_go = rejects(arms.stream, m0, "lower", settings.alpha_go, lam=lam["lower"], **kw)
    futile, logk_fut = rejects(arms.stream, m0, "upper", settings.alpha, lam=lam["upper"], **kw)
    return QualityTests(
        go=bool(go),
        futile=bool(futile),
        log_capital_go=float(logk_go.max()),
        log_capital_futility=float(logk_fut.max()),
        log_capital_go_now=float(logk_go[-1]),
        low=confidence_bound(arms.stream, m0, "lower", settings.alpha_go, lam=lam["lower"], **kw),
        high=confidence_bound(arms.stream, m0, "upper", settings.alpha, lam=lam["upper"], **kw),
    )
