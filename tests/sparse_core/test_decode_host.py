"""Decode timings carry the host's load while they ran, and are retimed under overload like prefill's
(sparse_core.decode.measure, evaluation.measure_decode_speed)."""

from __future__ import annotations

import dataclasses

import pytest

from sparse_core import SparsePlan, load_model
from sparse_core.decode.plan import DecodePlan
from sparse_core.testing import sample_text


def _prompt(tok, n):  # noqa: ANN001
    return tok(sample_text(6000), return_tensors="pt").input_ids[:, :n]


def _overloaded_first(monkeypatch: pytest.MonkeyPatch, n: int) -> list[bool]:
    """The first `n` measured blocks are overloaded (as if another process had taken the cores)."""
    from sparse_core import host

    real = host.measure
    seen: list[bool] = []

    def fake(start, end, *, threads=None):  # noqa: ANN001, ANN202
        load = real(start, end, threads=threads)
        seen.append(len(seen) < n)
        return dataclasses.replace(load, overloaded=seen[-1], others_busy_cores=1.9 if seen[-1] else 0.1)

    monkeypatch.setattr(host, "measure", fake)
    return seen


def test_side_by_side_decode_pairs_are_measured_and_retimed_under_overload(tiny_llama_dir, monkeypatch):
    from sparse_core.decode.measure import compare_decode

    model, tok = load_model(tiny_llama_dir)
    plan = SparsePlan(block_size=32, decode=DecodePlan(budget_tokens=None, tau=1.0))
    seen = _overloaded_first(monkeypatch, 1)
    r = compare_decode(model, plan, _prompt(tok, 300), new_tokens=4, repeats=2, sparse_cache="paged")
    # three measured blocks a pair (each arm and the whole pair): the first pair's first arm was overloaded
    assert len(seen) == 9 and len(r.dense_seconds_per_token) == len(r.sparse_seconds_per_token) == 2
    host = r.extra["host"]
    assert host["pairs_timed"] == 2 and host["pairs_retimed_for_overload"] == 1
    assert host["pairs_kept_under_overload"] == 0 and host["overloaded"] is False
    assert host["max_others_busy_cores"] == 0.1 and host["threads"] >= 1
    # overloaded throughout: retimed at most `repeats` times, then kept and flagged
    seen = _overloaded_first(monkeypatch, 99)
    r = compare_decode(model, plan, _prompt(tok, 300), new_tokens=4, repeats=2, sparse_cache="paged")
    host = r.extra["host"]
    assert (
        len(seen) == 12 and host["pairs_retimed_for_overload"] == 2 and host["pairs_kept_under_overload"] == 2
    )
    assert host["overloaded"] is True and r.agree == 1.0  # fidelity from a kept pair


def test_dense_only_decode_runs_are_measured_and_retimed_too(tiny_llama_dir, monkeypatch):
    from sparse_core.decode.measure import dense_decode

    model, tok = load_model(tiny_llama_dir)
    _overloaded_first(monkeypatch, 1)
    r = dense_decode(model, _prompt(tok, 200), new_tokens=3, repeats=2, cache="paged")
    assert len(r.dense_seconds_per_token) == 2
    assert r.extra["host"]["pairs_timed"] == 2 and r.extra["host"]["pairs_retimed_for_overload"] == 1


def test_progress_says_a_pair_is_timed_again_and_counts_its_runs_again(tiny_llama_dir, monkeypatch):
    """`bench decode`'s log under a busy host read "run 4/4" five times over: a retimed pair's runs were
    counted on, past the total, and nothing said why the runs went on. A retimed pair now says so
    (`RETIMING`) and the count goes back to where the pair started."""
    from sparse_core.decode import measure

    model, tok = load_model(tiny_llama_dir)
    plan = SparsePlan(block_size=32, decode=DecodePlan(budget_tokens=None, tau=1.0))
    said: list[tuple[str, int, int]] = []
    _overloaded_first(monkeypatch, 1)  # the first pair's first arm: that pair is timed again
    ids = _prompt(tok, 300)
    measure.compare_decode(
        model, plan, ids, new_tokens=3, repeats=2, sparse_cache="paged", progress=lambda *a: said.append(a)
    )
    # two pairs of two runs and the free-running one: 5; the retimed pair's two runs counted again
    assert [done for _, done, _ in said] == [1, 2, 0, 1, 2, 3, 4, 5] and {t for *_, t in said} == {5}
    assert [stage for stage, *_ in said] == ["decode"] * 2 + [measure.RETIMING] + ["decode"] * 5
    said.clear()
    _overloaded_first(monkeypatch, 1)
    measure.dense_decode(
        model, ids, new_tokens=3, repeats=2, cache="paged", progress=lambda *a: said.append(a)
    )
    assert said == [(measure.RETIMING, 0, 2), ("decode", 1, 2), ("decode", 2, 2)]


def test_the_decode_summary_records_the_runs_host_under_the_prefills_threads(tiny_llama_dir, monkeypatch):
    """The evaluation chooses its timings' threads once (docs/roi.md: decode under the prefill timing's
    thread policy), so the prefill and decode speed-ups are timed on the same threads; the decode timing
    chose them again, from a host that may have changed meanwhile. Each section records its runs' load."""
    import torch

    from sparse_core import host as host_module
    from sparse_core.evaluation import EvalSuite, device_description, evaluate

    real_policy, chosen = host_module.apply_thread_policy, []

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        chosen.append(real_policy(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(host_module, "apply_thread_policy", counted)

    model, tok = load_model(tiny_llama_dir)
    plan = SparsePlan(block_size=32, decode=DecodePlan(budget_tokens=None, tau=1.0))
    suite = EvalSuite(
        n_fidelity_texts=0,
        probe_lengths=(),
        speed_lengths=(256,),
        speed_repeats=2,
        decode_new_tokens=3,
        decode_repeats=2,
        layer_errors=False,
    )
    _overloaded_first(monkeypatch, 0)
    before = torch.get_num_threads()
    torch.set_num_threads(64)  # what the process had before the thread policy ran
    try:
        report = evaluate(model, tok, plan, suite)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    host = report.decode["summary"]["host"]
    assert host["pairs_timed"] == 2 and host["pairs_retimed_for_overload"] == 0
    assert host["pairs_kept_under_overload"] == 0 and host["max_others_busy_cores"] == 0.1
    assert host["cache"] in ("paged", "dynamic") and host["loadavg_before"] is not None
    assert len(chosen) == 1, chosen
    prefill = report.speed_summary["host"]
    assert {k: prefill.get(k) for k in chosen[0]} == {k: host.get(k) for k in chosen[0]} == chosen[0]
    assert prefill["pairs_timed"] == 2  # the prefill's own runs, beside the decode's above
    assert report.device == device_description(model, threads=chosen[0]["threads"])
    assert "x64 threads" not in report.device and after == 64  # the caller's count, given back
