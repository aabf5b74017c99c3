"""GPT-1 fine-tuning: the pretrained decoder, a linear head on the Extract token, L3 = L2 + λ·L1.

Input transformations (Radford et al. 2018, Figure 1):
    classification    [start; text; extract]
    entailment        [start; premise; delim; hypothesis; extract]
    similarity        [start; a; delim; b; extract] and [start; b; delim; a; extract],
                      the two final hidden states summed before the head
    multiple choice   [start; context; delim; answer_k; extract] for each k, one score each,
                      softmax across the answers
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import load_model, read_weights
from ..config import at_least
from ..data.records import label_set, read_task_records
from ..data.loader import epoch_indices, right_pad
from ..errors import GptstackError
from ..io import atomic_write_json
from ..model import GPT, Head
from ..tokenizer import Tokenizer
from .distributed import barrier, init_distributed, is_main
from .trainer import TrainConfig, Trainer, autocast, placement


def _finetune_train() -> "TrainConfig":
    # GPT-1's fine-tuning recipe: lr 6.25e-5, batch 32, linear decay to 0 (warmup: FinetuneConfig)
    return TrainConfig(steps=0, batch_size=32, lr=6.25e-5, schedule="linear", min_lr_ratio=0.0, warmup_steps=0,
                       weight_decay=0.01, log_every=10, eval_every=0, ckpt_every=1000, keep_checkpoints=1)


@dataclass
class FinetuneConfig:
    tasks: list[str] = field(default_factory=lambda: ["module", "value_claim", "renamed", "continuation"])
    epochs: float = 3.0
    task_epochs: dict[str, float] = field(default_factory=dict)  # built-in task -> epochs, where it differs from `epochs`
    warmup_fraction: float = 0.002  # GPT-1: 0.2% of training
    lm_coef: float = 0.5  # λ in L3 = L2 + λ·L1 (0 turns the auxiliary LM loss off)
    head_dropout: float = 0.1
    max_len: int = 0  # tokens per input sequence (0: the model's context)
    truncate: Literal["left", "right"] = "left"  # over-long inputs lose tokens from this side
    baselines: bool = True  # the pipeline also trains from scratch and with λ = 0, for the report
    train: TrainConfig = field(default_factory=_finetune_train)

    def problems(self):
        yield from at_least(self, 0, "epochs", "warmup_fraction", "lm_coef", "head_dropout", "max_len")


# ---------------------------------------------------------------- input transformations

GPT1_TOKENS = ("<|start|>", "<|delim|>", "<|extract|>")  # the input transformations' start, delimiter and extract


class TaskEncoder:
    def __init__(self, tok: Tokenizer, kind: str, max_len: int, truncate: str = "left"):
        if truncate not in ("left", "right"):
            raise GptstackError(f"truncate must be 'left' or 'right', got {truncate!r}")
        self.tok, self.kind, self.max_len, self.truncate = tok, kind, max_len, truncate
        self.start, self.delim, self.extract = (tok.special[t] for t in GPT1_TOKENS)

    def _cut(self, ids: list[int], n: int) -> list[int]:
        if len(ids) <= n:
            return ids
        return ids[len(ids) - n:] if self.truncate == "left" else ids[:n]

    def _pair(self, a: list[int], b: list[int]) -> tuple[list[int], list[int], bool]:
        """Fit two parts into the budget; the longer part gives way first."""
        budget = self.max_len - 3
        if len(a) + len(b) <= budget:
            return a, b, False
        if len(a) >= len(b):
            a = self._cut(a, max(budget - len(b), budget // 2))
            b = self._cut(b, budget - len(a))
        else:
            b = self._cut(b, max(budget - len(a), budget // 2))
            a = self._cut(a, budget - len(b))
        return a, b, True

    def encode(self, rec: dict) -> tuple[list[list[int]], int, bool]:
        """(sequences, index of the sequence the LM loss reads, truncated?)"""
        enc = self.tok.encode
        if self.kind == "classification":
            text = enc(rec["text"])
            cut = self._cut(text, self.max_len - 2)
            return [[self.start, *cut, self.extract]], 0, len(cut) < len(text)
        if self.kind == "entailment":
            a, b, cut = self._pair(enc(rec["premise"]), enc(rec["hypothesis"]))
            return [[self.start, *a, self.delim, *b, self.extract]], 0, cut
        if self.kind == "similarity":
            a, b, cut = self._pair(enc(rec["text_a"]), enc(rec["text_b"]))
            return [[self.start, *a, self.delim, *b, self.extract], [self.start, *b, self.delim, *a, self.extract]], 0, cut
        context = enc(rec["context"])
        seqs, any_cut = [], False
        for choice in rec["choices"]:
            a, b, cut = self._pair(context, enc(choice))
            seqs.append([self.start, *a, self.delim, *b, self.extract])
            any_cut |= cut
        return seqs, rec.get("label", 0), any_cut  # the LM loss reads the real answer's text


# ---------------------------------------------------------------- model

class TaskModel(nn.Module):
    """The decoder plus a head reading each sequence's final (Extract) hidden state."""

    def __init__(self, gpt: GPT, kind: str, n_labels: int, dropout: float):
        super().__init__()
        self.gpt, self.kind = gpt, kind
        self.head = Head(gpt.cfg.n_embd, 1 if kind == "multiple_choice" else n_labels, dropout)

    def forward(self, ids, extract, lm_rows=None):
        """ids (B, C, T), extract (B, C) -> task logits (B, labels or C), LM logits of rows lm_rows (B, T, V)."""
        B, C, T = ids.shape
        h = self.gpt.hidden(ids.view(B * C, T))
        h_ext = h[torch.arange(B * C, device=ids.device), extract.view(-1)].view(B, C, -1)
        if self.kind == "multiple_choice":
            logits = self.head(h_ext).squeeze(-1)  # one score per answer
        else:
            logits = self.head(h_ext.sum(1))  # similarity: both orders summed; others: C = 1
        lm = None
        if lm_rows is not None:
            lm = self.gpt.logits(h.view(B, C, T, -1)[torch.arange(B, device=ids.device), lm_rows])
        return logits, lm


