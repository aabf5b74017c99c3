"""GPT-1's L1 (and PPO-ptx's ptx term): mean next-token cross-entropy, and the pretrain stage."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..config import RunConfig
from ..data.loader import TokenSampler, build_sampler
from ..evals.lm import windows_loss
from ..generate import generate
from ..io import append_jsonl, atomic_write_json
from ..model import GPT
from ..tokenizer import Tokenizer
from .distributed import local_main_first
from .trainer import Trainer

SAMPLE_PROMPTS = ["def ", "class ", "import ", "    # ", "The "]


class LMObjective:
    def __init__(self, sampler: TokenSampler, flops_per_token: float, eval_tokens: int):
        self.sampler = sampler
        self._flops = flops_per_token
        self.eval_tokens = eval_tokens

    def train_batch(self, step: int, n: int) -> dict:
        return self.sampler.train_batch(step, n)

    def weight(self, micro: dict) -> int:
        return micro["target"].numel()

    def loss(self, model, micro: dict):
        _, loss = model(micro["input"], micro["target"])
        return loss, {"tokens": micro["target"].numel()}

    def evaluate(self, model) -> dict:
        out, total, weight = {}, 0.0, 0.0
        for i, (split, w) in enumerate(zip(self.sampler.splits, self.sampler.weights)):
            share = max(self.sampler.seq_len, int(self.eval_tokens * w))
            loss, _ = windows_loss(model, self.sampler.val_windows(i, share))
            if len(self.sampler.splits) > 1:
                out[f"val_loss/{split.source}"] = loss
            total, weight = total + w * loss, weight + w
        out["val_loss"] = total / weight
        return out

    def flops_per_token(self) -> float:
        return self._flops


def fit_vocab(cfg: RunConfig, tok: Tokenizer) -> None:
    """The model's vocabulary is the tokenizer's; the preset's number is only the target."""
    cfg.model.vocab_size = tok.vocab_size


def run_pretrain(cfg: RunConfig, out: Path, tok: Tokenizer) -> dict:
    t0 = time.time()
    fit_vocab(cfg, tok)
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
    atomic_write_json(out / "summary.json", result)
    return result


def write_samples(model, tok: Tokenizer, path: Path, seed: int, max_new_tokens: int = 96) -> None:
    path.unlink(missing_ok=True)
    gens = generate(model, [tok.encode(p) for p in SAMPLE_PROMPTS], max_new_tokens, temperature=0.8, top_k=50,
                    stop_ids=(tok.eot,), pad_id=tok.pad, seed=seed)
    for prompt, g in zip(SAMPLE_PROMPTS, gens):
        append_jsonl(path, {"prompt": prompt, "completion": tok.decode(g.tokens, skip_special=True)})

