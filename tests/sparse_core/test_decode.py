"""Sparse decode: page summaries, page selection, the decode kernel, and the retrofit's decode path
on tiny random Llama (GQA) and Qwen2 models."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from sparse_core import PlanError, SparsePlan, decode_stats, load_model, sparsify, unsparsify
from sparse_core.corpus import pack_token_windows
from sparse_core.decode.pages import summarize, sync
from sparse_core.decode.plan import DecodePlan
from sparse_core.decode.scoring import local_start, quest_upper_bound, select_pages
from sparse_core.kernels.decode import decode_attention
from sparse_core.testing import sample_text


def _dense(q, k, v, key_valid=None):
    g = q.shape[1] // k.shape[1]
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask
    )


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("length", [256, 301])
def test_decode_kernel_equals_dense_with_every_page(hq, hkv, length):
    torch.manual_seed(0)
    b, d, ps = 2, 32, 32
    q, k, v = torch.randn(b, hq, 1, d), torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    start = local_start(length, ps, 2)
    pages = torch.arange(start // ps).expand(b, hkv, -1)
    out = decode_attention(q, k, v, pages, ps, start)
    assert (out - _dense(q, k, v)).abs().max().item() <= 1e-4
    key_valid = torch.ones(b, length, dtype=torch.bool)
    key_valid[0, :70] = False  # left padding of the first row (covers a whole page and part of one)
    out = decode_attention(q, k, v, pages, ps, start, key_valid=key_valid)
    assert (out - _dense(q, k, v, key_valid)).abs().max().item() <= 1e-4


def test_decode_kernel_bf16_close_to_dense():
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 6, 1, 64), torch.randn(1, 2, 333, 64), torch.randn(1, 2, 333, 64)
    start = local_start(333, 16, 4)
    pages = torch.arange(start // 16).expand(1, 2, -1)
    out = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pages, 16, start)
    assert out.dtype == torch.bfloat16 and (out.float() - _dense(q, k, v)).abs().max().item() <= 2e-2


def test_decode_kernel_reads_only_the_selected_pages():
    torch.manual_seed(1)
    b, hq, hkv, length, d, ps = 1, 4, 2, 320, 16, 32
    q, k, v = torch.randn(b, hq, 1, d), torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    pages = torch.tensor([[[0, 3, 5], [1, 2, 7]]])
    start = local_start(length, ps, 2)  # pages 8 and 9
    out = decode_attention(q, k, v, pages, ps, start)
    for h in range(hkv):
        keep = torch.zeros(length, dtype=torch.bool)
        for p in pages[0, h].tolist():
            keep[p * ps : (p + 1) * ps] = True
        keep[start:] = True
        g = hq // hkv
        ref = F.scaled_dot_product_attention(
            q[:, h * g : (h + 1) * g], k[:, h : h + 1, keep], v[:, h : h + 1, keep]
        )
        assert (out[:, h * g : (h + 1) * g] - ref).abs().max().item() <= 1e-5


def test_page_summaries_after_appends_equal_summaries_from_scratch():
    torch.manual_seed(2)
    keys = torch.randn(2, 3, 403, 16)
    s = summarize(keys[:, :, :70], 32)
    t = 70
    for step in (1, 1, 5, 31, 1, 64, 100, 1, 129):  # single tokens, page-crossing chunks
        t += step
        s = sync(s, keys[:, :, :t], 32)
    assert t == keys.shape[2] and s.length == t
    ref = summarize(keys, 32)
    kmax, kmin, ksum = s.live()
    rmax, rmin, rsum = ref.live()
    assert torch.equal(kmax, rmax) and torch.equal(kmin, rmin)
    torch.testing.assert_close(ksum, rsum, rtol=0, atol=1e-5)
    assert torch.equal(s.page_counts(), ref.page_counts())
    # a different sequence of the same length is not mistaken for a continuation
    other = torch.randn(2, 3, 404, 16)
    s2 = sync(s, other, 32)
    assert torch.equal(s2.live()[0], summarize(other, 32).live()[0])


def test_quest_bound_is_an_upper_bound_and_tight_per_channel():
    torch.manual_seed(3)
    keys = torch.randn(1, 2, 256, 8)
    q = torch.randn(1, 4, 8)
    s = summarize(keys, 32)
    ub = quest_upper_bound(q, s.kmax[:, :, : s.n_pages], s.kmin[:, :, : s.n_pages])  # [1, 4, 8]
    logits = torch.einsum("bhd,bhsd->bhs", q, keys.repeat_interleave(2, 1))  # [1, 4, 256]
    true_max = logits.view(1, 4, 8, 32).amax(-1)
    assert (ub >= true_max - 1e-5).all()


def test_select_pages_keeps_sink_and_budget():
    mass = torch.tensor([[[0.1, 0.0, 0.5, 0.01, 0.3, 0.02, 0.03, 0.04]]])
    sel = select_pages(mass, sink_pages=1, local_pages=2, keep_pages=4, tau=None)
    assert sel.tolist() == [[[0, 2]]]  # sink + best page; local pages 6, 7 are read by the kernel
    sel = select_pages(mass, sink_pages=1, local_pages=2, keep_pages=None, tau=0.9)
    assert sel.tolist() == [[[0, 2, 4]]]
    sel = select_pages(mass, sink_pages=1, local_pages=2, keep_pages=None, tau=1.0)
    assert sel.tolist() == [[[0, 1, 2, 3, 4, 5]]]


def test_decode_plan_round_trip_and_old_plans_unchanged():
    old = SparsePlan(block_size=32, tau=0.9)
    assert "decode" not in old.to_dict()
    assert SparsePlan.from_dict(old.to_dict()).content_hash() == old.content_hash()
    plan = old.with_(decode=DecodePlan(budget_tokens=256, layer_overrides={1: {"budget_tokens": 512}}))
    again = SparsePlan.from_json(plan.to_json())
    assert again.decode == plan.decode and again.content_hash() == plan.content_hash() != old.content_hash()
    with pytest.raises(PlanError, match=r"plan.decode.estimator must be one of"):
        SparsePlan(decode={"estimator": "magic"})
    with pytest.raises(PlanError, match=r"plan.decode: unknown field\(s\) \['budget'\]"):
        SparsePlan(decode={"budget": 3})
    with pytest.raises(PlanError, match=r"plan.decode.density must be None or in \(0, 1\]"):
        SparsePlan(decode={"density": 1.5})


def _prompt(tok, n):
    return tok(sample_text(6000), return_tensors="pt").input_ids[:, :n]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_generation_equals_dense_at_full_decode_budget(tiny_model_factory, arch):
    model, tok = load_model(tiny_model_factory(arch))
    ids = _prompt(tok, 300)
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    # tau 1 keeps every page but still runs page scoring, selection and the gather kernel
    plan = SparsePlan(block_size=32, tau=1.0, decode=DecodePlan(budget_tokens=None, tau=1.0))
    sparsify(model, plan)
    with torch.no_grad():
        sparse = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    st = decode_stats(model)
    n_layers = model.config.num_hidden_layers
    assert torch.equal(sparse, dense)
    assert st.calls == 39 * n_layers and st.dense_calls == 0 and st.density == 1.0
    unsparsify(model)


def test_sparse_decode_reads_less_and_unsparsify_restores_dense_exactly(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    ids = _prompt(tok, 600)
    with torch.no_grad():
        ref = model(ids, use_cache=True)
        nxt = ref.logits[:, -1:].argmax(-1)
        dense_step = model(nxt, cache=ref.past_key_values).logits
    plan = SparsePlan(block_size=32, decode=DecodePlan(budget_tokens=128, local_pages=1))
    sparsify(model, plan)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        sparse_step = model(nxt, cache=out.past_key_values).logits
    st = decode_stats(model)
    assert st.calls == model.config.num_hidden_layers and 0 < st.density < 0.25
    assert not torch.allclose(sparse_step, dense_step, atol=1e-4)
    unsparsify(model)
    with torch.no_grad():
        again = model(ids, use_cache=True)
        assert torch.equal(model(nxt, cache=again.past_key_values).logits, dense_step)


def test_left_padded_batch_decode_equals_dense_at_full_budget(tiny_qwen_dir):
    model, tok = load_model(tiny_qwen_dir)
    tok.padding_side = "left"
    text = sample_text(4000)
    enc = tok([text[:1500], text[200:700]], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        dense = model.generate(**enc, **kw)
    sparsify(model, SparsePlan(block_size=32, tau=1.0, decode=DecodePlan(budget_tokens=None, tau=1.0)))
    with torch.no_grad():
        sparse = model.generate(**enc, **kw)
    assert decode_stats(model).calls > 0
    unsparsify(model)
    assert torch.equal(sparse, dense)


def test_decode_calibration_finds_a_budget_within_a_loose_budget_and_none_within_an_exact_one(tiny_llama_dir):
    from sparse_core.decode.calibration import DecodeLimits, calibrate_decode

    model, tok = load_model(tiny_llama_dir)
    texts = [sample_text(8000)[i * 2000 : (i + 1) * 2000] for i in range(4)]
    lim = DecodeLimits(  # break-even given: the search itself (tests/.../test_decode_break_even.py)
        prompt_tokens=512,
        n_prompts=1,
        new_tokens=8,
        budgets=(64, 128, 256),
        max_joint_checks=3,
        break_even_tokens=0,
    )
    dp, rep = calibrate_decode(model, tok, texts, "kl=5", limits=lim)
    assert rep.met_budget and dp is not None and rep.fidelity["kl"] <= 5
    assert len(rep.layer_budgets) == model.config.num_hidden_layers and rep.density < 1.0
    plan = SparsePlan(decode=dp).validate_for(model.config)
    assert SparsePlan.from_json(plan.to_json()).decode == dp
    assert [s["passed"] for s in rep.search][-1] in (True, False) and rep.new_tokens == 8
    with pytest.raises(ValueError, match=r"decode.new_tokens must be >= 2, got 1"):
        DecodeLimits(new_tokens=1)
    dp2, rep2 = calibrate_decode(model, tok, texts, "kl=0,agree=1", limits=lim)
    assert dp2 is None and not rep2.met_budget and rep2.layer_budgets == [None, None]
    assert not hasattr(model, "_sparsepilot")  # left dense


def test_decode_calibration_with_confidence_refuses_the_plan_at_the_budgets_edge(tiny_llama_dir):
    from sparse_core.decode.calibration import DecodeLimits, calibrate_decode

    model, tok = load_model(tiny_llama_dir)
    texts = [sample_text(24000)[i * 2000 : (i + 1) * 2000] for i in range(12)]
    # 8 prompts: the fewest the bound (its unit a prompt) takes at 1 - 0.05 / 3
    kw = dict(prompt_tokens=512, n_prompts=8, new_tokens=8, budgets=(64, 128, 256), max_joint_checks=3)
    lim = DecodeLimits(**kw, break_even_tokens=0)
    dp, rep = calibrate_decode(model, tok, texts, "kl=5", limits=lim)
    assert rep.met_budget and dp is not None
    # a budget the means' plan just meets on its KL: judged on the upper bound, that plan fails
    kl = rep.fidelity["kl"] * 1.0001
    tight = f"kl={kl:.8g},agree=0.01,nll_delta=100"
    _, point = calibrate_decode(model, tok, texts, tight, limits=lim)
    lim_c = DecodeLimits(**kw, break_even_tokens=0, confidence=0.95)
    dp_c, bounded = calibrate_decode(model, tok, texts, tight, limits=lim_c)
    sparse_steps = [s for s in bounded.search if s["fidelity"]["kl"] > 0]
    assert sparse_steps
    for s in sparse_steps:  # each sparse candidate: its bounds beside its means, judged at 0.05 / 3
        f = s["fidelity"]
        assert f["confidence"] == 0.95 and f["step_confidence"] == pytest.approx(1 - 0.05 / 3)
        assert f["kl_upper"] > f["kl"] and f["agree_lower"] <= f["agree"]
        assert f["nll_delta_upper"] >= f["nll_delta"]
        assert s["passed"] == (f["kl_upper"] <= kl)
    # the plan at the budget's edge on the means is refused on its bound: a denser one (or dense) stays
    assert point.met_budget and bounded.density > point.density
    if dp_c is not None:
        assert bounded.fidelity["kl_upper"] <= kl
    # the bounded search's candidates came from 2 windows beyond the 8 judged prompts; the means' from them
    assert (bounded.n_prompts, bounded.sensitivity_prompts) == (8, 2)
    assert (point.n_prompts, point.sensitivity_prompts) == (8, 0)
    # text for the judged prompts but not for the sensitivity windows: refused, naming what is missing
    few = texts[:4]
    filled = len(pack_token_windows(tok, few, 512, 99, seed=11, min_length=128))
    all_prompts = {**kw, "n_prompts": filled, "break_even_tokens": 0}
    _, fits = calibrate_decode(model, tok, few, "kl=5", limits=DecodeLimits(**all_prompts))
    assert fits.n_prompts == filled  # every window a prompt: enough without a confidence
    with pytest.raises(ValueError, match=rf"too short for decode.confidence: they fill {filled} window"):
        calibrate_decode(model, tok, few, "kl=5", limits=DecodeLimits(**all_prompts, confidence=0.5))
    # the unit is a prompt: 9 prompts of 512 tokens do not make 0.99's 10, however long they are
    with pytest.raises(ValueError, match=r"unit\) needs decode.n_prompts >= 10, got 9"):
        DecodeLimits(n_prompts=9, new_tokens=512, confidence=0.95)
    assert DecodeLimits(n_prompts=10, new_tokens=8, confidence=0.95).step_confidence() == pytest.approx(0.99)
    with pytest.raises(ValueError, match=r"decode.confidence must be in \(0, 1\)"):
        DecodeLimits(confidence=1.0)


def _perturbed_gate_tensors(name: str, model) -> dict:
    """Initial `gate` / `gate_v2` weights for the model at block size 32, perturbed so the max/min key
    features (and gate_v2's prior) count."""
    from sparse_core.estimators.learned_gate import BlockGate, GateShape
    from sparse_core.estimators.learned_gate_v2 import BlockGateV2, model_rope

    shape = GateShape.from_config(model.config)
    gate = BlockGate(shape, 32) if name == "gate" else BlockGateV2(shape, 32, *model_rope(model))
    with torch.no_grad():
        for layer in gate.layers:
            layer.wk.add_(0.05 * torch.randn_like(layer.wk))
            if name == "gate_v2":
                layer.prior.add_(0.5)
    return gate.to_tensors()


@pytest.mark.parametrize("name", ["gate", "gate_v2"])
def test_learned_decode_scores_pages_with_the_plans_gate(tiny_llama_dir, name):
    model, tok = load_model(tiny_llama_dir)
    ids = _prompt(tok, 400)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        dense = model.generate(ids, **kw)
    full = SparsePlan(block_size=32, decode=DecodePlan(estimator=name, budget_tokens=None, tau=1.0))
    full.tensors = _perturbed_gate_tensors(name, model)
    sparsify(model, full)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), dense)  # every page kept: exactly dense
    sparse = full.with_(decode=DecodePlan(estimator=name, budget_tokens=96, local_pages=1))
    sparsify(model, sparse)
    st = decode_stats(model)
    with torch.no_grad():
        model.generate(ids, **kw)
    assert st.calls == 15 * model.config.num_hidden_layers and st.density < 0.4
    unsparsify(model)
    with pytest.raises(PlanError, match="gate's key features are pooled over plan.block_size"):
        sparsify(model, sparse.with_(decode=DecodePlan(estimator=name, page_size=16)))
    with pytest.raises(PlanError, match=f"carries no {name} weights"):
        sparsify(model, SparsePlan(block_size=32, decode=DecodePlan(estimator=name)))


