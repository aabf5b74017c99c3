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
from ..checkpoint import load_model, save_state_dict
from ..config import at_least
from ..data.records import read_rankings
from ..evals.rm import answer_loglik, pair_agreement
from ..io import atomic_write_json, atomic_write_text, read_json, read_jsonl_loose
from ..tokenizer import Tokenizer
from ..train.rm import (Rankings, RewardModel, RMObjective, check_rankings_fit, from_policy, normalisation,
                        reward_metadata, scalar_flops_per_token, score_rankings)
from ..train.trainer import TrainConfig, Trainer
from .base import Context, Stage


def _rm_train() -> TrainConfig:
    # batch: rankings (each K answers) per step; InstructGPT trains its RM for one epoch
    return TrainConfig(steps=0, batch_size=16, lr=1e-4, schedule="cosine", min_lr_ratio=0.1, warmup_steps=10,
                       weight_decay=0.0, log_every=10, eval_every=0, ckpt_every=1000, keep_checkpoints=1)


@dataclass
class RMConfig:
    prompts: int = 2000  # world: training prompts to compare (train templates)
    val_prompts: int = 300  # world: held-out prompts (unseen templates) for the RM's accuracy
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
        yield from at_least(self, 1, "prompts", "val_prompts", "max_new_tokens")
        yield from at_least(self, 2, "k")  # a ranking compares answers
        yield from at_least(self, 0, "epochs", "tie_threshold")
        if not 0.5 <= self.agreement <= 1:
            yield "agreement", f"must be in [0.5, 1] (0.5: a coin), got {self.agreement}"
        if not self.temperatures or any(not t >= 0 for t in self.temperatures):
            yield "temperatures", f"must be one or more temperatures >= 0, got {self.temperatures}"


def world_rankings(cfg, policy: Path, out: Path, tok: Tokenizer, log=print) -> tuple[Path, Path, dict]:
    """Rankings of the policy's answers to the world's train prompts, and to held-out prompts (unseen
    templates) for validation, by the configured labeler; made once, reused on a rerun."""
    from ..comparisons import compare
    from ..world.instructions import InstructionSuite
    r = cfg.rm
    suite = InstructionSuite(seed=cfg.sft.seed)
    made = {}
    for name, split, n, seed in (("rankings", "train", r.prompts, r.seed + 100), ("rankings_val", "heldout", r.val_prompts, r.seed + 200)):
        path = out / f"{name}.jsonl"
        meta = out / f"{name}.summary.json"
        if not meta.is_file():
            log(f"[rm] sampling {r.k} answers to {n} {split} prompts and ranking them ({r.labeler} labeler)")
            summary = compare([str(policy)], tok, suite.prompts(split, n, seed=seed), r.k, r.labeler, path,
                              r.temperatures, r.agreement, r.tie_threshold, r.max_new_tokens, seed)
            atomic_write_json(meta, summary)
        made[name] = read_json(meta)
    return out / "rankings.jsonl", out / "rankings_val.jsonl", made


def judge_rows(rows: list[dict], suite) -> tuple[list, list[list[bool]], list[list[float]]]:
    """Each ranking's suite Prompt, and every answer's gold correctness and gold score."""
    from ..world.instructions import gold_score
    prompts = [suite.lookup(r["prompt"], r.get("system")) for r in rows]
    scores = [[gold_score(p, y) for y in r["responses"]] for p, r in zip(prompts, rows)]
    return prompts, [[s.correct for s in row] for row in scores], [[s.total for s in row] for row in scores]


def run_rm(cfg, policy: Path, out: Path, tok: Tokenizer, data: Path | None = None, val_data: Path | None = None,
           log=print) -> dict:
    """Train the reward model from `policy` (the SFT model) on rankings: the given files, or, with none,
    the world's (sampled from the policy and ranked by the configured labeler). Returns {"rm": ...}."""
    r = cfg.rm
    t0 = time.time()
    made = {}
    if data is None:
        out.mkdir(parents=True, exist_ok=True)
        data, val_data, made = world_rankings(cfg, policy, out, tok, log)
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
    steps = r.train.steps or max(1, math.ceil(r.epochs * len(train) / r.train.batch_size))
    train_cfg = dataclasses.replace(r.train, steps=steps, ckpt_every=min(r.train.ckpt_every, steps))
    mean_len = sum(len(s) for seqs, _ in train.examples for s in seqs) / sum(len(seqs) for seqs, _ in train.examples)
    objective = RMObjective(train, val, train_cfg.seed, scalar_flops_per_token(model.gpt, int(mean_len)))
    trainer = Trainer(train_cfg, model, objective, out, metadata=reward_metadata(model.gpt), desc="rm")
    summary = trainer.fit()
    if not trainer.is_main:
        return {}
    model = trainer.model.eval()
    gain, bias = normalisation(model, train)  # the SFT policy's own answers score mean 0, std 1
    model.gain.fill_(gain)
    model.bias.fill_(bias)
    save_state_dict(model.state_dict(), out / "model.safetensors", reward_metadata(model.gpt))
    result = {"rankings": len(train), "pairs": train.pairs, "val_rankings": len(val), "val_pairs": val.pairs,
              "steps": steps, "gain": gain, "bias": bias, "val_accuracy": (summary.get("final") or {}).get("val_accuracy"),
              "tokens_per_sec": summary.get("tokens_per_sec"), "mfu": summary.get("mfu")}
    if made:
        c = made["rankings"]
        result |= {"labeler": c["labeler"], "labeler_agreement": c["labeler_agreement"], "tie_fraction": c["tie_fraction"],
                   "k": c["k"], "samplers": c["samplers"]}
    if val_records and all("gold_ranks" in x and "family" in x for x in val_records):  # the world's rankings
        result |= gold_report(model, policy, tok, val, cfg, out, log)
    result["seconds"] = time.time() - t0
    summary = {"rm": result}
    atomic_write_json(out / "summary.json", summary)
    return summary


