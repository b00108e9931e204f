"""The break-even of sparse decode: below the plan's `break_even_tokens` decode is the dense model's
code path exactly; the break-even rule and its measurement; calibration and evaluation carry it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sparse_core import PlanError, SparsePlan, decode_stats, load_model, sparsify, unsparsify
from sparse_core.decode.break_even import (
    BreakEven,
    BreakEvenRow,
    break_even_from,
    break_even_host,
    measure_break_even,
    overload_span,
)
from sparse_core.decode.pages import summarize
from sparse_core.decode.plan import DecodePlan
from sparse_core.testing import sample_text


def _rows(*pairs: tuple[int, float]) -> list[BreakEvenRow]:
    return [BreakEvenRow(n, 100.0 * r, 100.0, r, 0.5) for n, r in pairs]


def test_break_even_is_where_sparse_stays_faster_for_every_longer_cache():
    assert break_even_from(_rows((512, 0.4), (1024, 0.9), (2048, 1.3), (4096, 2.5))) == (2048, True)
    # one point that does not win at a longer length pushes the break-even past it ("never slower")
    assert break_even_from(_rows((512, 0.4), (1024, 1.2), (2048, 1.0), (4096, 2.5))) == (4096, True)
    # the margin: 1.03x is timing noise, not a saving
    assert break_even_from(_rows((1024, 1.03), (2048, 1.2)), min_ratio=1.05) == (2048, True)
    assert break_even_from(_rows((1024, 1.03), (2048, 1.2)), min_ratio=1.0) == (1024, True)
    assert break_even_from(_rows((4096, 1.2), (1024, 2.0))) == (1024, True)  # order of the rows
    assert break_even_from(_rows((1024, 0.5), (2048, 0.9))) == (2049, False)  # never reached
    with pytest.raises(ValueError, match="no measurements"):
        break_even_from([])


def test_measured_break_even_follows_its_rows():
    plan = SparsePlan(decode=DecodePlan(page_size=16, budget_tokens=64, local_pages=2))
    params = plan.decode.layer_params(0, plan.block_size)
    r = measure_break_even(plan, params, q_heads=4, kv_heads=2, head_dim=16, lengths=(64, 256, 1024), steps=4)
    assert [row.tokens for row in r.rows] == [64, 256, 1024]
    assert all(row.dense_us > 0 and row.sparse_us > 0 for row in r.rows)
    assert (r.tokens, r.reached) == break_even_from(r.rows, r.min_ratio)
    # a budget of 64 tokens (4 pages, sink and local included) is most of a 64-token cache and a
    # small share of a 1,024-token one
    assert r.rows[-1].density < 0.15 < 0.5 < r.rows[0].density
    assert r.shape == {"q_heads": 4, "kv_heads": 2, "head_dim": 16, "dtype": "torch.float32"}
    # each length's steps ran under the host meter: its verdict per row and in all (review M, M1)
    assert all(isinstance(row.overloaded, bool) for row in r.rows) and r.host["pairs_timed"] == 3
    assert r.overloaded == any(row.overloaded for row in r.rows)
    assert r.host["pairs_kept_under_overload"] == sum(row.overloaded for row in r.rows)
    with pytest.raises(ValueError, match="not a multiple"):
        measure_break_even(plan, params, q_heads=5, kv_heads=2, head_dim=16)


def test_break_even_record_says_whether_a_busy_host_timed_it():
    """Review M, M1: the break-even is a timing, so its record carries the host's verdict per length
    (`overloaded`, `wait_share`) and `break_even_host` sums it for the plan; records written before the
    meter still load, with the verdict unknown (None), never "quiet"."""
    rows = [
        BreakEvenRow(1024, 50.0, 60.0, 0.833, 0.5, overloaded=False, wait_share=0.02),
        BreakEvenRow(4096, 150.0, 100.0, 1.5, 0.125, overloaded=True, wait_share=0.61),
    ]
    busy = BreakEven(4096, True, 1.05, rows, overloaded=True, wait_share=0.61)
    assert BreakEven.from_dict(busy.to_dict()) == busy
    quiet = BreakEven(1024, True, 1.05, rows[:1], overloaded=False, wait_share=0.02)
    assert break_even_host({"128": quiet.to_dict(), "256": busy.to_dict()}) == {
        "budgets": 2,
        "lengths_timed": 3,
        "lengths_kept_under_overload": 1,
        "max_wait_share": 0.61,
        "overloaded": True,
        "overload_spans": {"256": {"break_even": 4096, "low": 4096, "high": 4097, "lengths": [4096]}},
    }
    assert break_even_host({"128": quiet.to_dict()})["overloaded"] is False
    old = busy.to_dict()
    for key in ("overloaded", "wait_share", "host"):
        del old[key]
    for row in old["rows"]:
        del row["overloaded"], row["wait_share"]
    loaded = BreakEven.from_dict(old)
    assert loaded.overloaded is None and loaded.rows[1].overloaded is None and loaded.tokens == 4096
    assert break_even_host({"128": old}) == {
        "budgets": 1,
        "lengths_timed": 2,
        "lengths_kept_under_overload": 0,
        "max_wait_share": None,
        "overloaded": None,
        "overload_spans": {},
    }
    assert break_even_host(None) is None and break_even_host({}) is None


def _be_rows(ratios: dict[int, float], overloaded: set[int]) -> list[BreakEvenRow]:
    return [BreakEvenRow(t, 100.0, 100.0 / r, r, 0.5, overloaded=t in overloaded) for t, r in ratios.items()]


def test_only_overloaded_lengths_at_or_above_the_last_slow_one_can_move_a_break_even():
    """Review T3, T4: the break-even is the length after the longest one not 1.05x faster (M), so an
    overloaded length below M cannot move it, whatever a quiet host would have timed there; one at M
    could lower it, one above M could raise it. The span is where it could lie had they been quiet."""
    ratios = {512: 0.6, 1024: 0.7, 1536: 0.8, 2048: 0.9, 3072: 1.2, 4096: 1.4}
    assert break_even_from(_be_rows(ratios, set())) == (3072, True)
    # the review's calibration: overloaded short lengths far below the break-even: nothing to say
    assert overload_span(_be_rows(ratios, {512, 1024, 1536})) is None
    assert overload_span(_be_rows(ratios, set())) is None and overload_span([]) is None
    # the last slow length overloaded: a quiet host may have found it faster, down to after 1,536
    assert overload_span(_be_rows(ratios, {512, 2048})) == {
        "break_even": 3072,
        "low": 2048,
        "high": 3072,
        "lengths": [2048],
    }
    # a faster length overloaded: it may have been slower, pushing the break-even past it
    assert overload_span(_be_rows(ratios, {3072})) == {
        "break_even": 3072,
        "low": 3072,
        "high": 4096,
        "lengths": [3072],
    }
    # every length faster: each one decides; the longest slower would leave none reached
    fast = {512: 1.2, 1024: 1.3}
    assert overload_span(_be_rows(fast, {1024})) == {
        "break_even": 512,
        "low": 512,
        "high": 1025,
        "lengths": [1024],
    }
    be = BreakEven(3072, True, 1.05, _be_rows(ratios, {512, 1024, 1536}), overloaded=True)
    assert break_even_host({"256": be.to_dict()})["overload_spans"] == {}


def test_break_even_field_round_trips_and_is_absent_at_zero():
    plan = SparsePlan(block_size=32, decode=DecodePlan(budget_tokens=256))
    assert "break_even_tokens" not in plan.to_dict()["decode"]  # plans written before it keep their hash
    later = plan.with_(decode=DecodePlan(budget_tokens=256, break_even_tokens=3072))
    again = SparsePlan.from_json(later.to_json())
    assert again.decode.break_even_tokens == 3072 and again.content_hash() == later.content_hash()
    assert later.content_hash() != plan.content_hash()
    assert later.decode.layer_params(0, 32).break_even_tokens == 3072
    with pytest.raises(PlanError, match=r"plan.decode.break_even_tokens must be an integer >= 0, got -1"):
        DecodePlan(break_even_tokens=-1)
    per_layer = DecodePlan(
        budget_tokens=1024,
        break_even_tokens=4096,
        layer_overrides={1: {"budget_tokens": 256, "break_even_tokens": 1536}},
    )
    assert per_layer.layer_params(1, 32).break_even_tokens == 1536
    assert per_layer.layer_params(0, 32).break_even_tokens == 4096 and per_layer.first_break_even() == 1536
    with pytest.raises(PlanError, match=r"layer_overrides\[2\].break_even_tokens must be an integer >= 0"):
        DecodePlan(layer_overrides={2: {"break_even_tokens": 1.5}})


def _prompt(tok, n):
    return tok(sample_text(6000), return_tensors="pt").input_ids[:, :n]


def _greedy_logits(model, ids, steps):
    """Logits of each greedy decode step after prefilling `ids`."""
    out = model(ids, use_cache=True)
    cache, nxt, logits = out.cache, out.logits[:, -1:].argmax(-1), []
    for _ in range(steps):
        out = model(nxt, cache=cache)
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
    return torch.cat(logits)


@torch.no_grad()
def test_below_break_even_decode_is_the_dense_path_exactly(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    ids = _prompt(tok, 300)
    dense = _greedy_logits(model, ids, 12)
    # a budget that would read a fraction of the cache, but the cache stays below the break-even
    # (prefill dense: decode alone is compared)
    n_layers = model.config.num_hidden_layers
    plan = SparsePlan(
        block_size=32,
        dense_layers=tuple(range(n_layers)),
        decode=DecodePlan(budget_tokens=64, local_pages=1, break_even_tokens=400),
    )
    sparsify(model, plan)
    try:
        st = decode_stats(model)
        assert torch.equal(_greedy_logits(model, ids, 12), dense)
        assert st.calls == st.dense_calls == st.short_calls == 12 * n_layers and st.density == 1.0
        assert all(layer.self_attn._sparsepilot_layer.pages is None for layer in model.model.layers)
        # past the break-even the same plan reads less; the summaries, built when the cache got there,
        # equal those of the whole cache computed from scratch
        st.reset()
        long_ids = _prompt(tok, 390)
        out = model(long_ids, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        for _ in range(20):
            out = model(nxt, cache=cache)
            nxt = out.logits[:, -1:].argmax(-1)
        assert 0 < st.short_calls < st.calls and st.dense_calls == st.short_calls and st.density < 1.0
        pages = model.model.layers[0].self_attn._sparsepilot_layer.pages
        keys = cache.layers[0].keys
        fresh = summarize(keys, 32)
        assert pages.length == keys.shape[2] == 390 + 20
        for a, b in zip(pages.live(), fresh.live(), strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    finally:
        unsparsify(model)


def test_side_by_side_below_break_even_times_the_dense_arm_only(tiny_llama_dir):
    from sparse_core.decode.measure import compare_decode

    model, tok = load_model(tiny_llama_dir)
    plan = SparsePlan(block_size=32, decode=DecodePlan(budget_tokens=64, break_even_tokens=1000))
    r = compare_decode(model, plan, _prompt(tok, 300), new_tokens=6, repeats=2)
    assert r.speedup == 1.0 and r.speedup_interval == (1.0, 1.0) and r.density == 1.0
    assert r.extra["below_break_even"] and r.extra["identical"] and r.extra["break_even_tokens"] == 1000
    assert r.dense_seconds_per_token == r.sparse_seconds_per_token and len(r.dense_seconds_per_token) == 2
    assert r.dense_ms_per_token > 0 and r.kl == 0.0 and r.greedy_match == 1.0
    # a run that crosses the break-even is measured side by side
    crossing = compare_decode(
        model, plan.with_(decode=DecodePlan(budget_tokens=64, break_even_tokens=303)), _prompt(tok, 300),
        new_tokens=6, repeats=1,
    )  # fmt: skip
    assert (
        not crossing.extra["below_break_even"] and not crossing.extra["identical"] and crossing.density < 1.0
    )
    # every layer a dense decode layer: identical arms past the break-even too
    n_layers = model.config.num_hidden_layers
    all_dense = DecodePlan(budget_tokens=64, break_even_tokens=100, dense_layers=tuple(range(n_layers)))
    r = compare_decode(model, plan.with_(decode=all_dense), _prompt(tok, 300), new_tokens=4, repeats=1)
    assert r.extra["identical"] and not r.extra["below_break_even"] and r.speedup == 1.0
    assert not hasattr(model, "_sparsepilot")


def _texts() -> list[str]:
    return [sample_text(8000)[i * 2000 : (i + 1) * 2000] for i in range(4)]


def _measured_limits(**kw):  # noqa: ANN202
    """Decode calibration with the break-even measured at short caches only: it lies (reached or not)
    below the calibration's 520-token cache, so the budgets are searched."""
    from sparse_core.decode.calibration import DecodeLimits

    base = dict(prompt_tokens=512, n_prompts=1, new_tokens=8, budgets=(64, 128), max_joint_checks=2)
    return DecodeLimits(**base, break_even_lengths=(64, 128), **kw)


