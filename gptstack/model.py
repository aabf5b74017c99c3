"""The decoder-only Transformer of GPT-1/2/3, in one file.

    h0 = U·We + Wp                      token + learned position embeddings
    h_l = block(h_{l-1})                l = 1..n
    P(u) = softmax(h_n · We^T)          output tied to the token embedding

`norm_position="post"` is GPT-1 (LayerNorm after each residual add);
`"pre"` is GPT-2/3 (LayerNorm at each sub-block's input, plus a final one).
The model returns hidden states so task heads (classifier, scalar reward /
value) can sit on top; it imports nothing from the training or eval code.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import from_dict


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_ctx: int = 256
    vocab_size: int = 4096
    norm_position: Literal["pre", "post"] = "pre"  # "post": GPT-1 (LayerNorm after each residual add); "pre": GPT-2/3
    dropout: float = 0.0  # residual, embedding and attention dropout (GPT-1 used 0.1)
    bias: bool = True
    init_std: float = 0.02

    def problems(self):
        for name in ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size"):
            if getattr(self, name) < 1:
                yield name, f"must be at least 1, got {getattr(self, name)}"
        if not 0 <= self.dropout < 1:
            yield "dropout", f"must be in [0, 1), got {self.dropout}"
        if self.n_embd % self.n_head:
            yield "n_embd", f"({self.n_embd}) must be divisible by model.n_head ({self.n_head})"


class KVCache:
    """Keys and values of earlier positions, preallocated for `max_len` tokens on first use
    (in the dtype the attention computes in, so it follows autocast)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int):
        self.shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = self.v = None
        self.len = 0  # positions already stored

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k is None:
            self.k = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
            self.v = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
        end = self.len + k.size(2)
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, attn_mask=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if attn_mask is not None:  # padded batches: the caller says who may see whom
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        elif k.size(2) == T:  # no earlier positions: plain causal (flash kernels on GPU)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        elif T == 1:  # one new token after the cache: it sees every position, no mask to build
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # T new queries after k.size(2) - T cached positions
            past = k.size(2) - T
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, layer=0, attn_mask=None):
        if self.pre_norm:  # GPT-2/3
            x = x + self.attn(self.ln1(x), cache, layer, attn_mask)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, cache, layer, attn_mask))  # GPT-1
        return self.ln2(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if cfg.norm_position == "pre" else nn.Identity()
        self.apply(self._init)
        # GPT-2: scale the residual projections by 1/sqrt(2·n_layer) so the residual stream's variance stays put
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, self.cfg.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden(self, idx, *, cache: KVCache | None = None, positions=None, attn_mask=None):
        """Final hidden states h_n, shape (B, T, n_embd)."""
        B, T = idx.shape
        start = cache.len if cache is not None else 0
        if positions is None:
            if start + T > self.cfg.n_ctx:
                raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.cfg.n_ctx}")
            positions = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, attn_mask)
        if cache is not None:
            cache.len += T
        return self.ln_f(x)

    def logits(self, h):
        return F.linear(h, self.wte.weight)  # tied output: softmax(h_n · We^T)

    def sequence_logprobs(self, ids, temperature: float = 1.0):
        """log P(ids[:, t] | ids[:, <t]) for t = 1..L-1 under softmax(logits / temperature): (B, L-1)."""
        return token_logprobs(self.logits(self.hidden(ids))[:, :-1], ids[:, 1:], temperature)

    def forward(self, idx, targets=None, **kw):
        """(logits, loss). Targets of -100 are ignored (prompt tokens in SFT, padding)."""
        logits = self.logits(self.hidden(idx, **kw))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    # -------------------------------------------------------------- accounting

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.wte.weight.numel() - self.wpe.weight.numel()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N for the matmuls (+ the tied unembedding, counted in N
        through wte) plus 12·L·d·T for attention scores (PaLM appendix B)."""
        n = self.num_params() - self.wpe.weight.numel()
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.n_embd * seq_len

    def metadata(self) -> dict[str, str]:
        return {"gptstack.model_config": json.dumps(asdict(self.cfg))}

    @staticmethod
    def config_from_metadata(meta: dict[str, str]) -> ModelConfig:
        return from_dict(ModelConfig, json.loads(meta["gptstack.model_config"]))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log P(targets[t] | what came before) under softmax(logits / temperature), with logits (..., T, V) and the
    targets (..., T) they predict: the one per-token log-probability of sampling, PPO, DPO and the evals."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1)


class Head(nn.Module):
    """A linear head on hidden states: GPT-1's classifier (P(y|x) = softmax(h·W_y)), or a scalar
    (reward, value, a multiple-choice score) when n_out = 1. Dropout first, as GPT-1's classifier."""

    def __init__(self, n_embd: int, n_out: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(n_embd, n_out)
        nn.init.normal_(self.proj.weight, 0.0, 0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h):
        return self.proj(self.drop(h))
