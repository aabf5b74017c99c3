"""The dpo stage: the rankings the reward model trains on -> DPO from the SFT model (train/dpo.py: sigmoid, IPO or
listwise Plackett-Luce loss, the frozen SFT model or its precomputed log-probabilities as the reference) -> Trainer
-> evaluation -> summary.

The evaluation is PPO's (evals/policy.py), on the same dev and test prompts: the DPO policy's greedy answers
against SFT's (win rate split by correctness and style, accuracy, gold score, the reward model's score) and its KL to
SFT on sampled answers; and the implicit reward β·log π/π_ref as a ranker of held-out answers, against the gold
ranking beside the reward model's agreement. The report section sets DPO beside PPO-ptx from the same run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .. import plots
from ..checkpoint import load_model
from ..config import at_least
from ..data.records import read_rankings
from ..errors import GptstackError
from ..evals.policy import versus_sft, world_prompts
from ..evals.rm import pair_agreement
from ..io import atomic_write_json, atomic_write_text, read_jsonl_loose
from ..tokenizer import Tokenizer
from ..train.distributed import barrier, init_distributed, is_main
from ..train.dpo import DPOObjective, LossType, Preferences, drop_dropout, ranking_logprobs
from ..train.rm import check_rankings_fit, comparisons, load_reward_model
from ..train.trainer import TrainConfig, Trainer, autocast, placement
from .base import Context, Stage
from .rm import _world_rows, judge_rows


def _dpo_train() -> TrainConfig:
    # batch: rankings (each K answers) per step, as the reward model's
    return TrainConfig(steps=0, batch_size=16, lr=1e-4, schedule="cosine", min_lr_ratio=0.1, warmup_steps=5,
                       weight_decay=0.0, log_every=5, eval_every=0, ckpt_every=1000, keep_checkpoints=1)


@dataclass
class DPOConfig:
    loss: LossType = "sigmoid"  # sigmoid (DPO) | ipo | listwise (Plackett-Luce over the whole ranking)
    beta: float = 0.1  # β: the implicit reward is β·log π/π_ref; larger stays closer to the reference
    label_smoothing: float = 0.0  # sigmoid only: the share of labels taken as flipped (conservative DPO)
    reference: Literal["model", "precomputed"] = "model"  # model: the frozen SFT model beside the policy; precomputed: its log-probs computed once, no second model in memory
    epochs: float = 1.0  # over the rankings, when train.steps is 0
    dev_prompts: int = 100  # world: dev prompts (PPO's: ppo.seed + 400): the figures that choose settings
    eval_prompts: int = 200  # world: test prompts (the SFT and PPO stages' test prompts) for the reported figures
    max_new_tokens: int = 48  # the evaluation's answers, as PPO's (ppo.max_new_tokens)
    no_end_penalty: float = 1.0  # the RM score of an answer without <|end|>, as PPO scores it (ppo.no_end_penalty)
    seed: int = 0  # the evaluation's sampled answers (KL) and dev prompts, as PPO's (ppo.seed)
    train: TrainConfig = field(default_factory=_dpo_train)

    def problems(self):
        yield from at_least(self, 1, "dev_prompts", "eval_prompts", "max_new_tokens")
        yield from at_least(self, 0, "epochs", "no_end_penalty")
        if not 0 < self.beta < float("inf"):
            yield "beta", f"must be a positive number, got {self.beta}"
        if not 0 <= self.label_smoothing < 0.5:
            yield "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}"
        if self.label_smoothing and self.loss != "sigmoid":
            yield "label_smoothing", f"applies to the sigmoid loss only (dpo.loss is {self.loss})"


def implicit_rewards(policy, reference, data: Preferences, beta: float) -> list[list[float]]:
    """β·(log π − log π_ref) of every answer of every ranking: DPO's implicit reward, a ranker like the RM."""
    return [[beta * (a - b) for a, b in zip(pa, pb)]
            for pa, pb in zip(ranking_logprobs(policy, data), data.reference or ranking_logprobs(reference, data))]


def labeler_accuracy(rewards: list[list[float]], data: Preferences) -> float:
    """The share of the labeler's non-tied pairs that the rewards order the same way (the RM's test_accuracy)."""
    got = [r[w] > r[l] for r, (_, ranks) in zip(rewards, data.examples) for w, l in comparisons(ranks)]
    return sum(got) / max(len(got), 1)


def gold_agreement(rewards: list[list[float]], data: Preferences, suite) -> dict:
    """On world rankings: the implicit reward's agreement with the gold ranking, overall and by subset (the pair's
    answers differ in correctness, or not), as the RM's gold_agreement is measured."""
    _, correct, _ = judge_rows(data.records, suite)
    got = pair_agreement(rewards, [r["gold_ranks"] for r in data.records], [r["family"] for r in data.records], correct)
    return {"implicit_reward_gold_agreement": got["agreement"], "gold_pairs": got["pairs"],
            "implicit_reward_gold_agreement_by_subset": {k: v["agreement"] for k, v in got["by_subset"].items()}}


