"""RLHF with PPO (InstructGPT step 3), PPO-ptx, and rule-based rewards (GPT-4).

Each rollout: the policy (initialised from SFT) answers a batch of prompts through the one engine
(dropout off, logits divided by the sampling temperature); the reward model scores each answer at its
final token; every token pays a KL penalty  β·(log π(a_t) − log π_SFT(a_t));  an answer that ends
without <|end|> pays `no_end_penalty`; rule-based rewards add to the score on the prompts they cover.
GAE (γ = 1, λ = 0.95) turns the rewards into advantages, whitened over the rollout. The rollout is then
reused for `ppo_epochs` passes of `minibatches` optimizer steps of the clipped policy loss plus the
clipped value loss; PPO-ptx adds γ_ptx·L1 on pretraining data to the same update.

The Trainer runs it like any objective: one Trainer step is one optimizer update, and `train_batch`
makes a new rollout with the current weights every `ppo_epochs × minibatches` steps.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..generate import generate
from ..model import GPT
from .rm import RewardModel


class ActorCritic(nn.Module):
    """The policy (a GPT) and its value function (the reward model's architecture, initialised from it:
    V(h_{t-1}) estimates the return of the answer from the state before token t)."""

    def __init__(self, policy: GPT, value: RewardModel):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, ids: torch.Tensor):
        """ids (B, L) right-padded -> (log-softmax over the vocabulary for tokens 1..L-1 (B, L-1, V),
        values for tokens 1..L-1 (B, L-1))."""
        logits = self.policy.logits(self.policy.hidden(ids))[:, :-1].float()
        values = self.value.head(self.value.gpt.hidden(ids)).squeeze(-1)[:, :-1].float()
        return logits, values


# ---------------------------------------------------------------- the algebra

def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(token t | tokens < t) for t = 1..L-1 under logits / temperature: (B, L-1)."""
    logp = F.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries (the rollout's action tokens)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return ((x - mean) * torch.rsqrt(var + eps)) * mask


def kl_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor,
               beta: float) -> torch.Tensor:
    """Per-token rewards: −β·(log π − log π_ref) on every action token, plus the sequence's score on its last."""
    rewards = -beta * (logp - ref_logp) * mask
    last = mask.long().cumsum(1).argmax(1)  # index of each row's last action token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's action tokens (contiguous, then padding):
    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1}, with V and A zero after the answer ends.
    Returns (advantages, returns = A + V)."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_adv)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        next_adv = torch.where(m > 0, a, torch.zeros_like(a))
        next_value = torch.where(m > 0, values[:, t], torch.zeros_like(a))
    return adv, (adv + values) * mask


