"""`usecase add` refuses a dataset calibration can never use, at the spec's calibration settings and at
the quick calibration's, which the main job (`sparsepilot run`) uses: another split (review T3)."""

from __future__ import annotations

import random
from pathlib import Path

from rollout.spec import load_spec
from rollout.validation import QUICK_HOLDOUT_FRACTION, calibration_shortfall
from sparse_core import texts_shortfall

SPEC = Path(__file__).resolve().parents[2] / "examples" / "usecases" / "support-chat.yaml"


def test_a_dataset_only_the_quick_split_cannot_use_is_refused() -> None:
    spec = load_spec(SPEC)
    c = spec.quality_budget.calibration
    assert c.holdout_fraction < QUICK_HOLDOUT_FRACTION and c.confidence is None
    # prompts whose spec split calibrates and whose quick split cannot (searched, seeded)
    rng = random.Random(0)
    for _ in range(20_000):
        tokens = {f"prompt {i}": rng.randint(5, 200) for i in range(5)}
        prompts = list(tokens)

        def at(holdout: float, tokens: dict[str, int] = tokens, prompts: list[str] = prompts) -> str | None:
            return texts_shortfall(
                prompts, tokens.__getitem__, holdout, c.seed, block_size=64, max_seq_len=512
            )

        if at(c.holdout_fraction) is None and at(QUICK_HOLDOUT_FRACTION) is not None:
            break
    else:
        raise AssertionError("no such dataset found")
    short = calibration_shortfall(spec, prompts, tokens)  # passed: only the spec's split was checked
    assert short is not None and short.startswith("the quick calibration (`sparsepilot run`'s)"), short