def against_sft(dpo, sft, rm, tok, prompts, d) -> tuple[dict, list[dict], list[dict]]:
    """The DPO policy against SFT on `prompts`, judged as PPO is: (figures with SFT's as sft_*, DPO's samples, SFT's)."""
    ours, samples, base, base_samples, wins = versus_sft(dpo, sft, rm, tok, prompts, d)
    flat = lambda figures: {k: v for k, v in figures.items() if not isinstance(v, dict) and k != "n"}  # noqa: E731
    figures = {"n": len(prompts), **flat(ours), **{f"sft_{k}": v for k, v in flat(base).items()}}
    if wins is not None:
        figures |= {"win_rate_vs_sft": wins["win_rate"], "wins": wins}
    return figures, samples, base_samples


def run_dpo(cfg, policy_dir: Path, out: Path, tok: Tokenizer, data: Path, val_data: Path | None = None,
            test_data: Path | None = None, rm_dir: Path | None = None, log=print) -> dict:
    """DPO from `policy_dir` (the SFT model, also the reference) on the rankings in `data`; `val_data` (default: every
    10th ranking of `data`) gives the held-out figures, `test_data` the reported ones. With the world's rankings the
    policy is also judged on the world's dev prompts, and on its test prompts when `test_data` is given; `rm_dir`
    adds the reward model's score of the answers. Returns {"dpo": ...}."""
    d = cfg.dpo
    t0 = time.time()
    init_distributed(d.train.device)
    device, precision = placement(d.train)
    records = read_rankings(data)
    check_rankings_fit(records, data)
    if val_data is not None:
        val_records = read_rankings(val_data)
    else:  # every 10th ranking held out
        records, val_records = [x for i, x in enumerate(records) if i % 10], records[::10]
    test_records = read_rankings(test_data) if test_data is not None else None
    torch.manual_seed(d.train.seed)
    policy = load_model(policy_dir)
    drop_dropout(policy)
    n_ctx = policy.cfg.n_ctx
    train, val = Preferences(records, tok, n_ctx), Preferences(val_records, tok, n_ctx)
    reference = load_model(policy_dir, device)
    drop_dropout(reference)
    if d.reference == "precomputed":
        log(f"[dpo] the reference's log-probabilities of {sum(len(a) for a, _ in train.examples + val.examples):,} answers")
        with autocast(device, precision):
            train.reference, val.reference = ranking_logprobs(reference, train), ranking_logprobs(reference, val)
        reference = None  # no second model during training
    steps = d.train.steps or max(1, math.ceil(d.epochs * len(train) / d.train.batch_size))
    train_cfg = dataclasses.replace(d.train, steps=steps, ckpt_every=min(d.train.ckpt_every, steps))
    mean_len = sum(len(s) for answers, _ in train.examples for s, _ in answers) / sum(len(a) for a, _ in train.examples)
    # training FLOPs: the policy's forward and backward (6N per token), and the reference's forward (2N) beside it
    fpt = policy.flops_per_token(int(mean_len)) * (4 / 3 if reference is not None else 1)
    objective = DPOObjective(train, val, d.beta, d.loss, d.label_smoothing, train_cfg.seed, reference, fpt)
    trainer = Trainer(train_cfg, policy, objective, out, metadata=policy.metadata(), desc=f"dpo ({d.loss})")
    summary = trainer.fit()
    final = summary.get("final") or {}
    result = {"loss_type": d.loss, "beta": d.beta, "label_smoothing": d.label_smoothing, "reference": d.reference,
              "rankings": len(train), "pairs": train.pairs, "val_rankings": len(val), "val_pairs": val.pairs, "steps": steps,
              **final, "train_seconds": summary.get("seconds"),
              "tokens_per_sec": summary.get("tokens_per_sec"), "mfu": summary.get("mfu"),
              "train_peak_rss_mb": summary.get("peak_rss_mb")}
    del objective, reference, policy, trainer

    # the evaluation, on every rank, with the published weights on the stage's device
    dpo, sft = load_model(out, device), load_model(policy_dir, device)
    rm = load_reward_model(rm_dir, device) if rm_dir is not None and (Path(rm_dir) / "model.safetensors").is_file() else None
    world = _world_rows(records) and _world_rows(val_records)
    test = Preferences(test_records, tok, n_ctx) if test_records is not None else None
    samples = base_samples = None
    with autocast(device, precision):
        val_rewards = implicit_rewards(dpo, sft, val, d.beta)
        result["dev"] = {"accuracy_vs_labeler": labeler_accuracy(val_rewards, val)}
        if test is not None:
            test_rewards = implicit_rewards(dpo, sft, test, d.beta)
            result |= {"split": "test", "test_rankings": len(test), "test_pairs": test.pairs,
                       "test_accuracy_vs_labeler": labeler_accuracy(test_rewards, test)}
        if world:
            from ..world.instructions import InstructionSuite
            suite = InstructionSuite(seed=cfg.sft.seed)
            result["dev"] |= gold_agreement(val_rewards, val, suite)
            dev_prompts = world_prompts(suite, "dev", d.dev_prompts, d.seed + 400)  # PPO's dev prompts
            log(f"[dpo] evaluating on {len(dev_prompts)} dev prompts: DPO against SFT")
            result["dev"] |= against_sft(dpo, sft, rm, tok, dev_prompts, d)[0]
            if test is not None and _world_rows(test_records):
                result |= gold_agreement(test_rewards, test, suite)
                prompts = world_prompts(suite, "test", d.eval_prompts, cfg.sft.seed + 1)  # the SFT and PPO stages' test prompts
                log(f"[dpo] evaluating on {len(prompts)} test prompts: DPO against SFT")
                figures, samples, base_samples = against_sft(dpo, sft, rm, tok, prompts, d)
                result |= {**figures, "judge": "gold labeler"}
    result["params"] = dpo.num_params()
    result["seconds"] = time.time() - t0
    summary = {"dpo": result}
    if is_main():
        if samples is not None:
            atomic_write_text(out / "samples.jsonl", "".join(json.dumps(
                {**{k: s[k] for k in ("family", "system", "prompt") if k in s}, "sft": b["answer"], "dpo": s["answer"],
                 "sft_score": b["gold_score"], "dpo_score": s["gold_score"]}) + "\n" for s, b in zip(samples, base_samples)))
        atomic_write_json(out / "summary.json", summary)
    barrier()
    return summary


