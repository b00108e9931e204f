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
        if len(texts) < 2:
            assert why is not None and "at least 2" in why
            continue
        need = 2 * block
        parts = split_texts(texts, frac, seed)
        packs = [pack_token_windows(tok, p, seq, 1, seed=seed, min_length=need) for p in parts]
        assert (why is None) == all(packs), (case, why)
