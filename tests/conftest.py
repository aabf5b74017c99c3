import contextlib
import json
import os
import pty
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Tiny settings for end-to-end runs: a model that trains in seconds on 2 CPU cores.
TINY = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.n_ctx=64", "tokenizer.vocab_size=512",
        "pretrain.batch_size=8", "pretrain.warmup_steps=5", "pretrain.log_every=5", "pretrain.eval_tokens=2048"]


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gptstack-cache")
    os.environ["GPTSTACK_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~40 real stdlib modules in a folder: small enough to tokenize in a second."""
    from gptstack.world.corpus import stdlib_files
    out = tmp_path_factory.mktemp("corpus")
    picked = [p for p in stdlib_files() if 4_000 < p.stat().st_size < 25_000][:40]
    for i, p in enumerate(picked):
        shutil.copy(p, out / f"{i:02d}_{p.name}")
    return out


def run_cli(*args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptstack", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """A small random GPT saved as a stage folder with its tokenizer: for evals' mechanics, not quality."""
    import torch
    from gptstack.checkpoint import save_state_dict
    from gptstack.model import ModelConfig
    from gptstack.model import GPT
    from gptstack.tokenizer import Tokenizer
    folder = tmp_path_factory.mktemp("random-model")
    tok = Tokenizer.train(["def f(x): return x + 1\nQ: What is 1 plus 2?\nA: 3\nthe cat sat\n"] * 30, vocab_size=300)
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(n_layer=2, n_embd=32, n_head=2, n_ctx=64, vocab_size=tok.vocab_size))
    save_state_dict(gpt.state_dict(), folder / "model.safetensors", gpt.metadata())
    tok.save(folder / "tokenizer.json")
    return folder


class Terminal:
    """`python -m gptstack ARGS` in a pseudo-terminal, driven like a person at a keyboard."""

    def __init__(self, args):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "gptstack", *map(str, args)], stdin=slave, stdout=slave,
                                     stderr=slave, close_fds=True, env={**os.environ, "TERM": "dumb"})
        os.close(slave)
        self.seen = ""

    def expect(self, text, timeout=60):
        end = time.time() + timeout
        while text not in self.seen:
            left = end - time.time()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"never saw {text!r}; terminal shows:\n{self.seen}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    pass
        i = self.seen.index(text) + len(text)
        before, self.seen = self.seen[:i], self.seen[i:]
        return before

    def send(self, text):
        os.write(self.master, text.encode())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.master)


QUESTIONS = [f"What is {a} plus {b}?" for a in range(2, 10) for b in range(3, 7)]


def write_own_files(d: Path) -> None:
    """A user's own files for every verb, in folder d: SFT records (sft.jsonl), K = 3 rankings (rankings.jsonl),
    PPO prompts (prompts.jsonl) and a 2-label classification task (task.jsonl)."""
    def write(name, rows):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write("sft.jsonl", [{"prompt": q, "response": str(eval(q[8:-1].replace("plus", "+")))} for q in QUESTIONS])
    write("rankings.jsonl", [{"prompt": q, "responses": ["7", "I don't know.", "banana"], "ranks": [1, 2, 3]} for q in QUESTIONS])
    write("prompts.jsonl", [{"prompt": q} for q in QUESTIONS])
    write("task.jsonl", [{"text": f"{w} number {i}", "label": w} for i in range(40) for w in ("odd", "even") if i % 2 == (w == "odd")])


def run_ranks(args, ranks: int = 1, env: dict | None = None) -> str:
    """`gptstack ARGS` under torchrun with `ranks` CPU processes (returns their stdout), or with 1 in this process at
    one thread, as torchrun gives each rank, so both compute alike. `env`: extra environment for either."""
    from gptstack.cli import main
    args, env = [str(a) for a in args], env or {}
    if ranks == 1:
        threads = torch.get_num_threads()
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            torch.set_num_threads(1)
            try:
                assert main(args) == 0
            finally:
                torch.set_num_threads(threads)
        return ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "gptstack", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stdout


@contextlib.contextmanager
def serving(app):
    """An ASGI app (gptstack serve's) under uvicorn in a thread, on a free loopback port: yields its base URL."""
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def slowed(model, seconds: float):
    """The model, each forward taking `seconds` longer: answers that stream slowly enough to stop mid-way."""
    forward = model.hidden

    def hidden(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)
    model.hidden = hidden
    return model


def multiple_choice_task(folder: Path, name: str = "mc") -> Path:
    """A user's multiple-choice task (8 questions, 3 options) as a task YAML beside its data: folder/NAME.yaml."""
    rows = [{"context": f"the cat {w}", "choices": ["sat", "ran", "slept"], "label": i % 3} for i, w in enumerate("abcdefgh")]
    (folder / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text("kind: multiple_choice\ndata: qa.jsonl\ntemplate: '{context}'\n")
    return folder / f"{name}.yaml"