def run(ctx: Context) -> dict:
    rm = ctx.folder("rm")
    files = [rm / f"{name}.jsonl" for name in ("rankings", "rankings_val", "rankings_test")]
    if not files[0].is_file():
        raise GptstackError(f"{files[0]}: no rankings; the dpo stage trains on the rm stage's rankings (run it first)")
    return run_dpo(ctx.cfg, ctx.folder("sft"), ctx.folder("dpo"), ctx.tokenizer(), files[0],
                   *(f if f.is_file() else None for f in files[1:]), rm_dir=rm, log=ctx.log)


# ---------------------------------------------------------------- report

def plot_dpo(run: Path) -> Path | None:
    """Training: the loss, and the implicit rewards of the preferred and the other answers with their margin."""
    rows = [r for r in read_jsonl_loose(run / "dpo" / "metrics.jsonl") if r.get("event") == "train"]
    if not rows:
        return None
    fig, (a, b) = plots.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["step"] for r in rows]
    a.plot(steps, [r["loss"] for r in rows])
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_title("DPO loss (training batches)")
    a.grid(alpha=0.3)
    for key, label in (("chosen_reward", "preferred answer"), ("rejected_reward", "other answer"), ("margin", "margin")):
        b.plot(steps, [r[key] for r in rows], label=label)
    b.set_xlabel("step")
    b.set_ylabel("implicit reward β·log π/π_ref")
    b.set_title("implicit rewards of non-tied pairs")
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    return plots.save(fig, run / "plots" / "dpo.png")


def _cell(section: dict | None, key: str, fmt: str) -> str:
    value = (section or {}).get(key)
    return "n/a" if value is None else f"{value:{fmt}}"


