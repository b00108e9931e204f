"""What a speed-up is worth in money. Pure functions; the formula is in docs/roi.md.

For each arm:  seconds per request  t = prompt_tokens / prefill_tps + output_tokens / decode_tps
               (the sparse arm's decode_tps is the measured sparse decode throughput when the plan
               decodes sparsely, else the dense one)
               GPU-hours per day    H = requests_per_day * t / 3600 / utilisation
               $ per month          C = H * gpu_usd_per_hour * DAYS_PER_MONTH
saved = C_dense - C_sparse;  payback days = pilot_one_off_usd / (saved / DAYS_PER_MONTH).
Of the saving, sparse decode's share is C_sparse(output tokens at the dense decode throughput) - C_sparse;
`decode_outcome` puts it, with the measured decode speed-up or the break-even it stays below, in words.
The interval on the speed-up carries through (every output is monotone in it). A speed-up <= 1
gives a zero or negative saving: it is reported as the number it is, with ``pays_off = False``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from rollout import calibration_outcome

if TYPE_CHECKING:
    from rollout.spec import UseCaseSpec

DAYS_PER_MONTH = 365.25 / 12  # 30.4375
ROI_CONFIDENCE = 0.95  # the speed-up interval a saving's range is priced at
# what every surface says in place of an interval where none was measured (`interval_measured` False: one
# timing pair, whose "ends" are the estimate; the state DB stores none, rollout.runs)
NO_INTERVAL = "no interval: one timing pair"


@dataclass(frozen=True)
class RoiInputs:
    dense_tps: float  # dense tokens/s at the use case's length mix (prefill, or all tokens)
    speedup: float  # sparse / dense throughput for the same tokens
    speedup_low: float
    speedup_high: float
    requests_per_day: float
    prompt_tokens: float  # mean per request
    output_tokens: float  # mean per request
    gpu_usd_per_hour: float
    utilisation: float
    pilot_one_off_usd: float
    decode_tps: float | None = None  # dense output tokens/s; None: at dense_tps in both arms
    # sparse arm's output tokens/s (sparse decode); None: the same as decode_tps in both arms
    sparse_decode_tps: float | None = None
    sparse_decode_tps_low: float | None = None  # interval ends (None: the point estimate)
    sparse_decode_tps_high: float | None = None
    # False: no interval was measured (one timing pair), the ends are the estimate: nothing is established
    interval_measured: bool = True


@dataclass(frozen=True)
class RoiResult:
    inputs: RoiInputs
    effective_speedup: float  # per request: prefill and decode together (t_dense / t_sparse)
    effective_speedup_low: float
    effective_speedup_high: float
    dense_seconds_per_request: float
    sparse_seconds_per_request: float
    dense_gpu_hours_day: float
    sparse_gpu_hours_day: float
    sparse_gpu_hours_day_low: float  # at the speed-up's upper bound (fewest hours)
    sparse_gpu_hours_day_high: float
    dense_usd_month: float
    sparse_usd_month: float
    saved_usd_month: float
    saved_usd_month_low: float
    saved_usd_month_high: float
    payback_days: float | None  # None: never pays back (no saving)
    payback_days_low: float | None  # best case (upper speed-up bound)
    payback_days_high: float | None  # worst case; None when the low end saves nothing
    pays_off: bool  # saved_usd_month > 0
    certain: bool  # even the low end of the interval saves money
    verdict: str
    decode_saved_usd_month: float = 0.0  # the part of saved_usd_month that sparse decode brings

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["inputs"] = asdict(self.inputs)
        return out


def _check(name: str, value: float, *, positive: bool = True, upper: float | None = None) -> None:
    if value is None or not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be <= {upper}, got {value!r}")


def _check_finite(i: RoiInputs, **priced: float) -> None:
    """Refuse dollars that are not numbers: valid inputs at the edges of their ranges (a vanishing
    utilisation, huge traffic at a huge price) can overflow the paid hours, and inf - inf is NaN."""
    bad = [name for name, value in priced.items() if not math.isfinite(value)]
    if bad:
        raise ValueError(
            f"{bad[0]} is {priced[bad[0]]!r}: the inputs overflow the paid GPU-hours (requests_per_day "
            f"{i.requests_per_day!r}, gpu_usd_per_hour {i.gpu_usd_per_hour!r}, utilisation "
            f"{i.utilisation!r}); check cost.utilisation and traffic.requests_per_day"
        )


def seconds_per_request(
    prompt_tokens: float, output_tokens: float, prefill_tps: float, decode_tps: float | None
) -> float:
    return prompt_tokens / prefill_tps + output_tokens / (decode_tps if decode_tps else prefill_tps)


def gpu_hours_per_day(requests_per_day: float, seconds_per_req: float, utilisation: float) -> float:
    """Paid GPU-hours: busy hours divided by the share of paid time the GPUs are busy."""
    return requests_per_day * seconds_per_req / 3600.0 / utilisation


def usd_per_month(gpu_hours_day: float, gpu_usd_per_hour: float) -> float:
    return gpu_hours_day * gpu_usd_per_hour * DAYS_PER_MONTH


def usd(x: float) -> str:
    """Dollars as a board reads them: "$1,234", "-$466" (not "$-466"); under a dollar either way, with its
    cents ("-$0.40", not "-$0": whole dollars rounded such an amount to a signed zero)."""
    text = f"${abs(x):,.2f}" if 0.005 <= abs(x) < 0.995 else f"${abs(x):,.0f}"
    return f"-{text}" if x < 0 and text not in ("$0", "$0.00") else text


def payback_days(one_off_usd: float, saved_usd_month: float) -> float | None:
    """Days of savings that repay the one-off cost; None when there is no saving to repay it."""
    if saved_usd_month <= 0:
        return None
    return one_off_usd / (saved_usd_month / DAYS_PER_MONTH)


def compute_roi(inputs: RoiInputs) -> RoiResult:
    i = inputs
    _check("dense_tps", i.dense_tps)
    for name in ("speedup", "speedup_low", "speedup_high"):
        _check(name, getattr(i, name))
    if not i.speedup_low <= i.speedup <= i.speedup_high:
        raise ValueError(
            f"speed-up interval must contain the estimate: {i.speedup_low} <= {i.speedup} <= {i.speedup_high}"
        )
    _check("requests_per_day", i.requests_per_day, positive=False)
    _check("prompt_tokens", i.prompt_tokens, positive=False)
    _check("output_tokens", i.output_tokens, positive=False)
    if i.prompt_tokens + i.output_tokens <= 0:
        raise ValueError("a request must have some tokens (prompt_tokens + output_tokens > 0)")
    _check("gpu_usd_per_hour", i.gpu_usd_per_hour, positive=False)
    _check("utilisation", i.utilisation, upper=1.0)
    _check("pilot_one_off_usd", i.pilot_one_off_usd, positive=False)
    if i.decode_tps is not None:
        _check("decode_tps", i.decode_tps)
    sd, sd_low, sd_high = _sparse_decode(i)

    def arm(speedup: float, decode_tps: float | None) -> tuple[float, float, float]:
        # without a measured decode throughput output tokens go at the dense arm's prefill throughput in
        # both arms: a prefill speed-up is no evidence that output tokens come faster
        out_tps = decode_tps if decode_tps else i.dense_tps
        t = seconds_per_request(i.prompt_tokens, i.output_tokens, i.dense_tps * speedup, out_tps)
        hours = gpu_hours_per_day(i.requests_per_day, t, i.utilisation)
        return t, hours, usd_per_month(hours, i.gpu_usd_per_hour)

    t_dense, h_dense, c_dense = arm(1.0, i.decode_tps)
    t_sparse, h_sparse, c_sparse = arm(i.speedup, sd)
    t_best, h_best, c_best = arm(i.speedup_high, sd_high)
    t_worst, h_worst, c_worst = arm(i.speedup_low, sd_low)
    c_sparse_dense_decode = arm(i.speedup, i.decode_tps)[2]
    _check_finite(
        i,
        dense_usd_month=c_dense,
        sparse_usd_month=c_sparse,
        sparse_usd_month_low=c_worst,
        sparse_usd_month_high=c_best,
    )
    saved, saved_low, saved_high = c_dense - c_sparse, c_dense - c_worst, c_dense - c_best
    eff, eff_low, eff_high = t_dense / t_sparse, t_dense / t_worst, t_dense / t_best
    pays_off = saved > 0
    certain = saved_low > 0 and i.interval_measured
    pb = payback_days(i.pilot_one_off_usd, saved)
    cost = usd(max(0.0, -saved))  # never "$-0"
    if not pays_off:
        what = (
            f"the speed-up is {i.speedup:.2f}x (<= 1)"
            if i.sparse_decode_tps is None
            # prefill and decode together: "with sparse decode" misled where decode stays dense below
            # its break-even (its line says 1.00x) and the figure is prefill's, diluted by dense decode
            else f"the per-request speed-up (prefill and decode together) is {eff:.2f}x (<= 1)"
        )
        verdict = (
            f"not shown to save: {what}; at the estimate sparse attention would cost {cost}/month more, "
            f"though the interval reaches {usd(saved_high)}/month saved; do not roll out for cost"
            if saved_high > 0
            else f"no savings: {what}, so sparse attention would cost {cost}/month more; "
            "do not roll out for cost"
        )
    elif not i.interval_measured:
        verdict = (
            f"saves {usd(saved)}/month at the estimate, but no interval was measured (one timing pair): "
            "savings are not established"
        )
    elif not certain:
        verdict = (
            f"saves {usd(saved)}/month at the estimate, but the interval reaches {usd(saved_low)}/month "
            f"(speed-up {i.speedup_low:.2f}x): savings are not established"
        )
    else:
        verdict = (
            f"saves {usd(saved)}/month ({usd(saved_low)}-{usd(saved_high)}); "
            f"pays back the ${i.pilot_one_off_usd:,.0f} pilot in {pb:,.0f} days"
        )
    return RoiResult(
        inputs=i,
        effective_speedup=eff,
        effective_speedup_low=eff_low,
        effective_speedup_high=eff_high,
        dense_seconds_per_request=t_dense,
        sparse_seconds_per_request=t_sparse,
        dense_gpu_hours_day=h_dense,
        sparse_gpu_hours_day=h_sparse,
        sparse_gpu_hours_day_low=h_best,
        sparse_gpu_hours_day_high=h_worst,
        dense_usd_month=c_dense,
        sparse_usd_month=c_sparse,
        saved_usd_month=saved,
        saved_usd_month_low=saved_low,
        saved_usd_month_high=saved_high,
        payback_days=pb,
        payback_days_low=payback_days(i.pilot_one_off_usd, saved_high),
        payback_days_high=payback_days(i.pilot_one_off_usd, saved_low),
        pays_off=pays_off,
        certain=certain,
        verdict=verdict,
        decode_saved_usd_month=c_sparse_dense_decode - c_sparse,
    )


def _sparse_decode(i: RoiInputs) -> tuple[float | None, float | None, float | None]:
    """The sparse arm's decode throughput (estimate, low, high); the dense one when not sparse."""
    if i.sparse_decode_tps is None:
        if i.sparse_decode_tps_low is not None or i.sparse_decode_tps_high is not None:
            raise ValueError("sparse_decode_tps_low/high need sparse_decode_tps")
        return i.decode_tps, i.decode_tps, i.decode_tps
    if i.decode_tps is None:
        raise ValueError(
            "sparse_decode_tps needs decode_tps (the dense decode throughput it is compared with)"
        )
    _check("sparse_decode_tps", i.sparse_decode_tps)
    lo = i.sparse_decode_tps if i.sparse_decode_tps_low is None else i.sparse_decode_tps_low
    hi = i.sparse_decode_tps if i.sparse_decode_tps_high is None else i.sparse_decode_tps_high
    _check("sparse_decode_tps_low", lo)
    _check("sparse_decode_tps_high", hi)
    if not lo <= i.sparse_decode_tps <= hi:
        raise ValueError(
            f"sparse decode interval must contain the estimate: {lo} <= {i.sparse_decode_tps} <= {hi}"
        )
    return i.sparse_decode_tps, lo, hi


