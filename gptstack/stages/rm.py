"""The rm stage (InstructGPT step 2): rankings -> all C(K,2) pairs of a prompt in one batch element -> Trainer
-> normalisation -> held-out agreement -> summary.

Rankings come from your files (`gptstack rm --data`), or are made here: the SFT policy's K answers to the
world's prompts, ranked by the configured labeler. With the world's rankings the report adds the RM's
agreement with the gold ranking beside two baselines (shorter answer first, the SFT log-likelihood).
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
from ..checkpoint import file_sha256, load_model, model_path, save_state_dict
from ..config import at_least
from ..data.records import read_rankings
from ..evals.rm import answer_loglik, pair_agreement
from ..io import atomic_write_json, atomic_write_text, read_json, read_jsonl_loose
from ..tokenizer import Tokenizer
from ..train.distributed import barrier, broadcast_from_main, init_distributed, is_main
from ..train.rm import (Rankings, RewardModel, RMObjective, check_rankings_fit, comparisons, from_policy,
                        load_reward_model, normalisation, reward_metadata, scalar_flops_per_token, score_rankings)
from ..train.trainer import TrainConfig, Trainer, autocast, placement
from .base import Context, Stage


def _rm_train() -> TrainConfig:
    # batch: rankings (each K answers) per step; InstructGPT trains its RM for one epoch
    return TrainConfig(steps=0, batch_size=16, lr=1e-4, schedule="cosine", min_lr_ratio=0.1, warmup_steps=10,
                       weight_decay=0.0, log_every=10, eval_every=0, ckpt_every=1000, keep_checkpoints=1)


@dataclass
class RMConfig:
    prompts: int = 2000  # world: training prompts to compare (train templates)
    val_prompts: int = 300  # world: dev prompts (unseen templates): the RM's validation
    test_prompts: int = 300  # world: test prompts (unseen templates, not dev's): the reported agreement
    k: int = 4  # answers per prompt
    temperatures: list[float] = field(default_factory=lambda: [1.0])  # each answer cycles through these
    labeler: Literal["gold", "noisy", "human"] = "noisy"  # the world's labelers; human: `compare` writes a to-do file
    agreement: float = 0.73  # the noisy labeler's pairwise agreement with gold (InstructGPT: ~73% between labelers)
    tie_threshold: float = 0.0  # gold scores this close tie
    max_new_tokens: int = 64
    epochs: float = 1.0  # when train.steps is 0
    seed: int = 0
    train: TrainConfig = field(default_factory=_rm_train)

    def problems(self):
        yield from at_least(self, 1, "prompts", "val_prompts", "test_prompts", "max_new_tokens")
        yield from at_least(self, 2, "k")  # a ranking compares answers
        yield from at_least(self, 0, "epochs", "tie_threshold")
        if not 0.5 <= self.agreement <= 1:
            yield "agreement", f"must be in [0.5, 1] (0.5: a coin), got {self.agreement}"
        if not self.temperatures or any(not t >= 0 for t in self.temperatures):
            yield "temperatures", f"must be one or more temperatures >= 0, got {self.temperatures}"


RANKING_SETS = {"rankings": "train", "rankings_val": "dev", "rankings_test": "test"}  # file -> the world's split


def world_rankings(cfg, policy: Path, out: Path, tok: Tokenizer, log=print) -> tuple[list[Path], dict]:
    """Rankings of the policy's answers to the world's train prompts, dev prompts (validation) and test
    prompts (the reported figures), by the configured labeler; made once, reused on a rerun. Under torchrun the
    ranks share the sampling and rank 0 writes. Returns the three files and their summaries."""
    from ..comparisons import compare
    from ..world.instructions import InstructionSuite
    r = cfg.rm
    suite = InstructionSuite(seed=cfg.sft.seed)
    counts = {"train": (r.prompts, r.seed + 100), "dev": (r.val_prompts, r.seed + 200), "test": (r.test_prompts, r.seed + 300)}
    device, precision = placement(r.train)
    made = {}
    for name, split in RANKING_SETS.items():
        n, seed = counts[split]
        path = out / f"{name}.jsonl"
        meta = out / f"{name}.summary.json"
        if not broadcast_from_main(meta.is_file()):  # rank 0's view, so every rank takes the same branch
            log(f"[rm] sampling {r.k} answers to {n} {split} prompts and ranking them ({r.labeler} labeler)")
            with autocast(device, precision):
                summary = compare([str(policy)], tok, suite.prompts(split, n, seed=seed), r.k, r.labeler, path,
                                  r.temperatures, r.agreement, r.tie_threshold, r.max_new_tokens, seed, str(device))
            if is_main():
                atomic_write_json(meta, summary)
            barrier()
        made[name] = read_json(meta)
    return [out / f"{name}.jsonl" for name in RANKING_SETS], made


def judge_rows(rows: list[dict], suite) -> tuple[list, list[list[bool]], list[list[float]]]:
    """Each ranking's suite Prompt, and every answer's gold correctness and gold score."""
    from ..world.instructions import gold_score
    prompts = [suite.lookup(r["prompt"], r.get("system")) for r in rows]
    scores = [[gold_score(p, y) for y in r["responses"]] for p, r in zip(prompts, rows)]
    return prompts, [[s.correct for s in row] for row in scores], [[s.total for s in row] for row in scores]


def run_rm(cfg, policy: Path, out: Path, tok: Tokenizer, data: Path | None = None, val_data: Path | None = None,
           test_data: Path | None = None, log=print) -> dict:
    """Train the reward model from `policy` (the SFT model) on rankings: the given files, or, with none,
    the world's (sampled from the policy and ranked by the configured labeler). Validation rankings are
    watched during training; test rankings give the reported figures. Returns {"rm": ...}."""
    r = cfg.rm
    t0 = time.time()
    init_distributed(r.train.device)
    device, precision = placement(r.train)  # every model of the stage computes there
    made = {}
    if data is None:
        if is_main():
            out.mkdir(parents=True, exist_ok=True)
        (data, val_data, test_data), made = world_rankings(cfg, policy, out, tok, log)
    records = read_rankings(data)
    check_rankings_fit(records, data)
    if val_data is not None:
        val_records = read_rankings(val_data)
    else:  # every 10th ranking held out
        records, val_records = [x for i, x in enumerate(records) if i % 10], records[::10]
    torch.manual_seed(r.train.seed)
    model = from_policy(policy)
    model.train()
    n_ctx = model.gpt.cfg.n_ctx
    train, val = Rankings(records, tok, n_ctx), Rankings(val_records, tok, n_ctx)
    test = Rankings(read_rankings(test_data), tok, n_ctx) if test_data is not None else None
    steps = r.train.steps or max(1, math.ceil(r.epochs * len(train) / r.train.batch_size))
    train_cfg = dataclasses.replace(r.train, steps=steps, ckpt_every=min(r.train.ckpt_every, steps))
    mean_len = sum(len(s) for seqs, _ in train.examples for s in seqs) / sum(len(seqs) for seqs, _ in train.examples)
    objective = RMObjective(train, val, train_cfg.seed, scalar_flops_per_token(model.gpt, int(mean_len)))
    metadata = reward_metadata(model.gpt)
    if r.train.lora_rank:  # the base its adapter belongs to: PPO starts its value function from it on that base
        metadata["gptstack.lora_base"] = file_sha256(model_path(policy))
    trainer = Trainer(train_cfg, model, objective, out, metadata=metadata, desc="rm")
    summary = trainer.fit()  # rank 0's, on every rank, once the weights are published
    # every rank scores with the published weights, whole (as trained under DDP or FSDP), on the stage's device
    model = load_reward_model(out, device)
    with autocast(device, precision):
        gain, bias = normalisation(model, train)  # the SFT policy's own answers score mean 0, std 1
        model.gain.fill_(gain)
        model.bias.fill_(bias)
        result = {"rankings": len(train), "pairs": train.pairs, "val_rankings": len(val), "val_pairs": val.pairs,
                  "steps": steps, "gain": gain, "bias": bias, "val_accuracy": (summary.get("final") or {}).get("val_accuracy"),
                  "tokens_per_sec": summary.get("tokens_per_sec"), "mfu": summary.get("mfu"),
                  "train_peak_rss_mb": summary.get("peak_rss_mb")}
        if test is not None:
            result |= {"split": "test", "test_rankings": len(test), "test_pairs": test.pairs,
                       "test_accuracy": labeler_accuracy(model, test)}
        if made:
            c = made["rankings"]
            result |= {"labeler": c["labeler"], "labeler_agreement": c["labeler_agreement"], "tie_fraction": c["tie_fraction"],
                       "k": c["k"], "samplers": c["samplers"]}
        if test is not None and _world_rows(test.records) and _world_rows(val.records):  # the world's rankings
            loglik_model = load_model(policy, device)
            log(f"[rm] agreement with the gold ranking: RM, shorter-first and log-likelihood on {len(val)} dev and "
                f"{len(test)} test prompts")
            result |= gold_report(model, loglik_model, tok, test, cfg, out / "test_scores.jsonl" if is_main() else None)
            result["dev"] = {"accuracy": result["val_accuracy"], **gold_report(model, loglik_model, tok, val, cfg)}
    result["seconds"] = time.time() - t0
    summary = {"rm": result}
    barrier()  # every rank has read the published weights before rank 0 replaces them with the normalised ones
    if is_main():
        save_state_dict(model.state_dict(), out / "model.safetensors", reward_metadata(model.gpt))
        atomic_write_json(out / "summary.json", summary)
    barrier()
    return summary


def labeler_accuracy(model: RewardModel, data: Rankings) -> float:
    """The share of the labeler's non-tied pairs that the RM orders the same way."""
    got = [r[w] > r[l] for r, (_, ranks) in zip(score_rankings(model, data), data.examples) for w, l in comparisons(ranks)]
    return sum(got) / max(len(got), 1)