def test_calibrate_adds_a_decode_section_when_asked(quality_tiny, quality_texts):
    from sparse_core.calibration import CalibrationLimits, calibrate

    model, tok = quality_tiny
    decode = {
        "prompt_tokens": 512,
        "n_prompts": 1,
        "new_tokens": 8,
        "budgets": (64, 128),
        "max_joint_checks": 2,
        "break_even_tokens": 0,
    }
    lim = CalibrationLimits(max_texts=2, max_seq_len=256, taus=(0.9,), max_joint_checks=1, decode=decode)
    plan, report = calibrate(model, tok, quality_texts, "kl=5", limits=lim)
    assert plan.decode is not None and report.decode["met_budget"]
    assert plan.metadata["decode_calibration"]["layer_budgets"] == report.decode["layer_budgets"]
    # the host while the break-evens were timed, for the ROI's decode line: none here (given as 0)
    assert plan.metadata["decode_calibration"]["break_even_host"] is None
    assert report.plan_hash == plan.content_hash()
    assert SparsePlan.from_json(plan.to_json()).decode == plan.decode
    with pytest.raises(ValueError, match="decode estimator 'gate' reuses the learned gate"):
        calibrate(model, tok, quality_texts, "kl=5", limits=CalibrationLimits(decode={"estimator": "gate"}))