def decode_outcome(decode: dict[str, Any] | None, roi: RoiResult) -> dict[str, Any]:
    """What sparse decode does for the use case, for the ROI's reader: `status` ("dense": the plan
    decodes densely; "below_break_even": every measured context is shorter than the plan's break-even,
    so decode runs the dense path, 1.00x by construction; "dense_layers": the plan's decode section
    keeps every layer dense (calibration found no budget that pays within the use case's contexts),
    1.00x likewise; "measured": a side-by-side speed-up),
    `speedup` [low, high], `saved_usd_month` (decode's part of the saving), `line` (a sentence) and
    `short` (a table cell). `decode` is the evaluation report's decode section ({"rows", "summary"})."""
    s = (decode or {}).get("summary")
    if not s or s.get("sparse_decode") is False:  # dense decode timed in both arms, or not at all
        return {
            "status": "dense",
            "speedup": 1.0,
            "speedup_low": 1.0,
            "speedup_high": 1.0,
            "saved_usd_month": 0.0,
            "line": "decode: dense in both arms (no decode section in the plan): output tokens cost the same",
            "short": "dense",
        }
    rows = (decode or {}).get("rows") or []
    be = int(s.get("break_even_tokens") or 0)
    # the break-even is itself a timing: a caveat where an overloaded length could move it across a context
    busy = break_even_overload(s.get("break_even_host"), s.get("context_tokens"))
    caveat = f" ({busy})" if busy else ""
    below = sum(1 for r in rows if (r.get("extra") or {}).get("below_break_even"))
    same = sum(
        1
        for r in rows
        if (r.get("extra") or {}).get("identical", (r.get("extra") or {}).get("below_break_even"))
    )
    ctx_lo, ctx_hi = s.get("context_tokens") or (None, None)
    out = {
        "break_even_tokens": be,
        "context_tokens": [ctx_lo, ctx_hi],
        "density": s.get("density"),
        "saved_usd_month": roi.decode_saved_usd_month,
        "break_even_overloaded": busy is not None,
    }
    flat = {"speedup": 1.0, "speedup_low": 1.0, "speedup_high": 1.0}
    if rows and same == len(rows) and below < len(rows):
        return {
            **out,
            **flat,
            "status": "dense_layers",
            "line": (
                f"decode: no decode saving: every layer decodes densely (break-even {be:,} tokens{caveat}), "
                "so decode runs at 1.00x and output tokens cost the same"
            ),
            "short": f"1.00x (dense; break-even {be:,} tokens)",
        }
    if rows and below == len(rows):
        return {
            **out,
            "status": "below_break_even",
            "speedup": 1.0,
            "speedup_low": 1.0,
            "speedup_high": 1.0,
            "line": (
                f"decode: no decode saving at this context length: {ctx_hi:,} tokens < break-even "
                f"{be:,} tokens{caveat}, so decode stays dense (1.00x) and output tokens cost the same"
            ),
            "short": f"1.00x ({ctx_hi:,} < break-even {be:,} tokens)",
        }
    # the speed-up and interval the dollars beside it are priced at (the ROI's sparse decode throughput
    # over the dense one: the paired runs at the ROI's 95%), not the evaluation summary's own figures
    if roi.inputs.sparse_decode_tps is not None and roi.inputs.decode_tps:
        sp, lo, hi = (x / roi.inputs.decode_tps for x in _sparse_decode(roi.inputs))  # type: ignore[operator]
    else:  # an ROI without a sparse decode throughput: the summary's figures
        sp, lo, hi = (s.get(k) for k in ("weighted_speedup", "weighted_speedup_low", "weighted_speedup_high"))
    saved = roi.decode_saved_usd_month
    money = f"saves ${saved:,.0f}/month" if saved >= 0 else f"costs ${-saved:,.0f}/month more"
    where = ""
    if ctx_hi is not None:
        span = f"{ctx_lo:,}-{ctx_hi:,}" if ctx_lo != ctx_hi else f"{ctx_hi:,}"
        where = f" at {span} tokens of context"
    read = f" ({s['density']:.0%} of the cache read)" if s.get("density") is not None else ""
    line = f"decode: {sp:.2f}x [{lo:.2f}, {hi:.2f}]{where}{read}: {money}"
    if below:
        line += (
            f"; {below} of {len(rows)} lengths are below the break-even ({be:,} tokens{caveat}): dense there"
        )
    return {
        **out,
        "status": "measured",
        "speedup": sp,
        "speedup_low": lo,
        "speedup_high": hi,
        "line": line,
        "short": f"{sp:.2f}x [{lo:.2f}, {hi:.2f}]",
    }


