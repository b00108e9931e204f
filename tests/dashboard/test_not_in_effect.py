"""An approval recorded whose promotion did not take effect (MLflow did not move the alias: the model is
not in this MLflow), on every page (review s48 B3, B8)."""

from __future__ import annotations

from typing import Any

from tests.dashboard.apptest_helpers import new_app, open_page, sign_in, texts


def test_an_approved_promotion_not_in_effect_is_said_so_and_what_finishes_it(seeded: dict[str, Any]) -> None:
    """B8: the click's message was a red "The action failed ... retry with the same idempotency key",
    though the approval was recorded. B3: the portfolio and the use-case page then said the use case
    "waits for more samples (240/300)"; what it needs is someone to finish the promotion."""
    go = seeded["contract-summarisation:decision"]
    finish = f"sparsepilot promote contract-summarisation --decision {go}"
    at = open_page(sign_in(new_app(), "alice"), "approvals")
    at.text_area(key=f"reason_{go}").input("saves money, quality holds")
    at.button(key=f"approve_{go}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    said = at.warning[0].value.replace("\\", "")
    assert said.startswith("Approved and recorded; the promotion is not in effect: MLflow did not move"), said
    assert f"Finish it with `{finish}`" in said and "idempotency key" not in said
    listed = at.warning[1].value.replace("\\", "")  # the page's list of what is not in effect
    assert "its alias move failed: MlflowException: Registered Model with name=" in listed, listed
    assert "MLflow unreachable?" not in listed  # a guess, where MLflow had answered

    waits = f"the promotion to be finished (approved by alice; not in effect): {finish}"
    open_page(at, "portfolio")  # the use-case page's "Waits for" is the same row's (queries.portfolio)
    shown = at.dataframe[0].value.set_index("name")
    assert shown.loc["contract-summarisation", "waits_for"] == waits, texts(at)
