"""The one generation engine: continuous batching over a KV cache.

An `Engine` holds a batch of slots, one sequence per slot, each with its own positions. Sequences join between
decode steps (their prompts prefilled together, left-padded, then placed in the batch's cache) and leave when they
end, so the batch keeps running while requests come and go (`gptstack serve`). Every step samples one token for
every running sequence and runs one batched forward for all of them. Each sequence returns its tokens, their
log-probabilities under the sampling distribution (logits / temperature), and whether a stop token or stop string
ended it; its `on_token(token)` streams each token as it is sampled.

`generate` is the engine with all its prompts admitted at once: sampling, evals, comparisons, PPO rollouts and
chat go through it, the server through the engine itself.

Each sequence samples with random numbers of its own, drawn from a generator seeded by (seed, row), so a row's
answer does not depend on the rows batched with it. `generate_all` splits many prompts across torchrun's
ranks on that basis and gathers the answers: rollouts, comparisons and evaluation answers come out the same
on any number of ranks.

The cache's columns are a shared clock: every running sequence ends at the column the next step writes, its
prompt placed just before the clock when it joins (the columns before it hidden by the attention mask). When the
clock reaches the cache's end, the columns before the oldest running sequence are dropped (and the cache grows
when little would be left); when the batch empties, its memory goes. With all prompts admitted at once this is
exactly the left-padded batch that `generate` has always run.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from .model import GPT, KVCache
from .tokenizer import conversation_images

ROW_SEED_MIX = 0x9E3779B97F4A7C15  # an odd 64-bit constant (2^64 / golden ratio): (seed, row) pairs map to distinct seeds


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row`'s random numbers when a call is seeded `seed`."""
    return (seed * ROW_SEED_MIX + row) % 2**64


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)  # new tokens, the stop token included if one was hit
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False  # ended by a stop token or stop string (not by the length limit)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, the k likeliest (token, logprob)


@dataclass(eq=False)
class Sequence:
    """One prompt to answer: its sampling settings and its own random numbers. `out` fills as it runs."""
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # seeds this sequence's own generator (None: a fresh one)
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    top_logprobs: int = 0  # also keep the k likeliest tokens of each step
    on_token: Callable[[int], None] | None = None
    out: Generation = field(default_factory=Generation)
    cancelled: bool = False  # set from any thread: the engine drops the sequence at its next step
    slot: int = -1
    uniforms: torch.Tensor | None = field(default=None, repr=False)  # one per new token, from the sequence's generator
    images: torch.Tensor | None = field(default=None, repr=False)  # (N, 3, S, S): what the prompt's <|image|> runs show


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


