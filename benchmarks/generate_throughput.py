"""Generation throughput: new tokens/s of gptstack's engine against `transformers`' `generate`.

Both run greedy decoding with a KV cache on the same model with the same weights (exported to a Hugging Face
folder and loaded by `transformers`; the benchmark first checks that both give the same logits), the same
prompts and the same number of new tokens, at batch 1 and batch 8, timed in alternating rounds in
one process. The last line printed is one JSON object: for each batch size, `tokens_per_sec`,
`reference_tokens_per_sec` and `ratio` (the median of the per-round ratios).

    python benchmarks/generate_throughput.py                   # CPU, the `tiny` preset's shape, random weights
    python benchmarks/generate_throughput.py --preset mini --device cuda
    python benchmarks/generate_throughput.py --model runs/smollm2   # a model folder (e.g. `gptstack import`ed)
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gptstack.checkpoint import find_tokenizer, load_model
from gptstack.convert.hf import write_hf
from gptstack.generate import generate
from gptstack.model import GPT
from gptstack.perf import device_name
from gptstack.stages import RunConfig
from gptstack.tokenizer import Tokenizer


def reference_model(ours: GPT, tok: Tokenizer, folder: Path, dtype: torch.dtype):
    """`transformers`' model of the same weights: ours exported with `gptstack export --to hf`'s writer and
    loaded with `from_pretrained` (GPT2LMHeadModel or LlamaForCausalLM)."""
    from transformers import AutoModelForCausalLM
    write_hf(ours, tok, folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model shape from this preset, random weights (default: tiny)")
    ap.add_argument("--model", help="a model folder (RUN/STAGE or `gptstack import`'s output) instead of a preset")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both models' weights and compute")
    args = ap.parse_args()
    device = torch.device(args.device)

    if args.model:
        ours, tok = load_model(args.model), Tokenizer.load(find_tokenizer(args.model))
    else:
        cfg = RunConfig.resolve(args.preset).model
        cfg.dropout, cfg.norm_position = 0.0, "pre"  # a block transformers has: GPT-2's (or Llama's)
        torch.manual_seed(0)
        ours, tok = GPT(cfg), Tokenizer.train(["a few words to give the exported folder a tokenizer\n"] * 4, vocab_size=300)
    dtype = getattr(torch, args.dtype)
    ours = ours.to(device, dtype).eval()
    cfg = ours.cfg
    with tempfile.TemporaryDirectory() as folder:
        ref = reference_model(ours, tok, Path(folder) / "hf", dtype).to(device)
    probe = torch.randint(0, cfg.vocab_size, (2, 16), device=device)
    with torch.no_grad():
        diff = (ours(probe)[0] - ref(probe).logits).abs().max().item()
    if diff > (1e-3 if dtype == torch.float32 else 0.5):  # bf16: two summation orders round differently
        raise SystemExit(f"the two models disagree (max logit difference {diff:.2e}); not the same network")
    print(f"{cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, vocab {cfg.vocab_size}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, {args.dtype}; {device_name(device)}; torch {torch.__version__}; "
          f"same logits within {diff:.1e}", flush=True)

    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(1, cfg.vocab_size, (batch, args.prompt_len), generator=g).to(device)

        def run_ours():
            out = generate(ours, prompts.tolist(), args.new_tokens, temperature=0.0)
            return sum(len(o.tokens) for o in out)

        def run_reference():
            with torch.no_grad():
                out = ref.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
            return (out.shape[1] - args.prompt_len) * batch

        same = [o.tokens for o in generate(ours, prompts.tolist()[:1], 16, temperature=0.0)] == \
            [ref.generate(prompts[:1], attention_mask=torch.ones_like(prompts[:1]), max_new_tokens=16, min_new_tokens=16,
                          do_sample=False, pad_token_id=0)[0, args.prompt_len:].tolist()]
        rates = {"ours": [], "reference": []}
        for name, fn in (("ours", run_ours), ("reference", run_reference)):
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in (("ours", run_ours), ("reference", run_reference)):
                sync(device)
                t0 = time.perf_counter()
                n = fn()
                sync(device)
                rates[name].append(n / (time.perf_counter() - t0))
        r = {"tokens_per_sec": statistics.median(rates["ours"]),
             "reference_tokens_per_sec": statistics.median(rates["reference"]),
             "ratio": statistics.median(a / b for a, b in zip(rates["ours"], rates["reference"])),
             "same_greedy_tokens": same}
        results[f"batch_{batch}"] = r
        print(f"batch {batch}: ours {r['tokens_per_sec']:,.0f} new tok/s | transformers {r['reference_tokens_per_sec']:,.0f} "
              f"new tok/s | ratio {r['ratio']:.2f}x | same greedy tokens: {same}", flush=True)
    print(json.dumps({"device": device_name(device), "model": args.model or args.preset, "prompt_len": args.prompt_len,
                      "new_tokens": args.new_tokens, "dtype": args.dtype, "torch": torch.__version__, **results}))


if __name__ == "__main__":
    main()
