"""The one generation engine: batched sampling with a KV cache.

Prompts of different lengths are left-padded; each row gets its own positions
and an attention mask that hides its padding. Returns the sampled tokens, their
log-probabilities under the sampling distribution (logits / temperature), and
whether a stop token or stop string ended them. `on_token(row, token)` streams each new token
as it is sampled. Used by sampling, evals, comparisons, PPO
rollouts, chat and serving alike.

Each row samples with random numbers of its own, drawn from a generator seeded by (seed, row), so a row's
answer does not depend on the rows batched with it. `generate_all` splits many prompts across torchrun's
ranks on that basis and gathers the answers: rollouts, comparisons and evaluation answers come out the same
on any number of ranks.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .model import GPT, KVCache

ROW_SEED_MIX = 0x9E3779B97F4A7C15  # an odd 64-bit constant (2^64 / golden ratio): (seed, row) pairs map to distinct seeds


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row`'s random numbers when a call is seeded `seed`."""
    return (seed * ROW_SEED_MIX + row) % 2**64


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)  # new tokens, the stop token included if one was hit
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False  # ended by a stop token or stop string (not by the length limit)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids: tuple[int, ...] = (), pad_id: int = 0,
             seed: int | list[int] | None = None, stop_strings: tuple[str, ...] = (),
             decode: Callable[[list[int]], str] | None = None,
             on_token: Callable[[int, int], None] | None = None, pad_to: int = 0) -> list[Generation]:
    """`seed`: row i's random numbers come from `row_seed(seed, i)`, or from `seed[i]` given one seed per row
    (None: fresh ones). `pad_to`: left-pad every prompt to at least this many tokens, through the attention mask
    whatever the batch, so a row computes alike in any batch padded to the same length (`generate_all`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if stop_strings and decode is None:
        raise ValueError("stop strings need `decode` to see the text")
    from torch.distributed.tensor import DTensor
    if isinstance(model.wte.weight, DTensor):
        raise ValueError("the model is FSDP-sharded: sample inside train.distributed.whole_weights(the sharded root)")
    was_training = model.training
    model.eval()
    device = model.wte.weight.device
    n_ctx = model.cfg.n_ctx
    B, P = len(prompts), max(pad_to, *(len(p) for p in prompts))
    if P >= n_ctx:
        raise ValueError(f"prompt of {P} tokens leaves no room in the context of {n_ctx}")
    max_new_tokens = min(max_new_tokens, n_ctx - P)
    if seed is None:
        seed = secrets.randbits(62)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [row_seed(seed, i) for i in range(B)]
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} prompts")
    if temperature > 0:  # one uniform number per row and new token, from the row's own generator (CPU: alike on any device)
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                                for s in seeds]).to(device)

    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, device=device)
        valid[i, P - len(p):P] = True
    ragged = pad_to > 0 or any(len(p) != P for p in prompts)
    positions = (valid[:, :P].long().cumsum(1) - 1).clamp(min=0)
    mask = None
    if ragged:  # causal and not padding; a pad query sees itself so no softmax row is empty
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        mask = (causal & valid[:, None, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)
    cache = KVCache(model.cfg, B, P + max_new_tokens)
    logits = model.logits(model.hidden(ids, cache=cache, positions=positions, attn_mask=mask)[:, -1]).float()
    next_pos = positions[:, -1] + 1

    out = [Generation() for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_ids) or [-1], device=device)
    for t in range(max_new_tokens):
        if temperature > 0:
            logp = F.log_softmax(logits / temperature, dim=-1)
            cdf = filter_logits(logp, top_k, top_p).softmax(-1).double().cumsum(-1)
            # inverse-CDF sampling with the row's uniform u: the first token whose cumulative mass exceeds u
            # (scaled by the row's total, so rounding never runs past the last token or onto a filtered one)
            tok = torch.searchsorted(cdf, (uniforms[:, t] * cdf[:, -1])[:, None], right=True).squeeze(1)
            tok = tok.clamp(max=logits.size(-1) - 1)
        else:
            logp = F.log_softmax(logits, dim=-1)
            tok = logits.argmax(-1)
        tok_lp = logp.gather(1, tok[:, None]).squeeze(1)
        stopped_by_text = []
        for i in (~done).nonzero().flatten().tolist():
            out[i].tokens.append(int(tok[i]))
            out[i].logprobs.append(float(tok_lp[i]))
            if on_token is not None:
                on_token(i, int(tok[i]))
            if stop_strings and any(s in decode(out[i].tokens[-32:]) for s in stop_strings):
                stopped_by_text.append(i)
        done |= torch.isin(tok, stops)
        if stopped_by_text:
            for i in stopped_by_text:
                out[i].finished = True
            done[stopped_by_text] = True
        if done.all() or t == max_new_tokens - 1:
            break
        tok = tok.masked_fill(done, pad_id)
        valid[:, P + t] = True
        step_mask = valid[:, None, None, :P + t + 1] if ragged else None
        logits = model.logits(model.hidden(tok[:, None], cache=cache, positions=next_pos[:, None], attn_mask=step_mask)[:, -1]).float()
        next_pos = next_pos + 1
    for g in out:
        g.finished = g.finished or (bool(g.tokens) and g.tokens[-1] in stop_ids)
    model.train(was_training)
    return out


def generate_all(model: GPT, prompts: list[list[int]], max_new_tokens: int, seed: int = 0, batch_size: int = 64,
                 **kw) -> list[Generation]:
    """`generate` for many prompts, split across torchrun's ranks and gathered on every rank in prompt order: a rank
    answers prompts rank, rank + world, ... in batches of `batch_size`. Answer i samples with `row_seed(seed, i)`
    and every batch is padded to the longest prompt of all, so the answers are the same on any number of ranks,
    wherever the matmul kernels compute a row alike in batches of any size (CPU fp32 from 4 rows, measured: a
    batch of 1-3 rows may round a logit differently, which changes a token only at a near-tie)."""
    from .train.distributed import across_ranks
    pad_to = max(map(len, prompts))

    def answer(indices):
        out = []
        for start in range(0, len(indices), batch_size):
            rows = indices[start:start + batch_size]
            out += generate(model, [prompts[i] for i in rows], max_new_tokens, seed=[row_seed(seed, i) for i in rows],
                            pad_to=pad_to, **kw)
        return out
    return across_ranks(answer, len(prompts))


def respond(model: GPT, tok, conversations: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.0,
            top_p: float = 1.0, batch_size: int = 64, seed: int = 0) -> list[tuple[str, Generation]]:
    """The assistant's next turn for each conversation (chat messages): (text, Generation) pairs, sampled across
    torchrun's ranks (`generate_all`). A turn cut off by the length limit keeps its text; `Generation.finished` says
    whether it closed with the template's stop token."""
    ids = tok.render_prompts(conversations, model.cfg.n_ctx, max_new_tokens)
    gens = generate_all(model, ids, max_new_tokens, seed=seed, batch_size=batch_size, temperature=temperature,
                        top_p=top_p, stop_ids=(tok.end,), pad_id=tok.pad)
    out = []
    for g in gens:
        body = g.tokens[:-1] if g.finished else g.tokens
        out.append((tok.decode(body, skip_special=True).strip(), g))
    return out