def _tiny_decode_limits(**kw) -> dict:
    """DecodeLimits fields for a quick decode calibration of the quality_tiny model after 768 tokens."""
    base = dict(prompt_tokens=768, n_prompts=1, new_tokens=8, budgets=(256, 512), max_joint_checks=2)
    return {**base, "break_even_tokens": 0, **kw}


def test_calibrate_finds_a_gate_v2_decode_section(quality_tiny, quality_texts):
    from sparse_core.calibration import CalibrationLimits, calibrate

    model, tok = quality_tiny
    # page_size: the plan's block size: gate_v2 pools pages like its blocks
    decode = _tiny_decode_limits(estimator="gate_v2", page_size=64)
    lim = CalibrationLimits(
        max_texts=3, max_seq_len=256, taus=(0.9,), max_joint_checks=1, gate_steps=4, decode=decode
    )
    plan, report = calibrate(model, tok, quality_texts, "kl=5", estimator="gate_v2", limits=lim)
    assert plan.decode is not None and plan.decode.estimator == "gate_v2" and report.decode["met_budget"]
    ids = _prompt(tok, 700)
    sparsify(model, plan)
    try:
        st = decode_stats(model)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert st.calls > 0 and st.density < 1.0  # the decode steps read a share of the pages
    finally:
        unsparsify(model)


