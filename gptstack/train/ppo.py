"""PPO with a per-token KL penalty (InstructGPT step 3), PPO-ptx, and rule-based rewards, as the loop
InstructGPT describes:

    for each rollout:                                   PPOObjective.batches
        sample answers to a batch of prompts with the current policy (the one generation engine)
        score them: answer_scores (the reward model at the last token, normalised, minus no_end_penalty
            for an answer without <|end|>), plus the rule-based rewards on the prompts they cover; and on
            every token r_t = −β·(log π(a_t) − log π_SFT(a_t))
        advantages: GAE (γ = 1, λ = 0.95) over the rewards, whitened over the rollout
        for each of ppo_epochs passes:
            for each of `minibatches` shuffled minibatches:
                one optimizer update of the clipped policy loss + vf_coef · the clipped value loss
                (+ γ_ptx · L1 on pretraining data: PPO-ptx)

The Trainer runs it like any objective: one Trainer step is one update, and `train_batch` reads the next
minibatch from the loop above. Under torchrun each rank samples and scores its share of the rollout's answers
(answer i seeded by i, so the rollout is the same on any number of ranks) and every rank gets the whole rollout;
the Trainer then hands each rank its slice of every minibatch. The objective takes its data, extra rewards and
metrics as arguments; where the prompts come from and how a policy is judged is the stage's business
(stages/ppo.py).

The rollout's log-probabilities and values are the baseline of the update's ratio π/π_old and value clip,
so both compute alike: dropout is off in every model (ActorCritic.train), and the Trainer calls
`train_batch`, where rollouts happen, under the same autocast as the update. At identical weights the
first update's ratio is then exactly 1.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.loader import right_pad
from ..generate import generate_all
from ..model import GPT, token_logprobs
from . import lora
from .distributed import across_ranks, whole_weights
from .rm import RewardModel


class ActorCritic(nn.Module):
    """Every model PPO uses, so that moving or wrapping this module moves and wraps all of them:
    the policy (a GPT) and its value function (the reward model's architecture, initialised from it:
    V(h_{t-1}) estimates the return of the answer from the state before token t), which train; and the
    frozen SFT reference and reward model, which stay out of the optimizer (no gradients) and out of the
    state dict (checkpoints hold what trains).

    With LoRA the three share one copy of the base weights: the value function's decoder is the policy's GPT,
    run through its adapter "value" (the policy's forwards run through "policy"), and the reference, given as
    None, is the policy with its adapters off."""

    FROZEN = ("reference", "reward_model")

    def __init__(self, policy: GPT, value: RewardModel, reference: GPT | None, reward_model: RewardModel):
        super().__init__()
        self.policy, self.value = policy, value
        self.shared = value.gpt is policy  # LoRA: one base, adapters "policy" and "value"
        if reference is None and not self.shared:
            raise ValueError("the reference may be left out only when the policy and value share a LoRA-wrapped base")
        self.reference = None if reference is None else reference.requires_grad_(False)
        self.reward_model = reward_model.requires_grad_(False)
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_post_hook(_frozen_not_missing)
        self.train()  # dropout off in every model from the start

    def train(self, mode: bool = True):
        """Every model stays in eval mode, so dropout is off in the update as in the rollout: with dropout in
        one and not the other, π/π_old ≠ 1 at identical weights and the clip fires before any update (and the
        frozen models have nothing to train). `self.training` still says whether PPO is training."""
        super().train(mode)
        for model in self.children():
            model.eval()
        return self

    def forward(self, ids: torch.Tensor, ptx: torch.Tensor | None = None):
        """ids (B, L) right-padded -> (logits for tokens 1..L-1 (B, L-1, V), values for tokens 1..L-1 (B, L-1)); with
        pretraining rows `ptx` (N, T), also the policy's logits on them (PPO-ptx). Every update goes through here, so
        DDP and FSDP see one forward of the module they wrap."""
        with self.adapter("policy"):
            logits = self.policy.logits(self.policy.hidden(ids)[:, :-1]).float()
            ptx_logits = None if ptx is None else self.policy.logits(self.policy.hidden(ptx))
        with self.adapter("value"):
            # the head's one output; summing it away gives a tensor of its own (FSDP warns of a module returning views)
            values = self.value.head(self.value.gpt.hidden(ids)[:, :-1]).float().sum(-1)
        if ptx is None:
            return logits, values
        return logits, values, ptx_logits

    def adapter(self, name: str | None):
        """Forwards of the shared base inside run through adapter `name` (None: the base alone, the reference)."""
        return lora.use_adapter(self.policy, name) if self.shared else contextlib.nullcontext()

    @torch.no_grad()
    def reference_logprobs(self, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log π_SFT of tokens 1..L-1: (B, L-1)."""
        with self.adapter(None):
            return (self.policy if self.reference is None else self.reference).sequence_logprobs(ids, temperature)

    def merged_state(self, state: dict, scaling: float) -> dict:
        """LoRA: the published actor-critic as plain models, the policy (base + adapter "policy") under `policy.`
        and the value function (base + adapter "value", its head) under `value.` (the Trainer publishes this)."""
        if not self.shared:
            return lora.merge(state, scaling)
        base = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
        rest = {k: v for k, v in state.items() if not k.startswith("policy.")}
        return {**{f"policy.{k}": v for k, v in lora.merge(base, scaling, "policy").items()},
                # copies: the weights no adapter touches would otherwise be one tensor under two names
                **{f"value.gpt.{k}": v.clone() for k, v in lora.merge(base, scaling, "value").items()}, **rest}


def value_from_reward_model(rm: RewardModel, gpt: GPT | None = None) -> RewardModel:
    """A trainable copy of the reward model as the value function's start (InstructGPT), with the score's
    normalisation folded into its head: V reads the head raw (ActorCritic.forward) while the rewards are
    gain·(raw + bias), so the head becomes gain·(w·h + b + bias) and V predicts the normalised score.
    `gpt`: the decoder V reads instead of a copy of the RM's (LoRA: the policy's, through its adapter "value")."""
    if gpt is None:
        value = copy.deepcopy(rm).requires_grad_(True)
    else:
        value = RewardModel(gpt)
        value.head.load_state_dict(rm.head.state_dict())
    with torch.no_grad():
        value.head.proj.weight.mul_(rm.gain)
        value.head.proj.bias.add_(rm.bias).mul_(rm.gain)
        value.gain.fill_(1.0)
        value.bias.zero_()
    return value


def _not_saved(module: ActorCritic) -> tuple[str, ...]:
    """The frozen models, and with a shared base the value function's decoder (the policy's, saved once)."""
    return tuple(f + "." for f in ActorCritic.FROZEN) + (("value.gpt.",) if module.shared else ())


def _drop_frozen(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(tuple(prefix + p for p in _not_saved(module)))]:
        del state_dict[key]


def _frozen_not_missing(module, incompatible):
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(_not_saved(module))]


