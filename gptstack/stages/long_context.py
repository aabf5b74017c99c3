"""The long_context stage (GPT-4's 8k/32k windows), opt-in: the run's model extended `factor` times and fine-tuned
at the new length, with passkey and needle retrieval measured over lengths x depths before and after.

    1. retrieval at the trained window: a short fine-tune on the retrieval mix at the window the model was trained
       on (retrieval_train; steps 0 skips it), so the model can retrieve inside its window and the test is of the
       extension, not of whether a small model can retrieve at all
    2. extend (gptstack/extend.py): interpolation for learned positions, YaRN for rotary ones (`method`)
    3. fine-tune at the new window (train; at most a few hundred steps), the checkpoint chosen on dev probes (the
       right answer's mean log-probability)
    4. passkey and needle accuracy on test probes: the model at its trained window (`trained`), extended but not
       fine-tuned (`before`) and fine-tuned (`after`), at 1x, 2x, 4x and 8x the trained window and five depths

    RUN/long_context/retrieval/   step 1's fine-tune       RUN/long_context/extended/  step 2's model
    RUN/long_context/finetune/    step 3's fine-tune       RUN/long_context/model.safetensors  the result
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import load_model, save_state_dict
from ..config import at_least
from ..data.sources import iter_documents
from ..errors import GptstackError
from ..evals.long_context import DEPTHS, TASKS, Haystacks, heat_map, retrieval_grid
from ..extend import LEARNED_METHODS, ROPE_METHODS, extend
from ..train.long_context import finetune_at_length
from ..train.trainer import TrainConfig
from .base import Context, Stage


def _train(steps: int, lr: float, batch_size: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, schedule="cosine", min_lr_ratio=0.1, warmup_steps=20,
                       weight_decay=0.0, log_every=10, eval_every=100, eval_tokens=16384, ckpt_every=100,
                       keep_checkpoints=1, select_by="dev_answer_logprob")


@dataclass
class LongContextConfig:
    factor: int = 4  # the new window is factor x the trained one
    method: str = "auto"  # auto: interpolate (learned positions) or yarn (rotary); or any of extend.py's methods
    # the sizes of the measured tiny run (README), set by a 2-core CPU's hour, not tuned
    retrieval_fraction: float = 0.75  # share of each fine-tuning batch that is retrieval examples (the rest: corpus windows)
    retrieval_train: TrainConfig = field(default_factory=lambda: _train(450, 1e-3, 8))  # step 1, at the trained window
    train: TrainConfig = field(default_factory=lambda: _train(100, 3e-4, 4))  # step 3, at the new window
    lengths: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # multiples of the trained window to test
    depths: list[float] = field(default_factory=lambda: list(DEPTHS))
    test_probes: int = 10  # test probes per (task, length, depth) cell
    dev_probes: int = 4  # dev probes per (task, depth) at the full window, each eval of the fine-tunes
    prefill_chunk: int = 2048  # prompt tokens per prefill forward in the evals

    def problems(self):
        yield from at_least(self, 1, "factor", "test_probes", "dev_probes")
        yield from at_least(self, 0, "prefill_chunk")
        if self.method not in ("auto", *LEARNED_METHODS, *ROPE_METHODS):
            yield "method", f"{self.method!r} is not one of auto, {', '.join(LEARNED_METHODS + ROPE_METHODS)}"
        if not 0 <= self.retrieval_fraction <= 1:
            yield "retrieval_fraction", f"must be in [0, 1], got {self.retrieval_fraction}"
        if not self.lengths or min(self.lengths) < 1:
            yield "lengths", f"must be positive multiples of the trained window, got {self.lengths}"
        if not self.depths or not all(0 <= d <= 1 for d in self.depths):
            yield "depths", f"must be fractions in [0, 1], got {self.depths}"


def run(ctx: Context) -> dict:
    t0 = time.time()
    cfg, lc, log = ctx.cfg, ctx.cfg.long_context, ctx.log
    tok = ctx.tokenizer()
    ctx.fit_vocab(tok)
    out = ctx.folder("long_context")
    model = load_model(ctx.start_model(), "auto")
    trained = model.cfg.n_ctx
    method = lc.method if lc.method != "auto" else ("interpolate" if model.cfg.positions == "learned" else "yarn")
    haystacks = Haystacks.from_documents(tok, (d for src in cfg.data.sources for d in iter_documents(src)), cfg.data.val_fraction)
    for split, ids in haystacks.ids.items():
        if len(ids) < trained * lc.factor:
            raise GptstackError(f"long_context: {len(ids):,} tokens of {split} text for the needle's haystacks, fewer than the "
                                f"longest probe; add data or raise data.val_fraction")
    lengths = [m * trained for m in lc.lengths]

    def grid(m, name):
        got = {}
        for task in TASKS:
            log(f"[long_context] {name}: {task} at {', '.join(map(str, lengths))} tokens")
            got[task] = retrieval_grid(m, tok, task, lengths, lc.depths, lc.test_probes, "test", lc.train.seed, haystacks,
                                       prefill_chunk=lc.prefill_chunk)
        return got

    summaries = {}
    if lc.retrieval_train.steps:
        model, summaries["retrieval"] = finetune_at_length(model, tok, cfg.data, haystacks, trained, lc.retrieval_train,
                                                           out / "retrieval", lc.retrieval_fraction, lc.dev_probes,
                                                           "long_context/retrieval")
    results = {"trained": grid(model, "trained")}
    extended = extend(model, trained * lc.factor, method)
    if ctx.rank == 0:
        save_state_dict(extended.state_dict(), out / "extended" / "model.safetensors", extended.metadata())
    results["before"] = grid(extended, "before")
    final, summaries["finetune"] = finetune_at_length(extended, tok, cfg.data, haystacks, extended.cfg.n_ctx, lc.train,
                                                      out / "finetune", lc.retrieval_fraction, lc.dev_probes,
                                                      "long_context/finetune")
    if ctx.rank == 0:
        save_state_dict(final.state_dict(), out / "model.safetensors", final.metadata())
    results["after"] = grid(final, "after")
    section = {"trained_ctx": trained, "extended_ctx": extended.cfg.n_ctx, "method": method, "split": "test",
               "test_probes_per_cell": lc.test_probes, "seconds": time.time() - t0,
               "finetune_steps": lc.train.steps, "retrieval_steps": lc.retrieval_train.steps,
               "selected": {k: s.get("selected") for k, s in summaries.items()}}
    for task in TASKS:
        section[task] = {when: results[when][task] for when in ("trained", "before", "after")}
    return {"long_context": section}


def markdown(run: Path, r: dict) -> list[str]:
    s = r["long_context"]
    lines = ["## Long context (window extension, passkey and needle retrieval)", "",
             f"Trained window {s['trained_ctx']:,} tokens, extended to {s['extended_ctx']:,} by `{s['method']}`, then "
             f"{s['finetune_steps']} fine-tuning steps at the new length (checkpoint chosen on dev probes). Accuracy on "
             f"{s['test_probes_per_cell']} **test** probes per cell; *trained*: the model at its own window "
             f"({s['retrieval_steps']} retrieval steps there first), *before*: extended, not fine-tuned, *after*: fine-tuned; "
             "— : past the model's window.", ""]
    for task in TASKS:
        grids = s[task]
        depths = list(next(iter(grids["after"].values())))
        lines += [f"### {task}", "", "| model | length | " + " | ".join(f"{d}%" for d in depths) + " |",
                  "|---|---|" + "---|" * len(depths)]
        for when, grid in grids.items():
            for length, row in grid.items():
                cells = ["—" if row[d] is None else f"{row[d]:.0%}" for d in depths]
                if any(c != "—" for c in cells):
                    lines.append(f"| {when} | {length} | " + " | ".join(cells) + " |")
        plot = heat_map({k: grids[k] for k in ("before", "after")}, run / "plots" / f"long_context_{task}.png",
                        f"{task}: {s['trained_ctx']} -> {s['extended_ctx']} tokens ({s['method']})")
        lines += ["", f"![{task} heat map]({plot.relative_to(run).as_posix()})", ""]
    return lines


def headline(s: dict) -> str | None:
    after = s["passkey"]["after"].get(str(s["extended_ctx"]))
    if not after:
        return None
    return (f"long context: passkey at {s['extended_ctx']:,} tokens after extension, test accuracy by depth "
            + ", ".join(f"{d}%: {a:.0%}" for d, a in after.items()))


STAGE = Stage("long_context", run, "extend the window 4x, fine-tune at the new length, passkey/needle retrieval grid",
              config=LongContextConfig, depends=("data", "tokenizer", "model", "pretrain"), report=markdown,
              default=False, named_only=True, headline=headline, measured=True)
