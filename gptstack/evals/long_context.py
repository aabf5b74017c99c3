"""Long-context retrieval: can a model use every position of its window?

    passkey   a 5-digit number hidden in repeated filler, asked for at the end (Mohtashami & Jaggi 2023)
    needle    "the special magic number for WORD is N" hidden in held-out corpus text (needle in a haystack)

A prompt is built in token space to `length` tokens (the answer's tokens included), the fact placed after
`depth` of the filler (0: the start, 1: just before the question). The model answers greedily through the one
generation engine; an answer is right when the first number it writes is the hidden one. A grid of lengths x
depths gives the accuracy per cell, and a heat map.

Prompts are drawn per split from disjoint seeds (and, for the needle, disjoint held-out documents): `train`
for fine-tuning examples, `dev` for every choice, `test` for the reported figures.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..generate import generate
from ..model import GPT, token_logprobs

SPLITS = ("train", "dev", "test")
TASKS = ("passkey", "needle")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.", " There and back again.")
NEEDLE_WORDS = ("apple", "river", "copper", "violin", "falcon", "marble", "lantern", "cedar", "harbor", "quartz",
                "meadow", "ember", "glacier", "saffron", "tundra", "orchid", "anchor", "comet", "walnut", "prism")


@dataclass
class Probe:
    """One prompt of the grid: its tokens, the number it hides and where."""
    prompt: list[int]
    answer: str
    answer_ids: list[int]
    length: int
    depth: float


def _rng(split: str, task: str, length: int, depth: float, i: int, seed: int) -> random.Random:
    key = f"{split}/{task}/{length}/{depth}/{i}/{seed}"
    return random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))


class ProbeDoesNotFit(ValueError):
    """A length too short for a probe's intro, fact, question and answer."""


def _place(before: list[int], filler: list[list[int]], fact: list[int], question: list[int], answer_ids: list[int],
           length: int, depth: float) -> list[int]:
    """before + as many filler pieces as fit (the prompt and its answer in `length` tokens), `fact` after `depth` of
    them: pieces are sentences (passkey) or tokens (needle), so the fact never splits a sentence."""
    room = length - len(before) - len(fact) - len(question) - len(answer_ids)
    if room < 0:
        raise ProbeDoesNotFit(f"a {length}-token probe cannot hold its intro, fact and question ({length - room} tokens)")
    used, pieces = 0, []
    for piece in filler:
        if used + len(piece) > room:
            break
        pieces.append(piece)
        used += len(piece)
    at = round(depth * len(pieces))
    return before + [t for p in pieces[:at] for t in p] + fact + [t for p in pieces[at:] for t in p] + question


class Haystacks:
    """Held-out text per split (documents the model was not trained on, split by a hash of their id), tokenized
    once and concatenated: the needle's filler."""

    def __init__(self, tok, texts_by_split: dict[str, list[str]]):
        self.ids = {split: [t for text in texts for t in tok.encode(text + "\n")] for split, texts in texts_by_split.items()}

    @classmethod
    def from_documents(cls, tok, documents, val_fraction: float, max_chars: int = 2_000_000) -> "Haystacks":
        """Train-split documents for `train`; the held-out (val) ones halved by hash into `dev` and `test`."""
        from ..data.tokens import is_val
        texts: dict[str, list[str]] = {s: [] for s in SPLITS}
        sizes = dict.fromkeys(SPLITS, 0)
        for doc in documents:
            split = "train"
            if is_val(doc.id, val_fraction):
                split = "dev" if int(hashlib.sha1(doc.id.encode()).hexdigest()[-1], 16) % 2 == 0 else "test"
            if sizes[split] < max_chars:
                texts[split].append(doc.text)
                sizes[split] += len(doc.text)
        return cls(tok, texts)

    def window(self, split: str, length: int, rng: random.Random) -> list[int]:
        ids = self.ids[split]
        if len(ids) < length:
            raise ValueError(f"{len(ids)} held-out tokens for the {split} split: too few for a {length}-token haystack")
        start = rng.randrange(len(ids) - length + 1)
        return ids[start:start + length]


def make_probe(task: str, tok, length: int, depth: float, split: str, i: int, seed: int = 0,
               haystacks: Haystacks | None = None) -> Probe:
    before, filler, fact, question, answer_ids, number = _parts(task, tok, length, split, i, seed, depth, haystacks)
    return Probe(_place(before, filler, fact, question, answer_ids, length, depth), number, answer_ids, length, depth)


def shortest_probe(task: str, tok, haystacks: Haystacks | None = None) -> int:
    """About the fewest tokens a probe can have: its intro, fact, question and answer with no filler (a few tokens
    spare, as keys tokenize to different lengths)."""
    before, _, fact, question, answer_ids, _ = _parts(task, tok, 0, "dev", 0, 0, 0.0, haystacks)
    return len(before) + len(fact) + len(question) + len(answer_ids) + 4