def _world_rows(records: list[dict]) -> bool:
    return bool(records) and all("gold_ranks" in x and "family" in x for x in records)


def gold_report(model: RewardModel, policy, tok: Tokenizer, data: Rankings, cfg, scores_path: Path | None = None) -> dict:
    """On world rankings: the RM, the shorter-answer-first ranker and the policy's log-likelihood, each against
    the gold ranking; with `scores_path`, every answer's reward beside its gold score (for the scatter plot)."""
    from ..world.instructions import InstructionSuite
    rows = data.records
    suite = InstructionSuite(seed=cfg.sft.seed)
    _, correct, gold_scores = judge_rows(rows, suite)
    gold_ranks = [row["gold_ranks"] for row in rows]
    families = [row["family"] for row in rows]
    rewards = score_rankings(model, data)
    lengths = [[-float(len(y)) for y in row["responses"]] for row in rows]
    loglik = answer_loglik(policy, tok, rows)
    rm_, short, ll = (pair_agreement(x, gold_ranks, families, correct) for x in (rewards, lengths, loglik))
    if scores_path is not None:
        atomic_write_text(scores_path, "".join(
            json.dumps({"family": f, "reward": rw, "gold_score": g}) + "\n"
            for f, rr, gg in zip(families, rewards, gold_scores) for rw, g in zip(rr, gg)))
    return {"gold_agreement": rm_["agreement"], "gold_pairs": rm_["pairs"],
            "baseline_length_agreement": short["agreement"], "baseline_loglik_agreement": ll["agreement"],
            "by_family": {f: {"gold_agreement": rm_["by_family"][f]["agreement"], "pairs": rm_["by_family"][f]["pairs"],
                              "baseline_length_agreement": short["by_family"][f]["agreement"],
                              "baseline_loglik_agreement": ll["by_family"][f]["agreement"]} for f in rm_["by_family"]},
            "by_subset": {k: {"gold_agreement": rm_["by_subset"][k]["agreement"], "pairs": rm_["by_subset"][k]["pairs"],
                              "baseline_length_agreement": short["by_subset"][k]["agreement"],
                              "baseline_loglik_agreement": ll["by_subset"][k]["agreement"]} for k in rm_["by_subset"]}}