def test_decode_calibration_sets_the_break_even(tiny_llama_dir):
    from sparse_core.decode.calibration import DecodeLimits, calibrate_decode

    model, tok = load_model(tiny_llama_dir)
    texts = _texts()
    lim = _measured_limits(
        whole_model_repeats=0
    )  # the per-layer measurement alone (the whole model's: below)
    dp, rep = calibrate_decode(model, tok, texts, "kl=5", limits=lim)
    assert rep.skipped is None and rep.search and rep.whole_model is None
    assert dp is not None and rep.break_even is not None
    # one measurement per budget the plan uses; a layer whose budget breaks even elsewhere says so
    used = sorted({b for b in rep.layer_budgets if b is not None})
    assert sorted(int(b) for b in rep.break_even) == used
    assert dp.break_even_tokens == rep.break_even[str(dp.budget_tokens)]["tokens"] > 0
    for li, b in enumerate(rep.layer_budgets):
        if b is not None:
            assert dp.layer_params(li, 64).break_even_tokens == rep.break_even[str(b)]["tokens"]
    assert dp.first_break_even() == min(m["tokens"] for m in rep.break_even.values())
    cap = model.config.max_position_embeddings
    rows = [r for m in rep.break_even.values() for r in m["rows"]]
    assert max(r["tokens"] for r in rows) <= cap and rep.seconds["break_even"] > 0
    assert all(r["tokens"] in (64, 128) for m in rep.break_even.values() for r in m["rows"])
    given, rep2 = calibrate_decode(
        model, tok, texts, "kl=5", limits=DecodeLimits(**{**vars(lim), "break_even_tokens": 0})
    )
    assert given.break_even_tokens == 0 and rep2.break_even is None
    with pytest.raises(ValueError, match="decode.break_even_tokens must be >= 0"):
        DecodeLimits(break_even_tokens=-5)


