"""The ppo stage (InstructGPT step 3): prompts -> PPO-ptx against the reward model with a per-token KL to SFT
(train/ppo.py) -> Trainer -> evaluation -> summary.

Prompts are yours (`ppo.prompts: FILE`, records {prompt, [system]} or {messages}) or the built-in world's.
They come in three disjoint sets: train (the rollouts), dev (the kept checkpoint; figures shown beside) and
test (the reported figures, used for no choice). Either way the report has the PPO policy against SFT on
test prompts: the RM's preference (win rate),
RM score, KL to SFT, answer length, and the pretraining val loss before and after, with and without the ptx
term (the same experiment run twice). With the world, the gold labeler also judges: the win rate split into
wins from correctness and wins from style, accuracy, refusal rates, other policies (`ppo.versus`), rounds of
new rankings (`ppo.rounds`), and the rollouts' gold score against their RM score (over-optimisation).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import plots
from ..checkpoint import file_sha256, find_tokenizer, load_model, model_path, read_weights, save_state_dict
from ..config import at_least
from ..data.loader import build_sampler
from ..data.records import read_prompt_records
from ..errors import GptstackError
from ..evals.lm import windows_loss
from ..evals.policy import Prompts, evaluate_policy, judged_by, versus_sft, win_rate, world_prompts
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl_loose
from ..tokenizer import Tokenizer
from ..train import lora
from ..train.distributed import barrier, broadcast_from_main, init_distributed, is_main, local_main_first
from ..train.ppo import ActorCritic, PPOObjective, value_from_reward_model
from ..train.rm import RewardModel, load_reward_model, scalar_flops_per_token
from ..train.trainer import TrainConfig, Trainer, autocast, placement
from .base import Context, Stage


def _ppo_train() -> TrainConfig:
    # one step = one minibatch update; steps = rollouts x ppo_epochs x minibatches (set by the stage)
    return TrainConfig(steps=0, batch_size=32, lr=3e-5, schedule="constant", min_lr_ratio=1.0, warmup_steps=1,
                       weight_decay=0.0, log_every=1, eval_every=0, ckpt_every=1000, keep_checkpoints=1)


@dataclass
class PPOConfig:
    prompts: str = "world"  # "world" (the instruction suite) or a JSONL file of {prompt, [system]} or {messages}
    val_prompts: str = ""  # a JSONL file of validation prompts, which pick the kept checkpoint (default: every 10th record of `prompts`)
    test_prompts: str = ""  # a JSONL file of test prompts for the reported figures (default: every 10th record, offset by 5)
    train_prompts: int = 2000  # world: training prompts the rollouts cycle through (train templates)
    dev_prompts: int = 100  # world: dev prompts (unseen templates): they pick the kept checkpoint
    eval_prompts: int = 200  # world: test prompts (unseen templates, not dev's) for the reported figures
    rollouts: int = 40  # how many rollouts (each followed by ppo_epochs x minibatches updates)
    rollout_batch: int = 64  # answers per rollout (train.batch_size = rollout_batch / minibatches)
    ppo_epochs: int = 2
    minibatches: int = 2
    temperature: float = 1.0  # sampling temperature; log-probs use logits / temperature
    max_new_tokens: int = 48
    kl_coef: float = 0.05  # β of the per-token KL penalty (the initial β when kl_target > 0)
    kl_target: float = 0.0  # > 0: adapt β so the KL per answer approaches this (nats)
    kl_horizon: int = 10000
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    no_end_penalty: float = 1.0  # subtracted from the score of an answer that ends without <|end|>
    ptx_coef: float = 0.2  # γ of PPO-ptx: γ·L1 on pretraining data (the `data` section) in the same update (0: plain PPO)
    ptx_seq_len: int = 64  # tokens per pretraining row in the ptx term (one row per answer in the minibatch)
    rbrm: str = ""  # rule-based rewards: a rubric YAML, or "world" for the built-in one ("": none)
    rbrm_coef: float = 1.0
    rbrm_judge: str = ""  # a model folder: the rubric's class is asked of this model (GPT-4's judge mode) instead of the patterns
    rounds: int = 1  # world: > 1: new rankings from the current policy, RM retrained on all, PPO continued
    select_by: str = "val_rm_score"  # the kept checkpoint (validation RM score; "" keeps the last)
    versus: list[str] = field(default_factory=list)  # world: other policies (e.g. a larger SFT model) also judged against
    eval_every_rollouts: int = 10
    baselines: bool = True  # the stage also runs γ = 0 (the ptx comparison)
    seed: int = 0
    train: TrainConfig = field(default_factory=_ppo_train)

    def problems(self):
        yield from at_least(self, 1, "train_prompts", "dev_prompts", "eval_prompts", "rollouts", "rollout_batch", "ppo_epochs", "minibatches",
                            "max_new_tokens", "kl_horizon", "rounds", "eval_every_rollouts", "ptx_seq_len")
        yield from at_least(self, 0, "temperature", "kl_coef", "kl_target", "clip", "value_clip", "vf_coef", "gamma", "lam",
                            "no_end_penalty", "ptx_coef", "rbrm_coef")
        if self.rollout_batch % self.minibatches:
            yield "rollout_batch", f"({self.rollout_batch}) must be divisible by ppo.minibatches ({self.minibatches})"


# ---------------------------------------------------------------- prompts

def prompt_sets(cfg) -> tuple[Prompts, Prompts, Prompts]:
    """(rollout prompts, dev prompts that pick the kept checkpoint, test prompts for the reported figures)."""
    p = cfg.ppo
    if p.prompts == "world":
        from ..world.instructions import InstructionSuite
        suite = InstructionSuite(seed=cfg.sft.seed)
        return (world_prompts(suite, "train", p.train_prompts, p.seed + 300),
                world_prompts(suite, "dev", p.dev_prompts, p.seed + 400),
                world_prompts(suite, "test", p.eval_prompts, cfg.sft.seed + 1))  # the SFT stage's test prompts
    records = read_prompt_records(Path(p.prompts))
    val = read_prompt_records(Path(p.val_prompts)) if p.val_prompts else None
    test = read_prompt_records(Path(p.test_prompts)) if p.test_prompts else None
    held = {i for i in range(len(records)) if (val is None and i % 10 == 0) or (test is None and i % 10 == 5)}
    train = [c for i, c in enumerate(records) if i not in held]
    if not train or (test is None and len(records) < 6):
        raise GptstackError(f"{p.prompts}: {len(records)} prompts are too few to hold out validation and test prompts "
                            "(every 10th, from the first and from the sixth); give --val-prompts and --test-prompts, or more prompts")
    return Prompts(train), Prompts(val if val is not None else records[::10]), Prompts(test if test is not None else records[5::10])


# ---------------------------------------------------------------- judging the policy (evals/policy.py)

def against_sft(ppo, no_ptx, sft, rm: RewardModel, tok, prompts: Prompts, p):
    """PPO (and PPO without ptx, if given) against SFT on `prompts`: (PPO's figures, its samples, SFT's figures,
    SFT's samples, PPO's win rate against SFT, the no-ptx run's figures or None)."""
    ours, samples, base, base_samples, wins = versus_sft(ppo, sft, rm, tok, prompts, p)
    nop = None
    if no_ptx is not None:
        figures, nop_samples = evaluate_policy(no_ptx, sft.sequence_logprobs, rm, tok, prompts, p)
        nop = {**{k: v for k, v in figures.items() if not isinstance(v, dict)},
               "win_rate_vs_sft": (w := win_rate(nop_samples, base_samples, judged_by(prompts)))["win_rate"], "wins": w}
    return ours, samples, base, base_samples, wins, nop


def load_rules(p, device="cpu"):
    """The rubric, with its judge model on `device` (the judge reads with its own tokenizer: it may be another run's,
    or an imported one)."""
    from ..rewards.rbrm import Judge, RuleBasedRewards
    judge = Judge(load_model(p.rbrm_judge, device), Tokenizer.load(find_tokenizer(p.rbrm_judge))) if p.rbrm_judge else None
    return RuleBasedRewards.load(p.rbrm, judge)


def rbrm_agreement(rules, rankings: Path, cfg) -> dict:
    """The text-only RBRM against the gold labeler on world rankings (K answers per prompt): over the pairs of
    answers to one prompt that both order (neither ties), the share they order alike; and how its coverage,
    read from the request's text, matches the prompts' labels (disallowed, risky-but-allowed, neither)."""
    from ..world.instructions import InstructionSuite
    suite = InstructionSuite(seed=cfg.sft.seed)
    agree = pairs = 0
    covered = {"disallowed": [0, 0], "risky": [0, 0], "neither": [0, 0]}  # [covered as it should be, prompts]
    for row in read_jsonl_loose(rankings):
        prompt = suite.lookup(row["prompt"], row.get("system"))
        kind = "disallowed" if prompt.disallowed else "risky" if prompt.risky else "neither"
        want = {"disallowed": "disallowed", "risky": "allowed", "neither": None}[kind]
        covered[kind][0] += rules.coverage(row["prompt"]) == want
        covered[kind][1] += 1
        rewards = [rules.reward(row["prompt"], y) for y in row["responses"]]
        gold = row["gold_ranks"]
        for i in range(len(rewards)):
            for j in range(i + 1, len(rewards)):
                if rewards[i] != rewards[j] and gold[i] != gold[j]:
                    pairs += 1
                    agree += (rewards[i] > rewards[j]) == (gold[i] < gold[j])
    return {"rbrm_gold_agreement": agree / pairs if pairs else None, "rbrm_gold_pairs": pairs,
            "rbrm_coverage": {k: c / n if n else None for k, (c, n) in covered.items()}}


# ---------------------------------------------------------------- training

def actor_critic(policy_dir: Path, rm_dir: Path, reference_dir: Path | None = None, train: TrainConfig | None = None,
                 log=print) -> ActorCritic:
    """Every model PPO trains with, in one module: the policy from `policy_dir`, the value function from the RM (on
    its normalised scale, as InstructGPT starts it), the frozen reference (SFT) and reward model. Built in CPU
    memory; the Trainer moves or shards the whole module onto the stage's device.

    With `train.lora_rank` > 0 the policy's weights are the one base: the policy trains adapter "policy", the value
    function adapter "value" on the same base under the RM's head, and the reference is the base with adapters off
    (a copy of its own only when it is another model, as in a later round)."""
    rm = load_reward_model(rm_dir)
    if train is None or not train.lora_rank:
        value = value_from_reward_model(rm)
        return ActorCritic(load_model(policy_dir), value, reference=load_model(reference_dir or policy_dir), reward_model=rm)
    policy = load_model(policy_dir)
    lora.add_lora(policy, train, "value")
    lora.add_lora(policy, train, "policy")  # the last adapter added is the active one: the policy's, for sampling
    value = value_from_reward_model(rm, gpt=policy)
    if rm_adapter_fits(rm_dir, policy_dir, train):
        lora.load_adapter(policy, read_weights(rm_dir / "adapter.safetensors")[0], "default", "value", prefix="gpt.")
    else:
        log(f"[ppo] note: {rm_dir} holds no LoRA adapter trained from {policy_dir} with this rank and alpha; the value "
            "function starts as the policy's base under the reward model's head")
    reference = None if reference_dir is None or Path(reference_dir) == Path(policy_dir) else load_model(reference_dir)
    return ActorCritic(policy, value, reference=reference, reward_model=rm)


def rm_adapter_fits(rm_dir: Path, policy_dir: Path, train: TrainConfig) -> bool:
    """Whether the RM's adapter was trained on `policy_dir`'s weights (the value function's base) with the same rank,
    alpha and targets, so that base + that adapter under the RM's head is the reward model exactly."""
    path = Path(rm_dir) / "adapter.safetensors"
    if not path.is_file():
        return False
    meta = read_weights(path)[1]
    made = json.loads(meta.get("gptstack.lora", "{}"))
    return (meta.get("gptstack.lora_base") == file_sha256(model_path(policy_dir)) and made.get("rank") == train.lora_rank
            and made.get("alpha") == train.lora_alpha and made.get("targets") == list(train.lora_targets))


def train_ppo(cfg, policy_dir: Path, rm_dir: Path, out: Path, tok: Tokenizer, ptx_coef: float, prompts: Prompts,
              val_prompts: Prompts, log=print, reference_dir: Path | None = None) -> dict:
    """PPO from `policy_dir` against the RM in `rm_dir` into OUT, rolling out on `prompts` and keeping the
    checkpoint that does best on `val_prompts`; OUT/model.safetensors is the policy (a plain GPT, for chat and
    serving), OUT/value.safetensors its value function."""
    p = dataclasses.replace(cfg.ppo, ptx_coef=ptx_coef)
    torch.manual_seed(p.train.seed)
    model = actor_critic(policy_dir, rm_dir, reference_dir, p.train, log)
    policy, value = model.policy, model.value
    if policy.cfg.n_ctx <= p.max_new_tokens:
        raise GptstackError(f"config 'ppo.max_new_tokens' ({p.max_new_tokens}) leaves no room for a prompt in the "
                            f"policy's context of {policy.cfg.n_ctx} tokens")
    with local_main_first():  # one process per machine tokenizes the pretraining data into the cache, then the rest
        ptx = build_sampler(cfg.data, tok, p.ptx_seq_len, p.seed) if p.ptx_coef > 0 else None
    extra_rewards = None
    if p.rbrm:
        rules = load_rules(p, placement(p.train)[0])

        def extra_rewards(which, texts):  # the rubric sees the request's text and the answer, nothing else
            return [rules.reward(prompts.request(i), t) for i, t in zip(which, texts)]
    rollout_metrics = None
    if prompts.suite is not None:
        from ..world.instructions import gold_score

        def rollout_metrics(which, texts):
            gold = [gold_score(prompts.suite[i], t) for i, t in zip(which, texts)]
            return {"gold_score": sum(s.total for s in gold) / len(gold), "gold_accuracy": sum(s.correct for s in gold) / len(gold)}

    def validate(ac: ActorCritic) -> dict:
        return evaluate_policy(ac.policy, ac.reference_logprobs, ac.reward_model, tok, val_prompts, p)[0]

    updates = p.ppo_epochs * p.minibatches
    steps = p.rollouts * updates
    train_cfg = dataclasses.replace(p.train, steps=steps, batch_size=p.rollout_batch // p.minibatches,
                                    eval_every=p.eval_every_rollouts * updates, select_by=p.select_by,
                                    ckpt_every=min(p.train.ckpt_every // updates * updates or updates, steps))
    fpt = policy.flops_per_token(64) + scalar_flops_per_token(value.gpt, 64)  # the rollouts' generation not counted
    objective = PPOObjective(p, model, tok, prompts.conversations, ptx, extra_rewards, rollout_metrics, validate, fpt)
    trainer = Trainer(train_cfg, model, objective, out, metadata={**policy.metadata(), "gptstack.kind": "actor_critic"},
                      desc=f"ppo{'' if p.ptx_coef > 0 else ' (no ptx)'}")
    summary = trainer.fit()  # rank 0's, on every rank
    if trainer.is_main:
        state, _ = read_weights(out / "model.safetensors")  # the kept (best or last) actor-critic
        if any(k.startswith("policy.") for k in state):
            save_state_dict({k[len("value."):]: v for k, v in state.items() if k.startswith("value.")},
                            out / "value.safetensors", {**value.gpt.metadata(), "gptstack.kind": "reward_model"})
            save_state_dict({k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")},
                            out / "model.safetensors", policy.metadata())
    barrier()  # the policy's own file exists before any rank reads it
    return {"steps": steps, "rollouts": p.rollouts, "selected": summary.get("selected"),
            "train_seconds": summary.get("seconds"), "final_beta": objective.kl.beta,
            "train_peak_rss_mb": summary.get("peak_rss_mb")}


def train_rounds(cfg, sft_dir: Path, rm_dir: Path, out: Path, tok: Tokenizer, prompts: Prompts, val_prompts: Prompts,
                 log=print) -> dict:
    """InstructGPT's iteration of steps 2 and 3 on the world: PPO for a share of the rollouts; then new
    rankings of the current policy's answers, the RM retrained (from SFT) on all rankings so far, and PPO
    continued from the current policy (the KL stays to SFT). The last round's policy is OUT's model."""
    from ..comparisons import compare
    from ..world.instructions import InstructionSuite
    from .rm import run_rm
    p = cfg.ppo
    if p.prompts != "world":
        raise GptstackError("config 'ppo.rounds' > 1 needs the world's prompts and labeler (ppo.prompts: world)")
    if not all((rm_dir / f"{name}.jsonl").is_file() for name in ("rankings", "rankings_val", "rankings_test")):
        raise GptstackError(f"{rm_dir}: rounds need the reward model's world rankings (rankings.jsonl, rankings_val.jsonl and "
                            "rankings_test.jsonl, written by `gptstack rm` without --data): each round's new rankings come "
                            "from the same labeler")
    per_round = cfg.replace(ppo=dataclasses.replace(p, rollouts=max(1, p.rollouts // p.rounds)))
    suite = InstructionSuite(seed=cfg.sft.seed)
    rankings = [rm_dir / "rankings.jsonl"]
    policy, rm, result, rounds = sft_dir, rm_dir, {}, []
    for k in range(1, p.rounds + 1):
        folder = out / f"round_{k}"
        if k > 1:
            new = folder / "rankings.jsonl"
            if not broadcast_from_main(new.is_file()):  # rank 0's view: every rank takes the same branch
                log(f"[ppo] round {k}: ranking the current policy's answers ({cfg.rm.labeler} labeler)")
                compare([str(policy)], tok, suite.prompts("train", cfg.rm.prompts // p.rounds, seed=cfg.rm.seed + 100 + k),
                        cfg.rm.k, cfg.rm.labeler, new, cfg.rm.temperatures, cfg.rm.agreement, cfg.rm.tie_threshold,
                        cfg.rm.max_new_tokens, cfg.rm.seed + k, device=p.train.device)
            rankings.append(new)
            combined = folder / "rankings_all.jsonl"
            if is_main():
                atomic_write_text(combined, "".join(r.read_text(encoding="utf-8") for r in rankings))
            barrier()
            rm = folder / "rm"
            if not broadcast_from_main((rm / "summary.json").is_file()):
                log(f"[ppo] round {k}: retraining the reward model on {len(rankings)} rounds of rankings")
                run_rm(cfg, sft_dir, rm, tok, combined, rm_dir / "rankings_val.jsonl", rm_dir / "rankings_test.jsonl", log)
        log(f"[ppo] round {k} of {p.rounds}")
        result = train_ppo(per_round, policy, rm, folder, tok, p.ptx_coef, prompts, val_prompts, log, reference_dir=sft_dir)
        rm_summary = json.loads((rm / "summary.json").read_text())["rm"]
        rounds.append({"round": k, "rankings": rm_summary["rankings"], "rm_gold_agreement": rm_summary.get("gold_agreement"),
                       "steps": result["steps"], "selected": result["selected"]})
        policy = folder
    if is_main():
        for name in ("model.safetensors", "value.safetensors"):
            atomic_write_bytes(out / name, (policy / name).read_bytes())
    barrier()
    return {**result, "rounds": p.rounds, "by_round": rounds, "rollouts": per_round.ppo.rollouts * p.rounds,
            "steps": sum(r["steps"] for r in rounds)}


# ---------------------------------------------------------------- evaluation

def pretrain_val_loss(model, sampler, tokens: int) -> float:
    return windows_loss(model, sampler.val_windows(0, tokens))[0]


def overoptimisation(metrics_path: Path, window: int = 5) -> dict:
    """The rollouts' RM score and gold score through training (moving averages over `window` updates):
    where gold peaked, and whether the RM score kept rising after it while gold fell (over-optimisation)."""
    rows = [r for r in read_jsonl_loose(metrics_path) if r.get("event") == "train" and "gold_score" in r]
    if len(rows) < 2 * window:
        return {}

    def smooth(key):
        xs = [r[key] for r in rows]
        return [sum(xs[max(0, i - window + 1):i + 1]) / len(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]

    gold, rm = smooth("gold_score"), smooth("rm_score")
    peak = max(range(len(gold)), key=gold.__getitem__)
    out = {"gold_start": gold[window - 1], "gold_peak": gold[peak], "gold_peak_step": rows[peak]["step"],
           "gold_end": gold[-1], "rm_start": rm[window - 1], "rm_at_gold_peak": rm[peak], "rm_end": rm[-1],
           "kl_at_gold_peak": rows[peak].get("kl")}
    # gold fell clearly below its peak while the RM score held or rose: the policy exploits the RM
    out["detected"] = bool(gold[-1] < gold[peak] - 0.02 and rm[-1] >= rm[peak])
    return out


def versus(policies: list[str], prompts: Prompts, ours: list[dict], max_new_tokens: int, log=print, device="cpu") -> dict:
    """The PPO policy's greedy answers judged against other policies' (InstructGPT's headline: a small PPO
    model against a much larger SFT one), each loaded on `device`. Each brings its own tokenizer."""
    if not policies:
        return {}  # and the world stays unimported
    from ..evals.instruct import evaluate_instructions
    out = {}
    for folder in policies:
        log(f"[ppo] evaluating on {len(prompts)} held-out prompts: PPO against {folder}")
        model = load_model(folder, device)
        figures, theirs = evaluate_instructions(model, Tokenizer.load(find_tokenizer(folder)), prompts.suite, max_new_tokens)
        wins = win_rate(ours, theirs)
        out[str(folder)] = {"params": model.num_params(), "win_rate": wins["win_rate"], "wins": wins,
                            "accuracy": figures["accuracy"], "gold_score": figures["gold_score"],
                            "mean_length": figures["mean_length"]}
    return out


def evaluation_models(run_policy: Path, out: Path, no_ptx: Path | None, rm_dir: Path, device) -> tuple:
    """The evaluation's models on the stage's device: (SFT, PPO, PPO without ptx or None, the reward model)."""
    return (load_model(run_policy, device), load_model(out, device),
            load_model(no_ptx, device) if no_ptx is not None else None, load_reward_model(rm_dir, device))


def run_ppo(cfg, run_policy: Path, rm_dir: Path, out: Path, tok: Tokenizer, log=print) -> dict:
    """The whole stage: PPO-ptx (and, for the comparison, PPO without ptx), then the evaluation. Under torchrun every
    rank runs all of it (the ranks share each Trainer's batches and each evaluation's answers); rank 0 writes."""
    t0 = time.time()
    p = cfg.ppo
    init_distributed(p.train.device)
    device, precision = placement(p.train)  # every model of the stage, trained or not, computes there
    train_prompts, val_prompts, prompts = prompt_sets(cfg)  # read once for every run of the stage
    if p.versus and prompts.suite is None:
        raise GptstackError("config 'ppo.versus' needs the gold labeler, so the world's prompts (ppo.prompts: world)")
    if p.rounds > 1:
        result = train_rounds(cfg, run_policy, rm_dir, out, tok, train_prompts, val_prompts, log)
    else:
        result = train_ppo(cfg, run_policy, rm_dir, out, tok, p.ptx_coef, train_prompts, val_prompts, log)
    no_ptx = None
    if p.baselines and p.ptx_coef > 0:
        log("[ppo] the same run without the ptx term, for the comparison")
        no_ptx = out / "no_ptx"
        train_ppo(cfg, run_policy, rm_dir, no_ptx, tok, 0.0, train_prompts, val_prompts, log)

    sft, ppo, no_ptx_model, rm = evaluation_models(run_policy, out, no_ptx, rm_dir, device)
    key = judged_by(prompts)
    with autocast(device, precision):
        log(f"[ppo] evaluating on {len(prompts)} test prompts: PPO against SFT")
        ours, samples, base, base_samples, wins, nop = against_sft(ppo, no_ptx_model, sft, rm, tok, prompts, p)
        with local_main_first():
            # windows as long as pretraining's (pretrain.seq_len; 0: the policy's whole context)
            sampler = build_sampler(cfg.data, tok, min(cfg.pretrain.seq_len or sft.cfg.n_ctx, sft.cfg.n_ctx), cfg.pretrain.seed)
        tokens = cfg.pretrain.eval_tokens
        loss_sft = pretrain_val_loss(sft, sampler, tokens)
        result |= {"split": "test", "judge": "gold labeler" if prompts.suite is not None else "reward model",
                   "win_rate_vs_sft": wins["win_rate"], "wins": wins, **ours,
                   **{f"sft_{k}": v for k, v in base.items() if k != "n"},
                   "pretrain_val_loss_sft": loss_sft,
                   "pretrain_val_loss_delta": pretrain_val_loss(ppo, sampler, tokens) - loss_sft}
        result["params"] = ppo.num_params()
        result["versus"] = versus(p.versus, prompts, samples, p.max_new_tokens, log, device)
        if nop is not None:
            result["pretrain_val_loss_delta_no_ptx"] = pretrain_val_loss(no_ptx_model, sampler, tokens) - loss_sft
            result["no_ptx"] = nop
        log(f"[ppo] the same figures on {len(val_prompts)} dev prompts (they chose the kept checkpoint)")
        dev, _, dev_base, _, dev_wins, dev_nop = against_sft(ppo, no_ptx_model, sft, rm, tok, val_prompts, p)
        result["dev"] = {"n": len(val_prompts), "win_rate_vs_sft": dev_wins["win_rate"], "wins": dev_wins,
                         **{k: v for k, v in dev.items() if not isinstance(v, dict) and k != "n"},
                         **{f"sft_{k}": v for k, v in dev_base.items() if not isinstance(v, dict) and k != "n"},
                         **({"no_ptx": dev_nop} if dev_nop is not None else {})}
        if p.rbrm and prompts.suite is not None and (rm_dir / "rankings_test.jsonl").is_file():
            rules = load_rules(p, device)
            result |= rbrm_agreement(rules, rm_dir / "rankings_test.jsonl", cfg)
            if (rm_dir / "rankings_val.jsonl").is_file():
                result["dev"] |= rbrm_agreement(rules, rm_dir / "rankings_val.jsonl", cfg)
    result["rollout_curves"] = overoptimisation(out / "metrics.jsonl" if p.rounds == 1 else out / f"round_{p.rounds}" / "metrics.jsonl")
    result["seconds"] = time.time() - t0
    summary = {"ppo": result}
    if is_main():
        atomic_write_text(out / "samples.jsonl", "".join(json.dumps(
            {**{k: s[k] for k in ("family", "system", "prompt", "messages") if k in s}, "sft": b["answer"], "ppo": s["answer"],
             "sft_score": b[key], "ppo_score": s[key]}) + "\n" for s, b in zip(samples, base_samples)))
        atomic_write_json(out / "summary.json", summary)
    barrier()
    return summary


def run(ctx: Context) -> dict:
    return run_ppo(ctx.cfg, ctx.folder("sft"), ctx.folder("rm"), ctx.folder("ppo"), ctx.tokenizer(), ctx.log)


# ---------------------------------------------------------------- report

def plot_ppo(run: Path) -> Path | None:
    """Rollouts through PPO: RM score beside gold score (over-optimisation shows as the two parting), and KL."""
    rows = [r for r in read_jsonl_loose(run / "ppo" / "metrics.jsonl") if r.get("event") == "train" and "rm_score" in r]
    if not rows:
        return None
    fig, (a, b) = plots.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["step"] for r in rows]
    a.plot(steps, [r["rm_score"] for r in rows], label="RM score (normalised)")
    a.set_xlabel("update")
    a.set_ylabel("RM score")
    if "gold_score" in rows[0]:
        g = a.twinx()
        g.plot(steps, [r["gold_score"] for r in rows], color="C1", label="gold score")
        g.set_ylabel("gold score", color="C1")
    a.set_title("rollouts: RM score" + (" and gold score" if "gold_score" in rows[0] else ""))
    a.grid(alpha=0.3)
    a.legend(loc="upper left", fontsize=8)
    b.plot(steps, [r["kl"] for r in rows], color="C2")
    b.set_xlabel("update")
    b.set_ylabel("KL to SFT per answer (nats)")
    b.set_title("KL")
    b.grid(alpha=0.3)
    return plots.save(fig, run / "plots" / "ppo.png")


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def markdown(run: Path, report: dict) -> list[str]:
    r = report["ppo"]
    w = r["wins"]
    gold = "accuracy" in r
    sel = r.get("selected")
    kept = f"; kept update {sel['step']} (best validation {sel['metric']})" if sel else ""
    dev = r.get("dev") or {}
    lines = ["## RLHF (PPO-ptx against the reward model, per-token KL to SFT)", "",
             f"{r['rollouts']} rollouts, {r['steps']} updates{kept}, chosen on {dev.get('n', '')} dev prompts. Figures on "
             f"{r['n']} test prompts (unseen templates, used for no choice), dev beside them; greedy answers; the "
             f"{r.get('judge', 'gold labeler')} judges.", ""]
    if r.get("by_round"):
        lines += [f"{r['rounds']} rounds: before each round after the first, the current policy's answers were ranked "
                  "and the RM retrained on all rankings so far.", "", "| round | rankings | RM gold agreement | updates |",
                  "|---|---|---|---|"]
        lines += [f"| {b['round']} | {b['rankings']} | {b['rm_gold_agreement'] or float('nan'):.3f} | {b['steps']} |"
                  for b in r["by_round"]]
        lines.append("")
    lines.append(f"Win rate against SFT on test: **{r['win_rate_vs_sft']:.3f}** (ties count half; dev "
                 f"{dev.get('win_rate_vs_sft', float('nan')):.3f}).")
    if gold:
        lines[-1] += (f" Where correctness differs ({w['correctness_pairs']} prompts) PPO wins {w['win_rate_correctness']:.3f}; "
                      f"where it is the same ({w['style_pairs']}, style: length, refusal style, over-refusal) "
                      f"{w['win_rate_style']:.3f}.")
    rows = [("accuracy", "accuracy", ".3f"), ("gold score", "gold_score", ".3f"), ("RM score", "rm_score", ".3f"),
            ("mean answer length (chars)", "mean_length", ".1f"), ("refusal rate, disallowed", "refusal_rate_disallowed", ".3f"),
            ("refusal rate, allowed", "refusal_rate_allowed", ".3f"), ("desired refusal style", "refusal_style_desired_rate", ".3f")]
    lines += ["", "| figure | SFT (test) | PPO (test) | SFT (dev) | PPO (dev) |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['sft_' + key]:{fmt}} | {r[key]:{fmt}} | {dev.get('sft_' + key, float('nan')):{fmt}} | "
              f"{dev.get(key, float('nan')):{fmt}} |" for name, key, fmt in rows if key in r]
    lines += [f"| KL to SFT per answer (nats) | 0 | {r['kl']:.2f} | 0 | {dev.get('kl', float('nan')):.2f} |",
              f"| pretraining val loss change | | {r['pretrain_val_loss_delta']:+.3f} (without ptx: "
              f"{r.get('pretrain_val_loss_delta_no_ptx', float('nan')):+.3f}) | | |", ""]
    if "rbrm_gold_agreement" in r:
        cov = r["rbrm_coverage"]
        lines += [f"Rule-based rewards (text only: the request, the answer and the rubric): on the reward model's test "
                  f"rankings they order {r['rbrm_gold_agreement'] or float('nan'):.3f} of {r['rbrm_gold_pairs']:,} pairs as the "
                  f"gold labeler does (dev {dev.get('rbrm_gold_agreement') or float('nan'):.3f}); the rubric's patterns cover "
                  f"{_share(cov['disallowed'])} of disallowed requests as disallowed, {_share(cov['risky'])} of risky-but-allowed "
                  f"ones as allowed, and leave {_share(cov['neither'])} of the rest alone.", ""]
    for folder, v in (r.get("versus") or {}).items():
        w = v["wins"]
        lines += [f"Against `{folder}` ({v['params'] / 1e6:.1f}M parameters, {v['params'] / r['params']:.1f}x PPO's "
                  f"{r['params'] / 1e6:.1f}M): PPO's win rate **{v['win_rate']:.3f}** (correctness pairs "
                  f"{w['win_rate_correctness']:.3f} of {w['correctness_pairs']}, style pairs {w['win_rate_style']:.3f} of "
                  f"{w['style_pairs']}); its accuracy {v['accuracy']:.3f}, gold score {v['gold_score']:.3f}.", ""]
    n = r.get("no_ptx")
    if n:
        acc = f", accuracy {n['accuracy']:.3f}, gold score {n['gold_score']:.3f}" if gold else f", RM score {n['rm_score']:.3f}"
        lines += [f"The same run without the ptx term (γ = 0): win rate {n['win_rate_vs_sft']:.3f}{acc}, KL {n['kl']:.2f} "
                  f"nats, pretraining val loss {r['pretrain_val_loss_delta_no_ptx']:+.3f} (with ptx: "
                  f"{r['pretrain_val_loss_delta']:+.3f}).", ""]
    c = r.get("rollout_curves") or {}
    if c:
        verdict = ("**Over-optimisation:** after the gold score of rollouts peaked, the RM score kept rising while gold fell."
                   if c["detected"] else "No over-optimisation seen: gold did not fall while the RM score rose.")
        lines += [f"Rollouts (moving average of 5 updates): gold score {c['gold_start']:.3f} at the start, peak "
                  f"{c['gold_peak']:.3f} at update {c['gold_peak_step']} (KL {c['kl_at_gold_peak']:.2f} nats), "
                  f"{c['gold_end']:.3f} at the end; RM score {c['rm_start']:.3f} -> {c['rm_at_gold_peak']:.3f} -> "
                  f"{c['rm_end']:.3f}. {verdict}", ""]
    if plot_ppo(run):
        lines += ["![PPO curves](plots/ppo.png)", ""]
    samples = read_jsonl_loose(run / "ppo" / "samples.jsonl")
    changed = [s for s in samples if s["sft"] != s["ppo"]][:6]
    if changed:
        family = "family" in changed[0]
        lines += ["### Before and after (greedy)", "", "| " + "family | " * family + "prompt | SFT | PPO |",
                  "|" + "---|" * (3 + family)]
        for s in changed:
            cell = lambda t: t.replace("|", "\\|").replace("\n", " ")[:90]  # noqa: E731
            prompt = s.get("prompt") or s["messages"][-1]["content"]
            lines.append("| " + f"{s['family']} | " * family + f"{cell(prompt)} | {cell(s['sft'])} ({s['sft_score']:.2f}) | "
                         f"{cell(s['ppo'])} ({s['ppo_score']:.2f}) |")
        lines.append("")
    return lines


def headline(r: dict) -> str:
    dev = r.get("dev") or {}
    line = (f"ppo: test win rate against SFT {r['win_rate_vs_sft']:.3f} by the {r['judge']} (dev "
            f"{dev.get('win_rate_vs_sft', float('nan')):.3f}), KL {r['kl']:.2f} nats")
    if "accuracy" in r:
        line += f", accuracy {r['accuracy']:.3f} (SFT {r['sft_accuracy']:.3f})"
    line += f", pretraining loss {r['pretrain_val_loss_delta']:+.3f}"
    if "pretrain_val_loss_delta_no_ptx" in r:
        line += f" (without ptx {r['pretrain_val_loss_delta_no_ptx']:+.3f})"
    return line


STAGE = Stage("ppo", run, "PPO-ptx against the reward model with a per-token KL to SFT, rule-based rewards",
              config=PPOConfig, depends=("sft", "rm"), report=markdown, headline=headline,
              measured=True)