def roi_for_spec(
    spec: UseCaseSpec,
    *,
    dense_tps: float,
    sparse_tps: float,
    speedup_interval: tuple[float, float] | None = None,
    decode_tps: float | None = None,
    sparse_decode_tps: float | None = None,
    sparse_decode_interval: tuple[float, float] | None = None,
) -> RoiResult:
    """ROI from a use case's traffic and cost inputs and measured throughputs at its length mix.
    Without an interval the point estimate is used for both ends (say so where it is shown).
    `sparse_decode_tps` (with its interval, tokens/s): output tokens of the sparse arm at the measured
    sparse decode throughput; None when the plan decodes densely."""
    _check("sparse_tps", sparse_tps)
    _check("dense_tps", dense_tps)
    s = sparse_tps / dense_tps
    lo, hi = speedup_interval if speedup_interval is not None else (s, s)
    return compute_roi(
        RoiInputs(
            dense_tps=dense_tps,
            speedup=s,
            speedup_low=min(lo, s),
            speedup_high=max(hi, s),
            interval_measured=speedup_interval is not None,
            requests_per_day=spec.traffic.requests_per_day,
            prompt_tokens=spec.traffic.prompt_tokens.mean(),
            output_tokens=spec.traffic.output_tokens.mean(),
            gpu_usd_per_hour=spec.cost.gpu_usd_per_hour,
            utilisation=spec.cost.utilisation,
            pilot_one_off_usd=spec.cost.pilot_one_off_usd,
            decode_tps=decode_tps,
            sparse_decode_tps=sparse_decode_tps,
            sparse_decode_tps_low=(
                None
                if sparse_decode_interval is None or sparse_decode_tps is None
                else min(sparse_decode_interval[0], sparse_decode_tps)
            ),
            sparse_decode_tps_high=(
                None
                if sparse_decode_interval is None or sparse_decode_tps is None
                else max(sparse_decode_interval[1], sparse_decode_tps)
            ),
        )
    )