def run(ctx: Context) -> dict:
    return run_rm(ctx.cfg, ctx.folder("sft"), ctx.folder("rm"), ctx.tokenizer(), log=ctx.log)


# ---------------------------------------------------------------- report

def plot_rm(run: Path) -> Path | None:
    """Every test answer's reward against its gold score."""
    rows = read_jsonl_loose(run / "rm" / "test_scores.jsonl")
    if not rows:
        return None
    fig, ax = plots.subplots(figsize=(6.5, 4.5))
    fams = sorted({r["family"] for r in rows})
    for i, f in enumerate(fams):
        pts = [r for r in rows if r["family"] == f]
        ax.scatter([r["gold_score"] for r in pts], [r["reward"] for r in pts], s=9, alpha=0.6, color=f"C{i % 10}", label=f)
    ax.set_xlabel("gold score")
    ax.set_ylabel("reward (normalised: SFT answers mean 0, std 1)")
    ax.set_title("reward model on test answers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, markerscale=1.5, ncol=2)
    return plots.save(fig, run / "plots" / "rm_vs_gold.png")


def markdown(run: Path, report: dict) -> list[str]:
    r = report["rm"]
    test = (f" Test accuracy: **{r['test_accuracy']:.3f}** on {r['test_pairs']:,} pairs of {r['test_rankings']:,} rankings "
            "that chose nothing." if "test_accuracy" in r else "")
    lines = ["## Reward model (all C(K,2) pairs of a K-way ranking per batch element)", "",
             f"{r['rankings']:,} rankings ({r['pairs']:,} non-tied pairs), {r['steps']} steps; validation accuracy against "
             f"the labeler's pairs: {r['val_accuracy']:.3f} on {r['val_pairs']:,} pairs.{test}", ""]
    if "gold_agreement" not in r:
        return lines
    dev = r["dev"]
    lines += [f"Rankings: K = {r['k']} answers from {', '.join(r['samplers'])}, ranked by the {r['labeler']} labeler, "
              f"whose measured agreement with gold is {r['labeler_agreement']:.3f}; {r['tie_fraction']:.1%} of pairs tie.", "",
              "Agreement with the gold ranking, non-tied pairs, on test prompts (unseen templates, used for no choice); "
              "dev (the validation prompts) beside it:", "",
              "| pairs (test) | n | RM | shorter first | SFT log-likelihood | RM on dev |", "|---|---|---|---|---|---|",
              f"| all | {r['gold_pairs']:,} | **{r['gold_agreement']:.3f}** | {r['baseline_length_agreement']:.3f} | "
              f"{r['baseline_loglik_agreement']:.3f} | {dev['gold_agreement']:.3f} |"]
    for name, row in r["by_subset"].items():
        lines.append(f"| {name.replace('_', ' ')} | {row['pairs']:,} | {row['gold_agreement']:.3f} | "
                     f"{row['baseline_length_agreement']:.3f} | {row['baseline_loglik_agreement']:.3f} | "
                     f"{dev['by_subset'].get(name, {}).get('gold_agreement', float('nan')):.3f} |")
    for name, row in r["by_family"].items():
        lines.append(f"| family: {name} | {row['pairs']:,} | {row['gold_agreement']:.3f} | "
                     f"{row['baseline_length_agreement']:.3f} | {row['baseline_loglik_agreement']:.3f} | "
                     f"{dev['by_family'].get(name, {}).get('gold_agreement', float('nan')):.3f} |")
    lines.append("")
    if plot_rm(run):
        lines += ["![reward against gold score](plots/rm_vs_gold.png)", ""]
    return lines


def headline(r: dict) -> str:
    if "gold_agreement" in r:
        return (f"rm: test agreement with gold {r['gold_agreement']:.3f} on {r['gold_pairs']:,} pairs (shorter-first "
                f"{r['baseline_length_agreement']:.3f}, SFT log-likelihood {r['baseline_loglik_agreement']:.3f}; "
                f"dev {r['dev']['gold_agreement']:.3f})")
    if "test_accuracy" in r:
        return f"rm: test accuracy {r['test_accuracy']:.3f} on {r['test_pairs']:,} pairs (validation {r['val_accuracy']:.3f})"
    return f"rm: validation accuracy {r['val_accuracy']:.3f} on {r['val_pairs']:,} pairs"


STAGE = Stage("rm", run, "reward model on K-way rankings (the world's, sampled from SFT and labeled)",
              config=RMConfig, depends=("sft",), report=markdown, headline=headline, measured=True)
