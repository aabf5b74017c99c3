"""Direct preference optimisation (Rafailov et al. 2023) on K-way rankings: the policy is trained on the
rankings directly, with the frozen SFT model as the reference and no reward model.

Each answer y of a prompt x has the policy's log-ratio h(y) = log π(y|x) − log π_ref(y|x), the log-probabilities
summed over the answer's tokens in the chat template (its content and closing stop token: what SFT learns), and
the implicit reward β·h(y). The losses, on the rankings the reward model trains on:

    sigmoid   −log σ(β·(h_w − h_l)) over every non-tied pair (w ranked above l), with label smoothing ε
              (conservative DPO: −(1−ε)·log σ(β·m) − ε·log σ(−β·m), labels flipped with probability ε);
    ipo       (h_w − h_l − 1/(2β))² over the same pairs (IPO, Azar et al. 2023);
    listwise  the Plackett-Luce negative log-likelihood of the ranking (DPO's appendix A.3):
              −Σ_i [β·h_i − log Σ_{j ∈ {i} ∪ below(i)} exp(β·h_j)], over the answers i ranked above at least one
              other. Ties: an answer competes only with the answers ranked strictly below it, never with those
              tied with it, so a tie group's order is left free (as a tie gives the pairwise losses no pair); with no
              tie this is the Plackett-Luce likelihood exactly, and for K = 2 it is the sigmoid loss.

The pairwise losses are grouped per prompt as the reward model's (`rm.pair_mean`: each prompt's mean over its
pairs, then the mean over prompts); the listwise loss is a mean over prompts of each ranking's likelihood. A
prompt whose answers all tie has nothing to learn and does not count, and a micro-batch counts by its ranked
prompts, so gradient accumulation is exact. At π = π_ref every h is 0: the sigmoid loss is ln 2 and the margins 0.

The reference is either a frozen model evaluated beside the policy, or its log-probabilities of every answer
computed once before training (`ranking_logprobs`), so that no second model stays in memory.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.loader import epoch_indices, right_pad
from ..model import GPT, CausalSelfAttention, token_logprobs
from ..tokenizer import Tokenizer, chat_messages
from .rm import comparisons, encode_answer_masked, pair_mask, pair_mean, ranked_prompts

LossType = Literal["sigmoid", "ipo", "listwise"]


class Preferences:
    """Ranking records, each as K answers in the chat template with the mask of the answer's own tokens; batched as
    ids (B, K, T), answer (B, K, T) and ranks (B, K) (rank 0: no answer in that slot). With `reference` set (one
    row of K summed log-probabilities per record), batches carry it as `ref`."""

    def __init__(self, records: list[dict], tok: Tokenizer, n_ctx: int):
        self.records, self.pad = records, tok.pad
        self.examples = [([encode_answer_masked(tok, chat_messages(r["prompt"], r.get("system"), y), n_ctx)
                           for y in r["responses"]], r["ranks"]) for r in records]
        self.pairs = sum(len(comparisons(ranks)) for _, ranks in self.examples)
        self.reference: list[list[float]] | None = None

    def __len__(self):
        return len(self.examples)

    def batch(self, indices) -> dict:
        ex = [self.examples[i] for i in indices]
        K = max(len(answers) for answers, _ in ex)
        slots = [answers[k] if k < len(answers) else ([], []) for answers, _ in ex for k in range(K)]
        ids = right_pad([s for s, _ in slots], self.pad)
        answer = torch.zeros(ids.shape, dtype=torch.bool)
        for row, (_, learn) in enumerate(slots):
            answer[row, :len(learn)] = torch.tensor(learn, dtype=torch.bool)
        out = {"ids": ids.view(len(ex), K, -1), "answer": answer.view(len(ex), K, -1),
               "ranks": torch.tensor([rk + [0] * (K - len(rk)) for _, rk in ex])}
        if self.reference is not None:
            out["ref"] = torch.tensor([self.reference[i] + [0.0] * (K - len(self.reference[i])) for i in indices],
                                      dtype=torch.float64)
        return out


def answer_logprobs(model, ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """ids (N, T) right-padded, answer (N, T) the answer's tokens -> log π(answer | what precedes it), summed over the
    answer's tokens: (N,), in fp32 whatever the autocast. `model` is a GPT or the DDP/FSDP module around one (its
    forward, so data parallelism sees the call)."""
    return (token_logprobs(model(ids)[0][:, :-1], ids[:, 1:]) * answer[:, 1:]).sum(1)


@torch.no_grad()
def ranking_logprobs(model: GPT, data: Preferences, batch_size: int = 16) -> list[list[float]]:
    """`model`'s summed log-probability of every answer of every ranking, on its device: the reference's, computed once
    before training, or the trained policy's, for the implicit rewards."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(data), batch_size):
        b = data.batch(range(start, min(start + batch_size, len(data))))
        B, K, T = b["ids"].shape
        lp = answer_logprobs(model, b["ids"].view(B * K, T).to(device), b["answer"].view(B * K, T).to(device))
        out += [row[:len(data.examples[start + i][0])] for i, row in enumerate(lp.view(B, K).double().tolist())]
    return out


