"""Tiny but real Hugging Face model directories for tests and the stack test: a config, random
weights in safetensors and a tokenizer trained offline on standard-library text. `load_model(path)`
loads them like any local model, so tests exercise the same code path as production."""

from __future__ import annotations

import functools
import json
from pathlib import Path

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
PLAIN_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"


def sample_text(min_chars: int = 20_000) -> str:
    """Natural English from the standard library's documentation topics (no download)."""
    from pydoc_data.topics import topics

    parts: list[str] = []
    total = 0
    for key in sorted(topics):
        parts.append(topics[key])
        total += len(topics[key])
        if total >= min_chars:
            break
    return "\n\n".join(parts)


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on stdlib text, wrapped for transformers."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token=None,
    )
    fast.chat_template = PLAIN_CHAT_TEMPLATE
    return fast


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Training takes a few seconds; tests build many tiny models, so train once per process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = sample_text(60_000)
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tok.to_str()


def tiny_config(
    arch: str = "llama",
    *,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 2048,
):
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny-model arch {arch!r}; choose one of {ARCHS}")
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    return cls(**kwargs)


def make_tiny_model_dir(path: str | Path, arch: str = "llama", *, seed: int = 0, **shape: int) -> Path:
    """Write a random-weight model of the given architecture to `path` and return it; `shape` sets
    `tiny_config`'s hidden, layers, heads, kv_heads and max_positions (its defaults otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **shape)
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Larger-than-default init so attention is not uniform and sparsity has something to do.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.normal_(0.0, 0.25)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "sparsepilot_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return path
