"""Supervised fine-tuning on demonstrations (InstructGPT step 1): next-token loss on the assistant's
tokens only, through the chat template. With the embedded world, the model kept is the one whose
greedy answers to held-out prompts get the best gold score (InstructGPT picks by RM score; the world
has a gold labeler)."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..config import RunConfig, SFTConfig
from ..data.records import read_sft_records
from ..data.loader import epoch_indices
from ..errors import GptstackError
from ..io import atomic_write_json, atomic_write_text
from ..tokenizer import Tokenizer
from .trainer import Trainer


class Demonstrations:
    """Rendered conversations as (ids, learn-mask) pairs, batched right-padded with -100 targets."""

    def __init__(self, conversations: list[list[dict]], tok: Tokenizer, n_ctx: int):
        self.examples, self.truncated = [], 0
        for conv in conversations:
            ids, learn = tok.render_chat(conv)
            if len(ids) > n_ctx:  # keep the end: the answer SFT learns is there
                ids, learn = ids[-n_ctx:], learn[-n_ctx:]
                self.truncated += 1
            self.examples.append((ids, learn))
        self.pad = tok.pad

    def __len__(self):
        return len(self.examples)

    def batch(self, indices) -> dict:
        ex = [self.examples[i] for i in indices]
        T = max(len(ids) for ids, _ in ex) - 1
        inputs = torch.full((len(ex), T), self.pad, dtype=torch.long)
        targets = torch.full((len(ex), T), -100, dtype=torch.long)
        for i, (ids, learn) in enumerate(ex):
            ids_t = torch.tensor(ids)
            inputs[i, :len(ids) - 1] = ids_t[:-1]
            keep = torch.tensor(learn[1:])  # target t+1 is learned when it is the assistant's
            targets[i, :len(ids) - 1] = ids_t[1:].masked_fill(~keep, -100)
        return {"input": inputs, "target": targets}


class SFTObjective:
    def __init__(self, train: Demonstrations, val: Demonstrations, seed: int, flops_per_token: float,
                 tok: Tokenizer | None = None, eval_prompts=None, max_new_tokens: int = 64):
        self.train, self.val, self.seed, self._flops = train, val, seed, flops_per_token
        self.tok, self.eval_prompts, self.max_new_tokens = tok, eval_prompts, max_new_tokens

    def train_batch(self, step: int, n: int) -> dict:
        return self.train.batch(epoch_indices(self.seed, step, n, len(self.train)))

    def weight(self, micro: dict) -> int:
        return int((micro["target"] != -100).sum())

    def loss(self, model, micro: dict):
        _, loss = model(micro["input"], micro["target"])
        return loss, {"tokens": int((micro["input"] != self.train.pad).sum())}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        total, count = 0.0, 0
        for start in range(0, len(self.val), 64):
            b = self.val.batch(range(start, min(start + 64, len(self.val))))
            b = {k: v.to(next(model.parameters()).device) for k, v in b.items()}
            n = int((b["target"] != -100).sum())
            total, count = total + model(b["input"], b["target"])[1].item() * n, count + n
        out = {"val_loss": total / max(count, 1)}
        if self.eval_prompts:
            from ..evals.instruct import evaluate_instructions
            figures, _ = evaluate_instructions(model, self.tok, self.eval_prompts, self.max_new_tokens)
            out |= {"gold_score": figures["gold_score"], "accuracy": figures["accuracy"]}
        return out

    def flops_per_token(self) -> float:
        return self._flops


def sft_data(cfg: SFTConfig):
    """(train conversations, val conversations, held-out suite prompts or None) from the config."""
    if cfg.data == "world":
        from ..world.instructions import InstructionSuite
        suite = InstructionSuite(seed=cfg.seed)
        demos = suite.demonstrations("train", cfg.demonstrations, shares=cfg.shares or None, seed=cfg.seed)
        convs = [_conversation(p, response) for p, response, _ in demos]
        n_val = max(1, len(convs) // 20)
        prompts = suite.prompts("heldout", cfg.eval_prompts, seed=cfg.seed + 1)
        return convs[n_val:], convs[:n_val], prompts
    path = Path(cfg.data)
    convs = read_sft_records(path)
    if cfg.val_data:
        return convs, read_sft_records(Path(cfg.val_data)), None
    if len(convs) < 2:
        raise GptstackError(f"{path}: SFT needs at least two records (one is held out for validation)")
    return [c for i, c in enumerate(convs) if i % 10], convs[::10], None  # every 10th record held out


def _conversation(prompt, response: str) -> list[dict]:
    from ..evals.instruct import conversation
    return conversation(prompt) + [{"role": "assistant", "content": response}]


def run_sft(cfg: RunConfig, init: Path, out: Path, tok: Tokenizer, log=print) -> dict:
    """SFT from a pretrained (or any gptstack) model folder into OUT; with the embedded world, then the
    held-out eval of both models (the pretrained one prompted with the same template). Returns the
    summary ({"sft": ...}), also written to OUT/summary.json."""
    s = cfg.sft
    t0 = time.time()
    torch.manual_seed(s.train.seed)
    model = load_model(init)
    model.train()
    train_convs, val_convs, prompts = sft_data(s)
    train = Demonstrations(train_convs, tok, model.cfg.n_ctx)
    val = Demonstrations(val_convs, tok, model.cfg.n_ctx)
    steps = s.train.steps or max(1, math.ceil(s.epochs * len(train) / s.train.batch_size))
    select_by = s.train.select_by or ("gold_score" if prompts else "")
    mean_len = sum(len(ids) for ids, _ in train.examples) / len(train)
    train_cfg = dataclasses.replace(s.train, steps=steps, select_by=select_by,
                                    ckpt_every=min(s.train.ckpt_every, steps), eval_every=s.train.eval_every or steps)
    objective = SFTObjective(train, val, train_cfg.seed, model.flops_per_token(int(mean_len)), tok, prompts, s.max_new_tokens)
    trainer = Trainer(train_cfg, model, objective, out, metadata=model.metadata(), desc="sft")
    summary = trainer.fit()
    if not trainer.is_main:
        return {}
    result = {"steps": steps, "demonstrations": len(train), "val_demonstrations": len(val),
              "truncated": train.truncated + val.truncated, "val_loss": (summary.get("final") or {}).get("val_loss"),
              "selected": summary.get("selected"), "tokens_per_sec": summary.get("tokens_per_sec"),
              "mfu": summary.get("mfu"), "train_seconds": summary.get("seconds")}
    if result["truncated"]:
        log(f"[sft] note: {result['truncated']} conversations were longer than {model.cfg.n_ctx} tokens; their start was cut")
    if prompts:
        from ..evals.instruct import evaluate_instructions
        log(f"[sft] held-out eval on {len(prompts)} prompts of unseen templates: the pretrained model (same template), then SFT")
        base, _ = evaluate_instructions(load_model(init, "auto"), tok, prompts, s.max_new_tokens)
        figures, samples = evaluate_instructions(load_model(out, "auto"), tok, prompts, s.max_new_tokens)
        result |= figures
        result |= {"base_gold_score": base["gold_score"], "base_accuracy": base["accuracy"],
                   "base_by_family": base["by_family"], "base_refusal_rate_disallowed": base["refusal_rate_disallowed"],
                   "base_refusal_rate_allowed": base["refusal_rate_allowed"]}
        atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
    result["seconds"] = time.time() - t0
    summary = {"sft": result}
    atomic_write_json(out / "summary.json", summary)
    return summary