# ---------------------------------------------------------------- objective

class TaskData:
    """Encoded examples of one file, batched as padded (n, C, T) tensors."""

    def __init__(self, records: list[dict], encoder: TaskEncoder, labels: list | None, path: Path):
        self.records = records
        self.examples, self.truncated = [], 0
        for rec in records:
            seqs, lm_row, cut = encoder.encode(rec)
            self.truncated += cut
            if labels is None or "label" not in rec:
                y = -1
            elif encoder.kind == "multiple_choice":
                y = rec["label"]
            elif rec["label"] in labels:
                y = labels.index(rec["label"])
            else:
                raise GptstackError(f"{path}:{rec['_line']}: field 'label' {rec['label']!r} is not among the training labels {labels}")
            self.examples.append((seqs, lm_row, y))
        self.pad = encoder.tok.pad

    def __len__(self):
        return len(self.examples)

    def batch(self, indices) -> dict:
        ex = [self.examples[i] for i in indices]
        C = max(len(s) for s, _, _ in ex)
        slots = [seqs[c] if c < len(seqs) else [] for seqs, _, _ in ex for c in range(C)]  # fewer choices: empty slots
        ids = right_pad(slots, self.pad).view(len(ex), C, -1)
        extract = torch.tensor([max(len(q) - 1, 0) for q in slots]).view(len(ex), C)
        choice_mask = torch.tensor([len(q) > 0 for q in slots]).view(len(ex), C)
        # the LM loss predicts each text token of its row; not start/extract
        lm_target = right_pad([seqs[lm_row][1:-1] for seqs, lm_row, _ in ex], -100, ids.size(-1))
        return {"ids": ids, "extract": extract, "choice_mask": choice_mask, "lm_row": torch.tensor([e[1] for e in ex]),
                "lm_target": lm_target, "label": torch.tensor([e[2] for e in ex])}


