"""LoRA against full fine-tuning on the real SmolLM2-135M-Instruct: each stage's peak resident memory, wall time and
training speed, SFT, rankings + RM and PPO-ptx, the `smollm2` preset at reduced sizes.

The same pipeline (`gptstack pipeline --preset smollm2 --stages import,sft,rm,ppo`) runs twice in fresh processes,
with the preset's LoRA (`*.train.lora_rank=16`) and with full fine-tuning (`*.train.lora_rank=0`), on the same
data and sizes. From report.json: each stage's `peak_rss_mb` (its own peak: the high-water mark is reset before
it), its training's own peak (`train_peak_rss_mb`) and `seconds`; from the Trainer: training's seconds and
tokens/s. The stages' evaluations (greedy answers, RM scoring) cost the same in both modes, so the stage ratios
understate training's. The last line printed is one JSON object.

    python benchmarks/lora_vs_full.py                  # 2 threads, about 10 minutes on a 2-core CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = [  # every stage small enough to run twice, large enough that training dominates each stage's memory peak
    "sft.demonstrations=96", "sft.dev_prompts=10", "sft.eval_prompts=10", "sft.train.eval_every=0",
    "rm.prompts=24", "rm.val_prompts=6", "rm.test_prompts=6",
    "ppo.train_prompts=64", "ppo.dev_prompts=6", "ppo.eval_prompts=10", "ppo.rollouts=2", "ppo.eval_every_rollouts=2",
    "ppo.baselines=false",
]
FULL = [f"{s}.train.lora_rank=0" for s in ("sft", "rm", "ppo")] + \
       ["sft.train.lr=2e-5", "rm.train.lr=1e-5", "ppo.train.lr=2e-6"]  # learning rates usual for full fine-tuning


def run(mode: str, folder: Path, threads: int) -> dict:
    cmd = [sys.executable, "-m", "gptstack", "pipeline", "--preset", "smollm2", "--out", str(folder),
           "--stages", "import,sft,rm,ppo", *SIZES, *(FULL if mode == "full" else [])]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if res.returncode:
        raise SystemExit(f"{mode}: {res.stderr[-3000:]}")
    report = json.loads((folder / "report.json").read_text())
    out = {"wall_seconds": time.time() - t0}
    for stage in ("sft", "rm", "ppo"):
        r = report[stage]
        train = json.loads((folder / stage / "trainer_state.json").read_text())["summary"]  # the Trainer's own
        out[stage] = {"peak_rss_mb": r["peak_rss_mb"], "train_peak_rss_mb": r["train_peak_rss_mb"], "seconds": r["seconds"],
                      "lora_rank": r["lora_rank"],
                      "train_seconds": train["seconds"], "tokens_per_sec": train["tokens_per_sec"],
                      "trainable_params": train["trainable_params"]}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", help="keep the two run folders here (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        got = {mode: run(mode, root / mode, args.threads) for mode in ("lora", "full")}
    print("stage   peak MB: stage (training alone), LoRA | full   seconds: stage (training), LoRA | full   train tok/s: LoRA | full")
    for stage in ("sft", "rm", "ppo"):
        a, b = got["lora"][stage], got["full"][stage]
        print(f"{stage:6} {a['peak_rss_mb']:7,.0f} ({a['train_peak_rss_mb']:,.0f}) | {b['peak_rss_mb']:7,.0f} ({b['train_peak_rss_mb']:,.0f})   "
              f"{a['seconds']:4.0f} ({a['train_seconds']:.0f}) | {b['seconds']:4.0f} ({b['train_seconds']:.0f})   "
              f"{a['tokens_per_sec']:6,.1f} | {b['tokens_per_sec']:6,.1f}")
    print(json.dumps({"threads": args.threads, **got}))


if __name__ == "__main__":
    main()
