"""`gptstack chat`: a terminal conversation with a model, streamed token by token.

The conversation is rendered with the one chat template and answered by the one engine. When it
outgrows the context, the oldest turns go first (the system message stays).
"""
from __future__ import annotations

import sys

from .generate import generate
from .tokenizer import Tokenizer

HELP = "commands: /system TEXT (set the system message and start over), /reset (start over), /quit; Ctrl-D or Ctrl-C exits"


class StreamPrinter:
    """Writes a row's tokens as text while they arrive; holds back an incomplete UTF-8 character."""

    def __init__(self, tok: Tokenizer, out, stop_id: int):
        self.tok, self.out, self.stop_id = tok, out, stop_id
        self.tokens, self.shown = [], ""

    def __call__(self, row: int, token: int) -> None:
        if token == self.stop_id:
            return
        self.tokens.append(token)
        text = self.tok.decode(self.tokens, skip_special=True)
        if text.endswith("\ufffd"):  # the rest of a multi-byte character is still to come
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text


def fit_context(tok: Tokenizer, messages: list[dict], budget: int) -> list[dict]:
    """The latest turns that fit in `budget` tokens, the system message kept."""
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    while len(turns) > 1 and len(tok.render_chat(system + turns, for_generation=True)[0]) > budget:
        turns = turns[1:]
    return system + turns


def chat(model, tok: Tokenizer, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
         top_p: float = 0.9, seed: int | None = None, read=input, out=sys.stdout) -> None:
    end = tok.end
    messages = [{"role": "system", "content": system}] if system else []
    out.write(f"gptstack chat ({HELP})\n")
    if system:
        out.write(f"system: {system}\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/help":
            out.write(HELP + "\n")
            continue
        if line == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            out.write("(conversation reset)\n")
            continue
        if line.startswith("/system"):
            text = line[len("/system"):].strip()
            messages = [{"role": "system", "content": text}] if text else []
            out.write(f"(system message {'set' if text else 'cleared'}; conversation reset)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        messages.append({"role": "user", "content": line})
        budget = model.cfg.n_ctx - min(max_new_tokens, model.cfg.n_ctx // 2)
        messages = fit_context(tok, messages, budget)
        ids = tok.render_chat(messages, for_generation=True)[0][-budget:]
        out.write("assistant> ")
        printer = StreamPrinter(tok, out, end)
        try:
            g = generate(model, [ids], max_new_tokens, temperature=temperature, top_p=top_p, stop_ids=(end,),
                         pad_id=tok.pad, seed=seed, on_token=printer)[0]
        except KeyboardInterrupt:  # stop this answer, keep the conversation as it was
            messages.pop()
            out.write("\n(interrupted)\n")
            continue
        out.write("\n" if g.finished else " [cut off: max new tokens]\n")
        body = g.tokens[:-1] if g.finished else g.tokens
        messages.append({"role": "assistant", "content": tok.decode(body, skip_special=True)})
