"""Comparisons (InstructGPT step 2's data): K answers per prompt from the policy (or several policies
and temperatures, as InstructGPT sampled from several models), ranked by a labeler.

Labelers: `gold` (the world's programmatic labeler), `noisy` (a simulated person who agrees with gold
on a configurable share of pairs, as InstructGPT's labelers agreed with each other ~73% of the time),
or `human` (writes a to-do file for `gptstack label`).

Under torchrun the ranks share the sampling (each answers its share of the prompts, answer i seeded by i, so
the rankings are the same on any number of ranks), every rank gets every answer, and rank 0 writes the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import load_model
from .data.records import prompt_messages, read_records
from .errors import GptstackError
from .generate import respond
from .io import atomic_write_text
from .tokenizer import Tokenizer
from .train.distributed import barrier, dist_env, init_distributed, is_main
from .train.trainer import pick_device
from .world.instructions import InstructionSuite, NoisyLabeler, Prompt, pairwise_agreement, rank

@dataclass
class Sampler:
    """One source of answers: a policy folder and a temperature."""
    model: object
    temperature: float
    name: str


def read_prompts(path: Path, suite: InstructionSuite | None) -> list[Prompt | dict]:
    """Prompts from a JSONL file of {prompt, [system]} or {messages} (the one prompt reader, `read_prompt_records`'s
    format): the suite's Prompt where the text is one of its prompts (so the gold labeler can judge it), else the
    bare record."""
    out = []
    for lineno, messages in read_records(path, lambda rec, p, n: (n, prompt_messages(rec, p, n))):
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        user = messages[-1]["content"]
        found = suite.lookup(user, system) if suite and len(messages) == 1 + (system is not None) else None
        out.append(found or {"prompt": user, "system": system, "messages": messages, "_line": lineno})
    return out


def sample_answers(samplers: list[Sampler], tok: Tokenizer, prompts: list, k: int, max_new_tokens: int,
                   seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """K answers per prompt, cycling through the samplers; returns (answers, sources) per prompt."""
    convs = [p.messages() if isinstance(p, Prompt) else p["messages"] for p in prompts]
    answers = [[None] * k for _ in prompts]
    sources = [[None] * k for _ in prompts]
    for j in range(k):
        s = samplers[j % len(samplers)]
        got = respond(s.model, tok, convs, max_new_tokens, temperature=s.temperature, seed=seed * 1000 + j)
        for i, (text, _) in enumerate(got):
            answers[i][j], sources[i][j] = text, s.name
    return list(zip(answers, sources))


def compare(policies: list[str], tok: Tokenizer, prompts: list, k: int, labeler: str, out: Path,
            temperatures: list[float] = (1.0,), agreement: float = 0.73, tie_threshold: float = 0.0,
            max_new_tokens: int = 64, seed: int = 0, device: str = "auto") -> dict:
    """Sample, rank and write the rankings (or the to-do file for `label`). Returns the summary, on every rank once
    rank 0 has written the file. The labeler and k come checked from `rm.*` (RMConfig); the policies compute on
    `device` (auto | cpu | cuda | ...: under torchrun, this rank's GPU)."""
    init_distributed(device)
    unjudgeable = [p for p in prompts if not isinstance(p, Prompt)]
    if labeler != "human" and unjudgeable:
        p = unjudgeable[0]
        raise GptstackError(f"line {p['_line']}: prompt {p['prompt'][:60]!r} is not one of the instruction suite's, so the "
                            f"{labeler} labeler cannot judge it; use --labeler human")
    on = pick_device(device, dist_env()[2])
    samplers = [Sampler(load_model(pol, on), t, f"{Path(pol).name}@T{t:g}") for pol in policies for t in temperatures]
    sampled = sample_answers(samplers, tok, prompts, k, max_new_tokens, seed)
    noisy = NoisyLabeler(agreement, tie_threshold, seed) if labeler == "noisy" else None
    rows, labeled, gold_all = [], [], []
    for p, (answers, sources) in zip(prompts, sampled):
        if isinstance(p, Prompt):
            row = {"prompt": p.user, "system": p.system, "family": p.family, "responses": answers, "sources": sources}
        else:
            row = {"prompt": p["prompt"], "system": p["system"], "responses": answers, "sources": sources}
        if labeler != "human":
            gold = rank(p, answers, tie_threshold)
            row["ranks"] = gold if labeler == "gold" else noisy.rank(p, answers)
            row["gold_ranks"], row["labeler"] = gold, labeler
            labeled.append(row["ranks"])
            gold_all.append(gold)
        rows.append(row)
    if is_main():
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    barrier()
    summary = {"prompts": len(rows), "k": k, "labeler": labeler, "samplers": [s.name for s in samplers], "file": str(out)}
    if labeled:
        pairs = [(i, j) for r in labeled for i in range(len(r)) for j in range(i + 1, len(r))]
        ties = sum(1 for r in labeled for i in range(len(r)) for j in range(i + 1, len(r)) if r[i] == r[j])
        summary |= {"labeler_agreement": pairwise_agreement(labeled, gold_all), "tie_fraction": ties / max(len(pairs), 1),
                    "pairs": len(pairs) - ties}
    return summary
