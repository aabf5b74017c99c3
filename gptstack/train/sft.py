"""Supervised fine-tuning on demonstrations (InstructGPT step 1): next-token loss on the assistant's tokens
only, through the chat template. The stage (stages/sft.py) says where demonstrations come from and how a
checkpoint is chosen; this is the objective."""
from __future__ import annotations

from typing import Callable

import torch

from ..data.loader import Demonstrations, epoch_indices


class SFTObjective:
    """Next-token loss on the assistant's tokens; the eval adds `evaluate_extra(model)`'s figures (the stage's
    held-out answers, e.g. the gold labeler's) to the val loss."""

    def __init__(self, train: Demonstrations, val: Demonstrations, seed: int, flops_per_token: float,
                 evaluate_extra: Callable[[torch.nn.Module], dict] | None = None):
        self.train, self.val, self.seed, self._flops = train, val, seed, flops_per_token
        self.evaluate_extra = evaluate_extra

    def train_batch(self, step: int, n: int) -> dict:
        return self.train.batch(epoch_indices(self.seed, step, n, len(self.train)))

    def weight(self, micro: dict) -> int:
        return int((micro["target"] != -100).sum())

    def loss(self, model, micro: dict):
        _, loss = model(micro["input"], micro["target"])
        return loss, {"tokens": int((micro["input"] != self.train.pad).sum())}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        total, count = 0.0, 0
        for start in range(0, len(self.val), 64):
            b = self.val.batch(range(start, min(start + 64, len(self.val))))
            b = {k: v.to(next(model.parameters()).device) for k, v in b.items()}
            n = int((b["target"] != -100).sum())
            total, count = total + model(b["input"], b["target"])[1].item() * n, count + n
        out = {"val_loss": total / max(count, 1)}
        if self.evaluate_extra is not None:
            out |= self.evaluate_extra(model)
        return out

    def flops_per_token(self) -> float:
        return self._flops
