"""How many prompts decode calibration's fidelity bound needs (`DecodeLimits.confidence`): its unit is
a prompt, one block its whole continuation (sparse_core.fidelity_bound), and the search judges each of
its steps at `eps_search.step_alpha`'s level. Torch-free, so a spec can be checked without a model."""

from __future__ import annotations

from sparse_core.eps_search import step_alpha
from sparse_core.fidelity_bound import min_blocks

# the decode search's checks unless a DecodeLimits says otherwise (its max_joint_checks)
SEARCH_STEPS = 5


def step_confidence(confidence: float, steps: int = SEARCH_STEPS) -> float:
    """The level each of `steps` checks is judged at so that the plan returned holds at `confidence`."""
    return 1 - step_alpha(1 - confidence, steps)


def prompts_needed(confidence: float, steps: int = SEARCH_STEPS) -> int:
    """The fewest prompts for which the bound at `confidence` over a `steps`-step search is finite
    (10 at 0.95 over 5 steps)."""
    return min_blocks(step_confidence(confidence, steps))


def check_prompts(confidence: float, n_prompts: int, steps: int = SEARCH_STEPS) -> None:
    """ValueError naming decode.n_prompts when `n_prompts` prompts are too few for the bound."""
    need = prompts_needed(confidence, steps)
    if n_prompts < need:
        raise ValueError(
            f"decode.confidence {confidence}: judged at {step_confidence(confidence, steps):.4g} on each "
            f"of the search's up to {steps} steps, the bound (over prompts: a prompt's continuation is "
            f"its unit) needs decode.n_prompts >= {need}, got {n_prompts}. Give more prompts (short "
            "continuations will do: decode.new_tokens), or no confidence"
        )


__all__ = ["SEARCH_STEPS", "check_prompts", "prompts_needed", "step_confidence"]
