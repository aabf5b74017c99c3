"""The eval stage: the pretrained model's val loss, perplexity, bits per byte and the unigram floor on
held-out documents (reported in the pretraining section)."""
from __future__ import annotations

from ..checkpoint import load_model
from ..data.loader import build_sampler
from ..evals.lm import lm_metrics
from .base import Context, Stage


def run(ctx: Context) -> dict:
    cfg = ctx.cfg
    tok = ctx.tokenizer()
    ctx.fit_vocab(tok)
    model = load_model(ctx.folder("pretrain"), "auto")
    sampler = build_sampler(cfg.data, tok, cfg.pretrain.seq_len or cfg.model.n_ctx, cfg.pretrain.seed)
    return {"pretrain": lm_metrics(model, sampler, tok.vocab_size)}


STAGE = Stage("eval", run, "val loss, perplexity and bits per byte of the pretrained model",
              depends=("data", "tokenizer", "model", "pretrain"), all_ranks=False)
