"""The reward model (InstructGPT step 2): the SFT model with its unembedding replaced by a scalar
head read at the final token, trained on every pair of a K-way ranking at once.

For a prompt with K ranked answers, each answer is encoded once and every ordered pair (w better
than l; ties skipped) enters  loss = −mean log σ(r(x, y_w) − r(x, y_l))  within the same batch
element, so the K·(K−1)/2 comparisons of one ranking cost K forward passes, not K·(K−1).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import inference_device, model_path, read_weights, save_state_dict
from ..data.loader import epoch_indices
from ..errors import GptstackError
from ..io import atomic_write_json, atomic_write_text, read_json
from ..model import GPT, Head
from ..tokenizer import Tokenizer
from .trainer import Trainer


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
        r = self.head(h[torch.arange(len(ids), device=ids.device), last]).squeeze(-1)
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

def encode_answer(tok: Tokenizer, prompt: str, system: str | None, response: str, n_ctx: int) -> list[int]:
    """The conversation (system, user prompt, assistant answer closed by <|end|>) in the chat template;
    an over-long one loses its start, so the reward still reads the answer's end."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tok.render_chat(messages)[0][-n_ctx:]


class Rankings:
    """Ranking records, each as K encoded answers and their ranks; batched as (B, K, T)."""

    def __init__(self, records: list[dict], tok: Tokenizer, n_ctx: int):
        self.records, self.pad = records, tok.pad
        self.examples = [([encode_answer(tok, r["prompt"], r.get("system"), y, n_ctx) for y in r["responses"]], r["ranks"])
                         for r in records]
        self.pairs = sum(len(comparisons(ranks)) for _, ranks in self.examples)

    def __len__(self):
        return len(self.examples)

    def batch(self, indices) -> dict:
        ex = [self.examples[i] for i in indices]
        K = max(len(seqs) for seqs, _ in ex)
        T = max(len(s) for seqs, _ in ex for s in seqs)
        ids = torch.full((len(ex), K, T), self.pad, dtype=torch.long)
        last = torch.zeros(len(ex), K, dtype=torch.long)
        ranks = torch.zeros(len(ex), K, dtype=torch.long)  # 0: no answer in this slot
        for i, (seqs, rk) in enumerate(ex):
            for k, s in enumerate(seqs):
                ids[i, k, :len(s)] = torch.tensor(s)
                last[i, k] = len(s) - 1
                ranks[i, k] = rk[k]
        return {"ids": ids, "last": last, "ranks": ranks}


def comparisons(ranks: list[int]) -> list[tuple[int, int]]:
    """Every (winner, loser) index pair of a ranking; ties give no pair."""
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def pair_mask(ranks: torch.Tensor) -> torch.Tensor:
    """(B, K, K): [b, w, l] is True when answer w is ranked strictly better than answer l."""
    present = ranks > 0
    return (ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :]


def pairwise_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """−mean over all pairs of log σ(r_w − r_l); rewards (B, K), ranks (B, K). Returns (loss, accuracy, pairs)."""
    mask = pair_mask(ranks)
    n = int(mask.sum())
    margin = rewards[:, :, None] - rewards[:, None, :]
    if n == 0:  # every answer tied: nothing to learn, but keep the graph for DDP
        return rewards.sum() * 0.0, torch.zeros(()), 0
    loss = -(F.logsigmoid(margin) * mask).sum() / n
    accuracy = ((margin > 0) & mask).sum().float() / n
    return loss, accuracy, n


class RMObjective:
    def __init__(self, train: Rankings, val: Rankings, seed: int, flops_per_token: float):
        self.train, self.val, self.seed, self._flops = train, val, seed, flops_per_token

    def train_batch(self, step: int, n: int) -> dict:
        return self.train.batch(epoch_indices(self.seed, step, n, len(self.train)))

    def weight(self, micro: dict) -> int:
        return int(pair_mask(micro["ranks"]).sum())

    def loss(self, model, micro: dict):
        B, K, T = micro["ids"].shape
        rewards = model(micro["ids"].view(B * K, T), micro["last"].view(-1)).view(B, K)
        loss, accuracy, _ = pairwise_loss(rewards, micro["ranks"])
        return loss, {"accuracy": accuracy, "tokens": int((micro["ids"] != self.train.pad).sum())}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        rewards = score_rankings(model, self.val, raw=True)
        total, correct, n = 0.0, 0, 0
        for r, (_, ranks) in zip(rewards, self.val.examples):
            for w, l in comparisons(ranks):
                total += -F.logsigmoid(torch.tensor(r[w] - r[l])).item()
                correct += r[w] > r[l]
                n += 1
        return {"val_loss": total / max(n, 1), "val_accuracy": correct / max(n, 1)}

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
        raise GptstackError(f"{path}: every ranking is a full tie; a reward model needs at least one strict preference")


# ---------------------------------------------------------------- the stage

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


def run_rm(cfg, policy: Path, out: Path, tok: Tokenizer, data: Path | None = None, val_data: Path | None = None,
           log=print) -> dict:
    """Train the reward model from `policy` (the SFT model) on rankings: the given files, or, with none,
    the world's (sampled from the policy and ranked by the configured labeler). Returns {"rm": ...}."""
    from ..data.records import read_rankings
    r = cfg.rm
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    if data is None:
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
    from ..checkpoint import load_model
    from ..evals.rm import answer_loglik, judge_rows, pair_agreement
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