def preference_loss(logratios: torch.Tensor, ranks: torch.Tensor, beta: float, loss_type: LossType = "sigmoid",
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """logratios (B, K): h = log π − log π_ref of each answer; ranks (B, K), 1 = best, 0 = no answer -> (loss, metrics).
    The metrics are over the non-tied pairs, grouped per prompt as the loss is: the implicit rewards β·h of the
    preferred and the other answer, their margin, and the share of pairs the implicit reward orders right."""
    h_w, h_l = logratios[:, :, None], logratios[:, None, :]  # [b, w, l]: h of the pair's preferred and other answer
    diff = h_w - h_l
    if loss_type == "sigmoid":
        loss = pair_mean(-(1 - label_smoothing) * F.logsigmoid(beta * diff) - label_smoothing * F.logsigmoid(-beta * diff), ranks)
    elif loss_type == "ipo":
        loss = pair_mean((diff - 1 / (2 * beta)) ** 2, ranks)
    elif loss_type == "listwise":
        loss = listwise_loss(beta * logratios, ranks)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    with torch.no_grad():
        ones = torch.ones_like(diff)
        metrics = {"chosen_reward": pair_mean(beta * h_w * ones, ranks), "rejected_reward": pair_mean(beta * h_l * ones, ranks),
                   "margin": pair_mean(beta * diff, ranks), "accuracy": pair_mean((diff > 0).to(diff.dtype), ranks)}
    return loss, metrics


def listwise_loss(scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """The Plackett-Luce negative log-likelihood of each ranking under `scores` (B, K), ties as the module's docstring
    says, averaged over the prompts that have a strict preference."""
    below = pair_mask(ranks)  # [b, i, j]: j ranked strictly below i
    pool = below | torch.eye(scores.size(1), dtype=torch.bool, device=scores.device)  # i against itself and all below it
    denominators = torch.logsumexp(scores[:, None, :].expand_as(pool).masked_fill(~pool, float("-inf")), 2)
    chooses = below.any(2)  # answers ranked above at least one other: the ranking's choices
    ranked = chooses.any(1)
    if not ranked.any():
        return scores.sum() * 0.0
    return -torch.where(chooses, scores - denominators, torch.zeros_like(scores)).sum(1)[ranked].mean()


def drop_dropout(model: nn.Module) -> None:
    """Dropout off in every layer, as in PPO: the log-ratio of the policy to its reference must be 0 at identical
    weights (the loss ln 2), and dropout in one forward and not the other would make it noise."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, CausalSelfAttention):
            m.dropout = 0.0


class DPOObjective:
    """DPO on `train` rankings; `val` rankings give the held-out loss and implicit-reward accuracy. The reference is
    `reference` (a frozen GPT on the policy's device) or, when it is None, the log-probabilities the datasets carry."""

    def __init__(self, train: Preferences, val: Preferences, beta: float, loss_type: LossType, label_smoothing: float,
                 seed: int, reference: GPT | None = None, flops_per_token: float = 0.0):
        if reference is None and (train.reference is None or val.reference is None):
            raise ValueError("without a reference model the rankings must carry the reference's log-probabilities")
        self.train, self.val, self.seed = train, val, seed
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.reference = None if reference is None else reference.eval().requires_grad_(False)
        self._flops = flops_per_token

    def train_batch(self, step: int, n: int) -> dict:
        return self.train.batch(epoch_indices(self.seed, step, n, len(self.train)))

    def weight(self, micro: dict) -> int:
        return ranked_prompts(micro["ranks"])  # the loss is a mean over ranked prompts

    def logratios(self, model, micro: dict) -> torch.Tensor:
        B, K, T = micro["ids"].shape
        ids, answer = micro["ids"].view(B * K, T), micro["answer"].view(B * K, T)
        policy = answer_logprobs(model, ids, answer).view(B, K)
        if "ref" in micro:
            return policy - micro["ref"].to(policy.dtype)
        with torch.no_grad():
            reference = answer_logprobs(self.reference, ids, answer).view(B, K)
        return policy - reference

    def loss(self, model, micro: dict):
        loss, metrics = preference_loss(self.logratios(model, micro), micro["ranks"], self.beta, self.loss_type,
                                        self.label_smoothing)
        return loss, {**metrics, "tokens": int((micro["ids"] != self.train.pad).sum())}

    @torch.no_grad()
    def evaluate(self, model, batch_size: int = 16) -> dict:
        """On the validation rankings: the loss (a mean over prompts) and the implicit reward's figures (over pairs)."""
        device = next(model.parameters()).device
        loss_sum, prompts, sums, pairs = 0.0, 0, {}, 0
        for start in range(0, len(self.val), batch_size):
            b = {k: v.to(device) for k, v in self.val.batch(range(start, min(start + batch_size, len(self.val)))).items()}
            for i in range(len(b["ranks"])):  # per prompt, so the loss and the figures weigh prompts and pairs exactly
                one = {k: v[i:i + 1] for k, v in b.items()}
                n = int(pair_mask(one["ranks"]).sum())
                if not n:
                    continue
                loss, metrics = preference_loss(self.logratios(model, one).double(), one["ranks"], self.beta,
                                                self.loss_type, self.label_smoothing)
                loss_sum, prompts, pairs = loss_sum + loss.item(), prompts + 1, pairs + n
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v.item() * n
        return {"val_loss": loss_sum / max(prompts, 1), **{f"val_{k}": v / max(pairs, 1) for k, v in sums.items()}}

    def flops_per_token(self) -> float:
        return self._flops
