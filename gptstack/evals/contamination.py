"""Train/eval contamination by n-gram overlap, GPT-3's method (Brown et al. 2020, section 4 and appendix C).

Text is normalised to its words: lower case, punctuation (underscore included), whitespace and casing ignored.
An eval example is *dirty* when one of its n-grams (n = 13 by default, GPT-3's maximum) occurs in any training
document, *clean* otherwise. An example of fewer than n words has no n-gram; GPT-3 lowered n for short
benchmarks down to 8 words ("spurious collisions at lower values of N"), so an example of MIN_WORDS..n-1 words
is dirty when all of its words, in order, occur in one training document, and one of fewer than MIN_WORDS
words cannot be tested: it counts as clean (no collision found) and is counted apart (`too_short`).

The index is built once per set of training documents and cached, keyed by the hash of their content:
    index-KEY.npy   the sorted, unique 64-bit hashes of every n-gram of the training documents
    words-KEY.txt   the normalised documents, one a line (the whole-example search of short examples)
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from ..io import atomic_write_text

WORD = re.compile(r"[^\W_]+")
MIN_WORDS = 8  # GPT-3's smallest n for a non-synthetic task
FORMAT_VERSION = 1  # bump when normalisation or hashing changes: old caches are then never read
_PRIME = np.uint64(0x100000001B3)  # odd: the rolling hash multiplier (wraps mod 2^64)


def words(text: str) -> list[str]:
    """The normalised words of a text."""
    return WORD.findall(text.lower())


class _WordHashes:
    """A stable 64-bit hash per word (Python's own str hash changes between processes, and the index is cached)."""

    def __init__(self):
        self.known: dict[str, int] = {}

    def __call__(self, ws: list[str]) -> np.ndarray:
        out = np.empty(len(ws), dtype=np.uint64)
        for i, w in enumerate(ws):
            h = self.known.get(w)
            if h is None:
                h = self.known[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            out[i] = h
        return out


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """The hash of every n-gram (a polynomial in the word hashes, mod 2^64), in order; empty below n words."""
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            h = h * _PRIME + word_hashes[i:i + m]
    return h


@dataclass
class Overlap:
    """Whether each example collides with the training data, and why not when it could not be tested."""
    dirty: list[bool]
    too_short: list[bool]  # fewer than MIN_WORDS words: untestable (counted clean)

    @property
    def dirty_share(self) -> float:
        return sum(self.dirty) / max(len(self.dirty), 1)


class NgramIndex:
    """The n-grams of a set of training documents, for exact collision tests against eval examples."""

    def __init__(self, hashes: np.ndarray, text: str, n: int, key: str = ""):
        self.hashes, self.text, self.n, self.key = hashes, text, n, key
        self._hash_words = _WordHashes()

    @classmethod
    def build(cls, documents: Iterable[tuple[str, str]], n: int = 13, cache: Path | None = None,
              total: int | None = None, desc: str = "n-gram index") -> "NgramIndex":
        """Normalise and hash `documents` ((id, text) pairs); with `cache`, reuse the index made from the same
        content, or write it there. The content is read either way: its hash is the cache key."""
        docs = [(doc_id, " ".join(words(text))) for doc_id, text in
                tqdm(documents, total=total, desc=f"{desc}: reading", unit="doc", mininterval=1.0)]
        h = hashlib.sha256(f"{FORMAT_VERSION}|{n}".encode())
        for _, normalised in docs:
            h.update(normalised.encode())
            h.update(b"\n")
        key = h.hexdigest()[:20]
        if cache is not None and (Path(cache) / f"index-{key}.npy").is_file() and (Path(cache) / f"words-{key}.txt").is_file():
            return cls(np.load(Path(cache) / f"index-{key}.npy"), (Path(cache) / f"words-{key}.txt").read_text(encoding="utf-8"), n, key)
        hash_words = _WordHashes()
        parts = [ngram_hashes(hash_words(normalised.split()), n)
                 for _, normalised in tqdm(docs, desc=f"{desc}: hashing {n}-grams", unit="doc", mininterval=1.0)]
        hashes = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)
        text = "\n".join(normalised for _, normalised in docs)
        if cache is not None:
            cache = Path(cache)
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".index-{key}.npy"
            np.save(tmp, hashes)
            tmp.replace(cache / f"index-{key}.npy")
            atomic_write_text(cache / f"words-{key}.txt", text)
        return cls(hashes, text, n, key)

    def __len__(self) -> int:
        return len(self.hashes)

    def collides(self, text: str) -> tuple[bool, bool]:
        """(dirty, too short to test) for one eval example."""
        ws = words(text)
        if len(ws) >= self.n:
            q = ngram_hashes(self._hash_words(ws), self.n)
            at = np.minimum(np.searchsorted(self.hashes, q), max(len(self.hashes) - 1, 0))
            return bool(len(self.hashes) and (self.hashes[at] == q).any()), False
        if len(ws) < MIN_WORDS:
            return False, True
        return self._occurs(" ".join(ws)), False

    def _occurs(self, phrase: str) -> bool:
        """Whether the normalised phrase occurs with word edges on both sides (documents are lines, words spaced)."""
        at = self.text.find(phrase)
        while at >= 0:
            end = at + len(phrase)
            if (at == 0 or self.text[at - 1] in " \n") and (end == len(self.text) or self.text[end] in " \n"):
                return True
            at = self.text.find(phrase, at + 1)
        return False

    def check(self, texts: list[str]) -> Overlap:
        flags = [self.collides(t) for t in texts]
        return Overlap([d for d, _ in flags], [s for _, s in flags])


def split_accuracy(correct: dict[int, bool], overlap: Overlap) -> dict:
    """Accuracy on all scored examples, the clean ones and the dirty ones; `correct` maps an example's position
    (in the list `overlap` was computed on) to whether the model got it right: the eval's own per-example results.
    None where a subset is empty."""
    def acc(keep):
        xs = [c for i, c in correct.items() if keep(i)]
        return sum(xs) / len(xs) if xs else None
    return {"acc_all": acc(lambda i: True), "acc_clean": acc(lambda i: not overlap.dirty[i]),
            "acc_dirty": acc(lambda i: overlap.dirty[i]), "n_scored": len(correct),
            "n_dirty_scored": sum(overlap.dirty[i] for i in correct)}
