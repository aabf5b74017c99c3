"""A built-in generation task for capability scaling (GPT-4 §3.1 did this with HumanEval's pass rate).

Identifier completion on held-out code: the context is up to `max_chars` of a validation document
ending just before an identifier; the query passes when greedy decoding writes exactly that identifier.
Small models already pass some of them (`self.` then the attribute used three lines up), and larger
ones pass more, so −log(pass rate) has a range to follow across a ladder of CPU-sized models.
The queries come from the documents the data split holds out, deterministically from a seed.
"""
from __future__ import annotations

import random
import re

from ..data.sources import iter_documents
from ..data.tokens import is_val
from ..errors import GptstackError
from .prompting import loglikelihood, split_whitespace

IDENT = re.compile(r"(?<![A-Za-z0-9_.])[A-Za-z_][A-Za-z0-9_]{3,}|(?<=\.)[A-Za-z_][A-Za-z0-9_]{3,}")


def identifier_queries(data_cfg, n: int, seed: int = 0, max_chars: int = 240) -> list[dict]:
    """`n` {context, answer} queries from the validation documents of the data sources."""
    docs = [d.text for src in data_cfg.sources for d in iter_documents(src, data_cfg.skip_bad)
            if is_val(d.id, data_cfg.val_fraction) and len(d.text) > 2 * max_chars]
    if not docs:
        raise GptstackError("capability task: the data sources hold no validation document long enough for a query")
    rng = random.Random(seed)
    out, tries = [], 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        text = rng.choice(docs)
        at = rng.randrange(max_chars, len(text))
        m = IDENT.search(text, at)
        if not m or m.start() - at > 400:
            continue
        start = text.rfind("\n", 0, m.start() - max_chars // 2)  # the context starts at a line
        context = text[max(start + 1, m.start() - max_chars):m.start()]
        if context.strip():
            out.append({"context": context, "answer": m.group()})
    return out


def pass_rate(model, tok, queries: list[dict]) -> dict:
    """How many queries greedy decoding completes with exactly the answer (the context is cut from the
    left to fit the window), and the mean log-likelihood of the answers."""
    requests = []
    for q in queries:
        ctx, cont = split_whitespace(q["context"], q["answer"])
        requests.append((tok.encode(ctx), tok.encode(cont)))
    scores = loglikelihood(model, requests)
    passed = sum(greedy for _, greedy in scores)
    return {"n": len(queries), "passed": int(passed), "pass_rate": passed / max(len(queries), 1),
            "mean_logprob": sum(ll for ll, _ in scores) / max(len(scores), 1)}
