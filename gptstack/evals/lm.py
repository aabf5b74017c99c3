"""Language-modelling evals: val loss, perplexity, bits per byte, and the unigram floor."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import GptstackError

if TYPE_CHECKING:
    from ..data.loader import TokenSampler


@torch.no_grad()
def windows_loss(model, windows: torch.Tensor, batch_size: int = 16) -> tuple[float, int]:
    """Mean next-token loss (nats) over (n, T+1) token windows, and the tokens scored."""
    device = model.wte.weight.device
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        _, loss = model(w[:, :-1], w[:, 1:])
        n = w[:, 1:].numel()
        total += loss.item() * n
        count += n
    return total / max(count, 1), count


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of val under the train unigram distribution, add-one smoothed:
    what a model knowing only token frequencies gets, the floor any real model must beat."""
    counts = np.bincount(np.asarray(train), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val)].mean())


def bits_per_byte(loss_nats: float, tokens: int, nbytes: int) -> float:
    return loss_nats * tokens / (nbytes * math.log(2))


def lm_metrics(model, sampler: TokenSampler, vocab_size: int) -> dict:
    """Full-val-split loss, perplexity, bits per byte and the unigram floor, per source and mixed."""
    rows, mixed = {}, {"val_loss": 0.0, "val_bpb": 0.0, "unigram_val_loss": 0.0, "val_tokens": 0}
    for i, (split, w) in enumerate(zip(sampler.splits, sampler.weights)):
        loss, n = windows_loss(model, sampler.val_windows(i))
        bpb = bits_per_byte(loss, len(split.val), split.val_bytes)
        uni = unigram_loss(split.train, split.val, vocab_size)
        rows[split.source] = {"val_loss": loss, "val_bpb": bpb, "unigram_val_loss": uni, "val_tokens": n}
        for k, v in (("val_loss", loss), ("val_bpb", bpb), ("unigram_val_loss", uni)):
            mixed[k] += w * v
        mixed["val_tokens"] += n
    if not math.isfinite(mixed["val_loss"]):
        raise GptstackError("validation loss is not finite")
    mixed["val_ppl"] = math.exp(mixed["val_loss"])
    if len(rows) > 1:
        mixed["by_source"] = rows
    return mixed
