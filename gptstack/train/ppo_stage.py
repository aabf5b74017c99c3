"""The ppo stage: PPO-ptx from the SFT policy against the reward model, then the InstructGPT evaluation.

Evaluation on held-out prompts (templates never trained on): the gold labeler's win rate of the PPO
policy's greedy answers against the SFT policy's (ties count half), split into wins that come from
correctness and wins from style; accuracy, gold score, RM score, KL to SFT, refusal rates; and the
pretraining val loss before and after, with and without the ptx term (the same experiment run twice).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..checkpoint import find_tokenizer, load_model, read_weights, save_state_dict
from ..data.loader import build_sampler
from ..errors import GptstackError
from ..evals.instruct import evaluate_instructions
from ..evals.lm import windows_loss
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl_loose
from ..tokenizer import Tokenizer
from ..world.instructions import InstructionSuite
from .ppo import ActorCritic, PPOObjective, evaluate_policy, rm_scores
from .rm import load_reward_model, scalar_flops_per_token
from .trainer import Trainer


def train_ppo(cfg, policy_dir: Path, rm_dir: Path, out: Path, tok: Tokenizer, ptx_coef: float, log=print,
              reference_dir: Path | None = None) -> dict:
    """PPO from `policy_dir` against the RM in `rm_dir` into OUT; OUT/model.safetensors is the policy
    (a plain GPT, for chat and serving), OUT/value.safetensors its value function."""
    p = dataclasses.replace(cfg.ppo, ptx_coef=ptx_coef)
    suite = InstructionSuite(seed=cfg.sft.seed)
    prompts = suite.prompts("train", p.prompts, seed=p.seed + 300)
    val_prompts = suite.prompts("heldout", max(32, p.eval_prompts // 2), seed=p.seed + 400)  # for checkpoint choice
    torch.manual_seed(p.train.seed)
    policy = load_model(policy_dir)
    reference = load_model(reference_dir or policy_dir).requires_grad_(False)
    rm = load_reward_model(rm_dir).requires_grad_(False)
    value = load_reward_model(rm_dir)  # the value function starts as the reward model (InstructGPT)
    model = ActorCritic(policy, value)
    ptx = None
    if p.ptx_coef > 0:
        ptx = build_sampler(cfg.data, tok, p.ptx_seq_len, p.seed)
    rules = None
    if p.rbrm:
        from ..rewards.rbrm import Judge, RuleBasedRewards
        judge = Judge(load_model(p.rbrm_judge), tok) if p.rbrm_judge else None
        rules = RuleBasedRewards.load(p.rbrm, judge)
    updates = p.ppo_epochs * p.minibatches
    steps = p.rollouts * updates
    train_cfg = dataclasses.replace(p.train, steps=steps, batch_size=p.rollout_batch // p.minibatches,
                                    eval_every=p.eval_every_rollouts * updates, select_by=p.select_by,
                                    ckpt_every=min(p.train.ckpt_every // updates * updates or updates, steps))
    fpt = policy.flops_per_token(64) + scalar_flops_per_token(value.gpt, 64)  # the rollouts' generation not counted
    objective = PPOObjective(p, model, reference, rm, tok, prompts, ptx, rules, val_prompts, fpt)
    trainer = Trainer(train_cfg, model, objective, out, metadata={**policy.metadata(), "gptstack.kind": "actor_critic"},
                      desc=f"ppo{'' if p.ptx_coef > 0 else ' (no ptx)'}")
    summary = trainer.fit()
    if not trainer.is_main:
        return {}
    state, _ = read_weights(out / "model.safetensors")  # the kept (best or last) actor-critic
    if any(k.startswith("policy.") for k in state):
        save_state_dict({k[len("value."):]: v for k, v in state.items() if k.startswith("value.")},
                        out / "value.safetensors", {**value.gpt.metadata(), "gptstack.kind": "reward_model"})
        save_state_dict({k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")},
                        out / "model.safetensors", policy.metadata())
    return {"steps": steps, "rollouts": p.rollouts, "selected": summary.get("selected"),
            "train_seconds": summary.get("seconds"), "final_beta": objective.kl.beta}


def pretrain_val_loss(model, sampler, tokens: int) -> float:
    return windows_loss(model, sampler.val_windows(0, tokens))[0]


def win_rate(ours: list[dict], theirs: list[dict]) -> dict:
    """The gold labeler's preference of `ours` over `theirs`, two policies' scored answers to the same prompts
    (evaluate_instructions' samples), ties half; split by where wins come from: pairs whose correctness
    differs, and pairs equally correct (style: length, refusal style, over-refusal)."""
    rows = []
    for a, b in zip(ours, theirs):
        sa, sb = a["gold_score"], b["gold_score"]
        rows.append((1.0 if sa > sb else 0.5 if sa == sb else 0.0, a["correct"] != b["correct"]))
    n = len(rows)
    by_correct = [w for w, differs in rows if differs]
    by_style = [w for w, differs in rows if not differs]
    return {"win_rate": sum(w for w, _ in rows) / n,
            "correctness_pairs": len(by_correct), "win_rate_correctness": sum(by_correct) / max(len(by_correct), 1),
            "style_pairs": len(by_style), "win_rate_style": sum(by_style) / max(len(by_style), 1),
            # each subset's contribution to the overall rate above one half
            "excess_from_correctness": sum(w - 0.5 for w in by_correct) / n,
            "excess_from_style": sum(w - 0.5 for w in by_style) / n}


def train_rounds(cfg, sft_dir: Path, rm_dir: Path, out: Path, tok: Tokenizer, log=print) -> dict:
    """InstructGPT's iteration of steps 2 and 3: PPO for a share of the rollouts; then new rankings of the
    current policy's answers, the RM retrained (from SFT) on all rankings so far, and PPO continued from
    the current policy (the KL stays to SFT). The last round's policy is OUT's model."""
    from ..comparisons import compare
    from .rm import run_rm
    p = cfg.ppo
    if not (rm_dir / "rankings.jsonl").is_file() or not (rm_dir / "rankings_val.jsonl").is_file():
        raise GptstackError(f"{rm_dir}: rounds need the reward model's world rankings (rankings.jsonl and rankings_val.jsonl, "
                            "written by `gptstack rm` without --data): each round's new rankings come from the same labeler")
    per_round = dataclasses.replace(cfg, ppo=dataclasses.replace(p, rollouts=max(1, p.rollouts // p.rounds)))
    suite = InstructionSuite(seed=cfg.sft.seed)
    rankings = [rm_dir / "rankings.jsonl"]
    policy, rm, result, rounds = sft_dir, rm_dir, {}, []
    for k in range(1, p.rounds + 1):
        folder = out / f"round_{k}"
        if k > 1:
            new = folder / "rankings.jsonl"
            if not new.is_file():
                log(f"[ppo] round {k}: ranking the current policy's answers ({cfg.rm.labeler} labeler)")
                compare([str(policy)], tok, suite.prompts("train", cfg.rm.prompts // p.rounds, seed=cfg.rm.seed + 100 + k),
                        cfg.rm.k, cfg.rm.labeler, new, cfg.rm.temperatures, cfg.rm.agreement, cfg.rm.tie_threshold,
                        cfg.rm.max_new_tokens, cfg.rm.seed + k)
            rankings.append(new)
            combined = folder / "rankings_all.jsonl"
            atomic_write_text(combined, "".join(r.read_text(encoding="utf-8") for r in rankings))
            rm = folder / "rm"
            if not (rm / "summary.json").is_file():
                log(f"[ppo] round {k}: retraining the reward model on {len(rankings)} rounds of rankings")
                run_rm(cfg, sft_dir, rm, tok, combined, rm_dir / "rankings_val.jsonl", log)
        log(f"[ppo] round {k} of {p.rounds}")
        result = train_ppo(per_round, policy, rm, folder, tok, p.ptx_coef, log, reference_dir=sft_dir)
        rm_summary = json.loads((rm / "summary.json").read_text())["rm"]
        rounds.append({"round": k, "rankings": rm_summary["rankings"], "rm_gold_agreement": rm_summary.get("gold_agreement"),
                       "steps": result["steps"], "selected": result["selected"]})
        policy = folder
    for name in ("model.safetensors", "value.safetensors"):
        atomic_write_bytes(out / name, (policy / name).read_bytes())
    return {**result, "rounds": p.rounds, "by_round": rounds, "rollouts": per_round.ppo.rollouts * p.rounds,
            "steps": sum(r["steps"] for r in rounds)}


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


def versus(policies: list[str], prompts: list, ours: list[dict], max_new_tokens: int, log=print) -> dict:
    """The PPO policy's greedy answers judged against other policies' (InstructGPT's headline: a small PPO
    model against a much larger SFT one). Each brings its own tokenizer."""
    out = {}
    for folder in policies:
        log(f"[ppo] evaluating on {len(prompts)} held-out prompts: PPO against {folder}")
        model = load_model(folder, "auto")
        figures, theirs = evaluate_instructions(model, Tokenizer.load(find_tokenizer(folder)), prompts, max_new_tokens)
        wins = win_rate(ours, theirs)
        out[str(folder)] = {"params": model.num_params(), "win_rate": wins["win_rate"], "wins": wins,
                            "accuracy": figures["accuracy"], "gold_score": figures["gold_score"],
                            "mean_length": figures["mean_length"]}
    return out


def run_ppo(cfg, run_policy: Path, rm_dir: Path, out: Path, tok: Tokenizer, log=print) -> dict:
    """The whole stage: PPO-ptx (and, for the comparison, PPO without ptx), then the evaluation."""
    t0 = time.time()
    p = cfg.ppo
    if p.rounds > 1:
        result = train_rounds(cfg, run_policy, rm_dir, out, tok, log)
    else:
        result = train_ppo(cfg, run_policy, rm_dir, out, tok, p.ptx_coef, log)
    if not result:
        return {}
    no_ptx = None
    if p.baselines and p.ptx_coef > 0:
        log("[ppo] the same run without the ptx term, for the comparison")
        no_ptx = out / "no_ptx"
        train_ppo(cfg, run_policy, rm_dir, no_ptx, tok, 0.0, log)

    suite = InstructionSuite(seed=cfg.sft.seed)
    prompts = suite.prompts("heldout", p.eval_prompts, seed=cfg.sft.seed + 1)  # the SFT stage's held-out prompts
    sft, ppo = load_model(run_policy, "auto"), load_model(out, "auto")
    rm = load_reward_model(rm_dir, "auto")
    log(f"[ppo] evaluating on {len(prompts)} held-out prompts: PPO against SFT")
    ours, samples = evaluate_policy(ppo, sft, rm, tok, prompts, p)
    base, base_samples = evaluate_instructions(sft, tok, prompts, p.max_new_tokens)
    wins = win_rate(samples, base_samples)
    base_rm = sum(rm_scores(rm, tok, prompts, [s["answer"] for s in base_samples])) / len(prompts)
    sampler = build_sampler(cfg.data, tok, cfg.model.n_ctx, cfg.pretrain.seed)
    tokens = cfg.pretrain.eval_tokens
    loss_sft = pretrain_val_loss(sft, sampler, tokens)
    result |= {"win_rate_vs_sft": wins["win_rate"], "wins": wins, **{k: v for k, v in ours.items()},
               "sft_accuracy": base["accuracy"], "sft_gold_score": base["gold_score"], "sft_rm_score": base_rm,
               "sft_mean_length": base["mean_length"], "sft_refusal_rate_disallowed": base["refusal_rate_disallowed"],
               "sft_refusal_rate_allowed": base["refusal_rate_allowed"],
               "sft_refusal_style_desired_rate": base["refusal_style_desired_rate"], "sft_by_family": base["by_family"],
               "pretrain_val_loss_sft": loss_sft,
               "pretrain_val_loss_delta": pretrain_val_loss(ppo, sampler, tokens) - loss_sft}
    result["params"] = ppo.num_params()
    result["versus"] = versus(p.versus, prompts, samples, p.max_new_tokens, log)
    if no_ptx is not None:
        no_ptx_model = load_model(no_ptx, "auto")
        result["pretrain_val_loss_delta_no_ptx"] = pretrain_val_loss(no_ptx_model, sampler, tokens) - loss_sft
        nop, nop_samples = evaluate_policy(no_ptx_model, sft, rm, tok, prompts, p)
        nop_wins = win_rate(nop_samples, base_samples)
        result["no_ptx"] = {**{k: v for k, v in nop.items() if not isinstance(v, dict)},
                            "win_rate_vs_sft": nop_wins["win_rate"], "wins": nop_wins}
    atomic_write_text(out / "samples.jsonl", "".join(
        json.dumps({"family": s["family"], "system": s["system"], "prompt": s["prompt"], "sft": b["answer"],
                    "ppo": s["answer"], "sft_gold": b["gold_score"], "ppo_gold": s["gold_score"]}) + "\n"
        for s, b in zip(samples, base_samples)))
    result["rollout_curves"] = overoptimisation(out / "metrics.jsonl" if p.rounds == 1 else out / f"round_{p.rounds}" / "metrics.jsonl")
    result["seconds"] = time.time() - t0
    summary = {"ppo": result}
    atomic_write_json(out / "summary.json", summary)
    return summary
