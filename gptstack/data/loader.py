"""Batches for next-token training from a weighted mixture of tokenized sources.

The batch of step s is a pure function of (seed, s): each sequence picks its
source by the mixture weights (GPT-3 Table 2.2: weight = share of training
examples, not of data size) and a random window in it. So the data cursor is
just the step, resume is exact, and any split of the global batch over ranks
and accumulation steps sees the same sequences.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import GptstackError
from ..tokenizer import Tokenizer, conversation_images
from .tokens import TokenSplits


class TokenSampler:
    def __init__(self, splits: list[TokenSplits], weights: list[float], seq_len: int, seed: int):
        for s in splits:
            for name, arr in (("train", s.train), ("val", s.val)):
                if len(arr) < seq_len + 2:
                    raise GptstackError(
                        f"data source '{s.source}': its {name} split has {len(arr)} tokens, fewer than "
                        f"one sequence of {seq_len + 1}; add data or lower pretrain.seq_len")
        self.splits = splits
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.seq_len = seq_len
        self.seed = seed

    def train_batch(self, step: int, n: int) -> dict:
        rng = np.random.default_rng((self.seed, step))
        which = rng.choice(len(self.splits), size=n, p=self.weights)
        rows = []
        for i in which:
            arr = self.splits[i].train
            o = int(rng.integers(0, len(arr) - self.seq_len - 1))
            rows.append(arr[o:o + self.seq_len + 1])
        data = torch.from_numpy(np.stack(rows).astype(np.int64))
        return {"input": data[:, :-1], "target": data[:, 1:]}

    def val_windows(self, source: int, max_tokens: int | None = None) -> torch.Tensor:
        """Non-overlapping (n, seq_len+1) windows of a source's val split, evenly spread if capped."""
        arr = self.splits[source].val
        T = self.seq_len
        starts = np.arange(0, len(arr) - T - 1, T)
        if max_tokens and len(starts) * T > max_tokens:
            keep = max(1, max_tokens // T)
            starts = starts[np.linspace(0, len(starts) - 1, keep).round().astype(int)]
        return torch.from_numpy(np.stack([arr[s:s + T + 1] for s in starts]).astype(np.int64))

    def epochs(self, sequences: int) -> list[dict]:
        """Per source: tokens, weight, and epochs seen after `sequences` training sequences."""
        out = []
        for s, w in zip(self.splits, self.weights):
            seen = sequences * self.seq_len * w
            out.append({"source": s.source, "weight": float(w), "train_tokens": int(len(s.train)),
                        "epochs": float(seen / len(s.train))})
        return out


def build_sampler(data_cfg, tok, seq_len: int, seed: int) -> TokenSampler:
    """Tokenize (or reuse the cached tokens of) every source of the mixture."""
    from .tokens import tokenize_source
    splits = [tokenize_source(s, tok, data_cfg.val_fraction, data_cfg.skip_bad) for s in data_cfg.sources]
    return TokenSampler(splits, [s.weight for s in data_cfg.sources], seq_len, seed)


def right_pad(rows: list[list[int]], pad: int, length: int | None = None) -> torch.Tensor:
    """Token rows of different lengths as one (len(rows), length or the longest) tensor, padded on the right."""
    out = torch.full((len(rows), length or max(map(len, rows))), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class Demonstrations:
    """Rendered conversations as (ids, learn-mask) pairs, batched right-padded with -100 targets. Conversations
    with image parts (the images as (3, S, S) uint8 tensors) need `image_tokens`, the model's placeholders per
    image; their batches also carry `images` (B, most images in a row, 3, S, S) and `image_count` (B,)."""

    def __init__(self, conversations: list[list[dict]], tok: Tokenizer, n_ctx: int, image_tokens: int = 0):
        self.examples, self.images, self.truncated = [], [], 0
        for conv in conversations:
            ids, learn = tok.render_chat(conv, image_tokens=image_tokens)
            images = conversation_images(conv)
            if len(ids) > n_ctx:  # keep the end: the answer SFT learns is there
                if images:
                    raise GptstackError(f"a conversation with images is {len(ids)} tokens, over the context of {n_ctx}")
                ids, learn = ids[-n_ctx:], learn[-n_ctx:]
                self.truncated += 1
            self.examples.append((ids, learn))
            self.images.append(images)
        self.pad = tok.pad

    def __len__(self):
        return len(self.examples)

    def batch(self, indices) -> dict:
        indices = list(indices)
        ex = [self.examples[i] for i in indices]
        # target t+1 is learned when it is the assistant's
        targets = [[t if keep else -100 for t, keep in zip(ids[1:], learn[1:])] for ids, learn in ex]
        out = {"input": right_pad([ids[:-1] for ids, _ in ex], self.pad), "target": right_pad(targets, -100)}
        rows = [self.images[i] for i in indices]
        most = max(map(len, rows))
        if most:  # one row per example (so any slice of the batch keeps its images), padded with blank images
            shape = next(r[0] for r in rows if r).shape
            out["images"] = torch.zeros(len(rows), most, *shape, dtype=torch.uint8)
            for i, r in enumerate(rows):
                if r:
                    out["images"][i, :len(r)] = torch.stack(r)
            out["image_count"] = torch.tensor([len(r) for r in rows])
        return out


def batch_images(batch: dict) -> torch.Tensor | None:
    """A batch's images in reading order, (N, 3, S, S), as the model's `images` takes them (None: no images)."""
    if "images" not in batch:
        return None
    images, count = batch["images"], batch["image_count"]
    return images[torch.arange(images.size(1), device=count.device)[None, :] < count[:, None]]


def epoch_indices(seed: int, step: int, n: int, size: int) -> list[int]:
    """The example indices of step `step`'s batch of `n` when training makes epochs over `size`
    examples, reshuffled each epoch: a pure function of the step, so resume is exact."""
    idx = np.arange(step * n, (step + 1) * n)
    order = {e: np.random.default_rng((seed, int(e))).permutation(size) for e in np.unique(idx // size)}
    return [int(order[i // size][i % size]) for i in idx]
