"""Does bf16 autocast train like fp32? The same pretraining run in each precision, compared step by step.

    python benchmarks/precision_loss.py                   # tiny preset, stdlib corpus, 150 steps, fp32 vs bf16
    python benchmarks/precision_loss.py --steps 300 --precisions fp32,bf16,fp32-tf32

Each precision is one pretraining run through gptstack's own stage code (stages.pretrain.run_pretrain:
the Trainer, data pipeline and schedule users get), with the same tokenizer, seed and batches,
logging the training loss at every step. The first precision is the baseline. Per-step losses
are noisy (each step sees a new batch), so the curves are compared after a trailing moving
average over `--window` steps: the figure is the largest relative difference
|loss_p - loss_base| / loss_base over the run. The final val loss and tokens/s of each run are
reported too. The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptstack.stages import RunConfig
from gptstack.stages.pretrain import run_pretrain
from gptstack.stages.tokenizer import train_tokenizer
from gptstack.tokenizer import Tokenizer


def train_losses(stage: Path) -> list[float]:
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


def moving_average(xs: list[float], window: int) -> list[float]:
    """The mean of the last `window` values at each step (of fewer at the start)."""
    recent = [xs[max(0, i - window + 1):i + 1] for i in range(len(xs))]
    return [sum(r) / len(r) for r in recent]


def max_relative_difference(a: list[float], base: list[float]) -> float:
    return max(abs(x - b) / b for x, b in zip(a, base))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated; the first is the baseline")
    ap.add_argument("--window", type=int, default=10, help="steps in the moving average of the loss")
    ap.add_argument("--out", default="runs/precision-loss", help="one run folder per precision goes here")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. pretrain.batch_size=8")
    args = ap.parse_args()

    out = Path(args.out)
    precisions = args.precisions.split(",")
    settings = [f"pretrain.steps={args.steps}", "pretrain.log_every=1", f"pretrain.ckpt_every={args.steps}",
                "pretrain.eval_every=0", *args.overrides]
    if not (out / "tokenizer.json").is_file():
        train_tokenizer(RunConfig.resolve(args.preset, overrides=settings), out)
    tok = Tokenizer.load(out / "tokenizer.json")
    curves, summaries = {}, {}
    for p in precisions:
        stage = out / p  # a finished run there is reused, an interrupted one resumed (the Trainer's checkpoints)
        summary = run_pretrain(RunConfig.resolve(args.preset, overrides=[*settings, f"pretrain.precision={p}"]), stage, tok)
        curves[p] = train_losses(stage)
        summaries[p] = summary["pretrain"]

    base = precisions[0]
    smooth = {p: moving_average(c, args.window) for p, c in curves.items()}
    result = {"preset": args.preset, "steps": args.steps, "window": args.window, "baseline": base, "precisions": {}}
    for p in precisions:
        row = {"final_train_loss": smooth[p][-1], "val_loss": summaries[p]["train_val_loss"],
               "tokens_per_sec": summaries[p]["tokens_per_sec"]}
        if p != base:
            row["max_relative_difference"] = max_relative_difference(smooth[p], smooth[base])
            row["max_relative_difference_raw"] = max_relative_difference(curves[p], curves[base])
            row["final_relative_difference"] = abs(smooth[p][-1] - smooth[base][-1]) / smooth[base][-1]
        result["precisions"][p] = row
        diff = f", max rel. diff of the smoothed curve vs {base} {row['max_relative_difference']:.3%}" if p != base else ""
        print(f"{p:>10}: smoothed train loss {row['final_train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
              f"{row['tokens_per_sec']:,.0f} tok/s{diff}")
    others = [p for p in precisions if p != base]
    result["max_relative_difference"] = max((result["precisions"][p]["max_relative_difference"] for p in others), default=0.0)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
