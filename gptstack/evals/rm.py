"""How well a scorer ranks answers: agreement with a reference ranking on non-tied pairs, by family and by
subset (the pair's answers differ in correctness, or not), for the reward model and for two baselines anyone
could build without one (shorter answer first; the SFT model's own log-likelihood)."""
from __future__ import annotations

from collections import defaultdict

import torch

from ..data.loader import Demonstrations
from ..model import token_logprobs
from ..tokenizer import chat_messages


def pair_agreement(scores: list[list[float]], gold_ranks: list[list[int]], families: list[str],
                   correct: list[list[bool]]) -> dict:
    """Share of gold-ordered pairs (ties skipped) that the scores order the same way (a score tie counts
    half); overall, by family, and by subset."""
    buckets = defaultdict(lambda: [0.0, 0])
    for s, g, fam, c in zip(scores, gold_ranks, families, correct):
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                if g[i] == g[j]:
                    continue
                better, worse = (i, j) if g[i] < g[j] else (j, i)
                hit = 1.0 if s[better] > s[worse] else 0.5 if s[better] == s[worse] else 0.0
                subset = "correctness_differs" if c[i] != c[j] else "correctness_same"
                for key in ("all", f"family/{fam}", f"subset/{subset}"):
                    buckets[key][0] += hit
                    buckets[key][1] += 1
    out = {"agreement": buckets["all"][0] / max(buckets["all"][1], 1), "pairs": buckets["all"][1],
           "by_family": {}, "by_subset": {}}
    for key, (hits, n) in sorted(buckets.items()):
        if key != "all":
            kind, name = key.split("/", 1)
            out["by_" + kind][name] = {"agreement": hits / n, "pairs": n}
    return out


@torch.no_grad()
def answer_loglik(model, tok, rows: list[dict], batch_size: int = 32) -> list[list[float]]:
    """The mean per-token log-probability the model gives each answer (its tokens and closing <|end|>)."""
    convs = [chat_messages(r["prompt"], r.get("system"), y) for r in rows for y in r["responses"]]
    data = Demonstrations(convs, tok, model.cfg.n_ctx)
    device = next(model.parameters()).device
    flat = []
    for start in range(0, len(data), batch_size):
        b = data.batch(range(start, min(start + batch_size, len(data))))
        target = b["target"].to(device)
        lp = token_logprobs(model(b["input"].to(device))[0], target.clamp(min=0))
        mask = target != -100
        flat += ((lp * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    out, i = [], 0
    for r in rows:
        out.append(flat[i:i + len(r["responses"])])
        i += len(r["responses"])
    return out