class FinetuneObjective:
    """L3 = L2 + λ·L1: the task's cross-entropy plus λ times the LM loss on the task's input."""

    def __init__(self, train: TaskData, val: TaskData, lm_coef: float, seed: int, n_labels: int, kind: str):
        self.train, self.val, self.lm_coef, self.seed, self.n_labels = train, val, lm_coef, seed, n_labels
        self.choices = kind == "multiple_choice"

    def train_batch(self, step: int, n: int) -> dict:
        return self.train.batch(epoch_indices(self.seed, step, n, len(self.train)))

    def weight(self, micro: dict) -> int:
        return len(micro["label"])

    def loss(self, model, micro: dict):
        use_lm = self.lm_coef > 0
        logits, lm = model(micro["ids"], micro["extract"], micro["lm_row"] if use_lm else None)
        if self.choices:  # answers a record lacks (fewer choices than the widest record) get no mass
            logits = logits.masked_fill(~micro["choice_mask"], float("-inf"))
        l2 = F.cross_entropy(logits.float(), micro["label"])
        metrics = {"task_loss": l2.detach(), "accuracy": (logits.argmax(-1) == micro["label"]).float().mean(),
                   "tokens": int((micro["ids"] != self.train.pad).sum())}
        if not use_lm:
            return l2, metrics
        l1 = F.cross_entropy(lm.flatten(0, 1).float(), micro["lm_target"].flatten(), ignore_index=-100)
        metrics["lm_loss"] = l1.detach()
        return l2 + self.lm_coef * l1, metrics

    def evaluate(self, model) -> dict:
        m = scores(predict_logits(model, self.val), self.val, self.n_labels)
        return {"val_accuracy": m["accuracy"]}


@torch.no_grad()
def predict_logits(model: TaskModel, data: TaskData, batch_size: int = 32) -> torch.Tensor:
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(data), batch_size):
        b = data.batch(range(i, min(i + batch_size, len(data))))
        logits, _ = model(b["ids"].to(device), b["extract"].to(device))
        if model.kind == "multiple_choice":
            logits = logits.masked_fill(~b["choice_mask"].to(device), float("-inf"))
        out.append(logits.float().cpu())
    model.train(was)
    return torch.cat(out)


def scores(logits: torch.Tensor, data: TaskData, n_labels: int) -> dict:
    y = torch.tensor([e[2] for e in data.examples])
    pred = logits.argmax(-1)
    out = {"accuracy": (pred == y).float().mean().item(), "n": len(y)}
    if n_labels == 2:  # F1 of the positive class (the second label in sorted order)
        tp = ((pred == 1) & (y == 1)).sum().item()
        fp = ((pred == 1) & (y == 0)).sum().item()
        fn = ((pred == 0) & (y == 1)).sum().item()
        out["f1"] = 2 * tp / max(2 * tp + fp + fn, 1)
    return out


# ---------------------------------------------------------------- running