def test_decode_calibration_times_the_whole_model_and_keeps_decode_dense_where_it_is_not_faster(
    tiny_llama_dir,
):
    """Step 6: where the plan decodes sparsely at the calibration length, paired runs of the whole model
    (dense, then with the plan) decide whether it stays sparse there: only when the runs' 95% interval
    lies above 1; otherwise every break-even moves past the judged continuations, and decode there is
    the dense code. The record says which, with the timings and the host's load."""
    from sparse_core.decode.calibration import DecodeLimits, calibrate_decode

    model, tok = load_model(tiny_llama_dir)
    n_layers = model.config.num_hidden_layers
    dp, rep = calibrate_decode(model, tok, _texts(), "kl=5", limits=_measured_limits(whole_model_repeats=3))
    wm = rep.whole_model
    assert dp is not None and wm is not None and rep.seconds["whole_model"] > 0
    assert wm["repeats"] == 3 and wm["cache_tokens"] == [512, 520] and wm["host"]["threads"] >= 1
    assert wm["speedup_low"] <= wm["speedup"] <= wm["speedup_high"]
    assert wm["faster"] == (wm["speedup_low"] > 1.0)
    measured = min(m["tokens"] for m in rep.break_even.values())
    assert wm["break_even_before"] == measured
    if wm["faster"]:
        assert dp.first_break_even() == wm["break_even_after"] == measured
    else:
        assert dp.first_break_even() == wm["break_even_after"] == 512 + 8 + 1
        assert not dp.sparse_at(n_layers, 520) and dp.sparse_at(n_layers, 521)
    with pytest.raises(ValueError, match="whole_model_repeats must be 0 or >= 2"):
        DecodeLimits(whole_model_repeats=1)


