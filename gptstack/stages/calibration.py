"""The calibration stage (GPT-4 report, figure 8): expected calibration error and reliability diagrams of the
run's models, before and after post-training, on the same multiple-choice questions and the same prompts, in
both formats of evals/calibration.py (the first of `formats` gives calibration.<model>.{ece, accuracy, n}; each
other one is a sub-key, calibration.<model>.options.ece).

Models: the run's pretrained (or imported) model, its SFT model and its PPO policy, each where the run has it,
plus any model folders named in `calibration.models` (e.g. an imported SmolLM2). The questions: the test queries
of the multiple-choice prompting tasks, scored by the prompting eval (raw K-shot prompts, no chat template, as
a base model reads them); no figure of this stage chooses anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import find_tokenizer, load_model
from ..config import at_least
from ..errors import GptstackError
from ..evals.calibration import BINS, FORMATS, calibrate, lettered, plot_reliability
from ..tokenizer import Tokenizer
from .base import Context, Stage
from .prompting import run_tasks

RUN_MODELS = ("import", "pretrain", "sft", "ppo")  # in recipe order: before and after post-training


@dataclass
class CalibrationConfig:
    tasks: list[str] = field(default_factory=lambda: ["continuation", "docstring_name"])  # multiple-choice tasks
    shots: int = 0  # solved examples in each prompt
    limit: int = 0  # questions per task (0: all)
    bins: int = BINS  # equal-width confidence bins of the ECE
    models: list[str] = field(default_factory=list)  # further model folders (each with its tokenizer.json)
    formats: list[str] = field(default_factory=lambda: list(FORMATS))  # letters (MMLU's, GPT-4's) | options
    seed: int = 0

    def problems(self):
        yield from at_least(self, 0, "shots", "limit")
        yield from at_least(self, 1, "bins")
        if not self.tasks:
            yield "tasks", "must name at least one multiple-choice task"
        if not self.formats or any(f not in FORMATS for f in self.formats) or len(set(self.formats)) < len(self.formats):
            yield "formats", f"must be one or more of {', '.join(FORMATS)}, got {self.formats}"


def run_models(run: Path, extra: list[str]) -> dict[str, Path]:
    """{name: folder} of the run's models that exist, then the extra folders (named by their folder)."""
    out = {name: run / name for name in RUN_MODELS if (run / name / "model.safetensors").is_file()}
    for m in extra:
        if not (Path(m) / "model.safetensors").is_file():
            raise GptstackError(f"calibration.models: {m}: no model.safetensors (a gptstack model folder, e.g. from `gptstack import`)")
        out[Path(m).name if Path(m).name not in out else str(m)] = Path(m)
    return out


def task_formats(task_paths: dict[str, Path], formats: list[str], folder: Path) -> dict[str, dict[str, Path]]:
    """{format: {task: task.yaml}}: the tasks as given (options) and lettered (letters)."""
    return {f: {name: lettered(path, folder) if f == "letters" else path for name, path in task_paths.items()} for f in formats}


def calibrate_models(models: dict[str, Path], tasks: dict[str, dict[str, Path]], c: CalibrationConfig, log=print) -> dict:
    """{model: figures of the first format, "format", and one sub-key per other format}."""
    out = {}
    for name, folder in models.items():
        model = load_model(folder, "auto")
        tok = Tokenizer.load(find_tokenizer(folder))
        by_format = {}
        for fmt, paths in tasks.items():
            by_format[fmt] = calibrate(model, tok, paths, c.shots, c.limit, c.seed, c.bins, desc=f"calibration {name} {fmt}")
            log(f"[calibration] {name} ({fmt}): ECE {by_format[fmt]['ece']:.3f}, accuracy {by_format[fmt]['accuracy']:.3f}, "
                f"mean confidence {by_format[fmt]['mean_confidence']:.3f} (n={by_format[fmt]['n']})")
        first, *rest = tasks
        out[name] = by_format[first] | {"format": first, "folder": str(folder), **{f: by_format[f] for f in rest}}
    return out


def by_format(results: dict) -> dict:
    """{model: {format: figures}} from calibrate_models' shape (for the plot)."""
    return {name: {r["format"]: r, **{f: r[f] for f in FORMATS if f in r}} for name, r in results.items()}


def run(ctx: Context) -> dict:
    c = ctx.cfg.calibration
    models = run_models(ctx.run, c.models)
    if not models:
        raise GptstackError(f"{ctx.run}: no model to calibrate (no pretrain, import, sft or ppo model)")
    folder = ctx.folder("calibration") / "tasks"
    tasks = task_formats(run_tasks(ctx, c.tasks), c.formats, folder)
    results = calibrate_models(models, tasks, c, ctx.log)
    plot_reliability(by_format(results), ctx.run / "plots" / "calibration.png")
    # report.json's stable keys: calibration.<model>.{ece, accuracy, n}
    return {"calibration": {**results, "settings": {"tasks": c.tasks, "shots": c.shots, "bins": c.bins,
                                                    "limit": c.limit, "formats": c.formats, "split": "test"}}}


def markdown(run: Path, r: dict) -> list[str]:
    section = r["calibration"]
    s = section["settings"]
    models = by_format({k: v for k, v in section.items() if k != "settings"})
    lines = ["## Calibration (GPT-4's reliability diagram)", "",
             f"Each model's probability of its chosen answer (the softmax over the options' log-likelihoods) against how "
             f"often it is right, on the same test questions of {', '.join(s['tasks'])} ({s['shots']}-shot, raw prompts, "
             f"no chat template). ECE: {s['bins']} equal-width bins of confidence; 0 is perfect calibration. *letters*: "
             "MMLU's format (options listed, the answer a letter), as in GPT-4's figure; *options*: each option's text "
             "as the answer (its summed log-likelihood: longer options are far less probable, so confidence is near 1 "
             "whatever the model believes). Nothing here chose anything.", "",
             "| model | format | ECE (90% bootstrap) | accuracy | mean confidence | n | " + " | ".join(f"ECE {t}" for t in s["tasks"]) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(s["tasks"])]
    for name, formats in models.items():
        for fmt, m in formats.items():
            lo, hi = m["ece_interval"]
            lines.append(f"| {name} | {fmt} | {m['ece']:.3f} ({lo:.3f}–{hi:.3f}) | {m['accuracy']:.3f} | {m['mean_confidence']:.3f} | {m['n']} | "
                         + " | ".join(f"{m['by_task'][t]['ece']:.3f}" for t in s["tasks"]) + " |")
    lines.append("")
    if (run / "plots" / "calibration.png").is_file():
        lines += ["![reliability diagrams](plots/calibration.png)", ""]
    return lines


def headline(section: dict) -> str | None:
    models = {k: v for k, v in section.items() if k != "settings"}
    fmt = next(iter(models.values()))["format"]
    return f"calibration ECE (test, {fmt}): " + ", ".join(f"{k} {v['ece']:.3f}" for k, v in models.items())


STAGE = Stage("calibration", run, "ECE and reliability diagrams of the pretrained, SFT and PPO models (multiple choice)",
              config=CalibrationConfig, depends=("prompting",), report=markdown, all_ranks=False, headline=headline)
