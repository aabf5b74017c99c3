"""All stages in order into one run folder, skipping finished ones, ending in a report: a loop over the stage
list (stages/), which knows no stage by name.

A stage is finished when its folder holds summary.json (written last, atomically). Under torchrun every
rank runs the pipeline; rank 0 writes the run folder, and a stage without a Trainer runs on rank 0 alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

from .data.sources import source_files
from .errors import GptstackError
from .io import folder_lock
from .report import write_report
from .stages import STAGES, Context, RunConfig
from .stages.base import finished, run_stage
from .train.distributed import barrier, broadcast_from_main, dist_env, init_distributed
from .train.trainer import RESUMABLE_KEYS, TrainConfig


def default_stages() -> list[str]:
    return [s.name for s in STAGES if s.default]


def all_stages() -> list[str]:
    """What `--stages all` means: every stage but the long experiments that run only when named."""
    return [s.name for s in STAGES if not s.named_only]


def run_pipeline(cfg: RunConfig, run: Path, stages: list[str] | None = None, log=print) -> dict:
    run = Path(run)
    stages = stages or default_stages()
    unknown = [s for s in stages if s not in [x.name for x in STAGES]]
    if unknown:
        raise GptstackError(f"unknown stage(s) {', '.join(unknown)} (known: {', '.join(s.name for s in STAGES)})")
    for src in cfg.data.sources:  # a missing path fails before anything is written
        source_files(src)
    init_distributed(cfg.pretrain.device)
    rank = dist_env()[0]
    ctx = Context(run, cfg, log if rank == 0 else _quiet, rank)
    created = not run.exists()
    _check_config(cfg, run)
    held = False
    try:
        with folder_lock(run) if rank == 0 else contextlib.nullcontext():  # a second process on this folder stops here
            held = True
            if rank == 0:
                cfg.save(run / "config.yaml")
            # rank 0 writes the summaries, so its view of what is finished is the one every rank follows
            done = broadcast_from_main([s.name for s in STAGES if finished(run, s.name)])
            for stage in STAGES:
                if stage.name not in stages:
                    continue
                barrier()  # ranks start a stage together: while rank 0 runs one alone, the others wait here
                if stage.name in done:
                    ctx.log(f"[{stage.name}] finished already, skipping ({run / stage.name / 'summary.json'})")
                    continue
                ctx.log(f"[{stage.name}] running")
                if stage.all_ranks or rank == 0:
                    run_stage(stage, ctx)
            return write_report(run) if rank == 0 else {}
    except GptstackError:
        if held and created and rank == 0 and not any(finished(run, s.name) for s in STAGES):
            shutil.rmtree(run, ignore_errors=True)  # never leave a half-written run folder behind
        raise


def _check_config(cfg: RunConfig, run: Path) -> None:
    """Settings that a started stage depends on cannot change under it (that would mix two experiments);
    a stage not started yet takes new settings."""
    path = run / "config.yaml"
    if not path.is_file():
        return
    old = RunConfig.load(path)
    old.model.vocab_size = cfg.model.vocab_size  # filled in from the tokenizer
    for stage in STAGES:
        if not (run / stage.name).exists():
            continue
        diffs = [d for sec in stage.sections for d in _diff(getattr(old, sec), getattr(cfg, sec), f"{sec}.")]
        if diffs:
            raise GptstackError(f"{path}: the {stage.name} stage was made with another config ({'; '.join(diffs[:4])}); "
                                f"use a new --out, the same settings, or delete {run / stage.name} to redo that stage")
        longer = [d for sec in stage.sections for d in _diff(getattr(old, sec), getattr(cfg, sec), f"{sec}.", RESUMABLE_KEYS - {"steps"})]
        if longer and finished(run, stage.name):  # a finished stage would otherwise skip, training nothing
            raise GptstackError(f"{path}: the {stage.name} stage finished with other settings ({'; '.join(longer[:4])}); to "
                                f"train on from its last checkpoint, delete {run / stage.name / 'summary.json'} (the "
                                "schedule then stretches from there), or use a new --out")


def _diff(a, b, prefix="", resumable=RESUMABLE_KEYS) -> list[str]:
    """'key: old -> new' for every setting that differs; a training section's `resumable` settings are left out."""
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        skip = resumable if isinstance(a, TrainConfig) else ()
        return [d for f in dataclasses.fields(a) if f.name not in skip
                for d in _diff(getattr(a, f.name), getattr(b, f.name), f"{prefix}{f.name}.", resumable)]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0: one copy of every message is enough."""
