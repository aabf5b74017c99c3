"""All stages in order into one run folder, skipping finished ones, ending in a report.

A stage is finished when its folder holds summary.json (written last, atomically).
report.json is the deep merge of the stage summaries: stages add keys, never rename.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from . import config as configlib
from .checkpoint import load_model
from .config import RunConfig, to_dict
from .data.loader import build_sampler
from .data.sources import iter_documents, source_files
from .data.tokens import is_val
from .errors import GptstackError
from .evals.lm import lm_metrics
from .evals.prompting import run_prompting_stage
from .io import atomic_write_json
from .tokenizer import Tokenizer
from .train.distributed import barrier, broadcast_from_main, dist_env, init_distributed
from .train.finetune import run_finetune_stage
from .train.lm import fit_vocab, run_pretrain
from .train.rm import run_rm
from .train.sft import run_sft
from .train.trainer import RESUMABLE_KEYS

STAGES = ["tokenizer", "pretrain", "eval", "prompting", "finetune", "sft", "rm", "ppo", "scale"]
# scale (a ladder of pretrain runs into RUN/scale, ~30 CPU minutes) runs only when --stages names it, never by "all"
NAMED_ONLY = ["scale"]
# what `pipeline` runs unless --stages says otherwise; finetune (12 fine-tuning runs: 4 tasks x
# pretrained / from scratch / λ = 0) is opt-in while it costs more than the rest of the demo together
DEFAULT_STAGES = ["tokenizer", "pretrain", "eval", "prompting", "sft"]


def stage_done(run: Path, stage: str) -> bool:
    return (run / stage / "summary.json").is_file()


def train_tokenizer(cfg: RunConfig, run: Path) -> dict:
    """BPE on the training documents of every source (val documents are held out from it too), or the
    tokenizer already placed in the run folder (`pretrain --tokenizer`); then its bytes per token on val text."""
    t0 = time.time()
    budget = cfg.tokenizer.train_bytes or float("inf")
    seen = {"bytes": 0}
    val_docs = []

    def texts():
        for src in cfg.data.sources:
            for doc in iter_documents(src, cfg.data.skip_bad):
                if is_val(doc.id, cfg.data.val_fraction):
                    if len(val_docs) < 200:
                        val_docs.append(doc.text)
                    continue
                if seen["bytes"] >= budget:
                    continue
                seen["bytes"] += len(doc.text.encode("utf-8"))
                yield doc.text

    given = run / "tokenizer.json"
    if given.is_file():
        tok = Tokenizer.load(given)
        for _ in texts():  # only to find the val documents and to check the corpus is not empty
            pass
    else:
        tok = Tokenizer.train(texts(), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    if seen["bytes"] == 0:
        raise GptstackError("empty corpus: the data sources hold no training text")
    sample = val_docs or ["def f(x):\n    return x\n"]
    nbytes = sum(len(t.encode("utf-8")) for t in sample)
    ntok = sum(len(ids) for ids in tok.encode_batch(sample))
    if not given.is_file():
        tok.save(given)
    result = {"tokenizer": {"vocab_size": tok.vocab_size, "bytes_per_token": nbytes / max(ntok, 1),
                            "train_bytes": seen["bytes"], "seconds": time.time() - t0}}
    atomic_write_json(run / "tokenizer" / "summary.json", result)
    return result


def eval_lm(cfg: RunConfig, run: Path) -> dict:
    tok = Tokenizer.load(run / "tokenizer.json")
    fit_vocab(cfg, tok)
    model = load_model(run / "pretrain", "auto")
    sampler = build_sampler(cfg.data, tok, cfg.pretrain.seq_len or cfg.model.n_ctx, cfg.pretrain.seed)
    result = {"pretrain": lm_metrics(model, sampler, tok.vocab_size)}
    atomic_write_json(run / "eval" / "summary.json", result)
    return result


def check_sources(cfg: RunConfig) -> None:
    """Fail on a missing path before anything is written."""
    for src in cfg.data.sources:
        source_files(src)


def run_pipeline(cfg: RunConfig, run: Path, stages: list[str] | None = None, log=print) -> dict:
    run = Path(run)
    stages = stages or DEFAULT_STAGES
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise GptstackError(f"unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})")
    check_sources(cfg)
    init_distributed(cfg.pretrain.device)  # under torchrun every rank runs the pipeline; rank 0 writes the run folder
    rank = dist_env()[0]
    if rank != 0:
        log = _quiet
    created = not run.exists()
    _check_config(cfg, run)
    try:
        if rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            configlib.save(cfg, run / "config.yaml")
        # rank 0 writes the summaries, so its view of what is finished is the one every rank follows
        finished = broadcast_from_main([s for s in STAGES if stage_done(run, s)])
        for stage in STAGES:
            if stage not in stages:
                continue
            barrier()  # ranks start a stage together: while rank 0 runs one alone, the others wait here
            if stage in finished:
                log(f"[{stage}] finished already, skipping ({run / stage / 'summary.json'})")
                continue
            log(f"[{stage}] running")
            if stage == "tokenizer" and rank == 0:
                train_tokenizer(cfg, run)
            elif stage == "pretrain":
                tok = _tokenizer(run)
                fit_vocab(cfg, tok)
                if rank == 0:
                    configlib.save(cfg, run / "config.yaml")  # with the vocabulary filled in
                run_pretrain(cfg, run / "pretrain", tok)
            elif stage == "eval" and rank == 0:
                eval_lm(cfg, run)
            elif stage == "prompting" and rank == 0:
                run_prompting_stage(cfg, run, _tokenizer(run), log)
            elif stage == "finetune":  # the Trainer needs every rank
                tok = _tokenizer(run)
                fit_vocab(cfg, tok)
                run_finetune_stage(cfg, run, tok, log)
            elif stage == "sft":
                run_sft(cfg, run / "pretrain", run / "sft", _tokenizer(run), log)
            elif stage == "rm":
                run_rm(cfg, run / "sft", run / "rm", _tokenizer(run), log=log)
            elif stage == "ppo":
                from .train.ppo_stage import run_ppo
                run_ppo(cfg, run / "sft", run / "rm", run / "ppo", _tokenizer(run), log)
            elif stage == "scale":
                from .ladder import run_scale_stage
                if dist_env()[1] > 1:
                    raise GptstackError("the scale stage runs in one process (its rungs are small); start it without torchrun")
                run_scale_stage(cfg, run, log)
    except GptstackError:
        if created and rank == 0 and not any(stage_done(run, s) for s in STAGES):
            shutil.rmtree(run, ignore_errors=True)  # never leave a half-written run folder behind
        raise
    if rank != 0:
        return {}
    from .report import write_report
    return write_report(run)


def _tokenizer(run: Path) -> Tokenizer:
    if not (run / "tokenizer.json").is_file():
        raise GptstackError(f"{run}: no tokenizer.json; run the tokenizer stage first")
    return Tokenizer.load(run / "tokenizer.json")


# the config sections each stage's output depends on
STAGE_SECTIONS = {"tokenizer": ("data", "tokenizer"), "pretrain": ("data", "tokenizer", "model", "pretrain"),
                  "eval": ("data", "tokenizer", "model", "pretrain"), "prompting": ("prompting",), "finetune": ("finetune",),
                  "sft": ("sft",), "rm": ("sft", "rm"), "ppo": ("sft", "rm", "ppo"), "scale": ("data", "scale")}


def _check_config(cfg: RunConfig, run: Path) -> None:
    """Settings that a started stage depends on cannot change under it (that would mix two experiments);
    a stage not started yet takes new settings."""
    path = run / "config.yaml"
    if not path.is_file():
        return
    old, new = to_dict(configlib.load(path)), to_dict(cfg)
    old["model"]["vocab_size"] = new["model"]["vocab_size"]  # filled in from the tokenizer
    for d in (old, new):
        for k in RESUMABLE_KEYS:
            d["pretrain"].pop(k, None)
    started = [s for s in STAGES if (run / s).exists()]
    for stage in started:
        diffs = [d for sec in STAGE_SECTIONS[stage] for d in _diff(old[sec], new[sec], f"{sec}.")]
        if diffs:
            raise GptstackError(f"{path}: the {stage} stage was made with another config ({'; '.join(diffs[:4])}); "
                                f"use a new --out, the same settings, or delete {run / stage} to redo that stage")


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0: one copy of every message is enough."""