def speedup_interval(
    dense_seconds: Sequence[float], sparse_seconds: Sequence[float], confidence: float = ROI_CONFIDENCE
) -> tuple[float, float, float]:
    """The speed-up from paired timings (`dense_seconds[i]` and `sparse_seconds[i]` timed back to back:
    an evaluation's round i at the use case's length mix) with the ROI's confidence interval: Student's
    t over the pairs' log ratios (`sparse_core.speedup`). Returns (estimate, low, high); the estimate is
    the geometric mean of the pairs' ratios, always inside the interval. Needs >= 2 pairs."""
    from sparse_core.speedup import paired_speedup  # scipy: only when an interval is asked for

    if len(dense_seconds) < 2 or len(sparse_seconds) < 2:
        raise ValueError("need at least 2 timings per arm for an interval")
    s = paired_speedup(dense_seconds, sparse_seconds, confidence)
    return s.estimate, s.low, s.high


DENSE_PLAN_DENSITY = 0.999  # a plan keeping this share of blocks computes what the dense model does


def dense_plan(density: float | None, decode_status: str | None) -> bool:
    """A plan that computes what the dense model does: it keeps every prefill block and decodes densely.
    Whatever its timings say, it saves nothing (timing noise above 1x is no saving): it is not piloted
    (`pilot_skip_reason`), and the portfolio counts no established saving and shows no payback for it."""
    return density is not None and density >= DENSE_PLAN_DENSITY and decode_status != "measured"


