"""Pure pieces of the pilot: deterministic arm assignment at the step's traffic %, the pilot's traffic
order (independent of the assignment hash), and the CLI's two forms of calibrate/evaluate."""

from __future__ import annotations

from typer.testing import CliRunner


def test_arm_assignment_is_deterministic_and_follows_the_traffic_share() -> None:
    from rollout.pilots import assign_arm, hash_unit

    ids = [f"req-{i}" for i in range(20_000)]
    arms = [assign_arm(r, "salt-1", 10.0) for r in ids]
    assert arms == [assign_arm(r, "salt-1", 10.0) for r in ids]  # same request, same arm, every time
    share = arms.count("treatment") / len(arms)
    assert 0.09 < share < 0.11  # 10% +- 5 binomial sd (sd = 0.0021)
    assert sum(a != b for a, b in zip(arms, (assign_arm(r, "salt-2", 10.0) for r in ids), strict=True)) > 2000
    # a ramp only ever adds requests to the treatment arm
    assert all(
        assign_arm(r, "salt-1", 50.0) == "treatment"
        for r, a in zip(ids, arms, strict=True)
        if a == "treatment"
    )
    assert all(0.0 <= hash_unit(r, "s") < 1.0 for r in ids[:100])


def test_pilot_traffic_order_does_not_bias_the_split() -> None:
    from flows.pilot import choose_requests
    from rollout.pilots import assign_arm

    rows = [{"id": f"r{i}", "prompt": "p"} for i in range(400)]
    used: set[str] = set()
    first = choose_requests(rows, used, "salt", 100)
    share = sum(assign_arm(rid, "salt", 50.0) == "treatment" for rid, _ in first) / 100
    assert 0.3 < share < 0.7  # ordering by the assignment hash itself would give 1.0
    second = choose_requests(rows, used, "salt", 350)  # exhausts the dataset, then replays with new ids
    ids = [rid for rid, _ in first + second]
    assert len(ids) == len(set(ids)) == 450
    assert sum(rid.endswith("~r2") for rid in ids) == 50


def test_calibrate_has_a_use_case_form_and_a_standalone_form() -> None:
    from sparsepilot.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["calibrate"])
    assert res.exit_code == 2 and "give a use case NAME, or --model --texts --out" in res.output
    res = runner.invoke(app, ["calibrate", "some-use-case", "--model", "smollm2-135m"])
    assert res.exit_code == 2 and "either a use case NAME or --model" in res.output
    res = runner.invoke(app, ["evaluate", "--model", "smollm2-135m"])
    assert res.exit_code == 2 and "--plan" in res.output
    assert "--texts" in runner.invoke(app, ["calibrate", "--help"]).output
