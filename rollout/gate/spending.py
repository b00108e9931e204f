"""Spending alpha across a use case's pilots: the GO level of its k-th pilot.

Each pilot's GO test keeps its own false GO <= its level at any number of looks (Ville's inequality). A use
case can be piloted again, though: a pilot that ends NO-GO (or is superseded) is followed by a new
calibration and a new pilot on the same held-apart requests. If every pilot ran at the spec's alpha,
trying plan after plan until one says GO would ship an inferior plan with probability up to k alpha
after k tries. Spending the spec's alpha as a convergent series over the pilots bounds
that for the use case's whole life: pilot k runs at

    alpha_k = alpha * 6 / (pi^2 k^2),  so  sum over k >= 1 of alpha_k = alpha  (Basel: sum 1/k^2 = pi^2/6),

and by the union bound P(some pilot of the use case gives a false GO) <= sum_k alpha_k <= alpha, whatever
the pilots' dependence (they draw the same held-apart rows) and however the owner chose to try again, as
long as each pilot's own level holds: its plan is fixed before it answers the pilot's requests (calibration
reads none of the held-apart rows).
The first pilot runs at 0.61 alpha: log(1/alpha_1) / log(1/alpha) = 1.17 at alpha 0.05, about a sixth
more requests to a GO; the second at 0.15 alpha (1.63x); the cost of a retry rises with each one.

**What was spent comes first.** A use case may have pilots that ran at alpha itself: started before
alpha was spent across pilots (no stored level), or under `spending="pilot"` before the spec chose
`use_case`. The series alone would then give later pilots alpha * (1 - 6/pi^2) more, up to 1.39 alpha in
all, so a pilot's level is the series' term capped by what its use case has left, alpha less the levels
of every pilot it started before (`pilot_alpha(..., spent_before=)`): the levels still sum to at most
alpha. Where nothing is left, no new pilot can say GO and none is started (`pilots.start_pilot` names
the way out: `gate.alpha_spending: pilot` in a new spec version, the owner's choice).

`spending="pilot"` keeps the older promise, per pilot only (alpha_k = alpha): the owner's choice, written in
the spec (`gate.alpha_spending`) and in docs/gate.md. Futility and the guardrails stop (NO-GO) at the spec's
alpha either way: a false stop ships nothing, so it needs no spending.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, get_args

from rollout.spec import GateSpec
from rollout.words import counted

# The spec's choices and defaults, read from its one definition (rollout.spec.GateSpec).
SPENDING: tuple[str, ...] = get_args(GateSpec.model_fields["alpha_spending"].annotation)
DEFAULT_SPENDING: str = GateSpec.model_fields["alpha_spending"].default
DEFAULT_ALPHA: float = GateSpec.model_fields["alpha"].default


def pilot_alpha(
    alpha: float, number: int, spending: str = DEFAULT_SPENDING, *, spent_before: float = 0.0
) -> float:
    """The GO level of the use case's pilot `number` (1 = its first pilot) under `spending`: the series'
    term, capped by what the use case has left (`spent_before`: the levels of the pilots it started
    before, `spent`); 0.0 when nothing is left."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"pilot number must be a whole number >= 1, got {number!r}")
    if spending == "pilot":
        return alpha
    if spending != "use_case":
        raise ValueError(f"alpha spending must be one of {', '.join(SPENDING)}, got {spending!r}")
    return max(0.0, min(alpha * 6.0 / (math.pi**2 * number**2), alpha - spent_before))


def spent(alpha: float, levels: Iterable[float | None]) -> float:
    """What pilots with these GO levels have spent together; None is a pilot started before alpha was
    spent across pilots, whose GO test runs at alpha itself."""
    return math.fsum(alpha if a is None else a for a in levels)


def account(gate: Mapping[str, Any], levels: Iterable[float | None]) -> dict[str, Any]:
    """A use case's false-GO budget for people: the GO level each pilot it started runs at (a pilot
    without a stored level at alpha), what they spent together, and the level its next pilot's GO would
    be held to. `gate`: the `gate` section of its stored spec (a spec stored without `alpha_spending`
    had the default)."""
    alpha = gate.get("alpha", DEFAULT_ALPHA)
    spending = gate.get("alpha_spending", DEFAULT_SPENDING)
    levels = [alpha if a is None else a for a in levels]
    used = spent(alpha, levels)
    return {
        "alpha": alpha,
        "alpha_spending": spending,
        "levels": levels,
        "pilots": len(levels),
        "spent": used,
        "next_go_alpha": pilot_alpha(alpha, len(levels) + 1, spending, spent_before=used),
    }


def describe(budget: Mapping[str, Any]) -> str:
    """One line from `account`, for the use-case page and `usecase show`."""
    alpha, nxt = f"{budget['alpha']:g}", f"{budget['next_go_alpha']:.3g}"
    if not budget["pilots"]:
        return f"No pilot yet; the first pilot's GO will be held to {nxt}."
    share = (
        f"Each pilot's GO is held to alpha {alpha} on its own (gate.alpha_spending: pilot)"
        if budget["alpha_spending"] == "pilot"
        else f"The pilots share the use case's alpha {alpha} for a false GO: {budget['spent']:.3g} spent"
    )
    if budget["next_go_alpha"] <= 0:
        return (
            f"{share} over {counted(budget['pilots'], 'pilot')}; nothing is left for a next pilot's GO "
            "(a new spec version with gate.alpha_spending: pilot holds each pilot to alpha on its own)."
        )
    return f"{share} over {counted(budget['pilots'], 'pilot')}; a next pilot's GO would be held to {nxt}."