@dataclass(frozen=True)
class PilotSkip:
    """Why a pilot would be wasted traffic: `why` (the finding, e.g. "no saving expected (-$23/month, at
    best $187)") and `then` (what follows from it); `offers_override`: the advice offers to pilot anyway (a
    saving not established), which `said(override)` completes with the override of the command that
    asked: `sparsepilot run`'s --pilot-all (flows.main_job), the cycle's flow parameter (flows.cycle).
    `str()` names none: `pilot NAME`'s refusal names its own command (`pilot_batches.NotPiloted`); the
    words used to name --pilot-all, `run`'s flag, to a user of `pilot`, whose flag is --pilot-anyway."""

    why: str
    then: str
    offers_override: bool = False

    def said(self, override: str | None = None) -> str:
        anyway = f" (or pilot anyway with {override})" if override and self.offers_override else ""
        return f"{self.why}: {self.then}{anyway}"

    def __str__(self) -> str:
        return self.said()


def pilot_skip_reason(
    *,
    met_budget: bool | None,
    density: float | None,
    saved_usd_month: float | None,
    saved_usd_month_high: float | None = None,
    saved_usd_month_low: float | None = None,
    pilot_anyway: bool = False,
    decode_status: str | None = None,
    measured_under_overload: str | None = None,
) -> PilotSkip | None:
    """Why a pilot would be wasted traffic, or None when it is worth running. A pilot costs real requests and
    the spec's one-off cost; it can only pay off when a sparse plan met the quality budget, actually skips
    blocks, and the evaluation establishes a saving: its interval lies above zero (a wide interval from
    timings on a busy host is no ground to spend traffic on; no interval at all, one timing pair, is none
    either). `pilot_anyway` (`pilot`'s --pilot-anyway, `run`'s --pilot-all) waives every case but the
    first; without a plan that met the budget there is nothing to pilot. The plan is judged as priced:
    `density` is the prefill's share of blocks kept and `decode_status` the ROI's decode outcome
    (`decode_outcome`'s status): a plan that keeps every prefill block but decodes sparsely ("measured")
    is not dense, and its saving decides. `measured_under_overload` (`timing_overload`'s warning, None on
    a quiet host): timings kept under overload are off in either direction, so a saving they do not
    establish is "not established" with the advice to re-evaluate on a quieter host, never the finding
    that sparse attention "does not pay off here" (still no pilot: no traffic is spent on a saving no
    clean timing showed; `pilot_anyway` waives it)."""
    if met_budget is False:
        return PilotSkip(calibration_outcome.MISSED_BUDGET, calibration_outcome.STAYS_DENSE)
    if pilot_anyway:
        return None
    if dense_plan(density, decode_status):
        return PilotSkip(f"the plan keeps {density:.2%} of blocks (as dense)", "nothing to pilot")
    if (
        measured_under_overload
        and saved_usd_month is not None
        and not _established(saved_usd_month, saved_usd_month_low, saved_usd_month_high)
    ):
        return PilotSkip(
            f"saving not established ({usd(saved_usd_month)}/month"
            f"{_range(saved_usd_month_low, saved_usd_month_high)}, timed under overload)",
            "the speed was timed while other processes left too little CPU, which moves a speed-up either "
            "way; re-evaluate on a quieter host",
            offers_override=True,
        )
    if saved_usd_month is not None and saved_usd_month <= 0:
        high = "" if saved_usd_month_high is None else f", at best {usd(saved_usd_month_high)}"
        return PilotSkip(
            f"no saving expected ({usd(saved_usd_month)}/month{high})",
            "sparse attention does not pay off here, stays dense, not piloted",
        )
    if saved_usd_month is not None and saved_usd_month_low is None and saved_usd_month_high is None:
        return PilotSkip(
            f"saving not established ({usd(saved_usd_month)}/month, {NO_INTERVAL})",
            "its estimate alone supports no saving; re-evaluate with more repeats",
            offers_override=True,
        )
    if saved_usd_month is not None and saved_usd_month_low is not None and saved_usd_month_low <= 0:
        high = "" if saved_usd_month_high is None else f", {usd(saved_usd_month_high)}"
        return PilotSkip(
            f"saving not established ({usd(saved_usd_month)}/month, interval "
            f"{usd(saved_usd_month_low)}{high})",
            "the speed measurement does not support a saving; re-evaluate on a quiet host",
            offers_override=True,
        )
    return None


