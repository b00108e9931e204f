"""Long-context probes, generated offline and scored by log-likelihood rank.

A 135M model cannot reliably *generate* a passkey beyond ~1k tokens, but it ranks the right one first
among distractors at 1k-8k: the log-likelihood margin is a sensitive long-context signal, and it
collapses to chance when the needle is cut out of attention. So every probe is a prompt plus a list of
candidate answers (equal digit counts, so no length bias); a probe is correct when the true answer has
the highest summed log-probability. The dense model's own accuracy is the reference a sparse plan is
compared with.

Everything is built at the token level (filler tokens from the stdlib corpus, needles tokenised apart)
so a probe has exactly the requested length, and the same seed gives the same probes.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from sparse_core.corpus import corpus_texts

PROBE_KINDS = ("passkey", "multikey", "kv", "vartrack")
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class ProbeInstance:
    kind: str
    length: int
    depth: float
    seed: int
    prompt_ids: list[int]
    candidates: list[list[int]]
    answer_index: int
    answer_text: str

    def digest(self) -> str:
        h = hashlib.sha256(repr((self.kind, self.prompt_ids, self.candidates, self.answer_index)).encode())
        return h.hexdigest()[:16]


@dataclass
class ProbeOutcome:
    kind: str
    length: int
    depth: float
    rank: int  # 1 = right answer has the highest log-likelihood
    margin: float  # log p(true) - max log p(distractor)
    correct: bool


@dataclass
class ProbeScores:
    outcomes: list[ProbeOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return sum(o.correct for o in self.outcomes) / len(self.outcomes) if self.outcomes else float("nan")

    def accuracy_by(self) -> dict[str, float]:
        """Accuracy per 'kind@length'."""
        groups: dict[str, list[bool]] = {}
        for o in self.outcomes:
            groups.setdefault(f"{o.kind}@{o.length}", []).append(o.correct)
        return {k: sum(v) / len(v) for k, v in sorted(groups.items())}

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "by_kind_length": self.accuracy_by(),
            "mean_margin": (
                sum(o.margin for o in self.outcomes) / len(self.outcomes) if self.outcomes else float("nan")
            ),
            "seconds": self.seconds,
            "outcomes": [asdict(o) for o in self.outcomes],
        }


# ----------------------------------------------------------------------------------------------------
# Generation


_FILLER: dict[tuple, list[int]] = {}


def _filler_ids(tokenizer) -> list[int]:
    """The held-out stdlib corpus tokenised once per tokenizer."""
    key = (id(tokenizer), getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    if key not in _FILLER:
        text = "\n\n".join(corpus_texts("heldout"))
        _FILLER.clear()
        _FILLER[key] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return _FILLER[key]


class _Builder:
    def __init__(self, tokenizer, seed: int):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.filler = _filler_ids(tokenizer)

    def enc(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def number(self, digits: int = 5) -> str:
        return str(self.rng.randint(10 ** (digits - 1), 10**digits - 1))

    def distinct_numbers(self, k: int, exclude: set[str], digits: int = 5) -> list[str]:
        out: list[str] = []
        while len(out) < k:
            n = self.number(digits)
            if n not in exclude and n not in out:
                out.append(n)
        return out

    def haystack(self, n_tokens: int) -> list[int]:
        """n_tokens of natural filler starting at a seeded offset (wraps around)."""
        if n_tokens <= 0:
            return []
        f = self.filler
        pos = self.rng.randrange(len(f))
        out: list[int] = []
        while len(out) < n_tokens:
            take = min(n_tokens - len(out), len(f) - pos)
            out += f[pos : pos + take]
            pos = 0
        return out

    def assemble(
        self, length: int, head: str, needles: Sequence[tuple[float, str]], tail: str
    ) -> tuple[list[int], float]:
        """head + filler with needles inserted at relative depths + tail, exactly `length` tokens."""
        head_ids, tail_ids = self.enc(head), self.enc(tail)
        needle_ids = [(d, self.enc(t)) for d, t in needles]
        fixed = len(head_ids) + len(tail_ids) + sum(len(n) for _, n in needle_ids)
        n_fill = length - fixed
        if n_fill < 0:
            raise ValueError(f"probe length {length} is too short for its fixed text ({fixed} tokens)")
        fill = self.haystack(n_fill)
        ids = list(head_ids)
        pos = 0
        for depth, nid in sorted(needle_ids, key=lambda x: x[0]):
            cut = int(round(depth * n_fill))
            ids += fill[pos:cut] + nid
            pos = cut
        ids += fill[pos:] + tail_ids
        assert len(ids) == length
        return ids, needle_ids[0][0] if needle_ids else 0.0

    def candidates(self, true: str, others: Sequence[str]) -> tuple[list[list[int]], int]:
        values = [true, *others]
        order = list(range(len(values)))
        self.rng.shuffle(order)
        cands = [self.enc(" " + values[i]) for i in order]
        return cands, order.index(0)


def _passkey(b: _Builder, length: int, depth: float, n_distractors: int):
    key = b.number()
    head = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n\n"
    )
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "\n\nWhat is the pass key? The pass key is"
    ids, _ = b.assemble(length, head, [(depth, needle)], tail)
    cands, idx = b.candidates(key, b.distinct_numbers(n_distractors, {key}))
    return ids, cands, idx, key


_WORDS = (
    "apple river candle falcon garden harbor island jacket lantern marble needle orchard pepper quartz "
    "saddle timber velvet walnut yonder zephyr anchor bishop copper dragon ember forest glacier hollow"
).split()


def _multikey(b: _Builder, length: int, depth: float, n_distractors: int, n_keys: int = 4):
    words = b.rng.sample(_WORDS, n_keys)
    values = b.distinct_numbers(n_keys, set())
    depths = [depth] + [b.rng.uniform(0.05, 0.95) for _ in range(n_keys - 1)]
    needles = [
        (d, f" One of the special magic numbers for {w} is: {v}. ")
        for d, w, v in zip(depths, words, values, strict=True)
    ]
    head = "Some special magic numbers are hidden inside the following text. Make sure to memorize them.\n\n"
    tail = f"\n\nWhat is the special magic number for {words[0]}? The special magic number for {words[0]} is:"
    ids, _ = b.assemble(length, head, needles, tail)
    others = values[1:] + b.distinct_numbers(max(0, n_distractors - (n_keys - 1)), set(values))
    cands, idx = b.candidates(values[0], others)
    return ids, cands, idx, values[0]


def _kv(b: _Builder, length: int, depth: float, n_distractors: int):
    """A JSON-like list of random key-value pairs filling the context; query the pair at `depth`."""
    head = "Extract the value corresponding to the specified key in the JSON object below.\n\n{\n"
    probe_tail = '\n}\n\nThe value associated with the key "KEY" is'
    # 8 tokens of slack: the queried key may tokenise longer than the placeholder.
    budget = length - len(b.enc(head)) - len(b.enc(probe_tail)) - 8
    pairs: list[tuple[str, str]] = []
    lines: list[list[int]] = []
    used = 0
    seen: set[str] = set()
    while True:
        k = f"{b.rng.getrandbits(32):08x}"
        v = b.number(6)
        if v in seen:
            continue
        line = b.enc(f'  "{k}": {v},\n')
        if used + len(line) > budget:
            break
        pairs.append((k, v))
        seen.add(v)
        lines.append(line)
        used += len(line)
    if len(pairs) < n_distractors + 1:
        raise ValueError(f"probe length {length} is too short for a key-value probe")
    qi = min(len(pairs) - 1, int(depth * len(pairs)))
    key, value = pairs[qi]
    tail_ids = b.enc(probe_tail.replace("KEY", key))
    body = b.enc(head) + [t for ln in lines for t in ln]
    # The few tokens left over (less than one line) become natural filler in front of the instruction.
    ids = b.haystack(length - len(body) - len(tail_ids)) + body + tail_ids
    if len(ids) != length:
        raise ValueError(f"could not build a key-value probe of exactly {length} tokens")
    others = b.rng.sample([v for i, (_, v) in enumerate(pairs) if i != qi], n_distractors)
    cands, idx = b.candidates(value, others)
    return ids, cands, idx, value


def _vartrack(b: _Builder, length: int, depth: float, n_distractors: int, hops: int = 3):
    """Two chains VAR A = 12345, VAR B = VAR A, ...; ask for the value of the end of the first chain."""
    names = [
        f"{''.join(b.rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ') for _ in range(5))}" for _ in range(2 * hops)
    ]
    names = list(dict.fromkeys(names))
    while len(names) < 2 * hops:
        names.append("".join(b.rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)))
        names = list(dict.fromkeys(names))
    v_true, v_other = b.distinct_numbers(2, set())
    chains = [(names[:hops], v_true), (names[hops:], v_other)]
    needles = []
    for ci, (chain, value) in enumerate(chains):
        first = depth if ci == 0 else b.rng.uniform(0.05, 0.5)
        ds = sorted([first] + [b.rng.uniform(first, 0.97) for _ in range(hops - 1)])
        for h, (d, name) in enumerate(zip(ds, chain, strict=True)):
            rhs = value if h == 0 else f"VAR {chain[h - 1]}"
            needles.append((d, f" VAR {name} = {rhs}. "))
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    target = chains[0][0][-1]
    tail = f"\n\nQuestion: what is the value of VAR {target}? Answer: VAR {target} = "
    ids, _ = b.assemble(length, head, needles, tail.rstrip())
    others = [v_other] + b.distinct_numbers(n_distractors - 1, {v_true, v_other})
    cands, idx = b.candidates(v_true, others)
    return ids, cands, idx, v_true


_GENERATORS: dict[str, Callable] = {
    "passkey": _passkey,
    "multikey": _multikey,
    "kv": _kv,
    "vartrack": _vartrack,
}


def generate_probes(
    tokenizer,
    *,
    lengths: Sequence[int] = (2048,),
    kinds: Sequence[str] = PROBE_KINDS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    per_depth: int = 1,
    n_distractors: int = 9,
    seed: int = 0,
) -> list[ProbeInstance]:
    """Probes for every (kind, length, depth); deterministic for a seed and tokenizer."""
    unknown = [k for k in kinds if k not in _GENERATORS]
    if unknown:
        raise ValueError(f"unknown probe kind(s) {unknown}; known: {list(PROBE_KINDS)}")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"probe depth {d} outside [0, 1]")
    out: list[ProbeInstance] = []
    for kind in kinds:
        for length in lengths:
            for di, depth in enumerate(depths):
                for r in range(per_depth):
                    s = int.from_bytes(
                        hashlib.sha256(f"{seed}:{kind}:{length}:{di}:{r}".encode()).digest()[:8], "big"
                    )
                    b = _Builder(tokenizer, s)
                    ids, cands, idx, ans = _GENERATORS[kind](b, int(length), float(depth), n_distractors)
                    out.append(ProbeInstance(kind, int(length), float(depth), seed, ids, cands, idx, ans))
    return out


# ----------------------------------------------------------------------------------------------------
# Scoring


@torch.inference_mode()
def candidate_logprobs(model, prompt_ids: Sequence[int], candidates: Sequence[Sequence[int]]) -> list[float]:
    """Summed log p(candidate | prompt) for each candidate: one prefill, then each candidate on top of the
    prompt's KV cache (cropped back after each), so the long prompt is encoded once."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out.cache
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores: list[float] = []
    for cand in candidates:
        lp = float(first[cand[0]])
        if len(cand) > 1:
            c = torch.tensor([list(cand[:-1])], device=device)
            o = model(input_ids=c, cache=cache, use_cache=True)
            lps = torch.log_softmax(o.logits[0].float(), dim=-1)
            tgt = torch.tensor(list(cand[1:]), device=device)
            lp += float(lps.gather(1, tgt[:, None]).sum())
            cache.crop(-(len(cand) - 1))  # back to the prompt
        scores.append(lp)
    return scores


def score_probes(
    model, probes: Sequence[ProbeInstance], *, progress: Callable[[int], None] | None = None
) -> ProbeScores:
    res = ProbeScores()
    t0 = time.perf_counter()
    for p in probes:
        lps = candidate_logprobs(model, p.prompt_ids, p.candidates)
        true = lps[p.answer_index]
        better = sum(1 for i, v in enumerate(lps) if i != p.answer_index and v >= true)
        best_other = max(v for i, v in enumerate(lps) if i != p.answer_index)
        res.outcomes.append(
            ProbeOutcome(p.kind, p.length, p.depth, 1 + better, float(true - best_other), better == 0)
        )
        if progress:
            progress(1)
    res.seconds = time.perf_counter() - t0
    return res