def finetune(cfg: FinetuneConfig, kind: str, tok: Tokenizer, out: Path, train_path: Path, val_path: Path | None,
             test_path: Path | None = None, init: Path | None = None, model_cfg=None, lm_coef: float | None = None,
             desc: str = "finetune") -> dict:
    """Fine-tune from a pretrained stage folder `init` (or from scratch with `model_cfg`); returns the summary.
    Without `val_path`, every 10th training record is held out (errors still name the training file's lines).
    The model kept is the last step's, or with `train.select_by: val_accuracy` the best val eval's: test is
    scored once, on the kept model, and chooses nothing."""
    lm_coef = cfg.lm_coef if lm_coef is None else lm_coef
    init_distributed(cfg.train.device)
    device, precision = placement(cfg.train)
    torch.manual_seed(cfg.train.seed)
    gpt = load_model(init) if init is not None else GPT(model_cfg)
    if any(t not in tok.special for t in GPT1_TOKENS):  # an imported model: GPT-1's input tokens join its vocabulary
        tok = tok.with_specials(GPT1_TOKENS)
        gpt.grow_vocab(tok.vocab_size)
    gpt.train()
    max_len = min(cfg.max_len or gpt.cfg.n_ctx, gpt.cfg.n_ctx)
    encoder = TaskEncoder(tok, kind, max_len, cfg.truncate)
    train_records = read_task_records(train_path, kind)
    if val_path is None:
        train_records, val_records = [r for i, r in enumerate(train_records) if i % 10], train_records[::10]
    else:
        val_records = read_task_records(val_path, kind)
    labels = list(range(max(len(r["choices"]) for r in train_records))) if kind == "multiple_choice" else label_set(train_records, train_path)
    train = TaskData(train_records, encoder, labels, train_path)
    val = TaskData(val_records, encoder, labels, val_path or train_path)
    n_labels = len(labels)
    model = TaskModel(gpt, kind, n_labels, cfg.head_dropout)
    steps = max(1, math.ceil(cfg.epochs * len(train) / cfg.train.batch_size))
    train_cfg = dataclasses.replace(cfg.train, steps=steps, warmup_steps=max(1, round(cfg.warmup_fraction * steps)),
                                    ckpt_every=min(cfg.train.ckpt_every, steps))
    task_meta = {"kind": kind, "labels": labels, "max_len": max_len, "truncate": cfg.truncate}
    meta = {**gpt.metadata(), "gptstack.task": json.dumps(task_meta)}
    objective = FinetuneObjective(train, val, lm_coef, train_cfg.seed, n_labels, kind)
    trainer = Trainer(train_cfg, model, objective, out, metadata=meta, desc=desc)
    summary = trainer.fit()  # rank 0's, on every rank, once the model is published
    kept, _ = load_task_model(out, device)  # what the run published (whole, under DDP or FSDP), not the last step's weights
    with autocast(device, precision):
        result = {"kind": kind, "labels": labels, "lm_coef": lm_coef, "n_train": len(train), "steps": steps,
                  "val": scores(predict_logits(kept, val), val, n_labels),
                  "truncated": train.truncated + val.truncated, "seconds": summary.get("seconds")}
        if summary.get("selected"):
            result["selected"] = summary["selected"]
        if test_path is not None:
            test = TaskData(read_task_records(test_path, kind), encoder, labels, test_path)
            result["test"] = scores(predict_logits(kept, test), test, n_labels)
            result["truncated"] += test.truncated
    if result["truncated"] and is_main():
        print(f"[{desc}] note: {result['truncated']} inputs were longer than {max_len} tokens and were cut on the {cfg.truncate}")
    if is_main():
        atomic_write_json(out / "summary.json", result)
        tok.save(out / "tokenizer.json")  # the model's own tokenizer (grown for an imported model); predict finds it here
    barrier()
    return result


def load_task_model(where: Path, device="cpu") -> tuple[TaskModel, dict]:
    from ..checkpoint import model_path
    path = model_path(where)
    state, meta = read_weights(path)
    if "gptstack.task" not in meta:
        raise GptstackError(f"{path}: not a fine-tuned task model (no task in its header)")
    task = json.loads(meta["gptstack.task"])
    n_labels = len(task["labels"])
    model = TaskModel(GPT(GPT.config_from_metadata(meta)), task["kind"], n_labels, 0.0)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), task


def predict(model_dir: Path, tok: Tokenizer, data_path: Path) -> list[dict]:
    """Each record with its predicted label and the probabilities of every label (or choice)."""
    model, task = load_task_model(model_dir)
    records = read_task_records(data_path, task["kind"], labelled=False)
    data = TaskData(records, TaskEncoder(tok, task["kind"], task["max_len"], task["truncate"]), None, data_path)
    probs = predict_logits(model, data).softmax(-1)
    out = []
    for rec, p in zip(records, probs):
        rec = {k: v for k, v in rec.items() if k != "_line"}
        if task["kind"] == "multiple_choice":
            rec["prediction"] = int(p.argmax())
            rec["probabilities"] = [round(float(x), 4) for x in p[:len(rec["choices"])]]
        else:
            rec["prediction"] = task["labels"][int(p.argmax())]
            rec["probabilities"] = {str(l): round(float(x), 4) for l, x in zip(task["labels"], p)}
        out.append(rec)
    return out