def _established(saved: float, low: float | None, high: float | None) -> bool:
    """A saving the evaluation establishes: positive at the estimate, with a measured interval whose low
    end is above zero (`pilot_skip_reason`'s last three cases)."""
    return saved > 0 and not (low is None and high is None) and (low is None or low > 0)


def _range(low: float | None, high: float | None) -> str:
    """What was measured of the saving's interval: ", interval $a, $b", ", at best $b", or ""."""
    if low is not None and high is not None:
        return f", interval {usd(low)}, {usd(high)}"
    if high is not None:
        return f", at best {usd(high)}"
    return "" if low is None else f", at worst {usd(low)}"


def evaluation_pilot_skip(
    evaluation: Mapping[str, Any] | None,
    *,
    met_budget: bool | None = None,
    pilot_anyway: bool = False,
    calibrated_density: float | None = None,
) -> PilotSkip | None:
    """`pilot_skip_reason` of an evaluation's figures (`density`, `savings_month_usd`,
    `savings_month_low` / `_high`, `decode_status`, `measured_under_overload`: a summary, a portfolio
    row, a run's columns): the
    one rule of "this plan is not piloted", which every path that starts a pilot obeys
    (`rollout.pilot_batches.ensure_pilot_in`: the cycle, `sparsepilot pilot`, an import, the main job)
    and whose words the portfolio shows. No evaluation: the calibration's outcome decides, and the plan's
    own density, `calibrated_density` (the model version's prefill density, given where its plan decodes
    densely: `rollout.runs.pilot_skip`): a plan that keeps every block is not piloted, evaluated or not
    (it was piloted, and promoted, when an import followed `calibrate` straight away); the saving rules
    need an evaluation's figures."""
    ev = evaluation or {}
    return pilot_skip_reason(
        met_budget=met_budget,
        density=ev.get("density") if evaluation else calibrated_density,
        saved_usd_month=ev.get("savings_month_usd"),
        saved_usd_month_high=ev.get("savings_month_high"),
        saved_usd_month_low=ev.get("savings_month_low"),
        decode_status=ev.get("decode_status"),
        measured_under_overload=ev.get("measured_under_overload"),
        pilot_anyway=pilot_anyway,
    )