def _parts(task, tok, length, split, i, seed, depth, haystacks):
    rng = _rng(split, task, length, depth, i, seed)
    number = str(rng.randrange(10_000, 100_000))
    answer_ids = tok.encode(" " + number)
    if task == "passkey":
        before = tok.encode(PASSKEY_INTRO)
        sentences = [tok.encode(x) for x in PASSKEY_FILLER]
        filler = sentences * (length // sum(map(len, sentences)) + 1)
        fact = tok.encode(f" The pass key is {number}. Remember it. {number} is the pass key.")
        question = tok.encode(" What is the pass key? The pass key is")
    elif task == "needle":
        word = rng.choice(NEEDLE_WORDS)
        before = []
        filler = [[t] for t in haystacks.window(split, length, rng)] if length else []
        fact = tok.encode(f"\nThe special magic number for {word} is {number}.\n")
        question = tok.encode(f"\nWhat is the special magic number for {word}? The special magic number for {word} is")
    else:
        raise ValueError(f"unknown long-context task {task!r} (known: {', '.join(TASKS)})")
    return before, filler, fact, question, answer_ids, number


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def answer_probes(model: GPT, tok, probes: list[Probe], batch_size: int = 16, prefill_chunk: int = 0) -> list[bool]:
    """Greedy answers through the engine; right when the first number written is the hidden one."""
    right = []
    for start in range(0, len(probes), batch_size):
        batch = probes[start:start + batch_size]
        gens = generate(model, [p.prompt for p in batch], max(len(p.answer_ids) for p in batch) + 1, temperature=0.0,
                        pad_id=tok.pad, prefill_chunk=prefill_chunk)
        right += [first_number(tok.decode(g.tokens, skip_special=True)) == p.answer for p, g in zip(batch, gens)]
    return right


@torch.no_grad()
def answer_logprobs(model: GPT, probes: list[Probe]) -> list[float]:
    """log P(the right answer | the prompt) of each probe, teacher-forced: it moves while exact answers are all wrong."""
    device = model.wte.weight.device
    out = []
    for p in probes:
        ids = torch.tensor([p.prompt + p.answer_ids], device=device)
        h = model.hidden(ids)[:, -len(p.answer_ids) - 1:-1]
        out.append(token_logprobs(model.logits(h), ids[:, -len(p.answer_ids):]).sum().item())
    return out


def retrieval_grid(model: GPT, tok, task: str, lengths, depths=DEPTHS, n: int = 10, split: str = "test", seed: int = 0,
                   haystacks: Haystacks | None = None, batch_size: int = 16, prefill_chunk: int = 0,
                   progress=None, metric: str = "accuracy") -> dict[str, dict[str, float | None]]:
    """{length: {depth: accuracy over n probes}} (metric "logprob": the right answer's mean log-probability); a
    length past the model's window, or too short to hold a probe's intro, fact and question, is None (not run)."""
    grid: dict[str, dict[str, float | None]] = {}
    for length in lengths:
        try:
            if length > model.cfg.n_ctx:
                raise ProbeDoesNotFit(f"{length} tokens: past the window")
            probes = [make_probe(task, tok, length, d, split, i, seed, haystacks) for d in depths for i in range(n)]
        except ProbeDoesNotFit:
            grid[str(length)] = {depth_key(d): None for d in depths}
            continue
        right = answer_probes(model, tok, probes, batch_size, prefill_chunk) if metric == "accuracy" else answer_logprobs(model, probes)
        grid[str(length)] = {depth_key(d): sum(right[j * n:(j + 1) * n]) / n for j, d in enumerate(depths)}
        if progress is not None:
            progress(task, length, grid[str(length)])
    return grid


def depth_key(depth: float) -> str:
    """The report key of a depth: its percentage ("0", "25", ... "100")."""
    return str(round(depth * 100))


def heat_map(grids: dict[str, dict[str, dict[str, float | None]]], path: Path, title: str) -> Path:
    """One panel per grid (e.g. before / after): accuracy by length (rows) and depth (columns); cells not run grey."""
    import matplotlib
    import numpy as np
    from .. import plots
    fig, axes = plots.subplots(1, len(grids), figsize=(3.6 * len(grids) + 1, 3.4), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items()):
        lengths = list(grid)
        depths = list(next(iter(grid.values())))
        values = np.array([[np.nan if grid[L][d] is None else grid[L][d] for d in depths] for L in lengths], dtype=float)
        cmap = matplotlib.colormaps["RdYlGn"].copy()
        cmap.set_bad("lightgrey")
        im = ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=1, cmap=cmap, aspect="auto")
        for r in range(len(lengths)):
            for c in range(len(depths)):
                ax.text(c, r, "—" if np.isnan(values[r, c]) else f"{values[r, c]:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d}%" for d in depths])
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set_xlabel("depth of the fact")
        ax.set_ylabel("prompt length (tokens)")
        ax.set_title(name)
    fig.colorbar(im, ax=axes[0, -1], shrink=0.8, label="accuracy")
    fig.suptitle(title)
    return plots.save(fig, path)
