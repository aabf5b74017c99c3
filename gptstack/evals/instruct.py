"""Instruction following: answers to suite prompts from the one engine, scored by the gold labeler.

Used for the pretrained model (prompted with the same chat template), the SFT model, and every
later policy, so all of them are measured the same way.
"""
from __future__ import annotations

from collections import defaultdict

from ..generate import generate
from ..tokenizer import Tokenizer
from ..world.instructions import Prompt, gold_score


def conversation(prompt: Prompt) -> list[dict]:
    """The turns a suite prompt opens: its system message, if any, and the user's request."""
    system = [{"role": "system", "content": prompt.system}] if prompt.system else []
    return system + [{"role": "user", "content": prompt.user}]


def prompt_ids(tok: Tokenizer, conversations: list[list[dict]], n_ctx: int, max_new_tokens: int) -> list[list[int]]:
    """Each conversation rendered with an open assistant turn; one too long for the context keeps its
    end (the request and the open turn), leaving room for the answer."""
    budget = n_ctx - min(max_new_tokens, n_ctx // 2)
    return [tok.render_chat(c, for_generation=True)[0][-budget:] for c in conversations]


def respond(model, tok: Tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
            temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 64, seed: int = 0):
    """The assistant's next turn for each conversation: (text, Generation) pairs. A turn cut off by the
    length limit keeps its text; `Generation.finished` says whether it closed with <|end|>."""
    end = tok.special["<|end|>"]
    out = []
    for start in range(0, len(conversations), batch_size):
        ids = prompt_ids(tok, conversations[start:start + batch_size], model.cfg.n_ctx, max_new_tokens)
        gens = generate(model, ids, max_new_tokens, temperature=temperature, top_p=top_p, stop_ids=(end,),
                        pad_id=tok.pad, seed=seed + start)
        for g in gens:
            body = g.tokens[:-1] if g.finished else g.tokens
            out.append((tok.decode(body, skip_special=True).strip(), g))
    return out


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


def evaluate_instructions(model, tok: Tokenizer, prompts: list[Prompt], max_new_tokens: int = 64,
                          batch_size: int = 64) -> tuple[dict, list[dict]]:
    """Greedy answers to `prompts`, scored; returns (figures, per-prompt samples)."""
    got = respond(model, tok, [conversation(p) for p in prompts], max_new_tokens, batch_size=batch_size)
    answers = [text for text, _ in got]
    scores = [gold_score(p, a) for p, a in zip(prompts, answers)]
    samples = [{"family": p.family, "system": p.system, "prompt": p.user, "answer": a, "gold_answer": p.answer,
                "correct": s.correct, "gold_score": s.total} for p, a, s in zip(prompts, answers, scores)]
    return score_answers(prompts, answers, scores), samples
