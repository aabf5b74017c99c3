"""Calibration on multiple choice (GPT-4 report, figure 8): does the model's probability of its chosen answer
match how often that answer is right?

A question's option probabilities are the softmax of the options' summed log-likelihoods (the prompting eval's
`acc` scoring, normalised over the options); the chosen answer is the most probable one, its probability the
confidence. Expected calibration error with B equal-width bins of confidence over [0, 1]:
    ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b|
(Guo et al. 2017's top-label form. GPT-4's figure bins every option's probability instead; this module follows
the chosen answer, as the issue asks.)

Two formats of the same questions (FORMATS):
- letters: MMLU's, which GPT-4's figure uses: the options listed as "A. ...", "B. ..." after the query, then
  "Answer:", and the continuations " A", " B", ...: one token each, so the option probabilities compare the
  model's beliefs about the options, not the lengths of their texts;
- options: each option's own text as the continuation (the prompting eval's `acc`): a longer option has a
  much smaller summed log-likelihood, so its softmax is near one-hot whatever the model believes.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import yaml

from .. import plots
from ..errors import GptstackError
from ..io import atomic_write_text
from .prompting import evaluate_task, load_task, query_text

BINS = 10
FORMATS = ("letters", "options")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def option_probabilities(logliks: list[float]) -> list[float]:
    top = max(logliks)
    e = [math.exp(x - top) for x in logliks]
    return [x / sum(e) for x in e]


def confidences(per_example: list[dict]) -> tuple[list[float], list[bool]]:
    """(probability of the chosen answer, whether it is the right one) per multiple-choice example."""
    conf, right = [], []
    for e in per_example:
        probs = option_probabilities(e["loglik"])
        chosen = max(range(len(probs)), key=probs.__getitem__)
        conf.append(probs[chosen])
        right.append(chosen == e["label"])
    return conf, right


def reliability(conf: list[float], right: list[bool], bins: int = BINS) -> tuple[float, list[dict]]:
    """(ECE, one row per bin: its edges, count, mean confidence and accuracy; None where it is empty)."""
    if len(conf) != len(right) or not conf:
        raise GptstackError(f"calibration needs as many outcomes as confidences, and some: got {len(conf)} and {len(right)}")
    rows = [{"lo": b / bins, "hi": (b + 1) / bins, "n": 0, "confidence": None, "accuracy": None} for b in range(bins)]
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, c in enumerate(conf):
        if not 0 <= c <= 1:
            raise GptstackError(f"a confidence must be a probability in [0, 1], got {c}")
        members[min(int(c * bins), bins - 1)].append(i)  # 1.0 belongs to the last bin
    ece = 0.0
    for row, idx in zip(rows, members):
        if idx:
            row["n"] = len(idx)
            row["confidence"] = sum(conf[i] for i in idx) / len(idx)
            row["accuracy"] = sum(right[i] for i in idx) / len(idx)
            ece += len(idx) / len(conf) * abs(row["accuracy"] - row["confidence"])
    return ece, rows


def ece_interval(conf: list[float], right: list[bool], bins: int = BINS, resamples: int = 200, seed: int = 0,
                 level: float = 0.9) -> list[float]:
    """A bootstrap interval of the ECE over the questions (resampled with replacement): its sampling noise."""
    rng = random.Random(seed)
    n = len(conf)
    values = sorted(reliability([conf[i] for i in pick], [right[i] for i in pick], bins)[0]
                    for pick in ([rng.randrange(n) for _ in range(n)] for _ in range(resamples)))
    return [values[int((1 - level) / 2 * (resamples - 1))], values[int((1 + level) / 2 * (resamples - 1))]]


def figures(conf: list[float], right: list[bool], bins: int = BINS) -> dict:
    ece, rows = reliability(conf, right, bins)
    return {"ece": ece, "ece_interval": ece_interval(conf, right, bins), "accuracy": sum(right) / len(right),
            "mean_confidence": sum(conf) / len(conf), "n": len(conf), "bins": rows}


def lettered(path: Path, folder: Path) -> Path:
    """The multiple-choice task at `path` in MMLU's lettered format, written under `folder` (queries and few-shot
    pool alike); returns its task.yaml."""
    task, data, pool = load_task(path)
    if task.kind != "multiple_choice":
        raise GptstackError(f"{path}: calibration needs a multiple_choice task, not {task.kind}")

    def rows(records):
        out = []
        for rec in records:
            if len(rec["choices"]) > len(LETTERS):
                raise GptstackError(f"{path}: a question with {len(rec['choices'])} options has too many to letter")
            listed = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(rec["choices"]))
            out.append({"context": query_text(task, rec) + listed + "\nAnswer:",
                        "choices": list(LETTERS[:len(rec["choices"])]), "label": rec["label"]})
        return "".join(json.dumps(r) + "\n" for r in out)

    out = Path(folder) / f"{task.name}_letters"
    atomic_write_text(out / "test.jsonl", rows(data))
    atomic_write_text(out / "fewshot.jsonl", rows(pool))
    atomic_write_text(out / "task.yaml", yaml.safe_dump({
        "name": f"{task.name}_letters", "kind": "multiple_choice", "data": "test.jsonl", "fewshot": "fewshot.jsonl",
        "template": "{context}", "target_delimiter": " ", "fewshot_delimiter": task.fewshot_delimiter,
        "description": task.description}, sort_keys=False))
    return out / "task.yaml"


def calibrate(model, tok, task_paths: dict[str, Path], shots: int = 0, limit: int = 0, seed: int = 0,
              bins: int = BINS, desc: str = "") -> dict:
    """One model's calibration on multiple-choice tasks, scored by the prompting eval itself: the figures over
    every question of every task together, and per task."""
    conf, right, by_task = [], [], {}
    for name, path in task_paths.items():
        task, data, pool = load_task(path)
        if task.kind != "multiple_choice":
            raise GptstackError(f"{path}: calibration needs a multiple_choice task, not {task.kind}")
        scored = evaluate_task(model, tok, task, data, pool, shots, limit, seed, desc=f"{desc} {name}" if desc else "")
        c, r = confidences(scored["per_example"])
        if not c:
            raise GptstackError(f"{path}: no query fits the model's context of {model.cfg.n_ctx} tokens")
        by_task[name] = {k: v for k, v in figures(c, r, bins).items() if k != "bins"}
        conf += c
        right += r
    return figures(conf, right, bins) | {"by_task": by_task}


def plot_reliability(results: dict[str, dict], path: Path) -> Path:
    """Accuracy against confidence per bin: one row per format, one panel per model; the diagonal is perfect
    calibration. `results`: {model: {format: figures}}."""
    formats = list(next(iter(results.values())))
    fig, axes = plots.subplots(len(formats), len(results), figsize=(3.2 * len(results), 3.4 * len(formats)), squeeze=False)
    for row, fmt in zip(axes, formats):
        for ax, (name, by_format) in zip(row, results.items()):
            r = by_format[fmt]
            rows = [b for b in r["bins"] if b["n"]]
            width = r["bins"][0]["hi"] - r["bins"][0]["lo"]
            ax.bar([b["lo"] for b in rows], [b["accuracy"] for b in rows], width=width, align="edge",
                   edgecolor="black", alpha=0.7, label="accuracy")
            ax.plot([0, 1], [0, 1], "--", c="gray", lw=1, label="perfect")
            ax.plot([b["confidence"] for b in rows], [b["accuracy"] for b in rows], "o", c="C3", ms=3, label="bin: (mean confidence, accuracy)")
            ax.set_title(f"{name} ({fmt})\nECE {r['ece']:.3f}, acc {r['accuracy']:.2f} (n={r['n']})", fontsize=9)
            ax.set_xlabel("confidence (P of chosen answer)")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
        row[0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    return plots.save(fig, path)
