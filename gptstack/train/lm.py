"""GPT-1's L1 (and PPO-ptx's ptx term): mean next-token cross-entropy over a data mixture."""
from __future__ import annotations

from ..data.loader import TokenSampler
from ..evals.lm import windows_loss


class LMObjective:
    def __init__(self, sampler: TokenSampler, flops_per_token: float, eval_tokens: int):
        self.sampler = sampler
        self._flops = flops_per_token
        self.eval_tokens = eval_tokens

    def train_batch(self, step: int, n: int) -> dict:
        return self.sampler.train_batch(step, n)

    def weight(self, micro: dict) -> int:
        return micro["target"].numel()

    def loss(self, model, micro: dict):
        _, loss = model(micro["input"], micro["target"])
        return loss, {"tokens": micro["target"].numel()}

    def evaluate(self, model) -> dict:
        out, total, weight = {}, 0.0, 0.0
        for i, (split, w) in enumerate(zip(self.sampler.splits, self.sampler.weights)):
            share = max(self.sampler.seq_len, int(self.eval_tokens * w))
            loss, _ = windows_loss(model, self.sampler.val_windows(i, share))
            if len(self.sampler.splits) > 1:
                out[f"val_loss/{split.source}"] = loss
            total, weight = total + w * loss, weight + w
        out["val_loss"] = total / weight
        return out

    def flops_per_token(self) -> float:
        return self._flops
