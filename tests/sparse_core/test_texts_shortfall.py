"""`texts_shortfall` says in advance, from token counts alone, exactly when `calibrate` cannot cut a
calibration and a held-out window from its texts (review W3: `usecase add` accepted such datasets, and
their calibration failed after minutes)."""

from __future__ import annotations

import random

from sparse_core.corpus import pack_token_windows, split_texts, texts_shortfall


class WordTokenizer:
    """One token per word, EOS 0: token counts are exact."""

    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [1] * len(text.split())}


def test_it_agrees_with_the_packing_calibrate_does() -> None:
    tok, rng = WordTokenizer(), random.Random(0)
    for case in range(300):
        texts = [" ".join(["w"] * rng.randint(1, 60)) for _ in range(rng.randint(0, 8))]
        frac, seed, block, seq = rng.choice([0.25, 0.5]), case, rng.choice([16, 64]), rng.choice([64, 256])
        why = texts_shortfall(texts, lambda t: len(t.split()), frac, seed, block_size=block, max_seq_len=seq)
        if len(set(texts)) < 2:  # one text, or copies of one: nothing distinct to hold out
            assert why is not None and "at least 2 distinct" in why
            continue
        need = 2 * block
        parts = split_texts(texts, frac, seed)
        packs = [pack_token_windows(tok, p, seq, 1, seed=seed, min_length=need) for p in parts]
        assert (why is None) == all(packs), (case, why)


def test_copies_of_a_text_are_never_held_out_against_it() -> None:
    """Review W5: the split was by index, so a dataset whose prompts all repeat calibrated on held-out
    windows identical to its calibration text. Every copy of a text (up to whitespace and Unicode
    normalisation) now lands on one side, and copies of one text alone are not enough to calibrate."""
    import pytest

    texts = [f"prompt {i % 5}" + (" " if i % 2 else "") for i in range(40)]  # 5 texts, 8 copies each
    for seed in range(20):
        cal, held = split_texts(texts, 0.25, seed)
        assert cal and held and len(cal) + len(held) == len(texts)
        assert not {t.strip() for t in cal} & {t.strip() for t in held}, seed
    distinct = [f"prompt {i}" for i in range(9)]
    cal, held = split_texts(distinct + ["prompt 4", " prompt  4"], 0.34, 3)
    # copies follow their first text, wherever the split without them put it
    assert ("prompt 4" in held) == (" prompt  4" in held) == ("prompt 4" in split_texts(distinct, 0.34, 3)[1])

    same = ["one prompt"] * 40
    why = texts_shortfall(same, lambda t: 10_000, 0.25, 0)
    assert why is not None and "at least 2 distinct non-blank prompts" in why and "it has 1" in why
    with pytest.raises(ValueError, match="at least 2 distinct texts"):
        split_texts(same, 0.25, 0)
