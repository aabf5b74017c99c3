"""All stages in order into one run folder, skipping finished ones, ending in a report.

A stage is finished when its folder holds summary.json (written last, atomically).
report.json is the deep merge of the stage summaries: stages add keys, never rename.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from . import config as configlib
from .checkpoint import load_model
from .config import RunConfig, to_dict
from .data.loader import build_sampler
from .data.sources import iter_documents, source_files
from .data.tokens import is_val
from .errors import GptstackError
from .evals.lm import lm_metrics
from .io import atomic_write_json, read_json
from .tokenizer import Tokenizer
from .train.lm import fit_vocab, run_pretrain
from .train.trainer import dist_env

STAGES = ["tokenizer", "pretrain", "eval"]


def stage_done(run: Path, stage: str) -> bool:
    return (run / stage / "summary.json").is_file()


def train_tokenizer(cfg: RunConfig, run: Path) -> dict:
    """BPE on the training documents of every source (val documents are held out from it too)."""
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

    tok = Tokenizer.train(texts(), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    if seen["bytes"] == 0:
        raise GptstackError("empty corpus: the data sources hold no training text")
    sample = val_docs or ["def f(x):\n    return x\n"]
    nbytes = sum(len(t.encode("utf-8")) for t in sample)
    ntok = sum(len(ids) for ids in tok.encode_batch(sample))
    tok.save(run / "tokenizer.json")
    result = {"tokenizer": {"vocab_size": tok.vocab_size, "bytes_per_token": nbytes / max(ntok, 1),
                            "train_bytes": seen["bytes"], "seconds": time.time() - t0}}
    atomic_write_json(run / "tokenizer" / "summary.json", result)
    return result


def eval_lm(cfg: RunConfig, run: Path) -> dict:
    tok = Tokenizer.load(run / "tokenizer.json")
    fit_vocab(cfg, tok)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(run / "pretrain", device)
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
    stages = stages or STAGES
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise GptstackError(f"unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})")
    check_sources(cfg)
    rank = dist_env()[0]
    created = not run.exists()
    _check_config(cfg, run)
    try:
        if rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            configlib.save(cfg, run / "config.yaml")
        for stage in STAGES:
            if stage not in stages:
                continue
            if stage_done(run, stage):
                log(f"[{stage}] finished already, skipping ({run / stage / 'summary.json'})")
                continue
            log(f"[{stage}] running")
            if stage == "tokenizer":
                if rank == 0:
                    train_tokenizer(cfg, run)
                _barrier()
            elif stage == "pretrain":
                tok = _tokenizer(run)
                fit_vocab(cfg, tok)
                if rank == 0:
                    configlib.save(cfg, run / "config.yaml")  # with the vocabulary filled in
                run_pretrain(cfg, run / "pretrain", tok)
            elif stage == "eval" and rank == 0:
                eval_lm(cfg, run)
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


def _check_config(cfg: RunConfig, run: Path) -> None:
    """A run folder belongs to one config: resuming with another would mix two experiments."""
    path = run / "config.yaml"
    if not path.is_file():
        return
    old = to_dict(configlib.load(path))
    new = to_dict(cfg)
    old["model"]["vocab_size"] = new["model"]["vocab_size"]  # filled in from the tokenizer
    for section in ("pretrain",):
        for k in ("steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints", "device", "compile", "eval_tokens"):
            old[section].pop(k, None)
            new[section].pop(k, None)
    if old != new:
        diffs = _diff(old, new)
        raise GptstackError(f"{path}: this run folder was made with another config ({'; '.join(diffs[:4])}); "
                            "use a new --out, or the same settings")


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def _barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_report(run: Path) -> dict:
    return read_json(Path(run) / "report.json")
