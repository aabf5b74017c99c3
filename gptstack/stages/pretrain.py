"""The pretrain stage (GPT-1's L1 on the data mixture): tokens -> LMObjective -> Trainer -> samples -> summary."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import plots
from ..checkpoint import load_model
from ..data.loader import build_sampler
from ..generate import generate
from ..io import append_jsonl, read_jsonl_loose
from ..model import GPT
from ..tokenizer import Tokenizer
from ..train.distributed import local_main_first
from ..train.lm import LMObjective
from ..train.trainer import TrainConfig, Trainer
from .base import Context, Stage

SAMPLE_PROMPTS = ["def ", "class ", "import ", "    # ", "The "]


def run_pretrain(cfg, out: Path, tok: Tokenizer) -> dict:
    t0 = time.time()
    cfg.model.vocab_size = tok.vocab_size
    seq_len = cfg.pretrain.seq_len or cfg.model.n_ctx
    with local_main_first():  # one process per machine tokenizes into the cache; the others then read it
        sampler = build_sampler(cfg.data, tok, seq_len, cfg.pretrain.seed)
    torch.manual_seed(cfg.pretrain.seed)  # the same initial weights on every rank
    model = GPT(cfg.model)
    objective = LMObjective(sampler, model.flops_per_token(seq_len), cfg.pretrain.eval_tokens)
    trainer = Trainer(cfg.pretrain, model, objective, out, metadata=model.metadata(), desc="pretrain")
    summary = trainer.fit()
    if not trainer.is_main:
        return {}
    sequences = cfg.pretrain.steps * cfg.pretrain.batch_size
    result = {"pretrain": {
        "params": model.num_params(),
        "params_non_embedding": model.num_params(embeddings=False),
        "tokens": summary["tokens"],
        "val_loss_initial": summary["initial"]["val_loss"],
        "train_val_loss": summary["final"]["val_loss"],
        "final_train_loss": summary["final_train_loss"],
        "tokens_per_sec": summary["tokens_per_sec"],
        "mfu": summary["mfu"],
        "seconds": summary["seconds"],
        "precision": summary["precision"],
        "device": summary["device"],
        "world_size": summary["world_size"],
        "mixture": sampler.epochs(sequences),
    }}
    # an FSDP model is sharded over the ranks: rank 0 samples from the gathered weights instead
    whole_model = load_model(out, trainer.device) if trainer.sharded else trainer.model
    write_samples(whole_model, tok, out / "samples.jsonl", cfg.pretrain.seed)
    result["pretrain"]["stage_seconds"] = time.time() - t0
    return result


def write_samples(model, tok: Tokenizer, path: Path, seed: int, max_new_tokens: int = 96) -> None:
    path.unlink(missing_ok=True)
    gens = generate(model, [tok.encode(p) for p in SAMPLE_PROMPTS], max_new_tokens, temperature=0.8, top_k=50,
                    stop_ids=(tok.eot,), pad_id=tok.pad, seed=seed)
    for prompt, g in zip(SAMPLE_PROMPTS, gens):
        append_jsonl(path, {"prompt": prompt, "completion": tok.decode(g.tokens, skip_special=True)})


def run(ctx: Context) -> dict:
    tok = ctx.tokenizer()
    ctx.fit_vocab(tok)
    return run_pretrain(ctx.cfg, ctx.folder("pretrain"), tok)


# ---------------------------------------------------------------- report

def plot_loss(run: Path, p: dict) -> Path | None:
    rows = read_jsonl_loose(run / "pretrain" / "metrics.jsonl")
    train = [r for r in rows if r.get("event") == "train"]
    evals = [r for r in rows if r.get("event") == "eval" and "val_loss" in r]
    if not train:
        return None
    fig, ax = plots.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss", ms=4)
    if "unigram_val_loss" in p:
        ax.axhline(p["unigram_val_loss"], ls="--", c="gray", label="unigram floor (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"pretraining: {run.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    return plots.save(fig, run / "plots" / "loss.png")


def markdown(run: Path, r: dict) -> list[str]:
    p = r["pretrain"]
    lines = ["## Pretraining (L1: next-token cross-entropy)", ""]
    if "params" in p:
        lines += [
            "| figure | value |", "|---|---|",
            f"| parameters | {p['params']:,} ({p['params_non_embedding']:,} without embeddings) |",
            f"| tokens trained | {p['tokens']:,} |",
            f"| wall time | {p['seconds']:.0f} s on {p['device']} ({p['precision']}, {p['world_size']} rank(s)) |",
            f"| throughput | {p['tokens_per_sec']:,.0f} tokens/s, MFU {p['mfu']:.1%} of the measured matmul peak |",
            f"| val loss at init | {p['val_loss_initial']:.3f} |", ""]
    if "val_loss" in p:
        lines += [
            "| held-out metric | value |", "|---|---|",
            f"| val loss (nats/token) | {p['val_loss']:.3f} |",
            f"| unigram floor | {p['unigram_val_loss']:.3f} |",
            f"| perplexity | {p['val_ppl']:.1f} |",
            f"| bits per byte | {p['val_bpb']:.3f} |",
            f"| val tokens | {p['val_tokens']:,} |", ""]
    if p.get("mixture"):
        lines += ["Data mixture (GPT-3 Table 2.2 style):", "", "| source | weight | train tokens | epochs |", "|---|---|---|---|"]
        lines += [f"| {m['source']} | {m['weight']:.0%} | {m['train_tokens']:,} | {m['epochs']:.2f} |" for m in p["mixture"]]
        lines.append("")
    plot = plot_loss(run, p)
    if plot:
        lines += [f"![loss curve]({plot.relative_to(run).as_posix()})", ""]
    samples = read_jsonl_loose(run / "pretrain" / "samples.jsonl")
    if samples:
        lines += ["### Samples (temperature 0.8, top-k 50)", ""]
        for s in samples:
            lines += ["```python", s["prompt"] + s["completion"], "```", ""]
    return lines


def headline(r: dict) -> str | None:
    if "val_loss" not in r:  # the eval stage measures it
        return None
    return (f"pretrain: val loss {r['val_loss']:.3f} (unigram floor {r['unigram_val_loss']:.3f}), "
            f"{r.get('val_bpb', 0):.3f} bits/byte")


STAGE = Stage("pretrain", run, "next-token pretraining (L1) on the data mixture", config=TrainConfig,
              depends=("data", "tokenizer", "model"), report=markdown, headline=headline)
