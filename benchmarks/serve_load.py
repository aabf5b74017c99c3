"""Load on `gptstack serve` over loopback, bounded: a fixed number of streamed chat requests, then it stops.

1. `--clients` (64) concurrent streaming clients share `--requests` requests: errors, time to first token (p50, p99)
   and aggregate new tokens/s.
2. 10 clients go mid-answer (each closes its stream after the first token), then 10 finish, three rounds: after each
   the server has no sequence running or waiting and holds no KV cache; its resident memory after each round shows
   whether anything accumulates.
3. Aggregate tokens/s with 16 concurrent clients against one client's, the same requests each.

The server is `gptstack serve` in its own process (`--max-batch` slots); without `--model` it serves a random model
of the `tiny` preset's shape with a BPE trained here, so nothing is downloaded. The last line printed is one JSON
object.

    python benchmarks/serve_load.py                                         # tiny shape, 256 requests x 32 tokens
    python benchmarks/serve_load.py --model models/smollm2 --requests 64 --max-tokens 24
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

QUESTIONS = [f"What is {a} plus {b}?" for a in range(2, 10) for b in range(3, 7)]


def random_model(folder: Path) -> Path:
    """A random model of the tiny preset's shape, with a BPE trained on a few stdlib modules."""
    import dataclasses

    import torch

    from gptstack.checkpoint import save_state_dict
    from gptstack.model import GPT
    from gptstack.stages import RunConfig
    from gptstack.tokenizer import Tokenizer
    from gptstack.world.corpus import stdlib_files
    texts = [p.read_text(errors="replace") for p in stdlib_files()[:40]]
    tok = Tokenizer.train(texts + QUESTIONS, vocab_size=1024)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(RunConfig.resolve("tiny").model, vocab_size=tok.vocab_size, dropout=0.0))
    save_state_dict(model.state_dict(), folder / "model.safetensors", model.metadata())
    tok.save(folder / "tokenizer.json")
    return folder


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health") as r:
        return json.load(r)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def ask(client, model: str, i: int, max_tokens: int, go_after_first: bool = False) -> tuple[float, int]:
    """(seconds to the first token, new tokens) of one streamed chat request."""
    start, first, tokens = time.perf_counter(), None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], max_tokens=max_tokens,
        temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if first is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            first = time.perf_counter() - start
            if go_after_first:
                await stream.close()
                return first, 0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first, tokens


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` concurrent clients take the requests one after another until `requests` are done."""
    import openai
    todo, ttft, tokens, errors = iter(range(requests)), [], 0, []
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        async def one_client():
            nonlocal tokens
            for i in todo:
                try:
                    first, n = await ask(client, model, i, max_tokens)
                    ttft.append(first)
                    tokens += n
                except Exception as e:  # counted, and the first few shown
                    errors.append(repr(e))
        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - start
    ttft.sort()
    return {"clients": clients, "requests": requests, "errors": len(errors), "first_errors": errors[:3],
            "ttft_p50_s": round(statistics.median(ttft), 4) if ttft else None,
            "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 4) if ttft else None,
            "new_tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1)}


async def go_mid_answer(url: str, model: str, clients: int, max_tokens: int) -> None:
    import openai
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        await asyncio.gather(*(ask(client, model, i, max_tokens, go_after_first=True) for i in range(clients)))


def settle(url: str, timeout: float = 30) -> dict:
    """/health once nothing runs or waits (or the timeout passes)."""
    deadline = time.time() + timeout
    while (h := health(url))["running"] + h["waiting"] and time.time() < deadline:
        time.sleep(0.05)
    return h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model folder (default: a random model of the tiny preset's shape)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256, help="requests of the 64-client load")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=64, help="the server's slots")
    ap.add_argument("--ratio-requests", type=int, default=4, help="requests per client in the 16-vs-1 comparison")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else random_model(Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "gptstack", "serve", "--model", str(model_dir), "--port", str(port),
                                   "--max-batch", str(args.max_batch)], env={**os.environ})
        try:
            deadline = time.time() + 300
            while True:
                try:
                    model = health(url)["model"]
                    break
                except OSError:
                    if server.poll() is not None or time.time() > deadline:
                        raise SystemExit("the server did not start")
                    time.sleep(0.2)
            run = asyncio.run
            run(load(url, model, 4, 8, args.max_tokens))  # warm-up
            result = {"model": str(model_dir) if args.model else "random tiny-preset shape", "max_batch": args.max_batch,
                      "max_tokens": args.max_tokens, "load": run(load(url, model, args.clients, args.requests, args.max_tokens))}
            print(json.dumps(result["load"]), flush=True)
            rss, after = [round(rss_mb(server.pid), 1)], []
            for _ in range(3):  # a leak grows round after round; the allocator's first growth levels off
                run(go_mid_answer(url, model, 10, args.max_tokens * 4))
                after.append(settle(url))
                run(load(url, model, 10, 10, args.max_tokens))  # the same clients, finishing this time
                settle(url)
                rss.append(round(rss_mb(server.pid), 1))
            result["disconnects"] = {"clients": 10, "rounds": 3, "running_after": [h["running"] for h in after],
                                     "waiting_after": [h["waiting"] for h in after],
                                     "cache_bytes_after": [h["cache_bytes"] for h in after], "rss_mb": rss}
            print(json.dumps(result["disconnects"]), flush=True)
            one = run(load(url, model, 1, args.ratio_requests, args.max_tokens))
            many = run(load(url, model, 16, 16 * args.ratio_requests, args.max_tokens))
            result["throughput_16_vs_1"] = {"one_client_tokens_per_s": one["tokens_per_s"],
                                            "sixteen_clients_tokens_per_s": many["tokens_per_s"],
                                            "ratio": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
                                            "errors": one["errors"] + many["errors"]}
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
