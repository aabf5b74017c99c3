"""A longer context window for a trained model (`gptstack extend`).

Learned positions (GPT-1/2/3) have one row per position, so a longer window needs new rows:
    interpolate   new row j is the old table read at position j·T/T' (linear between neighbouring rows), so the
                  longer window covers the positions the model was trained on, denser (position interpolation)
    tile          new row j is old row j mod T: the table copied end to end (Longformer's initialisation)
Rotary positions need no new weights: the window grows and `model.rope_scaling` says how positions past the
trained window are mapped (linear, ntk, yarn: model.RopeScaling), which also applies at inference without
fine-tuning; `none` grows the window and lets rotary positions run past what was trained.

At scale factor 1 every method leaves the model as it was. A fine-tune at the new length usually follows
(the long_context stage, or `gptstack extend --steps N`).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

from .errors import GptstackError
from .model import GPT, RopeScaling

LEARNED_METHODS = ("interpolate", "tile")
ROPE_METHODS = ("none", "linear", "ntk", "yarn")


def interpolate_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """Rows of `table` (T, d) resampled to `length` rows: row j is the table at fractional position j·T/length."""
    T = table.size(0)
    where = torch.arange(length, dtype=torch.float64) * T / length
    lo = where.floor().long().clamp(max=T - 1)
    hi = (lo + 1).clamp(max=T - 1)  # past the last row: the last row (no neighbour to read)
    frac = (where - lo.double()).to(table.dtype)[:, None]
    return table[lo] * (1 - frac) + table[hi] * frac


def tile_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """Rows of `table` (T, d) repeated end to end to `length` rows: row j is row j mod T."""
    return table[torch.arange(length) % table.size(0)]


def extend(model: GPT, ctx: int, method: str) -> GPT:
    """A copy of `model` with a window of `ctx` tokens, by `method` (LEARNED_METHODS for learned positions,
    ROPE_METHODS for rotary ones)."""
    cfg = model.cfg
    allowed = LEARNED_METHODS if cfg.positions == "learned" else ROPE_METHODS
    if method not in allowed:
        raise GptstackError(f"--method {method}: a model with {cfg.positions} positions extends by {', '.join(allowed)}")
    if ctx < cfg.n_ctx:
        raise GptstackError(f"--ctx {ctx}: shorter than the model's window of {cfg.n_ctx}")
    out = copy.deepcopy(model)
    if cfg.positions == "learned":
        table = model.wpe.weight.detach()
        rows = interpolate_table(table, ctx) if method == "interpolate" else tile_table(table, ctx)
        out.wpe = nn.Embedding(ctx, cfg.n_embd).to(table.device)
        out.wpe.weight = nn.Parameter(rows.clone())
        out.cfg = dataclasses.replace(cfg, n_ctx=ctx)
        return out
    # rotary: the factor is counted from the window the model was first trained on, so extending twice composes
    trained = cfg.rope_scaling.original_ctx if cfg.rope_scaling.type != "none" else cfg.n_ctx
    scaling = RopeScaling() if method == "none" else RopeScaling(method, ctx / trained, trained)
    out.cfg = dataclasses.replace(cfg, n_ctx=ctx, rope_scaling=scaling)
    return out


def trained_ctx(model: GPT) -> int:
    """The window the model was trained on before any extension that rope_scaling records."""
    s = model.cfg.rope_scaling
    return s.original_ctx if s.type != "none" else model.cfg.n_ctx
