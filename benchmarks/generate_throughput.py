"""Generation throughput: new tokens/s of gptstack's engine against `transformers`' `generate`.

Both run greedy decoding with a KV cache on the same GPT-2-shaped model with the same weights
(copied into `GPT2LMHeadModel`; the benchmark first checks that both give the same logits), the same
prompts and the same number of new tokens, at batch 1 and batch 8, timed in alternating rounds in
one process. The last line printed is one JSON object: for each batch size, `tokens_per_sec`,
`reference_tokens_per_sec` and `ratio` (the median of the per-round ratios).

    python benchmarks/generate_throughput.py                   # CPU, the `tiny` preset's shape
    python benchmarks/generate_throughput.py --preset mini --device cuda
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gptstack.model import ModelConfig
from gptstack.stages import RunConfig
from gptstack.generate import generate
from gptstack.model import GPT
from gptstack.perf import device_name


def reference_model(ours: GPT):
    """`GPT2LMHeadModel` holding our weights (its Conv1D layers store the transposed matrices)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = ours.cfg
    hf = GPT2LMHeadModel(GPT2Config(
        n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, n_positions=cfg.n_ctx, vocab_size=cfg.vocab_size,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa"))
    state = {"transformer.wte.weight": ours.wte.weight, "transformer.wpe.weight": ours.wpe.weight,
             "transformer.ln_f.weight": ours.ln_f.weight, "transformer.ln_f.bias": ours.ln_f.bias,
             "lm_head.weight": ours.wte.weight}
    for i, b in enumerate(ours.blocks):
        h = f"transformer.h.{i}."
        for hf_name, mod in (("attn.c_attn", b.attn.qkv), ("attn.c_proj", b.attn.proj), ("mlp.c_fc", b.mlp.fc),
                             ("mlp.c_proj", b.mlp.proj)):
            state[h + hf_name + ".weight"] = mod.weight.t()
            state[h + hf_name + ".bias"] = mod.bias
        for hf_name, mod in (("ln_1", b.ln1), ("ln_2", b.ln2)):
            state[h + hf_name + ".weight"] = mod.weight
            state[h + hf_name + ".bias"] = mod.bias
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if not k.endswith("attn.bias") and not k.endswith("masked_bias")]:
        raise SystemExit(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model shape from this preset (default: tiny)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)

    cfg: ModelConfig = RunConfig.resolve(args.preset).model
    cfg.dropout, cfg.norm_position, cfg.bias = 0.0, "pre", True  # GPT-2's block, as transformers builds it
    torch.manual_seed(0)
    ours = GPT(cfg).to(device).eval()
    ref = reference_model(ours).to(device)
    probe = torch.randint(0, cfg.vocab_size, (2, 16), device=device)
    with torch.no_grad():
        diff = (ours(probe)[0] - ref(probe).logits).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"the two models disagree (max logit difference {diff:.2e}); not the same network")
    print(f"{cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, vocab {cfg.vocab_size}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy; {device_name(device)}; torch {torch.__version__}; "
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
    print(json.dumps({"device": device_name(device), "preset": args.preset, "prompt_len": args.prompt_len,
                      "new_tokens": args.new_tokens, "torch": torch.__version__, **results}))


if __name__ == "__main__":
    main()
