"""Supervised fine-tuning on demonstrations (InstructGPT step 1): next-token loss on the assistant's tokens
only, through the chat template. Demonstrations with images (the vision stage: LLaVA's two stages are this
loss on captions and on questions) pass their images to the model, which splices them in. The stage (stages/sft.py) says where demonstrations come from and how a
checkpoint is chosen; this is the objective."""
from __future__ import annotations

from typing import Callable

import torch

from ..data.loader import Demonstrations, batch_images, epoch_indices


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
        _, loss = model(micro["input"], micro["target"], images=batch_images(micro))
        return loss, {"tokens": int((micro["input"] != self.train.pad).sum())}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        out = {"val_loss": demonstrations_loss(model, self.val)}
        if self.evaluate_extra is not None:
            out |= self.evaluate_extra(model)
        return out

    def flops_per_token(self) -> float:
        return self._flops


@torch.no_grad()
def demonstrations_loss(model, data: Demonstrations, batch_size: int = 64) -> float:
    """The mean next-token loss over the assistant's tokens of `data`."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(data), batch_size):
        b = {k: v.to(device) for k, v in data.batch(range(start, min(start + batch_size, len(data)))).items()}
        n = int((b["target"] != -100).sum())
        total, count = total + model(b["input"], b["target"], images=batch_images(b))[1].item() * n, count + n
    return total / max(count, 1)