def test_calibrate_trains_a_page_gate_into_the_plan(quality_tiny, quality_texts, tmp_path):
    """Decode estimator `page_gate`: calibration trains it on text after the prompts', the plan carries
    its weights (hashed) whatever the prefill estimator, and the served decode scores pages with it."""
    from sparse_core import plan_io
    from sparse_core.calibration import CalibrationLimits, calibrate

    model, tok = quality_tiny
    decode = _tiny_decode_limits(estimator="page_gate", page_size=16, page_gate_rows=64, page_gate_steps=10)
    lim = CalibrationLimits(max_texts=2, max_seq_len=256, taus=(0.9,), max_joint_checks=1, decode=decode)
    plan, report = calibrate(model, tok, quality_texts, "kl=5", limits=lim)
    assert plan.decode is not None and plan.decode.estimator == "page_gate" and report.decode["met_budget"]
    trained = report.decode["page_gate"]
    assert (
        trained["windows"] == 2 and trained["rows"] == 128 and trained["loss_after"] < trained["loss_before"]
    )
    assert any(k.startswith("page_gate.") for k in plan.tensors) and plan.estimator != "page_gate"
    plan_io.save(plan, tmp_path / "plan", config=model.config)
    loaded = plan_io.load(tmp_path / "plan")
    assert loaded.content_hash() == report.plan_hash == plan.content_hash()
    sparsify(model, loaded)
    try:
        st = decode_stats(model)
        with torch.no_grad():
            model.generate(
                _prompt(tok, 700), max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id
            )
        assert st.calls > 0 and st.density < 1.0
    finally:
        unsparsify(model)