def plan_money(figures: Mapping[str, Any]) -> dict[str, Any]:
    """What a plan's money is, the one rule every surface that shows it applies (the portfolio, the
    use-case page, the Approvals card, `sparsepilot evaluate NAME`, the evaluate flow's result), from an
    evaluation's figures as `evaluation_pilot_skip` reads them (a run's summary, a portfolio row) and its
    stored `payback_days`: the saving as measured with its interval; the payback only where the saving is
    established (`evaluation_pilot_skip` finds nothing against it), else None; `not_established`, why no
    saving is established (that finding), else None; and `saves_nothing`, for a plan that keeps every
    block (`dense_plan`), the verdict that replaces the stored one, which priced its timing noise as a
    saving ("saves $201/month ...; pays back the $3,000 pilot in 455 days"), else None."""
    skip = evaluation_pilot_skip(figures)
    saved, density = figures.get("savings_month_usd"), figures.get("density")
    dense = dense_plan(density, figures.get("decode_status"))
    return {
        "savings_month_usd": saved,
        "savings_month_low": figures.get("savings_month_low"),
        "savings_month_high": figures.get("savings_month_high"),
        "payback_days": figures.get("payback_days") if skip is None else None,
        "not_established": None if skip is None else skip.why,
        "saves_nothing": (
            f"saves nothing: the plan keeps {density:.2%} of blocks and decodes densely, so it computes what "
            "the dense model does"
            + ("" if saved is None else f"; the {usd(saved)}/month its timings show is timing noise")
            + ": no payback, nothing to pilot"
            if dense
            else None
        ),
    }