# ---------------------------------------------------------------- the algebra

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

def pack(prompts: list[list[int]], answers: list[list[int]], pad: int, length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt followed by its answer, right-padded (to `length` at least): ids (B, L) and the action mask
    (B, L-1), True where token t+1 is one the policy chose."""
    rows = [p + a for p, a in zip(prompts, answers)]
    ids = right_pad(rows, pad, max(length, *map(len, rows)))
    mask = torch.zeros(len(prompts), ids.size(1) - 1)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        mask[i, len(p) - 1:len(p) + len(a) - 1] = 1.0
    return ids, mask


@torch.no_grad()
def answer_scores(reward_model: RewardModel, prompt_ids: list[list[int]], answer_ids: list[list[int]], ended: list[bool],
                  pad: int, no_end_penalty: float, length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The score PPO maximises, for each answer (token ids as sampled) after its prompt: the reward model's
    normalised score read at the answer's last token, minus no_end_penalty where the answer did not end with
    <|end|>. Selection and evaluation use it too, so they see what training exploits. `length`: pad the rows to at
    least this (the longest row of all when these are one rank's share, so a row scores alike on any number of ranks).
    Returns (scores, the reward model's scores alone), on the reward model's device."""
    device = next(reward_model.parameters()).device
    ids, _ = pack(prompt_ids, answer_ids, pad, length)
    last = torch.tensor([len(p) + len(a) - 1 for p, a in zip(prompt_ids, answer_ids)], device=device)
    rm_scores = reward_model.score(ids.to(device), last)
    unfinished = 1.0 - torch.tensor(ended, dtype=rm_scores.dtype, device=device)
    return rm_scores - no_end_penalty * unfinished, rm_scores


def sample(policy: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float, end_id: int,
           pad_id: int, seed: int):
    """Answers to every prompt, split across the ranks and gathered on each (answer i seeded by (seed, i))."""
    return generate_all(policy, prompts, max_new_tokens, seed=seed, temperature=temperature, stop_ids=(end_id,),
                        pad_id=pad_id)


class PPOObjective:
    """PPO on `prompts` (chat conversations awaiting an answer) with the models of `model`.
    extra_rewards(indices, answers) -> rewards added (× rbrm_coef) to the RM score (rule-based rewards);
    rollout_metrics(indices, answers) -> figures logged with each rollout (e.g. the gold labeler's);
    evaluate(model) -> validation figures (logged as val_*; `select_by` may pick the kept checkpoint by one)."""

    def __init__(self, cfg, model: ActorCritic, tok, prompts: list[list[dict]], ptx_sampler=None,
                 extra_rewards: Callable[[list[int], list[str]], list[float]] | None = None,
                 rollout_metrics: Callable[[list[int], list[str]], dict] | None = None,
                 evaluate: Callable[[ActorCritic], dict] | None = None, flops_per_token: float = 0.0):
        self.cfg, self.model, self.tok, self.prompts, self.ptx = cfg, model, tok, prompts, ptx_sampler
        self.extra_rewards, self.rollout_metrics, self.evaluate_fn = extra_rewards, rollout_metrics, evaluate
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.updates_per_rollout = self.steps_per_group = cfg.ppo_epochs * cfg.minibatches  # a signal stops at a rollout's end
        self.rollout, self.rollout_index, self.stats = None, -1, {}
        self._loop, self._next_step = None, None
        self._flops = flops_per_token
        self.end = tok.end

    # the adaptive β is the objective's only state; the Trainer keeps it in the checkpoint
    def state_dict(self) -> dict:
        return {"beta": self.kl.beta}

    def load_state_dict(self, state: dict) -> None:
        self.kl.beta = state["beta"]

    # ------------------------------------------------------------ the loop

    def batches(self, first_step: int = 0) -> Iterator[tuple[int, dict]]:
        """(step, minibatch) for every update from `first_step` on: the PPO loop of the module docstring."""
        cfg = self.cfg
        n = cfg.rollout_batch // cfg.minibatches
        step = first_step - first_step % self.updates_per_rollout  # a resumed run starts at a rollout's first update
        for index in range(step // self.updates_per_rollout, cfg.rollouts):
            self.rollout, self.rollout_index = self.make_rollout(index), index  # sample, score, advantages
            for epoch in range(cfg.ppo_epochs):
                order = torch.randperm(cfg.rollout_batch, generator=torch.Generator().manual_seed(cfg.seed * 7919 + index * 31 + epoch))
                for mb in range(cfg.minibatches):
                    if step >= first_step:
                        yield step, {k: v[order[mb * n:(mb + 1) * n]] for k, v in self.rollout.items()}
                    step += 1

    def train_batch(self, step: int, n: int) -> dict:
        if self._loop is None or step != self._next_step:
            self._loop = self.batches(step)
        got, batch = next(self._loop)
        self._next_step = got + 1
        if self.ptx is not None and self.cfg.ptx_coef > 0:
            ptx = self.ptx.train_batch(step, n)
            # the update's loss is a mean over the minibatch's answer tokens (the micro-batches' weight), the ptx term
            # a mean over its pretraining rows: each row's share of the ptx mean, rescaled to count per answer token,
            # keeps the two means right however the Trainer splits the batch across ranks and micro-batches
            tokens_per_row = float(batch["mask"].sum().clamp(min=1)) / n
            batch |= {"ptx_input": ptx["input"], "ptx_target": ptx["target"], "ptx_scale": torch.full((n,), tokens_per_row)}
        return batch

    @torch.no_grad()
    def make_rollout(self, index: int) -> dict:
        """Sample answers to the rollout's prompts, score them, and turn the rewards into advantages. Each rank
        samples and scores its share of the answers (under FSDP with the whole weights, gathered once); every rank
        gets the whole rollout."""
        cfg, model, tok = self.cfg, self.model, self.tok
        device = next(model.parameters()).device
        n = cfg.rollout_batch
        start = (index * n) % len(self.prompts)
        which = [(start + i) % len(self.prompts) for i in range(n)]
        prompt_ids = tok.render_prompts([self.prompts[i] for i in which], model.policy.cfg.n_ctx, cfg.max_new_tokens)
        with whole_weights(model):
            gens = sample(model.policy, prompt_ids, cfg.max_new_tokens, cfg.temperature, self.end, tok.pad,
                          seed=cfg.seed * 100003 + index)
            answers, ended = [g.tokens for g in gens], [g.finished for g in gens]
            texts = [tok.decode(a[:-1] if e else a, skip_special=True).strip() for a, e in zip(answers, ended)]
            ids, mask = pack(prompt_ids, answers, tok.pad)  # the whole rollout, padded alike on every rank

            def score(rows):  # this rank's answers: the models' per-token figures, the RM score, the rule reward
                r_ids, r_mask = ids[rows].to(device), mask[rows].to(device)
                logits, values = model(r_ids)
                logp = token_logprobs(logits, r_ids[:, 1:], cfg.temperature)
                ref_logp = model.reference_logprobs(r_ids, cfg.temperature)
                entropy = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1)
                scores, rm_scores = (x.tolist() for x in answer_scores(
                    model.reward_model, [prompt_ids[i] for i in rows], [answers[i] for i in rows],
                    [ended[i] for i in rows], tok.pad, cfg.no_end_penalty, ids.size(1)))
                rule = (self.extra_rewards([which[i] for i in rows], [texts[i] for i in rows])
                        if self.extra_rewards is not None else [0.0] * len(rows))
                per_token = [x.float().cpu() for x in (logp, values * r_mask, ref_logp, entropy)]
                return [(*(x[j].clone() for x in per_token), scores[j], rm_scores[j], float(rule[j]))  # a row apiece
                        for j in range(len(rows))]
            scored = across_ranks(score, n)  # every answer's, on every rank
        mask = mask.to(device)
        logp, values, ref_logp, entropy = (torch.stack([a[k] for a in scored]).to(device) for k in range(4))
        score, rm_score, rule = (torch.tensor([a[k] for a in scored], device=device) for k in range(4, 7))
        score = score + cfg.rbrm_coef * rule
        rewards = kl_rewards(logp, ref_logp, mask, score, self.kl.beta)
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten:
            adv = whiten(adv, mask)
        kl_seq = ((logp - ref_logp) * mask).sum(1)
        self.kl.update(kl_seq.mean().item(), n)
        self.stats = {"reward": float(score.mean()), "rm_score": float(rm_score.mean()), "kl": float(kl_seq.mean()),
                      "beta": self.kl.beta, "answer_length": sum(len(t) for t in texts) / n,
                      "ended": sum(ended) / n, "rule_reward": float(rule.mean()),
                      **(self.rollout_metrics(which, texts) if self.rollout_metrics else {}),
                      "entropy": float(masked_mean(entropy, mask))}
        return {"ids": ids, "mask": mask.cpu(), "scores": score.cpu(), "old_logp": logp.cpu(), "old_values": values.cpu(),
                "advantages": adv.cpu(), "returns": returns.cpu()}

    # ------------------------------------------------------------ one update

    def weight(self, micro: dict) -> float:
        return float(micro["mask"].sum())

    def loss(self, model, micro: dict):
        cfg = self.cfg
        mask = micro["mask"]
        ptx = "ptx_input" in micro  # PPO-ptx: γ·L1 on pretraining data in the same update
        logits, values, *ptx_logits = model(micro["ids"], micro["ptx_input"] if ptx else None)
        logp = token_logprobs(logits, micro["ids"][:, 1:], cfg.temperature)
        policy_loss, value_loss, stats = ppo_losses(logp, micro["old_logp"], micro["advantages"], values,
                                                    micro["old_values"], micro["returns"], mask, cfg.clip, cfg.value_clip)
        loss = policy_loss + cfg.vf_coef * value_loss
        metrics = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), **stats,
                   "tokens": int(mask.sum())}
        if ptx:  # the micro-batch's rows' share of the minibatch's ptx mean, per answer token (see train_batch)
            lm = F.cross_entropy(ptx_logits[0].flatten(0, 1).float(), micro["ptx_target"].flatten())
            lm = lm * len(mask) / mask.sum().clamp(min=1) * micro["ptx_scale"][0]
            loss = loss + cfg.ptx_coef * lm
            metrics["ptx_loss"] = lm.detach()
        metrics |= {k: torch.tensor(v) for k, v in self.stats.items()}
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        if self.evaluate_fn is None:
            return {}
        return {f"val_{k}": v for k, v in self.evaluate_fn(model).items() if not isinstance(v, dict)}

    def flops_per_token(self) -> float:
        return self._flops
