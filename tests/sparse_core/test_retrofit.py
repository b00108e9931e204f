"""sparsify/unsparsify on tiny random Llama/Qwen/Mistral models: exact at tau=1, reversible,
padding honoured, decode correct, plans that do not fit rejected."""

from __future__ import annotations

import pytest
import torch

from sparse_core import (
    PlanError,
    SparsePlan,
    is_sparsified,
    load_model,
    sparse_stats,
    sparsified,
    sparsify,
    unsparsify,
)
from sparse_core.testing import sample_text

PROMPT_TOKENS = 300  # several 32-token blocks, not a multiple of the block


def _prompt(tok, n=PROMPT_TOKENS):
    return tok(sample_text(4000), return_tensors="pt").input_ids[:, :n]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_generation_equals_dense_at_tau_one(tiny_model_factory, arch):
    model, tok = load_model(tiny_model_factory(arch))
    ids = _prompt(tok)
    with torch.no_grad():
        dense_logits = model(ids).logits
        dense_gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    sparsify(model, SparsePlan(block_size=32, tau=1.0))
    assert is_sparsified(model)
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    stats = sparse_stats(model)
    assert (logits - dense_logits).abs().max().item() <= 1e-4
    assert torch.equal(gen, dense_gen)
    n_layers = model.config.num_hidden_layers
    assert len(stats.calls) == 2 * n_layers  # forward + generate prefill ran sparse in every layer
    assert stats.dense_fallbacks >= 11 * n_layers  # decode steps ran dense
    assert stats.density == 1.0


def test_sparse_path_changes_outputs_and_unsparsify_restores_exactly(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    ids = _prompt(tok, 512)
    with torch.no_grad():
        dense = model(ids).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    sparsify(model, SparsePlan(block_size=32, tau=0.5, layer_overrides={1: {"top_k": 3}}))
    with torch.no_grad():
        sparse = model(ids).logits
    stats = sparse_stats(model)
    per_layer = stats.per_layer()
    assert stats.density < 1.0 and per_layer[1]["density"] < per_layer[0]["density"] + 1e-9
    assert len(per_layer[0]["heads"]) == model.config.num_key_value_heads  # grouped selection
    assert not torch.allclose(sparse, dense, atol=1e-3)
    unsparsify(model)
    assert not is_sparsified(model) and model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "_sparsepilot_layer") for m in model.modules())