def test_page_gate_calibration_needs_its_own_text_and_a_plan_to_train_into(tiny_llama_dir):
    from sparse_core.decode.calibration import DecodeLimits, calibrate_decode

    model, tok = load_model(tiny_llama_dir)
    lim = DecodeLimits(
        estimator="page_gate",
        prompt_tokens=512,
        n_prompts=1,
        new_tokens=4,
        budgets=(64,),
        break_even_tokens=0,
    )
    one_window = [sample_text(8000)[:1300]]  # ~570 tokens: one 512-token window, the prompt's
    with pytest.raises(ValueError, match="texts too short to train the decode page_gate: .* 2 more"):
        calibrate_decode(model, tok, one_window, "kl=5", base=SparsePlan(), limits=lim)
    with pytest.raises(ValueError, match="'page_gate' trains weights into the plan: pass base="):
        calibrate_decode(model, tok, one_window, "kl=5", limits=lim)
    with pytest.raises(ValueError, match="decode.page_gate_steps must be >= 1, got 0"):
        DecodeLimits(page_gate_steps=0)
    # with a confidence, page_gate's 2 windows are also the sensitivity windows: 2 prompts + 2 fit
    four_windows = [sample_text(8000)[:4500]]
    more = dict(n_prompts=2, confidence=0.5, max_joint_checks=1, page_gate_rows=16, page_gate_steps=2)
    bounded = DecodeLimits(**{**asdict(lim), **more})
    _, rep = calibrate_decode(model, tok, four_windows, "kl=5", base=SparsePlan(), limits=bounded)
    assert (rep.n_prompts, rep.sensitivity_prompts, rep.page_gate["windows"]) == (2, 2, 2)
    assert not rep.sensitivity_apart
    # apart from them, the sensitivities need 2 windows more than that text holds
    apart = DecodeLimits(**{**asdict(bounded), "sensitivity_apart": True})
    with pytest.raises(ValueError, match="judged prompts and page_gate's 2 training windows"):
        calibrate_decode(model, tok, four_windows, "kl=5", base=SparsePlan(), limits=apart)
    six_windows = [sample_text(8000)[:6700]]
    _, rep = calibrate_decode(model, tok, six_windows, "kl=5", base=SparsePlan(), limits=apart)
    assert (rep.n_prompts, rep.sensitivity_prompts, rep.page_gate["windows"]) == (2, 2, 2)
    assert rep.sensitivity_apart


