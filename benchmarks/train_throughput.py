"""Training throughput of gptstack's GPT against Hugging Face GPT-2 built with the same config, in one run.

    python benchmarks/train_throughput.py             # 6 layers, 384 wide, 6 heads, ctx 256, vocab 8192, batch 8
    python benchmarks/train_throughput.py --preset gpt2 --device cuda --batch 16 --modes bf16,bf16+compile

A step is what the Trainer does per optimizer step: forward, cross-entropy, backward, gradient
clipping, AdamW. Both models get the same random batch. A mode is a Trainer precision (fp32,
fp32-tf32, bf16; train/trainer.py says what each computes), optionally with torch.compile;
both models run in every mode.

Every (mode, model) pair is built and warmed up first; then each timed round runs every pair
in turn (in a rotating order), so load from other processes falls on all of them alike. A
figure is the median over rounds; a ratio is the median of the per-round ratios. MFU is model
FLOPs (GPT.flops_per_token) over the matmul peak of the mode's dtype and fp32 matmul mode,
measured (gptstack.perf) before the models run and after every round, at its best.

The last line of stdout is one JSON object: the headline (ours against transformers, both fp32
eager: `tokens_per_sec`, `reference_tokens_per_sec`, `ratio`, `mfu`), `eager_ratio`, our
fastest mode against transformers compiled in fp32 (`best_vs_reference_compiled_ratio`), and
every mode's figures under `modes`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from gptstack.model import ModelConfig
from gptstack.stages import RunConfig
from gptstack.model import GPT
from gptstack.perf import device_name, matmul_dtype, measure_matmul_flops
from gptstack.train.trainer import PRECISIONS, autocast, resolve_precision, use_matmul_precision

def build_reference(cfg: ModelConfig):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, n_positions=cfg.n_ctx,
                    vocab_size=cfg.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                    bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")
    model = GPT2LMHeadModel(hf)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def ours_loss(model, x, y):
    return model(x, y)[1]


def reference_loss(model, x, y):
    # the same loss as ours, over all T positions (HF's `labels=` would shift and score T-1)
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


MODELS = {"ours": (GPT, ours_loss), "reference": (build_reference, reference_loss)}


class Runner:
    """One model in one mode: its AdamW and its training step."""

    def __init__(self, which: str, cfg: ModelConfig, precision: str, compiled: bool, device):
        torch.manual_seed(0)
        build, self.loss_fn = MODELS[which]
        self.model = build(cfg).to(device)
        self.device, self.precision = device, precision
        self.forward = torch.compile(self.model) if compiled else self.model
        # fused AdamW where the Trainer uses it (CUDA); the same optimizer for both models either way
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                           fused=device.type == "cuda")

    def step(self, x, y):
        use_matmul_precision(self.precision)
        with autocast(self.device, self.precision):
            loss = self.loss_fn(self.forward, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def seconds(self, x, y, steps: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step(x, y)
        sync(self.device)
        return time.perf_counter() - t0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_mode(mode: str, device) -> tuple[str, bool]:
    precision, _, extra = mode.partition("+")
    if precision not in PRECISIONS or extra not in ("", "compile"):
        raise SystemExit(f"unknown mode {mode!r}: one of {', '.join(PRECISIONS)}, optionally with +compile")
    return resolve_precision(precision, device), extra == "compile"


def measure(modes: list[str], cfg: ModelConfig, args, device, x, y) -> tuple[dict, dict, dict]:
    """tokens/s of every (mode, model) in every round, each one's warm-up seconds, and the matmul
    peak of each precision in use."""
    def peak_of(precision: str) -> float:
        use_matmul_precision(precision)
        return measure_matmul_flops(device, matmul_dtype(precision), seconds=0.3)

    # the peak is measured before anything else runs and again after every round, under the same
    # load as the models; its best counts, so load can only lower MFU
    peak = {p: peak_of(p) for p in {parse_mode(m, device)[0] for m in modes}}
    runners, warmup = {}, {}
    for mode in modes:
        precision, compiled = parse_mode(mode, device)
        for which in MODELS:
            r = runners[mode, which] = Runner(which, cfg, precision, compiled, device)
            t0 = time.perf_counter()  # warm-up: compilation, allocator, oneDNN / cuBLAS plans
            for _ in range(args.warmup):
                r.step(x, y)
            sync(device)
            warmup[mode, which] = time.perf_counter() - t0
            print(f"  {which} in {mode}: built and warmed up in {warmup[mode, which]:.0f} s", flush=True)
    tokens = x.numel() * args.steps
    rates = {key: [] for key in runners}
    keys = list(runners)
    for i in range(args.rounds):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            rates[key].append(tokens / runners[key].seconds(x, y, args.steps))
        peak = {p: max(v, peak_of(p)) for p, v in peak.items()}
    return rates, warmup, peak


def mode_figures(mode: str, rates: dict, warmup: dict, peaks: dict, flops_per_token: float, device) -> dict:
    precision, compiled = parse_mode(mode, device)
    peak = peaks[precision]
    ours, ref = rates[mode, "ours"], rates[mode, "reference"]
    return {"tokens_per_sec": statistics.median(ours), "reference_tokens_per_sec": statistics.median(ref),
            "ratio": statistics.median(a / b for a, b in zip(ours, ref)),
            "mfu": statistics.median(ours) * flops_per_token / peak,
            "reference_mfu": statistics.median(ref) * flops_per_token / peak,
            "peak_flops": peak, "precision": precision, "compile": compiled,
            "warmup_seconds": warmup[mode, "ours"], "reference_warmup_seconds": warmup[mode, "reference"],
            "rounds_tokens_per_sec": [round(v) for v in ours], "rounds_reference_tokens_per_sec": [round(v) for v in ref]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", help="start from a gptstack preset's model shape and micro-batch: tiny, mini, small, gpt2, ...")
    ap.add_argument("--n-layer", type=int, help="(default 6)")
    ap.add_argument("--n-embd", type=int, help="(default 384)")
    ap.add_argument("--n-head", type=int, help="(default 6)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence, also the context length (default 256)")
    ap.add_argument("--vocab", type=int, help="(default 8192)")
    ap.add_argument("--batch", type=int, default=0, help="sequences per step (default: 8, or the preset's micro-batch)")
    ap.add_argument("--steps", type=int, default=0, help="steps per model per timed round (default: 2 on CPU, 10 on GPU)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model and mode (compilation happens here)")
    ap.add_argument("--modes", default="fp32,fp32+compile,bf16+compile",
                    help="comma-separated precisions (fp32, fp32-tf32, bf16), each optionally +compile")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.preset:
        run = RunConfig.resolve(args.preset)
        cfg = run.model
        args.batch = args.batch or run.pretrain.micro_batch_size or run.pretrain.batch_size
    else:  # the shape of the `mini` preset (nanoGPT's baby GPT)
        cfg = ModelConfig(n_layer=6, n_embd=384, n_head=6, n_ctx=256, vocab_size=8192)
    for name, value in (("n_layer", args.n_layer), ("n_embd", args.n_embd), ("n_head", args.n_head),
                        ("n_ctx", args.seq_len), ("vocab_size", args.vocab)):
        if value is not None:
            setattr(cfg, name, value)
    cfg.dropout, cfg.norm_position, cfg.bias = 0.0, "pre", True  # GPT-2's block, as transformers builds it
    seq_len = cfg.n_ctx
    args.batch = args.batch or 8
    args.steps = args.steps or (10 if device.type == "cuda" else 2)
    modes = [m for m in args.modes.split(",") if m]

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (args.batch, seq_len + 1), generator=g).to(device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    model = GPT(cfg)
    params, flops_per_token = model.num_params(), model.flops_per_token(seq_len)
    del model
    print(f"{cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, ctx {seq_len}, vocab {cfg.vocab_size} "
          f"({params / 1e6:.1f}M params); batch {args.batch} x {seq_len}; {device_name(device)}; torch {torch.__version__}",
          flush=True)

    rates, warmup, peaks = measure(modes, cfg, args, device, x, y)
    results = {mode: mode_figures(mode, rates, warmup, peaks, flops_per_token, device) for mode in modes}
    for mode, r in results.items():
        print(f"{mode:>18}: ours {r['tokens_per_sec']:>10,.0f} tok/s, MFU {r['mfu']:6.1%} | "
              f"transformers {r['reference_tokens_per_sec']:>10,.0f} tok/s, MFU {r['reference_mfu']:6.1%} | "
              f"ratio {r['ratio']:.2f}x  (peak {r['peak_flops'] / 1e12:.3g} TFLOP/s)")

    head_mode = "fp32" if "fp32" in results else modes[0]
    head = results[head_mode]
    best_mode = max(results, key=lambda m: results[m]["tokens_per_sec"])
    summary = {"tokens_per_sec": head["tokens_per_sec"], "reference_tokens_per_sec": head["reference_tokens_per_sec"],
               "ratio": head["ratio"], "mfu": head["mfu"], "headline_mode": head_mode,
               "eager_ratio": results["fp32"]["ratio"] if "fp32" in results else None,
               "best_mode": best_mode, "best_tokens_per_sec": results[best_mode]["tokens_per_sec"],
               "best_mfu": results[best_mode]["mfu"], "best_vs_reference_compiled_ratio": None}
    if "fp32+compile" in results:
        paired = zip(rates[best_mode, "ours"], rates["fp32+compile", "reference"])
        summary["best_vs_reference_compiled_ratio"] = statistics.median(a / b for a, b in paired)
        print(f"best: ours in {best_mode} against transformers in fp32+compile: "
              f"{summary['best_vs_reference_compiled_ratio']:.2f}x")
    summary.update(config={"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "seq_len": seq_len,
                           "vocab_size": cfg.vocab_size, "batch": args.batch, "params": params},
                   device=device_name(device), torch=torch.__version__, steps=args.steps, rounds=args.rounds,
                   modes=results)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