def markdown(run: Path, report: dict) -> list[str]:
    r = report["dpo"]
    ppo, rm = report.get("ppo"), report.get("rm") or {}
    smoothing = f", label smoothing {r['label_smoothing']}" if r["label_smoothing"] else ""
    lines = ["## DPO on the same rankings, beside PPO-ptx", "",
             f"{r['loss_type']} loss, β = {r['beta']}{smoothing}, reference: {r['reference']}; {r['rankings']:,} rankings "
             f"({r['pairs']:,} non-tied pairs), {r['steps']} steps from the SFT model. Validation rankings: loss "
             f"{_cell(r, 'val_loss', '.3f')}, implicit-reward pair accuracy {_cell(r, 'val_accuracy', '.3f')}, margin "
             f"{_cell(r, 'val_margin', '.3f')}.", ""]
    if "win_rate_vs_sft" in r:
        dev, pdev = r.get("dev") or {}, (ppo or {}).get("dev")
        lines += [f"Both policies start from the same SFT model; PPO-ptx learns from a reward model trained on the same "
                  f"rankings, DPO from the rankings directly. Greedy answers to the same {r['n']} test prompts (unseen "
                  "templates, used for no choice), judged by the gold labeler; dev beside them (dev chose DPO's settings). "
                  "KL to SFT per answer on temperature-1 samples.", "",
                  "| figure | SFT (test) | DPO (test) | PPO-ptx (test) | DPO (dev) | PPO-ptx (dev) |", "|---|---|---|---|---|---|"]
        rows = [("win rate against SFT", "win_rate_vs_sft", ".3f"), ("accuracy", "accuracy", ".3f"),
                ("gold score", "gold_score", ".3f"), ("RM score", "rm_score", ".3f"), ("KL to SFT (nats)", "kl", ".2f"),
                ("mean answer length (chars)", "mean_length", ".1f")]
        for name, key, fmt in rows:
            sft = _cell(r, "sft_" + key, fmt) if key not in ("win_rate_vs_sft", "kl") else "0.500" if key == "win_rate_vs_sft" else "0"
            lines.append(f"| {name} | {sft} | **{_cell(r, key, fmt)}** | {_cell(ppo, key, fmt)} | {_cell(dev, key, fmt)} | "
                         f"{_cell(pdev, key, fmt)} |")
        for name, key in (("win rate, correctness differs", "win_rate_correctness"), ("win rate, style", "win_rate_style")):
            lines.append(f"| {name} | | {_cell(r['wins'], key, '.3f')} ({r['wins']['correctness_pairs' if 'correct' in key else 'style_pairs']}) "
                         f"| {_cell((ppo or {}).get('wins'), key, '.3f')} | {_cell(dev.get('wins'), key, '.3f')} | "
                         f"{_cell((pdev or {}).get('wins'), key, '.3f')} |")
        lines += [f"| training time (s) | | {_cell(r, 'train_seconds', '.0f')} | {_cell(ppo, 'train_seconds', '.0f')} | | |",
                  f"| stage time (s) | | {_cell(r, 'seconds', '.0f')} | {_cell(ppo, 'seconds', '.0f')} | | |",
                  f"| peak memory (MB) | | {_cell(r, 'peak_rss_mb', ',.0f')} | {_cell(ppo, 'peak_rss_mb', ',.0f')} | | |", "",
                  "Stage times include each stage's evaluation, and PPO-ptx's also its γ = 0 baseline run; all times are "
                  "wall-clock on the machine each stage ran on.", ""]
    if "implicit_reward_gold_agreement" in r:
        sub, rsub = r["implicit_reward_gold_agreement_by_subset"], rm.get("by_subset") or {}
        lines += [f"DPO's implicit reward β·log π/π_ref as a ranker of the held-out test answers (the RM's test rankings, "
                  f"{r['gold_pairs']:,} non-tied gold pairs): agreement with the gold ranking **{r['implicit_reward_gold_agreement']:.3f}**"
                  f" (the reward model: {_cell(rm, 'gold_agreement', '.3f')}); where correctness differs "
                  f"{_cell(sub, 'correctness_differs', '.3f')} (RM {_cell(rsub.get('correctness_differs'), 'gold_agreement', '.3f')}), "
                  f"where it is the same {_cell(sub, 'correctness_same', '.3f')} (RM "
                  f"{_cell(rsub.get('correctness_same'), 'gold_agreement', '.3f')}). Against the labeler's own pairs: "
                  f"{_cell(r, 'test_accuracy_vs_labeler', '.3f')} (RM {_cell(rm, 'test_accuracy', '.3f')}); on dev "
                  f"{_cell(r['dev'], 'implicit_reward_gold_agreement', '.3f')} against gold.", ""]
    if plot_dpo(run):
        lines += ["![DPO training](plots/dpo.png)", ""]
    return lines


def headline(r: dict) -> str:
    if "win_rate_vs_sft" in r:
        return (f"dpo: test win rate against SFT {r['win_rate_vs_sft']:.3f} (dev {r['dev'].get('win_rate_vs_sft', float('nan')):.3f}), "
                f"KL {r['kl']:.2f} nats, accuracy {r['accuracy']:.3f} (SFT {r['sft_accuracy']:.3f}); implicit-reward gold "
                f"agreement {r['implicit_reward_gold_agreement']:.3f}")
    return f"dpo: validation implicit-reward pair accuracy {r.get('val_accuracy', float('nan')):.3f} on {r['val_pairs']:,} pairs"


# opt-in (as finetune): its training and evaluation would take `make demo` past its 20-minute budget on 2 cores
STAGE = Stage("dpo", run, "DPO from SFT on the reward model's rankings (sigmoid, IPO or listwise), judged beside PPO-ptx",
              config=DPOConfig, depends=("sft", "rm"), report=markdown, headline=headline, default=False, measured=True)

