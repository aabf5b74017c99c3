"""Byte-level BPE (HF `tokenizers`) with the special tokens every stage reserves.

Text is always text: `encode` never turns a literal "<|end|>" in user data into
the control token. Control tokens enter a sequence only by id, so data cannot
forge a turn boundary, and encode -> decode round-trips any string exactly.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .config import at_least
from .errors import GptstackError
from .io import atomic_write_text

SPECIAL_TOKENS = [
    "<|endoftext|>",  # document separator (GPT-2)
    "<|pad|>",
    "<|start|>", "<|delim|>", "<|extract|>",  # GPT-1 input transformations
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",  # chat turns
    "<|image|>",  # GPT-4-style image placeholder
]


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2
    train_bytes: int = 0  # train the BPE on at most this many bytes of the corpus (0: all)

    def problems(self):
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            yield "vocab_size", f"must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), got {self.vocab_size}"
        yield from at_least(self, 1, "min_frequency")
        yield from at_least(self, 0, "train_bytes")


class Tokenizer:
    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.hf.encode_special_tokens = True  # literal "<|...|>" in text stays text
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise GptstackError(f"tokenizer lacks the special tokens {', '.join(missing)}")
        self.special = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        self.eot = self.special["<|endoftext|>"]
        self.pad = self.special["<|pad|>"]

    # ---------------------------------------------------------------- training / io

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False) -> "Tokenizer":
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise GptstackError(f"tokenizer vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise GptstackError(f"{path}: no tokenizer here (train one with `gptstack tokenizer train`)")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise GptstackError(f"{path}: not a valid tokenizer file ({str(e).splitlines()[0]})") from None

    def save(self, path) -> None:
        atomic_write_text(Path(path), self.hf.to_str(pretty=True))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- use

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    # ---------------------------------------------------------------- the chat template (the only one)
    #
    #   <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>
    #
    # Each turn is its role token, the content's text tokens, and <|end|>. Content is encoded as text,
    # so a message cannot forge a turn. For generation the template ends with an open <|assistant|>,
    # and the model's <|end|> closes its turn.

    def render_chat(self, messages: list[dict], for_generation: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and, for training, which of them are the assistant's to learn
        (its content and the <|end|> that closes it; never the role token)."""
        ids, learn = [], []
        end = self.special["<|end|>"]
        for m in messages:
            role = m["role"]
            if role not in CHAT_ROLES:
                raise GptstackError(f"unknown chat role {role!r} (roles: {', '.join(CHAT_ROLES)})")
            body = self.encode(m["content"]) + [end]
            ids += [self.special[f"<|{role}|>"]] + body
            learn += [False] + [role == "assistant"] * len(body)
        if for_generation:
            ids.append(self.special["<|assistant|>"])
            learn.append(False)
        return ids, learn

    def render_prompts(self, conversations: list[list[dict]], n_ctx: int, max_new_tokens: int) -> list[list[int]]:
        """Each conversation rendered with an open assistant turn; one too long for the context keeps its
        end (the request and the open turn), leaving room for the answer."""
        budget = n_ctx - min(max_new_tokens, n_ctx // 2)
        return [self.render_chat(c, for_generation=True)[0][-budget:] for c in conversations]

    def parse_chat(self, ids: list[int]) -> list[dict]:
        """The turns of rendered token ids; an unclosed last turn (a cut-off answer) is kept as it is."""
        roles = {self.special[f"<|{r}|>"]: r for r in CHAT_ROLES}
        end = self.special["<|end|>"]
        turns, role, body = [], None, []
        for i in list(ids) + [end]:
            if i in roles or i == end:
                if role is not None:
                    turns.append({"role": role, "content": self.decode(body)})
                role, body = roles.get(i), []
            elif role is not None:
                body.append(i)
        return turns


CHAT_ROLES = ("system", "user", "assistant")


def chat_messages(user: str, system: str | None = None, answer: str | None = None) -> list[dict]:
    """The turns of one exchange: the system message if any, the user's request, and the answer if given."""
    return (([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
            + ([{"role": "assistant", "content": answer}] if answer is not None else []))
