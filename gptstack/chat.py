"""`gptstack chat`: a terminal conversation with a model, streamed token by token.

The conversation is rendered with the one chat template and answered by the one engine. When it
outgrows the context, the oldest turns go first (the system message stays).
"""
from __future__ import annotations

import sys

import torch

from .errors import GptstackError
from .generate import generate
from .images import read_image
from .tokenizer import Tokenizer, conversation_images

HELP = ("commands: /system TEXT (set the system message and start over), /image PATH (show the model a picture with "
        "your next message), /reset (start over), /quit; Ctrl-D or Ctrl-C exits")


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


def fit_context(tok: Tokenizer, messages: list[dict], budget: int, image_tokens: int = 0) -> list[dict]:
    """The latest turns that fit in `budget` tokens, the system message kept."""
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    while len(turns) > 1 and len(tok.render_chat(system + turns, True, image_tokens)[0]) > budget:
        turns = turns[1:]
    return system + turns


def chat(model, tok: Tokenizer, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
         top_p: float = 0.9, seed: int | None = None, read=input, out=sys.stdout) -> None:
    end = tok.end
    vision = model.cfg.vision
    image_tokens = vision.tokens if vision.image_size else 0
    pictures = []  # shown with the next message (/image)
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
        if line.split()[0] == "/image":
            path = line[len("/image"):].strip()
            if not image_tokens:
                out.write("(this model takes no images)\n")
                continue
            try:
                pictures.append(read_image(path, vision.image_size))
            except GptstackError as e:
                out.write(f"({e})\n")
                continue
            out.write(f"(picture {path} will go with your next message)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        content = [{"type": "image", "image": p} for p in pictures] + [{"type": "text", "text": line}] if pictures else line
        messages.append({"role": "user", "content": content})
        pictures = []
        budget = model.cfg.n_ctx - min(max_new_tokens, model.cfg.n_ctx // 2)
        messages = fit_context(tok, messages, budget, image_tokens)
        try:
            ids = tok.render_prompts([messages], model.cfg.n_ctx, max_new_tokens, image_tokens)[0]
        except GptstackError as e:  # a picture whose placeholders do not fit the context
            messages.pop()
            out.write(f"({e})\n")
            continue
        shown = conversation_images(messages)
        out.write("assistant> ")
        printer = StreamPrinter(tok, out, end)
        try:
            g = generate(model, [ids], max_new_tokens, temperature=temperature, top_p=top_p, stop_ids=(end,),
                         pad_id=tok.pad, seed=seed, on_token=printer, images=[torch.stack(shown) if shown else None])[0]
        except KeyboardInterrupt:  # stop this answer, keep the conversation as it was
            messages.pop()
            out.write("\n(interrupted)\n")
            continue
        out.write("\n" if g.finished else " [cut off: max new tokens]\n")
        body = g.tokens[:-1] if g.finished else g.tokens
        messages.append({"role": "assistant", "content": tok.decode(body, skip_special=True)})
