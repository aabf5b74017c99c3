"""The finetune stage (GPT-1): every built-in task of the world's code corpus fine-tuned from the pretrained
model with L3 = L2 + λ·L1, and, for the report, from scratch and with λ = 0. The figures are test accuracy on
held-out code, with val beside them; the tasks' settings were chosen on val. Your own task records go through
`gptstack finetune` (train/finetune.py) instead."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import GptstackError
from ..train.distributed import broadcast_from_main
from ..train.finetune import FinetuneConfig, finetune
from .base import Context, Stage


def run(ctx: Context) -> dict:
    """Every built-in task: fine-tuned from the pretrained model, and for the report the same recipe
    from a random initialisation and with λ = 0."""
    from ..world.tasks import TASKS, build_tasks
    cfg, run, log = ctx.cfg, ctx.run, ctx.log
    tok = ctx.tokenizer()
    ctx.fit_vocab(tok)
    f = cfg.finetune
    unknown = [t for t in [*f.tasks, *f.task_epochs] if t not in TASKS]
    if unknown:
        raise GptstackError(f"config 'finetune.tasks' / 'finetune.task_epochs': unknown task(s) {', '.join(unknown)} (known: {', '.join(TASKS)})")
    # rank 0 writes the task files; the others wait for them here (and take rank 0's list)
    info = broadcast_from_main(build_tasks(run / "finetune" / "data", seed=f.train.seed) if ctx.rank == 0 else None)
    pretrained = ctx.start_model()
    results = {}
    for task in f.tasks:
        kind, files = info[task]["kind"], {k: Path(v) for k, v in info[task]["files"].items()}
        variants = {"pretrained": (pretrained, f.lm_coef)}
        if f.baselines:
            variants |= {"scratch": (None, f.lm_coef), "lambda0": (pretrained, 0.0)}
        got = {}
        task_cfg = dataclasses.replace(f, epochs=f.task_epochs.get(task, f.epochs))
        for name, (init, lm_coef) in variants.items():
            log(f"[finetune] {task} ({kind}), {name}")
            got[name] = finetune(task_cfg, kind, tok, run / "finetune" / task / name, files["train"], files["val"], files["test"],
                                 init=init, model_cfg=cfg.model, lm_coef=lm_coef, desc=f"{task}/{name}")
        results[task] = task_row(info[task], got)
    return {"finetune": results}


def task_row(task_info: dict, got: dict) -> dict:
    """One task's report row. Every setting was chosen on val and each run keeps its last step, so test is
    looked at only here: the figures are test accuracy, with val beside them to show the two agree."""
    main = got["pretrained"]
    row = {"kind": task_info["kind"], "chance": task_info["chance"], "split": "test", "accuracy": main["test"]["accuracy"],
           "val_accuracy": main["val"]["accuracy"], "n_train": main["n_train"], "n_val": main["val"]["n"],
           "n_test": main["test"]["n"], "labels": main["labels"], "truncated": main["truncated"]}
    if "f1" in main["test"]:
        row["f1"] = main["test"]["f1"]
    if "scratch" in got:
        row |= {"from_scratch_accuracy": got["scratch"]["test"]["accuracy"], "from_scratch_val_accuracy": got["scratch"]["val"]["accuracy"],
                "lambda0_accuracy": got["lambda0"]["test"]["accuracy"], "lambda0_val_accuracy": got["lambda0"]["val"]["accuracy"]}
    return row


def markdown(run: Path, r: dict) -> list[str]:
    lines = ["## Fine-tuning (GPT-1: L3 = L2 + λ·L1, a linear head on the Extract token)", "",
             "Accuracy on the test split (held-out code), with val beside it; every setting was chosen on val. "
             "*from scratch*: the same recipe from random weights; *λ = 0*: without the auxiliary LM loss.", "",
             "| task | kind | chance | val | test | F1 (test) | from scratch val | from scratch test | λ = 0 test | train examples |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for task, t in r["finetune"].items():
        f1 = f"{t['f1']:.3f}" if "f1" in t else ""
        lines.append(f"| {task} | {t['kind']} | {t['chance']:.3f} | {t['val_accuracy']:.3f} | **{t['accuracy']:.3f}** | {f1} | "
                     f"{t.get('from_scratch_val_accuracy', nan):.3f} | {t.get('from_scratch_accuracy', nan):.3f} | "
                     f"{t.get('lambda0_accuracy', nan):.3f} | {t['n_train']} |")
    lines.append("")
    return lines


# 12 fine-tuning runs (4 tasks x pretrained / from scratch / λ = 0) cost more than the rest of the demo: opt-in
STAGE = Stage("finetune", run, "GPT-1 task heads on the built-in tasks, with from-scratch and λ = 0 baselines",
              config=FinetuneConfig, report=markdown, default=False)
