"""Judging a chat policy against another on the same prompts: greedy answers scored by the gold labeler (on the
world's prompts) and by a reward model, the KL to a reference on sampled answers, and the win rate split into wins
from correctness and wins from style. PPO and DPO are both judged by these, so their figures compare."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generate import respond
from ..train.distributed import across_ranks
from ..train.ppo import answer_scores, pack, sample
from ..train.rm import RewardModel


@dataclass
class Prompts:
    """Conversations awaiting an answer; with the world as the source, also its suite prompts (the gold
    labeler judges answers to those)."""
    conversations: list[list[dict]]
    suite: list | None = None

    def __len__(self):
        return len(self.conversations)

    def request(self, i: int) -> str:
        return self.conversations[i][-1]["content"]


def world_prompts(suite, split: str, n: int, seed: int) -> Prompts:
    from .instruct import conversations
    prompts = suite.prompts(split, n, seed=seed)
    return Prompts(conversations(prompts), prompts)


@torch.no_grad()
def evaluate_policy(policy, reference_logprobs, rm: RewardModel | None, tok, prompts: Prompts, p) -> tuple[dict, list[dict]]:
    """Greedy answers to `prompts`, scored by the RM exactly as PPO's rollouts are (the sampled tokens, minus the
    no-end penalty: `answer_scores`; no RM, no score), and by the gold labeler on the world's prompts; given the
    reference's `sequence_logprobs`, the KL to it per answer, estimated on temperature-1 samples
    (Σ_t log π − log π_ref). `p` holds max_new_tokens, no_end_penalty and seed (the stage's config). Returns
    (figures, the greedy answers as samples). Under torchrun the ranks share the sampling and scoring, and each
    gets every figure."""
    ids_in = tok.render_prompts(prompts.conversations, policy.cfg.n_ctx, p.max_new_tokens)
    got = respond(policy, tok, prompts.conversations, p.max_new_tokens)
    answers = [text for text, _ in got]
    if prompts.suite is not None:
        from .instruct import judge_answers
        figures, samples = judge_answers(prompts.suite, answers)
    else:
        figures = {"n": len(answers), "mean_length": sum(map(len, answers)) / max(len(answers), 1)}
        samples = [{"messages": c, "answer": a} for c, a in zip(prompts.conversations, answers)]
    if rm is not None:
        greedy = [g.tokens for _, g in got]
        length = max(len(a) + len(b) for a, b in zip(ids_in, greedy))
        scores = across_ranks(lambda rows: answer_scores(
            rm, [ids_in[i] for i in rows], [greedy[i] for i in rows], [got[i][1].finished for i in rows], tok.pad,
            p.no_end_penalty, length)[0].tolist(), len(ids_in))
        for s, r in zip(samples, scores):
            s["rm_score"] = r
        figures["rm_score"] = sum(scores) / len(scores)
    if reference_logprobs is None:
        return figures, samples
    gens = sample(policy, ids_in, p.max_new_tokens, 1.0, tok.end, tok.pad, seed=p.seed)
    ids, mask = pack(ids_in, [g.tokens for g in gens], tok.pad)
    device = next(policy.parameters()).device

    def kl(rows):  # Σ_t log π − log π_ref over each of this rank's answers
        r_ids, r_mask = ids[rows].to(device), mask[rows].to(device)
        return ((policy.sequence_logprobs(r_ids) - reference_logprobs(r_ids)) * r_mask).sum(1).tolist()
    per_answer = across_ranks(kl, len(ids_in))
    figures["kl"] = sum(per_answer) / len(per_answer)
    return figures, samples


def win_rate(ours: list[dict], theirs: list[dict], key: str = "gold_score") -> dict:
    """How often `ours` is preferred to `theirs` (two policies' answers to the same prompts, scored by `key`:
    the gold labeler's score, or the RM's), ties half. With the gold labeler, split by where wins come from:
    pairs whose correctness differs, and pairs equally correct (style: length, refusal style, over-refusal)."""
    rows = []
    for a, b in zip(ours, theirs):
        sa, sb = a[key], b[key]
        rows.append((1.0 if sa > sb else 0.5 if sa == sb else 0.0, a.get("correct") != b.get("correct")))
    n = len(rows)
    out = {"win_rate": sum(w for w, _ in rows) / n}
    if key != "gold_score":
        return out
    by_correct = [w for w, differs in rows if differs]
    by_style = [w for w, differs in rows if not differs]
    return {**out, "correctness_pairs": len(by_correct), "win_rate_correctness": sum(by_correct) / max(len(by_correct), 1),
            "style_pairs": len(by_style), "win_rate_style": sum(by_style) / max(len(by_style), 1),
            # each subset's contribution to the overall rate above one half
            "excess_from_correctness": sum(w - 0.5 for w in by_correct) / n,
            "excess_from_style": sum(w - 0.5 for w in by_style) / n}


def judged_by(prompts: Prompts) -> str:
    """The sample key a win is decided by: the gold labeler's score on the world's prompts, else the RM's."""
    return "gold_score" if prompts.suite is not None else "rm_score"


def versus_sft(policy, sft, rm: RewardModel | None, tok, prompts: Prompts, p) -> tuple:
    """`policy` against the SFT model it started from, on `prompts`: (its figures with the KL to SFT, its samples, SFT's
    figures, SFT's samples, its win rate against SFT, or None when nothing judges: no world and no RM)."""
    ours, samples = evaluate_policy(policy, sft.sequence_logprobs, rm, tok, prompts, p)
    base, base_samples = evaluate_policy(sft, None, rm, tok, prompts, p)
    key = judged_by(prompts)
    return ours, samples, base, base_samples, win_rate(samples, base_samples, key) if key in samples[0] else None
