"""What a long window costs and whether a model uses it: one probe at a time through the generation engine.

    cost        prefill tokens/s, decode tokens/s, the KV cache's bytes and the process's peak memory at each
                prompt length (a passkey prompt of that length, answered greedily)
    retrieval   the same measurements, and whether the answer was right, per rope_scaling method (the model
                extended to --ctx by each: none, linear, ntk, yarn; no fine-tuning) x length x depth x task

Each probe is one line of JSON appended to --out as soon as it is measured (a long grid can be stopped and its
lines kept); the last line printed is the summary. Test-split probes only: nothing here chooses anything.

    python benchmarks/long_context.py cost --model runs/lc/long_context --lengths 256,512,1024 --out cost_tiny.jsonl
    python benchmarks/long_context.py retrieval --model runs/smol --ctx 32768 --methods none,linear,ntk,yarn \
        --lengths 8192,16384 --depths 0.5 --tasks passkey --out smol.jsonl
    python benchmarks/long_context.py table smol.jsonl      # the markdown tables of README's long-context section
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gptstack.checkpoint import find_tokenizer, load_model
from gptstack.data.sources import SourceConfig, iter_documents
from gptstack.evals.long_context import Haystacks, first_number, make_probe
from gptstack.extend import extend
from gptstack.generate import Engine, Sequence
from gptstack.perf import peak_rss_mb, reset_peak_rss
from gptstack.tokenizer import Tokenizer


@torch.no_grad()
def measure(model, tok, probe, prefill_chunk: int) -> dict:
    """One probe through the engine: prefill (admit) and decode (steps) timed apart, the cache's bytes, the peak."""
    reset_peak_rss()
    engine = Engine(model, 1, tok.pad, prefill_chunk=prefill_chunk)
    seq = Sequence(probe.prompt, len(probe.answer_ids) + 1, temperature=0.0)
    t0, c0 = time.perf_counter(), time.process_time()
    engine.admit([seq])
    t1, c1 = time.perf_counter(), time.process_time()
    kv_bytes = 2 * engine.cache.k.numel() * engine.cache.k.element_size()
    kv_columns = engine.cache.k.size(3)  # the cache is freed when the batch empties
    while engine.busy:
        engine.step()
    t2, c2 = time.perf_counter(), time.process_time()
    answer = first_number(tok.decode(seq.out.tokens, skip_special=True))
    # CPU seconds beside wall seconds: on a shared machine the wall clock also counts other jobs' turns
    return {"prompt_tokens": len(probe.prompt), "prefill_s": t1 - t0, "prefill_cpu_s": c1 - c0,
            "prefill_tok_s": len(probe.prompt) / (t1 - t0), "prefill_tok_per_cpu_s": len(probe.prompt) / (c1 - c0),
            "decode_tok_s": len(seq.out.tokens) / (t2 - t1), "decode_tok_per_cpu_s": len(seq.out.tokens) / (c2 - c1), "kv_cache_mb": kv_bytes / 2**20,
            "kv_mb_per_1k_tokens": kv_bytes / 2**20 / kv_columns * 1000, "peak_rss_mb": peak_rss_mb(),
            "right": answer == probe.answer}


def tables(path: str) -> None:
    """Markdown: retrieval (right or wrong per method, task, length, depth) and cost (per length) from the lines."""
    rows = [json.loads(line) for line in open(path)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells = {(r["method"], r["task"], r["length"], r["depth"]): r["right"] for r in rows}
    keys = sorted({(t, L, d) for _, t, L, d in cells})
    print("| task | length | depth | " + " | ".join(methods) + " |\n|---|---|---|" + "---|" * len(methods))
    for t, L, d in keys:
        marks = [{True: "right", False: "wrong", None: ""}[cells.get((m, t, L, d))] for m in methods]
        print(f"| {t} | {L:,} | {d:.0%} | " + " | ".join(marks) + " |")
    print("\n| prompt tokens | prefill CPU s | prefill tokens/CPU-s | decode tokens/CPU-s | KV cache MiB | peak RSS MiB |\n|---|---|---|---|---|---|")
    seen = set()
    for r in sorted(rows, key=lambda r: r["length"]):
        if r["length"] in seen or "prefill_cpu_s" not in r:
            continue
        seen.add(r["length"])
        print(f"| {r['prompt_tokens']:,} | {r['prefill_cpu_s']:.1f} | {r['prefill_tok_per_cpu_s']:,.0f} | "
              f"{r['decode_tok_per_cpu_s']:.1f} | {r['kv_cache_mb']:,.0f} | {r['peak_rss_mb']:,.0f} |")


def main():
    if sys.argv[1:2] == ["table"]:
        return tables(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["cost", "retrieval"])
    p.add_argument("--model", required=True, help="RUN/STAGE or model folder")
    p.add_argument("--ctx", type=int, default=0, help="retrieval: extend to this window by each method (0: as saved)")
    p.add_argument("--methods", default="none", help="retrieval: comma-separated rope_scaling methods")
    p.add_argument("--lengths", required=True, help="comma-separated prompt lengths (tokens)")
    p.add_argument("--depths", default="0.5", help="comma-separated depths of the fact")
    p.add_argument("--tasks", default="passkey", help="passkey, needle or both")
    p.add_argument("--probes", type=int, default=1, help="probes per cell")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill forward (0: at once)")
    p.add_argument("--out", required=True, help="JSON lines, one per probe, appended")
    a = p.parse_args()
    torch.manual_seed(0)
    base = load_model(a.model)
    tok = Tokenizer.load(find_tokenizer(a.model))
    tasks = a.tasks.split(",")
    haystacks = None
    if "needle" in tasks:
        haystacks = Haystacks.from_documents(tok, iter_documents(SourceConfig(path="stdlib")), 0.05, max_chars=400_000)
    methods = a.methods.split(",") if a.what == "retrieval" else ["as saved"]
    rows = []
    for method in methods:
        model = extend(base, a.ctx, method) if a.ctx else base
        for length in map(int, a.lengths.split(",")):
            for task in tasks:
                for depth in map(float, a.depths.split(",")):
                    for i in range(a.probes):
                        probe = make_probe(task, tok, length, depth, "test", i, haystacks=haystacks)
                        row = {"model": a.model, "method": method, "ctx": model.cfg.n_ctx, "task": task, "length": length,
                               "depth": depth, "probe": i, "prefill_chunk": a.prefill_chunk,
                               "threads": torch.get_num_threads(), **measure(model, tok, probe, a.prefill_chunk)}
                        rows.append(row)
                        with open(a.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(json.dumps(row), flush=True)
    print(json.dumps({"probes": len(rows), "right": sum(r["right"] for r in rows), "out": str(Path(a.out))}))


if __name__ == "__main__":
    main()
