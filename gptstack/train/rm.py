"""The reward model (InstructGPT step 2): the SFT model with its unembedding replaced by a scalar
head read at the final token, trained on every pair of a K-way ranking at once.

For a prompt with K ranked answers, each answer is encoded once and every ordered pair (w better
than l; ties skipped) enters the loss within the same batch element, so the K·(K−1)/2 comparisons of
one ranking cost K forward passes, not K·(K−1). As InstructGPT writes it, the loss is a mean over
prompts of each prompt's mean over its pairs,

    loss = −mean_x [ mean_{(w, l) of x} log σ(r(x, y_w) − r(x, y_l)) ],

so every ranking counts once whatever its K and its ties (a full tie has no pair and does not count).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import inference_device, model_path, read_weights
from ..data.loader import epoch_indices, right_pad
from ..errors import GptstackError
from ..model import GPT, Head
from ..tokenizer import Tokenizer, chat_messages


def scalar_flops_per_token(gpt: GPT, seq_len: int) -> float:
    """Training FLOPs per token of the decoder under a scalar head: no unembedding matmul."""
    return gpt.flops_per_token(seq_len) - 6 * gpt.cfg.vocab_size * gpt.cfg.n_embd


class RewardModel(nn.Module):
    """r(x, y): the decoder's hidden state at the answer's last token (its <|end|>) through a scalar head.
    `gain` and `bias` normalise the raw score (set after training so SFT answers score mean 0, std 1)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        self.head = Head(gpt.cfg.n_embd, 1)
        self.register_buffer("gain", torch.ones(()))
        self.register_buffer("bias", torch.zeros(()))

    def forward(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """ids (N, T) right-padded, last (N,) index of each row's final token -> raw rewards (N,)."""
        h = self.gpt.hidden(ids)
        r = self.head(h[torch.arange(len(ids), device=ids.device), last]).sum(-1)  # the one output (sum: no view, for FSDP)
        return r.float() if r.dtype in (torch.bfloat16, torch.float16) else r  # the loss in fp32 (or fp64)

    def score(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return (self(ids, last) + self.bias) * self.gain


def from_policy(where) -> RewardModel:
    """A reward model initialised from a gptstack model folder (the SFT model): the unembedding goes
    unused (the tied embedding matrix stays as the input embedding) and a fresh scalar head reads h_n."""
    from ..checkpoint import load_model
    return RewardModel(load_model(where))


def load_reward_model(where, device="cpu") -> RewardModel:
    path = model_path(where)
    state, meta = read_weights(path)
    if meta.get("gptstack.kind") != "reward_model":
        raise GptstackError(f"{path}: not a reward model (train one with `gptstack rm`)")
    model = RewardModel(GPT(GPT.config_from_metadata(meta)))
    model.load_state_dict(state, strict=True)
    return model.to(inference_device(device)).eval()


def reward_metadata(gpt: GPT) -> dict[str, str]:
    return {**gpt.metadata(), "gptstack.kind": "reward_model"}


# ---------------------------------------------------------------- data

def encode_answer(tok: Tokenizer, messages: list[dict], n_ctx: int) -> list[int]:
    """A conversation ending in the answer to score, in the chat template, cut right after the stop token that
    closes the answer (<|end|>, <|im_end|>): where PPO's sampled answers end, so the reward reads the same token
    in training as in PPO (never the template's text after the stop, as ChatML's newline). An over-long one
    loses its start, so the reward still reads the answer's end."""
    return encode_answer_masked(tok, messages, n_ctx)[0]


def encode_answer_masked(tok: Tokenizer, messages: list[dict], n_ctx: int) -> tuple[list[int], list[bool]]:
    """`encode_answer` with the template's mask of the answer's own tokens (its content and closing stop token)."""
    ids, learn = tok.render_chat(messages)
    end = max((i + 1 for i, keep in enumerate(learn) if keep), default=len(ids))  # after the answer's last learned token
    return ids[:end][-n_ctx:], learn[:end][-n_ctx:]


class Rankings:
    """Ranking records, each as K encoded answers and their ranks; batched as (B, K, T)."""

    def __init__(self, records: list[dict], tok: Tokenizer, n_ctx: int):
        self.records, self.pad = records, tok.pad
        self.examples = [([encode_answer(tok, chat_messages(r["prompt"], r.get("system"), y), n_ctx) for y in r["responses"]], r["ranks"])
                         for r in records]
        self.pairs = sum(len(comparisons(ranks)) for _, ranks in self.examples)

    def __len__(self):
        return len(self.examples)

    def batch(self, indices) -> dict:
        ex = [self.examples[i] for i in indices]
        K = max(len(seqs) for seqs, _ in ex)
        slots = [(seqs[k], rk[k]) if k < len(seqs) else ([], 0) for seqs, rk in ex for k in range(K)]  # rank 0: empty
        ids = right_pad([s for s, _ in slots], self.pad).view(len(ex), K, -1)
        last = torch.tensor([max(len(s) - 1, 0) for s, _ in slots]).view(len(ex), K)
        ranks = torch.tensor([r for _, r in slots]).view(len(ex), K)
        return {"ids": ids, "last": last, "ranks": ranks}


def comparisons(ranks: list[int]) -> list[tuple[int, int]]:
    """Every (winner, loser) index pair of a ranking; ties give no pair."""
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def pair_mask(ranks: torch.Tensor) -> torch.Tensor:
    """(B, K, K): [b, w, l] is True when answer w is ranked strictly better than answer l."""
    present = ranks > 0
    return (ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :]


def ranked_prompts(ranks: torch.Tensor) -> int:
    """How many prompts of a batch have at least one pair (the ones the loss averages over)."""
    return int(pair_mask(ranks).any(2).any(1).sum())


def pair_mean(x: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """x (B, K, K), a figure of each ordered pair [b, w, l] -> the mean over prompts with a pair of each prompt's
    mean over its non-tied pairs (w ranked above l): how the RM's loss, and DPO's pairwise losses, weigh pairs.
    A batch with no pair gives x.sum() * 0 (nothing to learn, but the graph is kept for DDP)."""
    mask = pair_mask(ranks).to(x.dtype)
    pairs = mask.sum((1, 2))
    ranked = pairs > 0
    if not ranked.any():
        return x.sum() * 0.0
    return ((x * mask).sum((1, 2))[ranked] / pairs[ranked]).mean()


def pairwise_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards (B, K), ranks (B, K) -> (loss, accuracy): the mean over prompts with a pair of each prompt's
    mean over its pairs of −log σ(r_w − r_l), and, averaged the same way, of [r_w > r_l]."""
    margin = rewards[:, :, None] - rewards[:, None, :]
    return -pair_mean(F.logsigmoid(margin), ranks), pair_mean((margin > 0).to(margin.dtype), ranks).detach()


class RMObjective:
    def __init__(self, train: Rankings, val: Rankings, seed: int, flops_per_token: float):
        self.train, self.val, self.seed, self._flops = train, val, seed, flops_per_token

    def train_batch(self, step: int, n: int) -> dict:
        return self.train.batch(epoch_indices(self.seed, step, n, len(self.train)))

    def weight(self, micro: dict) -> int:
        # the loss is a mean over ranked prompts, so a micro-batch counts by how many it holds
        return ranked_prompts(micro["ranks"])

    def loss(self, model, micro: dict):
        B, K, T = micro["ids"].shape
        rewards = model(micro["ids"].view(B * K, T), micro["last"].view(-1)).view(B, K)
        loss, accuracy = pairwise_loss(rewards, micro["ranks"])
        return loss, {"accuracy": accuracy, "tokens": int((micro["ids"] != self.train.pad).sum())}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """val_loss: the training loss on the validation rankings (a mean over prompts); val_accuracy: the share
        of their pairs the model orders right (over pairs, like the stage's test accuracy)."""
        losses, right, pairs = [], 0.0, 0
        for r, (_, ranks) in zip(score_rankings(model, self.val, raw=True), self.val.examples):
            n = len(comparisons(ranks))
            if n:
                loss, accuracy = pairwise_loss(torch.tensor([r], dtype=torch.float64), torch.tensor([ranks]))
                losses.append(loss.item())
                right += accuracy.item() * n
                pairs += n
        return {"val_loss": sum(losses) / max(len(losses), 1), "val_accuracy": right / max(pairs, 1)}

    def flops_per_token(self) -> float:
        return self._flops


@torch.no_grad()
def score_rankings(model: RewardModel, data: Rankings, raw: bool = False, batch_size: int = 16) -> list[list[float]]:
    """The reward of every answer of every ranking (normalised unless raw)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(data), batch_size):
        b = data.batch(range(start, min(start + batch_size, len(data))))
        B, K, T = b["ids"].shape
        ids, last = b["ids"].view(B * K, T).to(device), b["last"].view(-1).to(device)
        r = (model(ids, last) if raw else model.score(ids, last)).view(B, K).cpu()
        out += [r[i, :len(data.examples[start + i][0])].tolist() for i in range(B)]
    return out


def normalisation(model: RewardModel, data: Rankings) -> tuple[float, float]:
    """(gain, bias) so the answers in `data` (the SFT policy's samples) score mean 0 and std 1."""
    raw = [x for row in score_rankings(model, data, raw=True) for x in row]
    mean = sum(raw) / len(raw)
    std = math.sqrt(sum((x - mean) ** 2 for x in raw) / max(len(raw) - 1, 1)) or 1.0
    return 1.0 / std, -mean


def check_rankings_fit(records: list[dict], path: Path) -> None:
    if not any(comparisons(r["ranks"]) for r in records):
        raise GptstackError(f"{path}: every ranking is a full tie; learning from rankings (a reward model, DPO) needs at least one strict preference")
