"""The tokenizer stage: a byte-level BPE trained on the training documents of every source (val documents
are held out from it too), or the tokenizer already placed in the run folder (`pretrain --tokenizer`);
then its bytes per token on held-out text."""
from __future__ import annotations

import time
from pathlib import Path

from ..data.sources import iter_documents
from ..data.tokens import is_val
from ..errors import GptstackError
from ..io import atomic_write_json
from ..tokenizer import Tokenizer, TokenizerConfig
from .base import Stage


def train_tokenizer(cfg, run: Path) -> dict:
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


def markdown(run: Path, r: dict) -> list[str]:
    t = r["tokenizer"]
    return ["## Tokenizer", "", f"Byte-level BPE, {t['vocab_size']:,} tokens, trained on {t['train_bytes']:,} bytes "
            f"in {t['seconds']:.1f} s; {t['bytes_per_token']:.2f} bytes per token on held-out text.", ""]


STAGE = Stage("tokenizer", lambda ctx: train_tokenizer(ctx.cfg, ctx.run), "byte-level BPE on the training documents",
              config=TokenizerConfig, depends=("data",), report=markdown, all_ranks=False)
