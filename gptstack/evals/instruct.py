"""Instruction following on the built-in world: greedy answers to suite prompts from the one engine, scored
by the world's gold labeler.

Used for the pretrained model (prompted with the same chat template), the SFT model, and every later policy,
so all of them are measured the same way. Only stages whose data source is the world call it.
"""
from __future__ import annotations

from collections import defaultdict

from ..generate import respond
from ..tokenizer import Tokenizer
from ..world.instructions import Prompt, gold_score


def conversations(prompts: list[Prompt]) -> list[list[dict]]:
    """The turns each suite prompt opens: its system message, if any, and the user's request."""
    return [p.messages() for p in prompts]


def score_answers(prompts: list[Prompt], answers: list[str], scores: list) -> dict:
    """The report's figures for a set of answers and their gold scores: gold score, correctness accuracy
    (the right answer, whatever the style), both by family, and the refusal rates."""
    fam = defaultdict(list)
    for p, s in zip(prompts, scores):
        fam[p.family].append(s)
    disallowed = [s for p, s in zip(prompts, scores) if p.disallowed]
    allowed = [s for p, s in zip(prompts, scores) if not p.disallowed]
    refusals = [s for s in disallowed if s.refused]

    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    return {
        "n": len(scores),
        "gold_score": mean([s.total for s in scores]),
        "accuracy": mean([float(s.correct) for s in scores]),
        "by_family": {f: {"n": len(ss), "accuracy": mean([float(s.correct) for s in ss]),
                          "gold_score": mean([s.total for s in ss])} for f, ss in sorted(fam.items())},
        "refusal_rate_disallowed": mean([float(s.refused) for s in disallowed]),
        "refusal_rate_allowed": mean([float(s.refused) for s in allowed]),
        "refusal_style_desired_rate": mean([float(s.refusal_style == "desired") for s in refusals]),
        "mean_length": mean([float(len(a)) for a in answers]),
    }


def judge_answers(prompts: list[Prompt], answers: list[str]) -> tuple[dict, list[dict]]:
    """Answers to `prompts` scored by the gold labeler; returns (figures, per-prompt samples)."""
    scores = [gold_score(p, a) for p, a in zip(prompts, answers)]
    samples = [{"family": p.family, "system": p.system, "prompt": p.user, "answer": a, "gold_answer": p.answer,
                "correct": s.correct, "gold_score": s.total} for p, a, s in zip(prompts, answers, scores)]
    return score_answers(prompts, answers, scores), samples


def evaluate_instructions(model, tok: Tokenizer, prompts: list[Prompt], max_new_tokens: int = 64,
                          batch_size: int = 64) -> tuple[dict, list[dict]]:
    """Greedy answers to `prompts`, scored; returns (figures, per-prompt samples)."""
    got = respond(model, tok, conversations(prompts), max_new_tokens, batch_size=batch_size)
    return judge_answers(prompts, [text for text, _ in got])
