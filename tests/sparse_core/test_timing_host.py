"""What the host did while a library call timed a plan: a busy spell in one arm of a pair flags the pair
(sparse_core.host.PairMeter), and the caller's torch threads are left as found."""

from __future__ import annotations

import dataclasses
import time

import pytest

from sparse_core import SparsePlan, is_sparsified, load_model


def _busy_during(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """A synthetic neighbour: host.measure's wait share is the share of the measured span that overlaps
    the returned list's busy windows (our threads wait throughout them, run freely otherwise)."""
    from sparse_core import host

    real = host.measure
    busy: list[tuple[float, float]] = []

    def fake(start, end, *, threads=None):  # noqa: ANN001, ANN202
        span = max(end.wall - start.wall, 1e-9)
        waited = sum(max(0.0, min(end.wall, b) - max(start.wall, a)) for a, b in busy) / span
        load = real(start, end, threads=threads)
        over = waited > host.WAIT_SHARE_LIMIT
        return dataclasses.replace(load, wait_share=round(waited, 3), overloaded=over)

    monkeypatch.setattr(host, "measure", fake)
    return busy


def test_a_busy_spell_in_the_dense_arm_alone_has_the_pair_timed_again(tiny_llama_dir, monkeypatch):
    """The dense arm of the first pair runs while a neighbour keeps our thread waiting (1.4x slower), the
    sparse arm four times as long on a quiet host: over the whole pair the wait share is under the limit,
    so the pair was kept unflagged and the speed-up read 2.8x for a 2.0x plan. Each arm is now judged on
    its own: that pair is timed again, and the speed-up is the plan's."""
    from sparse_core import evaluation

    model, tok = load_model(tiny_llama_dir)
    busy = _busy_during(monkeypatch)
    real = evaluation._time_prefill
    dense_calls = 0

    def timed(m, ids):  # noqa: ANN001, ANN202
        nonlocal dense_calls
        real(m, ids)
        if is_sparsified(m):
            time.sleep(0.2)
            return 0.5
        dense_calls += 1
        if dense_calls == 2:  # the first timed dense arm (the first call is its untimed warm-up)
            t = time.monotonic()
            time.sleep(0.05)
            busy.append((t, time.monotonic()))
            return 1.4
        return 1.0

    monkeypatch.setattr(evaluation, "_time_prefill", timed)
    rows, summary = evaluation.measure_speed(model, tok, SparsePlan(block_size=32, tau=0.9), [128], repeats=2)
    host = summary["host"]
    assert host["pairs_retimed_for_overload"] == 1 and host["pairs_kept_under_overload"] == 0, host
    assert rows[0].dense_seconds == [1.0, 1.0] and rows[0].speedup == pytest.approx(2.0)


def test_an_arm_is_judged_on_its_own_wait_share_where_it_was_measured() -> None:
    """`pair_load`: an arm over the limit flags the pair and its share is the pair's; an arm whose wait
    share was not measured (too short, no schedstat) leaves the span's judgement as it is."""
    from sparse_core.host import HostLoad, pair_load

    def load(share: float | None, over: bool) -> HostLoad:
        return HostLoad(2.0, 1, 1.0, 0.2, None, None, overloaded=over, wait_share=share)

    span = load(0.21, False)
    assert pair_load(span, [load(0.29, True), load(0.01, False)]) == dataclasses.replace(
        span, overloaded=True, wait_share=0.29
    )
    assert pair_load(span, [load(None, True), load(0.02, False)]) == span
    assert pair_load(load(0.4, True), []).overloaded


def _speed(model, tok) -> None:  # noqa: ANN001
    from sparse_core.evaluation import measure_speed

    measure_speed(model, tok, SparsePlan(block_size=32, tau=0.9), [96], repeats=2)


def _decode_speed(model, tok) -> None:  # noqa: ANN001
    from sparse_core.evaluation import EvalSuite, measure_decode_speed

    suite = EvalSuite(decode_new_tokens=2, decode_repeats=1)
    measure_decode_speed(model, tok, SparsePlan(block_size=32, tau=0.9), [96], None, suite=suite)


def _calibration_refused(model, tok) -> None:  # noqa: ANN001
    from sparse_core.calibration import calibrate_many

    with pytest.raises(ValueError, match="texts too short to calibrate on"):  # after its thread policy
        calibrate_many(
            model, tok, ["too short", "also short", "short too"], "kl=1,agree=0.3", estimators=("pooled",)
        )


@pytest.mark.parametrize("call", [_speed, _decode_speed, _calibration_refused])
def test_a_library_call_leaves_the_callers_torch_threads_as_it_found_them(tiny_llama_dir, call) -> None:
    """The evaluation's timings and calibration choose torch's threads from the CPUs really free; a
    caller's own count (here 3, more than the thread policy gives a test worker) used to stay
    overridden after they returned, or raised."""
    import torch

    model, tok = load_model(tiny_llama_dir)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        call(model, tok)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