def test_past_break_even_moves_every_break_even_and_never_lowers_one() -> None:
    from sparse_core.decode.calibration import past_break_even

    dp = DecodePlan(budget_tokens=64, break_even_tokens=300)
    dp.layer_overrides = {1: {"budget_tokens": 128, "break_even_tokens": 900}, 2: {"budget_tokens": 32}}
    past_break_even(dp, 521)
    assert dp.break_even_tokens == 521 and dp.layer_overrides[1]["break_even_tokens"] == 900
    assert "break_even_tokens" not in dp.layer_overrides[2]  # it follows the plan's
    assert dp.first_break_even() == 521


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_score_request_decodes_on_the_paged_cache_as_generate_does(tiny_model_factory, arch):
    from transformers import AutoConfig

    from sparse_core.decode.cache import PagedCache, full_attention_only, paged_cache_kwargs
    from sparse_core.tasks import score_request

    path = tiny_model_factory(arch)
    model, tok = load_model(path)
    assert full_attention_only(model.config) and isinstance(paged_cache_kwargs(model)["cache"], PagedCache)
    prompt = sample_text(3000)[:1500]
    r = score_request(model, tok, prompt, "x", "contains", max_new_tokens=12)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():  # transformers' own cache
        gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = gen[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in ref:
        ref = ref[: ref.index(tok.eos_token_id)]
    assert r.output == tok.decode(ref, skip_special_tokens=True) and r.new_tokens == len(ref)
    # sliding-window layers keep transformers' cache
    cfg = AutoConfig.from_pretrained(path)
    cfg.layer_types = ["full_attention", "sliding_attention"]
    assert not full_attention_only(cfg)
    assert not full_attention_only(SimpleNamespace(use_sliding_window=True, sliding_window=64))
    assert full_attention_only(SimpleNamespace(use_sliding_window=False, sliding_window=None))


def test_decode_calibration_skips_the_search_below_the_smallest_budgets_break_even(tiny_llama_dir):
    from sparse_core.decode.calibration import DecodeLimits, calibrate_decode

    model, tok = load_model(tiny_llama_dir)
    texts = [sample_text(8000)[i * 2000 : (i + 1) * 2000] for i in range(4)]
    # at 2,048 cached tokens a 64-token budget on this tiny shape does not pay for its fixed cost
    # (~10x slower than dense SDPA there), so the break-even is beyond every measured length
    lim = DecodeLimits(
        prompt_tokens=512, n_prompts=1, new_tokens=8, budgets=(64, 128), break_even_lengths=(2048,)
    )
    dp, rep = calibrate_decode(model, tok, texts, "kl=0,agree=1", limits=lim)
    n_layers = model.config.num_hidden_layers
    assert rep.break_even["64"]["reached"] is False and rep.break_even["64"]["rows"][0]["ratio"] < 1.05
    assert dp.dense_layers == tuple(range(n_layers)) and dp.break_even_tokens == 2049 == dp.first_break_even()
    assert rep.met_budget and rep.search == [] and rep.layer_budgets == [None] * n_layers
    assert rep.skipped == (
        "not searched: a 520-token cache is below the break-even of the smallest budget (64 tokens): "
        "2,049 tokens; decode stays dense"
    )
    assert rep.fidelity["kl"] == 0.0 and rep.fidelity["agree"] == 1.0 and rep.n_prompts == 1
    plan = SparsePlan(decode=dp).validate_for(model.config)
    assert SparsePlan.from_json(plan.to_json()).decode == dp


def test_the_spec_carries_the_whole_model_runs_to_decode_calibration() -> None:
    from pydantic import ValidationError

    from rollout.spec import DecodeCalibration
    from sparse_core.decode.calibration import DecodeLimits

    assert DecodeCalibration().whole_model_repeats == 4 == DecodeLimits().whole_model_repeats
    spec = DecodeCalibration(whole_model_repeats=8)
    assert DecodeLimits(**spec.model_dump()).whole_model_repeats == 8
    with pytest.raises(ValidationError, match="one run gives no interval"):
        DecodeCalibration(whole_model_repeats=1)
