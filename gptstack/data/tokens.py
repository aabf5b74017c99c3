"""Tokenized splits on disk: one uint16/uint32 token file per split plus an index.

Written once per (source content, tokenizer, split settings) into the cache
(GPTSTACK_CACHE, default ~/.cache/gptstack) and memory-mapped by every run
after that. Documents are joined with <|endoftext|>; a document goes to val
by a hash of its id, so the split does not move when files are added.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GptstackError
from ..io import atomic_write_json
from ..tokenizer import Tokenizer
from .sources import LoadStats, SourceConfig, fingerprint, iter_documents

FORMAT_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("GPTSTACK_CACHE", Path.home() / ".cache" / "gptstack")).expanduser()


@dataclass
class TokenSplits:
    source: str
    train: np.ndarray
    val: np.ndarray
    train_bytes: int
    val_bytes: int
    documents: int
    skipped: int


def is_val(doc_id: str, val_fraction: float) -> bool:
    h = int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16)
    return h / 2**32 < val_fraction


def tokenize_source(src: SourceConfig, tok: Tokenizer, val_fraction: float, skip_bad: bool = False) -> TokenSplits:
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, fingerprint(src), tok.fingerprint(), val_fraction, skip_bad]).encode()).hexdigest()[:20]
    folder = cache_dir() / "tokens" / key
    if not (folder / "index.json").exists():
        _write_splits(src, tok, val_fraction, skip_bad, folder)
    index = json.loads((folder / "index.json").read_text())
    dtype = np.dtype(index["dtype"])
    return TokenSplits(
        source=src.path,
        train=np.memmap(folder / "train.bin", dtype=dtype, mode="r"),
        val=np.memmap(folder / "val.bin", dtype=dtype, mode="r"),
        train_bytes=index["train_bytes"], val_bytes=index["val_bytes"],
        documents=index["documents"], skipped=index["skipped"],
    )


def _write_splits(src, tok: Tokenizer, val_fraction, skip_bad, folder: Path) -> None:
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats = LoadStats()
    nbytes = {"train": 0, "val": 0}
    files = {s: open(tmp / f"{s}.bin", "wb") for s in ("train", "val")}
    try:
        batch = []

        def flush():
            for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch])):
                split = "val" if is_val(doc.id, val_fraction) else "train"
                files[split].write(np.asarray(ids + [tok.eot], dtype=dtype).tobytes())
                nbytes[split] += len(doc.text.encode("utf-8"))
            batch.clear()

        for doc in iter_documents(src, skip_bad, stats):
            batch.append(doc)
            if len(batch) >= 256:
                flush()
        flush()
    finally:
        for f in files.values():
            f.close()
    if nbytes["train"] + nbytes["val"] == 0:
        shutil.rmtree(tmp)
        raise GptstackError(f"data source '{src.path}': empty corpus (no text found)")
    if nbytes["train"] == 0 or nbytes["val"] == 0:
        _split_tail(tmp, dtype, val_fraction, nbytes)  # too few documents to split by document
    atomic_write_json(tmp / "index.json", {
        "source": src.path, "dtype": np.dtype(dtype).name, "tokenizer": tok.fingerprint(),
        "train_tokens": os.path.getsize(tmp / "train.bin") // np.dtype(dtype).itemsize,
        "val_tokens": os.path.getsize(tmp / "val.bin") // np.dtype(dtype).itemsize,
        "train_bytes": nbytes["train"], "val_bytes": nbytes["val"],
        "documents": stats.documents, "skipped": len(stats.skipped), "skipped_examples": stats.skipped[:20],
    })
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process wrote the same cache entry first
        shutil.rmtree(tmp, ignore_errors=True)


def _split_tail(tmp: Path, dtype, val_fraction: float, nbytes: dict) -> None:
    """All documents fell on one side: hold out the last val_fraction of the tokens instead."""
    all_ids = np.concatenate([np.fromfile(tmp / f"{s}.bin", dtype=dtype) for s in ("train", "val")])
    total_bytes = nbytes["train"] + nbytes["val"]
    cut = len(all_ids) - max(1, int(len(all_ids) * max(val_fraction, 0.01)))
    all_ids[:cut].tofile(tmp / "train.bin")
    all_ids[cut:].tofile(tmp / "val.bin")
    nbytes["val"] = round(total_bytes * (len(all_ids) - cut) / len(all_ids))
    nbytes["train"] = total_bytes - nbytes["val"]