def test_sensitivity_windows_are_the_gates_or_apart_from_them_never_the_prompts():
    from sparse_core.decode.calibration import DecodeLimits, split_windows, windows_needed

    packed = [[i] * 8 for i in range(7)]  # window i is all i

    def firsts(windows):
        return [w[0] for w in windows]

    gate = dict(estimator="page_gate", prompt_tokens=64, n_prompts=3, page_gate_windows=2)
    shared = DecodeLimits(**gate, confidence=0.5, max_joint_checks=1, sensitivity_prompts=2)
    assert [firsts(x) for x in split_windows(packed, shared, 8)] == [[0, 1, 2], [3, 4], [3, 4]]
    apart = DecodeLimits(**{**asdict(shared), "sensitivity_apart": True})
    assert [firsts(x) for x in split_windows(packed, apart, 8)] == [[0, 1, 2], [3, 4], [5, 6]]
    # a training-free scorer trains nothing: its sensitivity windows follow the prompts either way
    quest = DecodeLimits(**{**asdict(apart), "estimator": "quest"})
    assert [firsts(x) for x in split_windows(packed, quest, 8)] == [[0, 1, 2], [], [3, 4]]
    # without a confidence the sensitivities come from the judged prompts themselves (no windows)
    means = DecodeLimits(**{**asdict(apart), "confidence": None})
    assert [firsts(x) for x in split_windows(packed, means, 8)] == [[0, 1, 2], [3, 4], []]
    with pytest.raises(ValueError, match=r"fill 6 window\(s\) of 8 tokens; the 3 judged prompts and"):
        split_windows(packed[:6], apart, 8)
    # what calibration packs is what the split reads
    assert [windows_needed(lim) for lim in (shared, apart, quest, means)] == [5, 7, 5, 5]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_paged_cache_generates_what_the_dynamic_cache_does(tiny_model_factory, arch):
    from sparse_core.decode.cache import PagedCache, PagedLayer

    model, tok = load_model(tiny_model_factory(arch))
    ids = _prompt(tok, 300)
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        cache = PagedCache()
        assert torch.equal(model.generate(ids, cache=cache, **kw), dense)
        assert isinstance(cache.layers[0], PagedLayer) and cache.get_seq_length() == 329
        assert cache.layers[0].keys.shape[2] == 329 and not cache.layers[0].keys.is_contiguous()
        sparsify(model, SparsePlan(block_size=32, tau=1.0, decode=DecodePlan(budget_tokens=None, tau=1.0)))
        assert torch.equal(model.generate(ids, cache=PagedCache(), **kw), dense)
        unsparsify(model)
    cache.crop(-29)
    assert cache.get_seq_length() == 300 and cache.layers[1].values.shape[2] == 300