class Engine:
    """Continuous batching: `admit` sequences into free slots between steps, `step` until none is `busy`.
    The model should be in eval mode. `decode` turns token ids into text, for stop strings. `prefill_chunk`: prompts
    are prefilled this many tokens at a time (0: at once), for memory linear in the prompt's length."""

    def __init__(self, model: GPT, slots: int, pad_id: int = 0, decode: Callable[[list[int]], str] | None = None,
                 prefill_chunk: int = 0):
        from torch.distributed.tensor import DTensor
        if isinstance(model.wte.weight, DTensor):
            raise ValueError("the model is FSDP-sharded: sample inside train.distributed.whole_weights(the sharded root)")
        self.model, self.slots, self.pad_id, self.decode = model, slots, pad_id, decode
        self.prefill_chunk = prefill_chunk  # prompt tokens per prefill forward (0: the whole prompt at once)
        self.device = model.wte.weight.device
        self.running: list[Sequence | None] = [None] * slots
        self.steps = 0  # batched decode steps run so far
        self._empty()

    def _empty(self) -> None:
        """No cache memory held; the batch has no rows."""
        self.cache = KVCache(self.model.cfg, self.slots, 0)  # its len is the clock: the column the next step writes
        self.valid = torch.zeros(self.slots, 0, dtype=torch.bool, device=self.device)  # which columns each row sees
        self.positions = torch.zeros(self.slots, dtype=torch.long, device=self.device)  # each row's next position
        self.logits = None  # (slots, vocab): each running row's next-token logits
        self.rows = 0  # the batch: slots [0, rows), grown as sequences join, reset when it empties
        self.masked = False  # some row has columns it must not see (padding, or columns from before it joined)

    @property
    def busy(self) -> bool:
        return any(s is not None for s in self.running)

    def free_slots(self) -> int:
        return self.running.count(None)

    @torch.no_grad()
    def admit(self, seqs: list[Sequence], pad_to: int = 0) -> None:
        """Prefill newcomers together (left-padded to the longest prompt, or to `pad_to`, so a row computes alike
        in any batch padded so) and give each a free slot, its prompt ending at the clock."""
        free = [i for i, s in enumerate(self.running) if s is None]
        if len(seqs) > len(free):
            raise ValueError(f"{len(seqs)} sequences for {len(free)} free slots")
        if not seqs or any(len(s.prompt) == 0 for s in seqs):
            raise ValueError("every prompt needs at least one token")
        if any(s.max_new_tokens < 1 for s in seqs):
            raise ValueError("max_new_tokens must be at least 1")
        if self.decode is None and any(s.stop_strings for s in seqs):
            raise ValueError("stop strings need `decode` to see the text")
        n_ctx = self.model.cfg.n_ctx
        B, P = len(seqs), max(pad_to, *(len(s.prompt) for s in seqs))
        if P >= n_ctx:
            raise ValueError(f"prompt of {P} tokens leaves no room in the context of {n_ctx}")
        ids = torch.full((B, P), self.pad_id, dtype=torch.long, device=self.device)
        valid = torch.zeros(B, P, dtype=torch.bool, device=self.device)
        for i, s in enumerate(seqs):
            ids[i, P - len(s.prompt):] = torch.tensor(s.prompt, device=self.device)
            valid[i, P - len(s.prompt):] = True
            s.max_new_tokens = min(s.max_new_tokens, n_ctx - len(s.prompt))
            if s.temperature > 0:  # one uniform number per new token, from the sequence's own generator (CPU: alike on any device)
                seed = secrets.randbits(62) if s.seed is None else s.seed
                s.uniforms = torch.rand(s.max_new_tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        ragged = pad_to > 0 or any(len(s.prompt) != P for s in seqs)
        self.masked = self.masked or ragged or self.rows > 0
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        prefill = KVCache(self.model.cfg, B, P)
        # the newcomers' images in reading order (row by row), as the splice fills the placeholders
        shown = [s.images for s in seqs if s.images is not None and len(s.images)]
        images = torch.cat(shown).to(self.device) if shown else None
        # chunked prefill: queries [start, end) at a time against the cache so far, so the activations and the
        # attention mask grow with chunk x length instead of length^2 (a 32k-token prompt fits on a CPU); prompts
        # with images are prefilled whole, so that the splice sees every placeholder with its image
        chunk = P if images is not None else self.prefill_chunk or P
        for start in range(0, P, chunk):
            end = min(P, start + chunk)
            mask = None
            if ragged:  # causal and not padding; a pad query sees itself so no softmax row is empty
                query, key = torch.arange(start, end, device=self.device)[:, None], torch.arange(end, device=self.device)
                mask = ((key <= query) & valid[:, None, None, :end]) | (key == query)
            h = self.model.hidden(ids[:, start:end], cache=prefill, positions=positions[:, start:end], attn_mask=mask,
                                  images=images)
        logits = self.model.logits(h[:, -1]).float()

        clock, extent = self.cache.len, max(s.max_new_tokens for s in seqs)
        if clock < P or clock + extent > self.valid.size(1):  # the prompts must end at the clock, their answers fit
            clock = max(P, self._span())
            capacity = self.valid.size(1)
            if clock + extent > capacity:
                capacity = min(n_ctx, max(clock + extent, 2 * capacity))
            self._move(clock, capacity, prefill.k.dtype)
        slots = free[:B]
        rows = torch.tensor(slots, device=self.device)
        self.cache.k[:, rows, :, clock - P:clock] = prefill.k
        self.cache.v[:, rows, :, clock - P:clock] = prefill.v
        self.valid[rows] = False
        self.valid[rows, clock - P:clock] = valid
        self.positions[rows] = positions[:, -1] + 1
        if self.logits is None:
            self.logits = torch.zeros(self.slots, logits.size(-1), device=self.device)
        self.logits[rows] = logits
        for slot, s in zip(slots, seqs):
            s.slot = slot
            self.running[slot] = s
        self.rows = max(self.rows, slots[-1] + 1)

    def _span(self) -> int:
        """Columns from the first token of the oldest running sequence to the clock."""
        live = [i for i, s in enumerate(self.running) if s is not None]
        used = self.valid[live].any(0).nonzero() if live else []
        return self.cache.len - int(used[0]) if len(used) else 0

    def _move(self, clock: int, capacity: int, dtype=None) -> None:
        """The running sequences' columns moved to end at `clock`, in a cache of `capacity` columns."""
        span, old = self._span(), self.cache.len
        k, v, valid = self.cache.k, self.cache.v, self.valid
        if k is None or capacity != valid.size(1):
            cfg = self.model.cfg
            self.cache.shape = (cfg.n_layer, self.slots, cfg.kv_heads, capacity, cfg.head_dim)
            self.cache.k = torch.zeros(self.cache.shape, dtype=dtype if k is None else k.dtype, device=self.device)
            self.cache.v = torch.zeros_like(self.cache.k)
        self.valid = torch.zeros(self.slots, capacity, dtype=torch.bool, device=self.device)
        if span:
            self.cache.k[..., clock - span:clock, :] = k[..., old - span:old, :].clone()
            self.cache.v[..., clock - span:clock, :] = v[..., old - span:old, :].clone()
            self.valid[:, clock - span:clock] = valid[:, old - span:old]
        self.cache.len = clock

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """Sample the next token of every running sequence, retire those that ended (a stop token or string, their
        length, or cancelled), then one batched decode step for the rest. Returns the retired sequences."""
        retired = [s for s in self.running if s is not None and s.cancelled]
        for s in retired:
            self.running[s.slot] = None
        live = [s for s in self.running if s is not None]
        going = []
        for s, (tok, logprob, top) in zip(live, self._sample(live)):
            s.out.tokens.append(tok)
            s.out.logprobs.append(logprob)
            if top:
                s.out.top_logprobs.append(top)
            if s.on_token is not None:
                s.on_token(tok)
            if tok in s.stop_ids or s.stop_strings and any(x in self.decode(s.out.tokens[-32:]) for x in s.stop_strings):
                s.out.finished = True
            if s.out.finished or len(s.out.tokens) >= s.max_new_tokens:
                self.running[s.slot] = None
                retired.append(s)
            else:
                going.append((s.slot, tok))
        if going:
            self._decode(going)
        else:
            self._empty()
        for s in retired:
            self.positions[s.slot] = 0  # a free row computes (masked from the others) at position 0
        return retired

    def _sample(self, live: list[Sequence]) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """(token, its log-probability, the k likeliest) for each sequence, rows with the same settings together."""
        groups: dict[tuple, list[int]] = {}
        for j, s in enumerate(live):
            groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(j)
        out = [None] * len(live)
        for (temperature, top_k, top_p), members in groups.items():
            seqs = [live[j] for j in members]
            logits = self.logits[[s.slot for s in seqs]]
            if temperature > 0:
                logp = F.log_softmax(logits / temperature, dim=-1)
                cdf = filter_logits(logp, top_k, top_p).softmax(-1).double().cumsum(-1)
                # inverse-CDF sampling with the row's uniform u: the first token whose cumulative mass exceeds u
                # (scaled by the row's total, so rounding never runs past the last token or onto a filtered one)
                u = torch.stack([s.uniforms[len(s.out.tokens)] for s in seqs]).to(self.device)
                tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
                tok = tok.clamp(max=logits.size(-1) - 1)
            else:
                logp = F.log_softmax(logits, dim=-1)
                tok = logits.argmax(-1)
            tok_lp = logp.gather(1, tok[:, None]).squeeze(1).tolist()
            k = max(s.top_logprobs for s in seqs)
            top = logp.topk(k, dim=-1) if k else None
            for r, (j, s) in enumerate(zip(members, seqs)):
                best = list(zip(top.indices[r, :s.top_logprobs].tolist(), top.values[r, :s.top_logprobs].tolist())) if k else []
                out[j] = (int(tok[r]), tok_lp[r], best)
        return out

    def _decode(self, going: list[tuple[int, int]]) -> None:
        """One forward of the batch's rows: each running row's last token, a pad token in a free row."""
        if self.cache.len == self.valid.size(1):  # out of columns: drop those before the oldest sequence (grow when few would be left)
            span, capacity = self._span(), self.valid.size(1)
            self._move(span, min(self.model.cfg.n_ctx, 2 * capacity) if 2 * span > capacity else capacity)
        n, slots = self.rows, [slot for slot, _ in going]
        tok = torch.full((n,), self.pad_id, dtype=torch.long, device=self.device)
        tok[slots] = torch.tensor([t for _, t in going], device=self.device)
        self.valid[:, self.cache.len] = True
        mask = self.valid[:n, None, None, :self.cache.len + 1] if self.masked else None
        h = self.model.hidden(tok[:, None], cache=self.cache.rows(n), positions=self.positions[:n, None], attn_mask=mask)
        self.logits[:n] = self.model.logits(h[:, -1]).float()
        self.cache.len += 1
        self.positions[slots] += 1
        self.steps += 1


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids: tuple[int, ...] = (), pad_id: int = 0,
             seed: int | list[int] | None = None, stop_strings: tuple[str, ...] = (),
             decode: Callable[[list[int]], str] | None = None,
             on_token: Callable[[int, int], None] | None = None, pad_to: int = 0,
             images: list[torch.Tensor | None] | None = None, prefill_chunk: int = 0) -> list[Generation]:
    """Every prompt answered by an engine of their own, all admitted at once. `seed`: row i's random numbers come
    from `row_seed(seed, i)`, or from `seed[i]` given one seed per row (None: fresh ones). `pad_to`: left-pad every
    prompt to at least this many tokens, through the attention mask whatever the batch, so a row computes alike in
    any batch padded to the same length (`generate_all`). `on_token(row, token)` streams. `images[i]`: prompt i's
    images (N, 3, S, S) for its <|image|> placeholders, or None. `prefill_chunk`: the prompts are prefilled this
    many tokens at a time (0: at once; long prompts: memory linear in their length)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B, P = len(prompts), max(pad_to, *(len(p) for p in prompts))
    if P >= model.cfg.n_ctx:
        raise ValueError(f"prompt of {P} tokens leaves no room in the context of {model.cfg.n_ctx}")
    max_new_tokens = min(max_new_tokens, model.cfg.n_ctx - P)  # every row stops where the longest prompt must
    if max_new_tokens < 1:
        return [Generation() for _ in prompts]
    if seed is None:
        seed = secrets.randbits(62)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [row_seed(seed, i) for i in range(B)]
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} prompts")
    if images is not None and len(images) != B:
        raise ValueError(f"{len(images)} image entries for {B} prompts")
    seqs = [Sequence(list(p), max_new_tokens, temperature, top_k, top_p, s, tuple(stop_ids), tuple(stop_strings),
                     on_token=None if on_token is None else partial(on_token, i), images=None if images is None else images[i])
            for i, (p, s) in enumerate(zip(prompts, seeds))]
    was_training = model.training
    model.eval()
    try:
        engine = Engine(model, B, pad_id, decode, prefill_chunk)
        engine.admit(seqs, pad_to)
        while engine.busy:
            engine.step()
    finally:
        model.train(was_training)
    return [s.out for s in seqs]


def generate_all(model: GPT, prompts: list[list[int]], max_new_tokens: int, seed: int = 0, batch_size: int = 64,
                 images: list[torch.Tensor | None] | None = None, **kw) -> list[Generation]:
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
                            pad_to=pad_to, images=None if images is None else [images[i] for i in rows], **kw)
        return out
    return across_ranks(answer, len(prompts))


def respond(model: GPT, tok, conversations: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.0,
            top_p: float = 1.0, batch_size: int = 64, seed: int = 0) -> list[tuple[str, Generation]]:
    """The assistant's next turn for each conversation (chat messages): (text, Generation) pairs, sampled across
    torchrun's ranks (`generate_all`). A turn cut off by the length limit keeps its text; `Generation.finished` says
    whether it closed with the template's stop token. Image parts go to the model's image encoder."""
    image_tokens = model.cfg.vision.tokens if model.cfg.vision.image_size else 0
    ids = tok.render_prompts(conversations, model.cfg.n_ctx, max_new_tokens, image_tokens)
    shown = [conversation_images(c) for c in conversations]
    images = [torch.stack(s) if s else None for s in shown] if any(shown) else None
    gens = generate_all(model, ids, max_new_tokens, seed=seed, batch_size=batch_size, temperature=temperature,
                        top_p=top_p, stop_ids=(tok.end,), pad_id=tok.pad, images=images)
    out = []
    for g in gens:
        body = g.tokens[:-1] if g.finished else g.tokens
        out.append((tok.decode(body, skip_special=True).strip(), g))
    return out