def timing_overload(timing_host: dict[str, Any] | None) -> str | None:
    """The warning an ROI's figures carry when some of the timings behind them were kept under overload
    (`roi["timing_host"]`: the prefill pairs' and the decode runs' `PairMeter` records, each with
    `pairs_timed` and `pairs_kept_under_overload`), or None when every pair was timed on a host that had
    room for it (or nothing was recorded). A pair is kept flagged once its retimes are spent
    (docs/sparse_core.md, "Measurements"), so the speed-up and the dollars then say what a busy host
    measured, not what the plan does; the figures stay as measured, with this beside them."""
    kept = timed = 0
    parts = []
    for block in ("prefill", "decode"):
        h = (timing_host or {}).get(block) or {}
        k, n = int(h.get("pairs_kept_under_overload") or 0), int(h.get("pairs_timed") or 0)
        kept, timed = kept + k, timed + n
        if k:
            parts.append(f"{block} {k} of {n}")
    be = break_even_overload((timing_host or {}).get("break_even"), (timing_host or {}).get("decode_context"))
    if not kept:
        return be and f"measured under overload: {be}"
    return (
        f"measured under overload: {kept} of {timed} timed pairs ({', '.join(parts)}) were timed while "
        "other processes left too little CPU; rerun on a quieter host" + (f"; and {be}" if be else "")
    )


def break_even_overload(
    break_even_host: dict[str, Any] | None, context_tokens: Sequence[int] | None = None
) -> str | None:
    """The caveat a decode break-even carries when calibration timed it while the host was overloaded
    in a way that could change what the ROI says, or None (a quiet host, a given break-even, a record
    from before the meter, or overloaded lengths that cannot move it across the use case's contexts).

    `break_even_host`: `sparse_core.decode.break_even.break_even_host` of the plan's calibration, in
    `roi["timing_host"]["break_even"]` and the decode summary; `context_tokens`: the evaluation's decode
    contexts [shortest, longest] (None: not recorded, every span counts). The break-even is a timing:
    on a busy host the sparse step's many small ops are preempted more than the one dense call, so it
    comes out longer. It is the shortest length from which every longer measured length is faster, so
    only the overloaded lengths at or above the longest length that was not faster can move it, and
    then only within the span `overload_spans` records per budget: from `low` (those lengths faster on
    a quiet host) to `high` (those lengths slower). A context c is decoded on the other side of a
    break-even moved within [low, high] only when low <= c < high, so the caveat stands only where some
    context of the use case lies there: below the break-even, where the decode line says "no decode
    saving", or just above it. A record from before `overload_spans` says only how many lengths were
    kept under overload: the caveat stands, as it cannot tell which."""
    h = break_even_host or {}
    k = int(h.get("lengths_kept_under_overload") or 0)
    if not k:
        return None
    n = int(h.get("lengths_timed") or 0)
    spans = h.get("overload_spans")
    if spans is None:  # recorded before the spans: which lengths were overloaded is unknown
        return (
            f"the decode break-even was timed at calibration while the host was overloaded ({k} of "
            f"{n} cache lengths); recalibrate on a quieter host"
        )
    ctx = list(context_tokens) if context_tokens and None not in context_tokens else None
    moved = [
        sp for sp in spans.values() if ctx is None or (ctx[0] < int(sp["high"]) and ctx[1] >= int(sp["low"]))
    ]
    if not moved:
        return None
    kept = sum(len(sp["lengths"]) for sp in moved)
    lengths = sorted({int(t) for sp in moved for t in sp["lengths"]})
    low, high = min(int(sp["low"]) for sp in moved), max(int(sp["high"]) for sp in moved)
    at = ", ".join(f"{t:,}" for t in lengths)
    return (
        f"the decode break-even was timed at calibration while the host was overloaded at {kept} "
        f"of {n} cache lengths that decide it ({at} tokens): on a quiet host it could lie anywhere from "
        f"{low:,} to {high:,} tokens; recalibrate on a quieter host"
    )


def priced_at(spec_version: int | None, current_spec_version: int | None) -> str | None:
    """The note an evaluation's dollars carry when they are priced at a spec version that is no longer
    the use case's current one (`usecase add --new-version` may change the traffic and cost they are
    priced at), or None when they are current or the version was not recorded (runs before migration
    0011). The speed-ups stay as measured; the dollars are the old version's until it is re-evaluated."""
    if spec_version is None or current_spec_version is None or spec_version == current_spec_version:
        return None
    return f"priced at spec v{spec_version}; current is v{current_spec_version}: re-evaluate to re-price"