def ppo_losses(logp, old_logp, advantages, values, old_values, returns, mask, clip: float = 0.2,
               value_clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The clipped surrogate policy loss and the clipped value loss, as token means over `mask`."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    policy_loss = masked_mean(pg, mask)
    v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean(((ratio - 1).abs() > clip).float(), mask),
                 "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask)}
    return policy_loss, value_loss, stats


class AdaptiveKL:
    """β that steers the KL per answer toward a target (Ziegler et al. 2019): β ← β·(1 + e·n/horizon),
    e = clip(KL/target − 1, −0.2, 0.2). With target 0, β stays fixed."""

    def __init__(self, beta: float, target: float = 0.0, horizon: int = 10000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target > 0:
            e = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + e * n / self.horizon


# ---------------------------------------------------------------- rollouts

def pack(prompts: list[list[int]], answers: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt followed by its answer, right-padded: ids (B, L) and the action mask (B, L-1), True
    where token t+1 is one the policy chose."""
    L = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), L - 1)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, len(p) - 1:len(p) + len(a) - 1] = 1.0
    return ids, mask


def sample(policy: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float, end_id: int,
           pad_id: int, seed: int):
    return generate(policy, prompts, max_new_tokens, temperature=temperature, stop_ids=(end_id,), pad_id=pad_id, seed=seed)


class PPOObjective:
    """One Trainer step = one PPO minibatch update; a rollout is made (with the current policy) at the
    start of every `ppo_epochs × minibatches` steps and reused for those steps."""

    def __init__(self, cfg, model: ActorCritic, reference: GPT, reward_model: RewardModel, tok, prompts: list,
                 ptx_sampler=None, rule_rewards=None, eval_prompts: list = (), flops_per_token: float = 0.0):
        self.cfg, self.model, self.reference, self.rm, self.tok = cfg, model, reference, reward_model, tok
        self.prompts, self.ptx, self.rules, self.eval_prompts = prompts, ptx_sampler, rule_rewards, list(eval_prompts)
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.updates_per_rollout = cfg.ppo_epochs * cfg.minibatches
        self.rollout, self.rollout_index, self.stats = None, -1, {}
        self._flops = flops_per_token
        self.end = tok.special["<|end|>"]

    # the adaptive β is the objective's only state; the Trainer keeps it in the checkpoint
    def state_dict(self) -> dict:
        return {"beta": self.kl.beta}

    def load_state_dict(self, state: dict) -> None:
        self.kl.beta = state["beta"]

    # ------------------------------------------------------------ rollouts

    def _conversations(self, prompts):
        from ..evals.instruct import conversation, prompt_ids
        return prompt_ids(self.tok, [conversation(p) for p in prompts], self.model.policy.cfg.n_ctx, self.cfg.max_new_tokens)

    @torch.no_grad()
    def make_rollout(self, index: int) -> dict:
        cfg = self.cfg
        device = next(self.model.parameters()).device
        n = cfg.rollout_batch
        start = (index * n) % len(self.prompts)
        prompts = [self.prompts[(start + i) % len(self.prompts)] for i in range(n)]
        prompt_ids = self._conversations(prompts)
        gens = sample(self.model.policy, prompt_ids, cfg.max_new_tokens, cfg.temperature, self.end, self.tok.pad,
                      seed=cfg.seed * 100003 + index)
        answers = [g.tokens for g in gens]
        ids, mask = pack(prompt_ids, answers, self.tok.pad)
        ids, mask = ids.to(device), mask.to(device)
        was = self.model.training
        self.model.eval()
        logits, values = self.model(ids)
        logp = token_logprobs(logits, ids, cfg.temperature)
        ref_logp = token_logprobs(self.reference.logits(self.reference.hidden(ids))[:, :-1].float(), ids, cfg.temperature)
        self.model.train(was)
        texts = [self.tok.decode(a[:-1] if g.finished else a, skip_special=True).strip() for a, g in zip(answers, gens)]
        ended = torch.tensor([g.finished for g in gens], dtype=torch.float32, device=device)
        last = torch.tensor([len(p) + len(a) - 1 for p, a in zip(prompt_ids, answers)], device=device)
        rm_score = self.rm.score(ids, last)
        score = rm_score - cfg.no_end_penalty * (1 - ended)
        rule = torch.zeros_like(score)
        if self.rules is not None:
            rule = torch.tensor([self.rules.reward(p, t) for p, t in zip(prompts, texts)], dtype=torch.float32, device=device)
            score = score + cfg.rbrm_coef * rule
        rewards = kl_rewards(logp, ref_logp, mask, score, self.kl.beta)
        adv, returns = gae(rewards, values * mask, mask, cfg.gamma, cfg.lam)
        if cfg.whiten:
            adv = whiten(adv, mask)
        kl_seq = ((logp - ref_logp) * mask).sum(1)
        self.kl.update(kl_seq.mean().item(), n)
        from ..world.instructions import gold_score
        gold = [gold_score(p, t) for p, t in zip(prompts, texts)]
        self.stats = {"reward": float(score.mean()), "rm_score": float(rm_score.mean()), "kl": float(kl_seq.mean()),
                      "beta": self.kl.beta, "answer_length": sum(len(t) for t in texts) / n,
                      "ended": float(ended.mean()), "rule_reward": float(rule.mean()),
                      "gold_score": sum(s.total for s in gold) / n, "gold_accuracy": sum(s.correct for s in gold) / n,
                      "entropy": float(masked_mean(-(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1), mask))}
        return {"ids": ids.cpu(), "mask": mask.cpu(), "old_logp": logp.cpu(), "old_values": (values * mask).cpu(),
                "advantages": adv.cpu(), "returns": returns.cpu()}

    def train_batch(self, step: int, n: int) -> dict:
        index, within = divmod(step, self.updates_per_rollout)
        if index != self.rollout_index:
            self.rollout, self.rollout_index = self.make_rollout(index), index
        B = self.cfg.rollout_batch
        epoch, mb = divmod(within, self.cfg.minibatches)
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + index * 31 + epoch)
        rows = torch.randperm(B, generator=g)[mb * n:(mb + 1) * n]
        batch = {k: v[rows] for k, v in self.rollout.items()}
        if self.ptx is not None and self.cfg.ptx_coef > 0:
            ptx = self.ptx.train_batch(step, n)
            batch |= {"ptx_input": ptx["input"], "ptx_target": ptx["target"]}
        return batch

    def weight(self, micro: dict) -> float:
        return float(micro["mask"].sum())

    def loss(self, model, micro: dict):
        cfg = self.cfg
        mask = micro["mask"]
        logits, values = model(micro["ids"])
        logp = token_logprobs(logits, micro["ids"], cfg.temperature)
        policy_loss, value_loss, stats = ppo_losses(logp, micro["old_logp"], micro["advantages"], values,
                                                    micro["old_values"], micro["returns"], mask, cfg.clip, cfg.value_clip)
        loss = policy_loss + cfg.vf_coef * value_loss
        metrics = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), **stats,
                   "tokens": int(mask.sum())}
        if "ptx_input" in micro:  # PPO-ptx: γ·L1 on pretraining data in the same update
            ptx_logits = model.policy.logits(model.policy.hidden(micro["ptx_input"]))
            ptx = F.cross_entropy(ptx_logits.flatten(0, 1).float(), micro["ptx_target"].flatten())
            loss = loss + cfg.ptx_coef * ptx
            metrics["ptx_loss"] = ptx.detach()
        metrics |= {k: torch.tensor(v) for k, v in self.stats.items()}
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        if not self.eval_prompts:
            return {}
        figures, _ = evaluate_policy(model.policy, self.reference, self.rm, self.tok, self.eval_prompts, self.cfg)
        return {f"val_{k}": v for k, v in figures.items() if not isinstance(v, dict)}

    def flops_per_token(self) -> float:
        return self._flops


@torch.no_grad()
def evaluate_policy(policy: GPT, reference: GPT, rm: RewardModel, tok, prompts: list, cfg) -> tuple[dict, list[dict]]:
    """Greedy answers to held-out prompts scored by the gold labeler and the RM, and the KL to the
    reference per answer, estimated on temperature-1 samples (Σ_t log π − log π_ref). Returns
    (figures, the greedy answers as samples)."""
    from ..evals.instruct import conversation, evaluate_instructions, prompt_ids
    figures, samples = evaluate_instructions(policy, tok, prompts, cfg.max_new_tokens)
    figures["rm_score"] = sum(rm_scores(rm, tok, prompts, [s["answer"] for s in samples])) / len(prompts)
    end = tok.special["<|end|>"]
    ids_in = prompt_ids(tok, [conversation(p) for p in prompts], policy.cfg.n_ctx, cfg.max_new_tokens)
    gens = sample(policy, ids_in, cfg.max_new_tokens, 1.0, end, tok.pad, seed=cfg.seed)
    ids, mask = pack(ids_in, [g.tokens for g in gens], tok.pad)
    device = next(policy.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    logp = token_logprobs(policy.logits(policy.hidden(ids))[:, :-1].float(), ids)
    ref = token_logprobs(reference.logits(reference.hidden(ids))[:, :-1].float(), ids)
    figures["kl"] = float(((logp - ref) * mask).sum(1).mean())
    return figures, samples


@torch.no_grad()
def rm_scores(rm: RewardModel, tok, prompts: list, answers: list[str], batch_size: int = 64) -> list[float]:
    """The reward model's (normalised) score of each answer text, encoded as in its training data."""
    from .rm import encode_answer
    device = next(rm.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        seqs = [encode_answer(tok, p.user, p.system, a, rm.gpt.cfg.n_ctx)
                for p, a in zip(prompts[start:start + batch_size], answers[start:start + batch_size])]
        ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        last = torch.tensor([len(s) - 1 for s in seqs])
        out += rm.score(ids.to(device), last.to(device)).tolist()
    return out