def gold_report(model: RewardModel, policy: Path, tok: Tokenizer, val: Rankings, cfg, out: Path, log=print) -> dict:
    """On the held-out rankings: the RM, the shorter-answer-first ranker and the policy's log-likelihood,
    each against the gold ranking; and every answer's reward beside its gold score (for the scatter plot)."""
    from ..world.instructions import InstructionSuite
    rows = val.records
    suite = InstructionSuite(seed=cfg.sft.seed)
    _, correct, gold_scores = judge_rows(rows, suite)
    gold_ranks = [row["gold_ranks"] for row in rows]
    families = [row["family"] for row in rows]
    log(f"[rm] held-out agreement with the gold ranking: RM, shorter-first and log-likelihood on {len(rows)} prompts")
    rewards = score_rankings(model, val)
    lengths = [[-float(len(y)) for y in row["responses"]] for row in rows]
    loglik = answer_loglik(load_model(policy, "auto"), tok, rows)
    rm_, short, ll = (pair_agreement(x, gold_ranks, families, correct) for x in (rewards, lengths, loglik))
    atomic_write_text(out / "val_scores.jsonl", "".join(
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
    """Every held-out answer's reward against its gold score."""
    rows = read_jsonl_loose(run / "rm" / "val_scores.jsonl")
    if not rows:
        return None
    fig, ax = plots.subplots(figsize=(6.5, 4.5))
    fams = sorted({r["family"] for r in rows})
    for i, f in enumerate(fams):
        pts = [r for r in rows if r["family"] == f]
        ax.scatter([r["gold_score"] for r in pts], [r["reward"] for r in pts], s=9, alpha=0.6, color=f"C{i % 10}", label=f)
    ax.set_xlabel("gold score")
    ax.set_ylabel("reward (normalised: SFT answers mean 0, std 1)")
    ax.set_title("reward model on held-out answers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, markerscale=1.5, ncol=2)
    return plots.save(fig, run / "plots" / "rm_vs_gold.png")


def markdown(run: Path, report: dict) -> list[str]:
    r = report["rm"]
    lines = ["## Reward model (all C(K,2) pairs of a K-way ranking per batch element)", "",
             f"{r['rankings']:,} rankings ({r['pairs']:,} non-tied pairs), {r['steps']} steps; held-out accuracy against "
             f"the labeler's pairs: **{r['val_accuracy']:.3f}** on {r['val_pairs']:,} pairs.", ""]
    if "gold_agreement" not in r:
        return lines
    lines += [f"Rankings: K = {r['k']} answers from {', '.join(r['samplers'])}, ranked by the {r['labeler']} labeler, "
              f"whose measured agreement with gold is {r['labeler_agreement']:.3f}; {r['tie_fraction']:.1%} of pairs tie.", "",
              "Agreement with the gold ranking on held-out prompts (unseen templates), non-tied pairs:", "",
              "| pairs | n | RM | shorter first | SFT log-likelihood |", "|---|---|---|---|---|",
              f"| all | {r['gold_pairs']:,} | **{r['gold_agreement']:.3f}** | {r['baseline_length_agreement']:.3f} | "
              f"{r['baseline_loglik_agreement']:.3f} |"]
    for name, row in r["by_subset"].items():
        lines.append(f"| {name.replace('_', ' ')} | {row['pairs']:,} | {row['gold_agreement']:.3f} | "
                     f"{row['baseline_length_agreement']:.3f} | {row['baseline_loglik_agreement']:.3f} |")
    for name, row in r["by_family"].items():
        lines.append(f"| family: {name} | {row['pairs']:,} | {row['gold_agreement']:.3f} | "
                     f"{row['baseline_length_agreement']:.3f} | {row['baseline_loglik_agreement']:.3f} |")
    lines.append("")
    if plot_rm(run):
        lines += ["![reward against gold score](plots/rm_vs_gold.png)", ""]
    return lines


STAGE = Stage("rm", run, "reward model on K-way rankings (the world's, sampled from SFT and labeled)",
              config=RMConfig, depends=("sft",), report=markdown, default=False)