def test_side_by_side_decode_on_the_paged_cache_is_exact_at_full_budget(tiny_llama_dir):
    from sparse_core.decode.measure import compare_decode

    model, tok = load_model(tiny_llama_dir)
    plan = SparsePlan(block_size=32, decode=DecodePlan(budget_tokens=None, tau=1.0))
    r = compare_decode(model, plan, _prompt(tok, 400), new_tokens=6, repeats=2, sparse_cache="paged")
    assert r.agree == 1.0 and r.greedy_match == 1.0 and r.first_divergence is None and abs(r.kl) < 1e-6
    assert r.density == 1.0 and len(r.sparse_seconds_per_token) == 2 and r.extra["sparse_cache"] == "paged"
    with pytest.raises(ValueError, match="no decode section"):
        compare_decode(model, SparsePlan(), _prompt(tok, 100))


def test_probe_answers_generated_through_decode(tiny_llama_dir):
    from sparse_core.decode.measure import probe_generation_accuracy
    from sparse_core.probes import ProbeInstance

    model, tok = load_model(tiny_llama_dir)
    prompt = _prompt(tok, 200)[0].tolist()
    with torch.no_grad():
        gen = model.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
        )
    said = tok.decode(gen[0, 200:], skip_special_tokens=True).strip()
    words = said.split()
    assert words, "the tiny model generated only whitespace"

    def probe(answer):
        return ProbeInstance("passkey", 200, 0.5, 0, prompt, [[1], [2]], 0, answer)

    r = probe_generation_accuracy(model, tok, [probe(words[0]), probe("zzz-not-said")])
    assert r["accuracy"] == 0.5 and r["n"] == 2 and r["answers"][0].startswith(words[0])


