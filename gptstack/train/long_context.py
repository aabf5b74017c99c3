"""The fine-tune after a window is extended: next-token loss on corpus windows at the new length (the positions
the model has not used yet), mixed with retrieval examples (passkey and needle prompts of the train split, any
length up to the window, the fact at any depth) whose loss falls on the answer's tokens only; the two losses are
averaged separately and added."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_model
from ..data.loader import TokenSampler, build_sampler
from ..evals.lm import windows_loss
from ..errors import GptstackError
from ..evals.long_context import TASKS, Haystacks, answer_logprobs, answer_probes, make_probe, shortest_probe
from .trainer import TrainConfig, Trainer


class LongContextObjective:
    def __init__(self, sampler: TokenSampler, tok, haystacks: Haystacks, flops_per_token: float, eval_tokens: int,
                 retrieval_fraction: float, min_length: int, dev_probes: int = 4, seed: int = 0):
        self.sampler, self.tok, self.haystacks = sampler, tok, haystacks
        self._flops, self.eval_tokens = flops_per_token, eval_tokens
        shortest = max(shortest_probe(task, tok, haystacks) for task in TASKS)
        if shortest > sampler.seq_len:
            raise GptstackError(f"a {sampler.seq_len}-token window cannot hold a retrieval example ({shortest} tokens "
                                "with no filler): extend and fine-tune a model with a longer window")
        self.retrieval_fraction, self.min_length = retrieval_fraction, max(min_length, shortest)
        self.dev_probes, self.seed = dev_probes, seed

    def train_batch(self, step: int, n: int) -> dict:
        batch = {k: v.clone() for k, v in self.sampler.train_batch(step, n).items()}  # input and target share memory
        batch["retrieval"] = torch.zeros(n, dtype=torch.bool)
        rng = random.Random(f"{self.seed}/{step}")
        T = self.sampler.seq_len
        for row in range(n):
            if rng.random() >= self.retrieval_fraction:
                continue
            probe = make_probe(TASKS[row % len(TASKS)], self.tok, rng.randint(self.min_length, T + 1), rng.random(),
                               "train", step * n + row, self.seed, self.haystacks)
            ids = torch.tensor(probe.prompt + probe.answer_ids)
            L = len(ids) - 1
            batch["retrieval"][row] = True
            batch["input"][row] = self.tok.pad
            batch["input"][row, :L] = ids[:-1]
            batch["target"][row] = -100  # the loss falls on the answer alone
            batch["target"][row, L - len(probe.answer_ids):L] = ids[-len(probe.answer_ids):]
        return batch

    def weight(self, micro: dict) -> int:
        return len(micro["input"])

    def loss(self, model, micro: dict):
        """Mean loss over the corpus windows' tokens plus mean loss over the answers' tokens: a few answer tokens
        per example would otherwise drown among thousands of corpus tokens."""
        logits, _ = model(micro["input"])
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), micro["target"].flatten(), ignore_index=-100,
                                    reduction="none").view_as(micro["target"])
        scored = micro["target"] != -100
        parts, metrics = [], {"tokens": micro["input"].numel()}
        for name, rows in (("lm_loss", ~micro["retrieval"]), ("answer_loss", micro["retrieval"])):
            part = per_token[rows].sum() / scored[rows].sum().clamp(min=1)  # 0 for a kind the batch lacks
            parts.append(part)
            metrics[name] = part.item()
        return sum(parts), metrics

    def evaluate(self, model) -> dict:
        """Val loss at the new length; on dev probes of the full window, exact retrieval accuracy and the mean
        log-probability of the right answer (what the stage selects by: accuracy ties at 0 while a model learns)."""
        loss, _ = windows_loss(model, self.sampler.val_windows(0, max(self.sampler.seq_len, self.eval_tokens)))
        out = {"val_loss": loss}
        was_training = model.training
        model.eval()
        for task in TASKS:
            probes = [make_probe(task, self.tok, self.sampler.seq_len, d / 4, "dev", i, self.seed, self.haystacks)
                      for d in range(5) for i in range(self.dev_probes)]
            right = answer_probes(model, self.tok, probes)
            out[f"dev_{task}"] = sum(right) / len(right)
            logprobs = answer_logprobs(model, probes)
            out[f"dev_{task}_logprob"] = sum(logprobs) / len(logprobs)
        out["dev_retrieval"] = (out["dev_passkey"] + out["dev_needle"]) / 2
        out["dev_answer_logprob"] = (out["dev_passkey_logprob"] + out["dev_needle_logprob"]) / 2
        model.train(was_training)
        return out

    def flops_per_token(self) -> float:
        return self._flops


def finetune_at_length(model, tok, data_cfg, haystacks: Haystacks, seq_len: int, train: TrainConfig, out: Path,
                       retrieval_fraction: float, dev_probes: int, desc: str = "long context"):
    """`model` fine-tuned on the mix at seq_len tokens through the Trainer into `out`: (the published model, chosen
    by train.select_by, and the Trainer's summary)."""
    train = dataclasses.replace(train, seq_len=seq_len)
    sampler = build_sampler(data_cfg, tok, seq_len, train.seed)
    objective = LongContextObjective(sampler, tok, haystacks, model.flops_per_token(seq_len), train.eval_tokens,
                                     retrieval_fraction, min_length=seq_len // 4, dev_probes=dev_probes,
                                     seed=train.seed)
    summary = Trainer(train, model, objective, out, metadata=model.metadata(), desc=desc).fit()
    return load_model(out, "auto"), summary