def test_sparsified_restores_the_dense_model_when_its_block_raises(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    ids = _prompt(tok, 128)
    with torch.no_grad():
        dense = model(ids).logits
    with pytest.raises(RuntimeError, match="inside the block"):
        with sparsified(model, SparsePlan(block_size=32, tau=0.5)) as m:
            assert m is model and is_sparsified(model)
            with torch.no_grad():
                model(ids)
            assert sparse_stats(model).calls  # the block ran sparse
            raise RuntimeError("inside the block")
    assert not is_sparsified(model) and model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_sparsepilot_layer") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_dense_at_tau_one(tiny_qwen_dir, side):
    model, tok = load_model(tiny_qwen_dir)
    tok.padding_side = side
    text = sample_text(4000)
    enc = tok([text[:1200], text[300:800]], return_tensors="pt", padding=True)
    with torch.no_grad():
        dense = model(**enc).logits
    sparsify(model, SparsePlan(block_size=32, tau=1.0))
    with torch.no_grad():
        sparse = model(**enc).logits
    stats = sparse_stats(model)
    unsparsify(model)
    valid = enc.attention_mask.bool()
    assert not torch.isnan(sparse).any()
    assert (sparse - dense)[valid].abs().max().item() <= 1e-4
    assert len(stats.calls) == model.config.num_hidden_layers and stats.dense_fallbacks == 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_of_whole_blocks_runs_sparse_below_tau_one(tiny_llama_dir, side):
    """A padded batch whose padded length is a whole number of blocks (the 4D mask's key row reaches
    the kernel uncopied) at tau < 1: it runs sparse, and the unpadded row gives what it gives alone."""
    model, tok = load_model(tiny_llama_dir)
    ids = _prompt(tok, 256)  # 8 blocks of 32
    batch = torch.cat([ids, ids.roll(7, dims=1)])
    mask = torch.ones_like(batch)
    if side == "left":
        mask[1, :56] = 0
    else:
        mask[1, 200:] = 0
    sparsify(model, SparsePlan(block_size=32, tau=0.6, local_blocks=1))
    with torch.no_grad():
        alone = model(ids).logits[0]
        sparse_stats(model).reset()
        padded = model(input_ids=batch, attention_mask=mask).logits
    stats = sparse_stats(model)
    unsparsify(model)
    assert len(stats.calls) == model.config.num_hidden_layers and stats.dense_fallbacks == 0
    assert all(c.density < 1.0 for c in stats.calls)
    assert not torch.isnan(padded[mask.bool()]).any()
    assert (padded[0] - alone).abs().max().item() <= 1e-4


def test_density_is_kept_over_causal_blocks_summed_over_calls_of_different_lengths(tiny_llama_dir):
    """A 320-token forward (10 blocks of 32: 55 causal per head) and a 64-token one (2 blocks: 3 causal,
    all kept by the sink + local window): sparse_stats's density is their kept blocks (each call's
    density x its causal blocks, counted by hand) over their causal blocks, not the mean of the calls."""
    model, tok = load_model(tiny_llama_dir)
    heads, layers = model.config.num_attention_heads, model.config.num_hidden_layers
    sparsify(model, SparsePlan(block_size=32, tau=0.6, local_blocks=1))
    with torch.no_grad():
        model(_prompt(tok, 320))
        model(_prompt(tok, 64))
    stats = sparse_stats(model)
    per_layer = stats.per_layer()
    unsparsify(model)
    assert [c.seq_len for c in stats.calls] == [320] * layers + [64] * layers
    by_hand = {320: heads * 55, 64: heads * 3}
    assert [c.causal_blocks for c in stats.calls] == [by_hand[c.seq_len] for c in stats.calls]
    assert all(c.density == 1.0 for c in stats.calls if c.seq_len == 64)
    assert all(c.density < 0.9 for c in stats.calls if c.seq_len == 320)
    kept = sum(c.density * by_hand[c.seq_len] for c in stats.calls)
    assert stats.density == pytest.approx(kept / (layers * (by_hand[320] + by_hand[64])), rel=1e-12)
    mean_of_calls = sum(c.density for c in stats.calls) / len(stats.calls)
    assert stats.density < mean_of_calls - 0.05
    for li, d in per_layer.items():
        long, short = (c for c in stats.calls if c.layer_idx == li)
        assert d["n"] == 2
        assert d["density"] == pytest.approx((long.density * 55 + 3) / 58, rel=1e-12)
        assert d["heads"] == pytest.approx([(x * 55 + 3) / 58 for x in long.head_density], rel=1e-12)


def test_bf16_forward_close_to_dense(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    ids = _prompt(tok)
    with torch.no_grad():
        dense = model(ids).logits.float()
        sparsify(model, SparsePlan(block_size=32, tau=1.0))
        sparse = model(ids).logits.float()
    assert (dense.argmax(-1) == sparse.argmax(-1)).float().mean().item() >= 0.95
    assert (sparse - dense).abs().max().item() <= 0.1


def test_plans_that_do_not_fit_are_rejected(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir)
    with pytest.raises(PlanError, match=r"layer_overrides names layer\(s\) \[5\]"):
        sparsify(model, SparsePlan(layer_overrides={5: {"tau": 0.9}}))
    with pytest.raises(PlanError, match="unknown estimator 'missing'"):
        sparsify(model, SparsePlan(estimator="missing"))
    assert not is_sparsified(model) and model.config._attn_implementation == "sdpa"


def test_dense_layers_and_plan_replacement(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    ids = _prompt(tok, 512)
    sparsify(model, SparsePlan(block_size=32, tau=0.5, dense_layers=[0]))
    with torch.no_grad():
        model(ids)
    per_layer = sparse_stats(model).per_layer()
    assert per_layer[0]["density"] == 1.0 and per_layer[1]["density"] < 1.0
    sparsify(model, SparsePlan(block_size=32, tau=1.0))  # replaces the plan, keeps the original impl
    unsparsify(model)
    assert model.config._attn_implementation == "sdpa"


def test_a_model_with_attention_sinks_is_refused_not_answered_wrongly():
    """gpt-oss passes per-head sink logits (`s_aux`) to its attention; the kernels (and the SDPA fallback)
    ignored them, so even tau 1.0 answered differently from dense (max |logit| error 0.36, 80% top-1).
    Such a model is refused by name."""
    import transformers

    cfg = transformers.GptOssConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        layer_types=["full_attention", "full_attention"],
        max_position_embeddings=256,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with pytest.raises(PlanError, match=r"gpt_oss: attention layer 0 \(GptOssAttention\) has 'sinks'"):
        sparsify(model, SparsePlan(block_size=16, tau=1.0))
    assert not is_sparsified(model)