@pytest.mark.parametrize(
    ("b", "h", "length", "cap"),
    [(1, 3, 301, None), (2, 2, 256, 512), (3, 8, 300, None)],
    ids=["page-loop", "aligned-buffer", "token-rows"],
)
def test_gather_pages_reads_exactly_the_selected_pages(b, h, length, cap):
    from sparse_core.kernels.decode import gather_kv, gather_pages

    torch.manual_seed(0)
    ps, d = 16, 8
    buf = torch.randn(b, h, cap or length, d)
    k = buf[:, :, :length]  # with cap: a view into a larger buffer, as PagedCache hands it
    pages = torch.sort(torch.randint(0, length // ps - 2, (b, h, 5)), -1).values
    out = gather_pages(k, pages, ps)
    tok = (pages * ps)[..., None] + torch.arange(ps)  # [b, h, 5, ps]
    ref = torch.gather(k, 2, tok.reshape(b, h, -1, 1).expand(b, h, 5 * ps, d))
    assert out.shape == (b, h, 5 * ps, d) and out.is_contiguous() and torch.equal(out, ref)
    v = (buf * 2)[:, :, :length]  # values laid out like the keys: one index for both
    kg, vg = gather_kv(k, v, pages, ps)
    assert torch.equal(kg, ref) and torch.equal(vg, 2 * ref)
    kg, vg = gather_kv(k, v.contiguous() if cap else v[:, :, :-1], pages, ps)  # laid out apart
    assert torch.equal(kg, ref) and torch.equal(vg, 2 * ref)


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("length", [256, 301])
def test_one_call_page_kernel_on_a_paged_buffer_equals_dense(hq, hkv, length):
    from sparse_core.decode.cache import paged_buffer
    from sparse_core.decode.scoring import select_pages_forced
    from sparse_core.kernels.decode import decode_attention_pages, paged_rows

    torch.manual_seed(0)
    b, d, ps = 2, 32, 32
    q = torch.randn(b, hq, 1, d)
    kb, vb = paged_buffer(torch.randn(b, hkv, length, d)), paged_buffer(torch.randn(b, hkv, length, d))
    k, v = kb[:, :, :length], vb[:, :, :length]  # views, as PagedCache hands them
    rows = paged_rows(k, v, ps)
    assert rows is not None
    if length % ps:  # a contiguous cache's pages are rows only when it ends on a page boundary
        assert paged_rows(k.contiguous(), v.contiguous(), ps) is None
    n = -(-length // ps)
    every = select_pages_forced(torch.rand(b, hkv, n), sink_pages=1, local_pages=2, keep_pages=n)
    assert every[..., 0].eq(n - 1).all() and every.sort(-1).values.eq(torch.arange(n)).all()
    out = decode_attention_pages(q, rows, every, ps, length)
    assert (out - _dense(q, k, v)).abs().max().item() <= 1e-4
    # a subset: exactly attention over the chosen pages' tokens (the newest page up to the end)
    mass = torch.rand(b, hkv, n)
    sel = select_pages_forced(mass.clone(), sink_pages=1, local_pages=2, keep_pages=5)
    assert sel.shape[-1] == 5 and sel[..., 0].eq(n - 1).all()
    out = decode_attention_pages(q, rows, sel, ps, length)
    g = hq // hkv
    for bi in range(b):
        for h in range(hkv):
            keep = torch.zeros(length, dtype=torch.bool)
            for p in sel[bi, h].tolist():
                keep[p * ps : (p + 1) * ps] = True
            assert keep[:ps].all() and keep[(n - 2) * ps :].all()  # sink and both local pages
            ref = F.scaled_dot_product_attention(
                q[bi : bi + 1, h * g : (h + 1) * g],
                k[bi : bi + 1, h : h + 1, keep],
                v[bi : bi + 1, h : h + 1, keep],
            )
            assert (out[bi : bi + 1, h * g : (h + 1) * g] - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sparse_decode_on_the_paged_cache_equals_the_merged_kernel_at_a_partial_budget(
    tiny_model_factory, arch
):
    """PagedCache runs the one-call path (forced topk, one gather, one attention), transformers'
    DynamicCache the two attentions merged by log-sum-exp: same pages, same tokens and logits."""
    from sparse_core.decode.cache import PagedCache

    model, tok = load_model(tiny_model_factory(arch))
    ids = _prompt(tok, 300)
    plan = SparsePlan(block_size=32, decode=DecodePlan(budget_tokens=128, page_size=32, local_pages=2))
    sparsify(model, plan)
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    kw_scores = dict(**kw, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        merged = model.generate(ids, **kw_scores)
        d_merged = decode_stats(model).density
        decode_stats(model).reset()
        paged = model.generate(ids, cache=PagedCache(), **kw_scores)
        d_paged = decode_stats(model).density
    unsparsify(model)
    assert torch.equal(paged.sequences, merged.sequences)
    gap = max((a - b).abs().max().item() for a, b in zip(paged.logits, merged.logits, strict=True))
    assert gap <= 1e-4 and d_paged == d_merged and 0 < d_paged < 0.6


def test_a_sliding_window_layer_decodes_densely_once_its_window_is_full(tiny_model_factory):
    """transformers' sliding-window cache never hands a layer more than its window of keys, so the old
    test (cache longer than the window) never fired and a layer whose oldest keys were sliding out
    decoded sparsely over whatever was left; inside its window it still decodes sparsely."""
    from transformers import AutoModelForCausalLM

    from sparse_core.decode.cache import paged_cache_kwargs

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_factory("mistral"), sliding_window=200, attn_implementation="sdpa"
    ).eval()
    plan = SparsePlan(block_size=16, tau=1.0, decode=DecodePlan(page_size=16, budget_tokens=32))
    for length, sparse_calls in ((120, 2 * 20), (300, 0)):
        ids = torch.randint(3, 400, (1, length), generator=torch.Generator().manual_seed(0))
        sparsify(model, plan)
        st = decode_stats(model)
        st.reset()
        with torch.no_grad():
            model.generate(
                input_ids=ids, max_new_tokens=21, do_sample=False, pad_token_id=0, **paged_cache_kwargs(model)
            )
        unsparsify(model)
        assert (st.calls, st.calls - st.dense_calls) == (2 * 20, sparse_calls), length
