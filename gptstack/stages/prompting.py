"""The prompting stage (GPT-2 zero-shot, GPT-3 few-shot): the pretrained model with K solved examples in its
context and no gradient step, swept over K, on built-in tasks or task YAML files."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import load_model
from ..config import at_least
from ..evals.prompting import CHANCE, plot_shots, resolve_tasks, sweep
from ..io import atomic_write_json
from .base import Context, Stage, finished

PER_EXAMPLE = "per_example.json"  # {task: {shots_K: [{index, correct, ...}]}}: what each accuracy averages


@dataclass
class PromptingConfig:
    tasks: list[str] = field(default_factory=lambda: ["cloze", "continuation", "arithmetic", "docstring_name"])
    shots: list[int] = field(default_factory=lambda: [0, 1, 4, 8])
    limit: int = 0  # queries per task (0: all)
    seed: int = 0  # which few-shot examples each query gets

    def problems(self):
        yield from at_least(self, 0, "limit")
        if any(k < 0 for k in self.shots):
            yield "shots", f"must be >= 0, got {self.shots}"


def run(ctx: Context) -> dict:
    p = ctx.cfg.prompting
    tasks = resolve_tasks(p.tasks, ctx.folder("prompting") / "tasks", p.seed)
    model = load_model(ctx.folder("pretrain"), "auto")
    results, per_example = sweep(model, ctx.tokenizer(), tasks, p.shots, p.limit, p.seed, ctx.log)
    atomic_write_json(ctx.folder("prompting") / PER_EXAMPLE, per_example)  # the contamination stage splits these
    plot_shots({"pretrain": results}, ctx.run / "plots" / "shots.png", CHANCE)
    return {"prompting": results}


def run_tasks(ctx: Context, names: list[str]) -> dict[str, Path]:
    """{name: task.yaml} of built-in tasks or task files: the built-in ones the finished prompting stage wrote (the
    same queries it scored, with its seed) when it wrote them all, else built into its folder."""
    folder = ctx.folder("prompting") / "tasks"
    files = [n for n in names if n.endswith((".yaml", ".yml")) or Path(n).is_file()]
    built = {n: folder / n / "task.yaml" for n in names if n not in files}
    if finished(ctx.run, "prompting") and all(p.is_file() for p in built.values()):
        return {**built, **resolve_tasks(files, folder)}
    return resolve_tasks(names, folder, ctx.cfg.prompting.seed)


def markdown(run: Path, r: dict) -> list[str]:
    lines = ["## Prompting (GPT-2 zero-shot, GPT-3 few-shot)", "",
             "Accuracy of the pretrained model with K solved examples in its context, no gradient step. "
             "*fit*: the mean number of examples that fit the context window.", ""]
    for task, by_k in r["prompting"].items():
        ks = list(by_k)
        lines += [f"**{task}** (n = {by_k[ks[0]]['n']})", "", "| K | " + " | ".join(k.split("_")[1] for k in ks) + " |",
                  "|---|" + "---|" * len(ks),
                  "| acc | " + " | ".join(f"{by_k[k]['acc']:.3f}" for k in ks) + " |"]
        if "acc_norm" in by_k[ks[0]]:
            lines.append("| acc_norm | " + " | ".join(f"{by_k[k]['acc_norm']:.3f}" for k in ks) + " |")
        lines += ["| fit | " + " | ".join(f"{by_k[k]['shots_fit']:.1f}" for k in ks) + " |", ""]
    if (run / "plots" / "shots.png").is_file():
        lines += ["![accuracy against K](plots/shots.png)", ""]
    return lines


STAGE = Stage("prompting", run, "zero-, one- and few-shot accuracy of the pretrained model (a K sweep)",
              config=PromptingConfig, report=markdown, all_ranks=False)
