"""Byte-level BPE (HF `tokenizers`) with the special tokens every stage reserves, and the chat template.

Text is always text: `encode` never turns a literal "<|end|>" in user data into
the control token. Control tokens enter a sequence only by id, so data cannot
forge a turn boundary, and encode -> decode round-trips any string exactly.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .chat_template import BUILTIN, ChatTemplate
from .config import at_least
from .errors import GptstackError
from .io import atomic_write_text, read_json

SPECIAL_TOKENS = [
    "<|endoftext|>",  # document separator (GPT-2)
    "<|pad|>",
    "<|start|>", "<|delim|>", "<|extract|>",  # GPT-1 input transformations
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",  # chat turns
    "<|image|>",  # GPT-4-style image placeholder
]
IMAGE = "<|image|>"  # an image's place in the text: as many of these ids as the model's encoder gives it vectors
TEMPLATE_FILE = "chat_template.json"  # an imported model's template, beside its tokenizer.json


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
    """Byte-level BPE and the model's chat template (chat_template.py): gptstack's own by default, an imported
    model's own beside its tokenizer.json (chat_template.json)."""

    def __init__(self, hf: HFTokenizer, template: ChatTemplate | None = None):
        self.hf = hf
        self.hf.encode_special_tokens = True  # literal "<|...|>" in text stays text
        self.template = template or BUILTIN
        self.special = {t.content: i for i, t in sorted(hf.get_added_tokens_decoder().items()) if t.special}
        required = SPECIAL_TOKENS if template is None else [self.template.stop, self.template.eos]
        missing = [t for t in required if t not in self.special]
        if missing:
            raise GptstackError(f"tokenizer lacks the special tokens {', '.join(missing)}")
        self.eot = self.special[self.template.eos]
        self.pad = self.special.get("<|pad|>", self.eot)  # padding is masked everywhere; any id will do
        self.end = self.special[self.template.stop]  # closes the assistant's turn
        self._markup = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)) + ")")

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
        """tokenizer.json (a file, or a folder holding one), with the chat_template.json beside it if any."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise GptstackError(f"{path}: no tokenizer here (train one with `gptstack tokenizer train`)")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise GptstackError(f"{path}: not a valid tokenizer file ({str(e).splitlines()[0]})") from None
        template_file = path.parent / TEMPLATE_FILE
        template = ChatTemplate.from_dict(read_json(template_file), str(template_file)) if template_file.is_file() else None
        return cls(hf, template)

    def save(self, path) -> None:
        path = Path(path)
        atomic_write_text(path, self.hf.to_str(pretty=True))
        if self.template is not BUILTIN:
            atomic_write_text(path.parent / TEMPLATE_FILE, json.dumps(self.template.to_dict(), indent=1, ensure_ascii=False))

    def with_specials(self, names) -> "Tokenizer":
        """A copy with the special tokens it lacks added after its vocabulary (GPT-1's task tokens for an
        imported model)."""
        hf = HFTokenizer.from_str(self.hf.to_str())
        hf.add_special_tokens([t for t in names if t not in self.special])
        return Tokenizer(hf, None if self.template is BUILTIN else self.template)

    def fingerprint(self) -> str:
        text = self.hf.to_str() + ("" if self.template is BUILTIN else json.dumps(self.template.to_dict(), sort_keys=True))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

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

    def markup(self, text: str) -> list[int]:
        """The template's own text: its special tokens by id, the rest as text."""
        ids = []
        for i, piece in enumerate(self._markup.split(text)):
            ids += [self.special[piece]] if i % 2 else self.encode(piece) if piece else []
        return ids

    # ---------------------------------------------------------------- the chat template (the one code path)
    #
    #   gptstack's: <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>
    #   SmolLM2's:  <|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n…
    #
    # Each turn is the template's prefix, the content's text tokens and the suffix. Content is encoded as text,
    # so a message cannot forge a turn. For generation the ids end with an open assistant prefix, and the
    # model's stop token (<|end|>, <|im_end|>) closes its turn.

    @property
    def image_id(self) -> int:
        if IMAGE not in self.special:
            raise GptstackError(f"the tokenizer has no {IMAGE} token (a model with image input adds it)")
        return self.special[IMAGE]

    def content_ids(self, message: dict, image_tokens: int = 0) -> list[int]:
        """A message's content as ids: text as text; in a list of parts (OpenAI's form), each
        {"type": "image", ...} part as `image_tokens` <|image|> placeholders, where the model splices the image in."""
        if isinstance(message["content"], str):
            return self.encode(self.template.content(message))
        ids = []
        for part in message["content"]:
            if part["type"] == "text":
                ids += self.encode(part["text"])
            elif not image_tokens:
                raise GptstackError("the conversation holds an image, but the model takes no images")
            else:
                ids += [self.image_id] * image_tokens
        return ids

    def render_chat(self, messages: list[dict], for_generation: bool = False,
                    image_tokens: int = 0) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and, for training, which of them are the assistant's to learn
        (its content and the stop token that closes it; never the template's other text). `image_tokens`: the
        placeholders each image part becomes (the model's `vision.tokens`)."""
        t = self.template
        ids = self.markup(t.begin)
        learn = [False] * len(ids)
        for m in t.turns(messages):
            role = m["role"]
            head, body, tail = self.markup(t.prefix[role]), self.content_ids(m, image_tokens), self.markup(t.suffix[role])
            closed = tail.index(self.end) + 1 if self.end in tail else len(tail)
            ids += head + body + tail
            learn += [False] * len(head) + [role == "assistant"] * (len(body) + closed) + [False] * (len(tail) - closed)
        if for_generation:
            opening = self.markup(t.prefix["assistant"])
            ids += opening
            learn += [False] * len(opening)
        return ids, learn

    def render_prompts(self, conversations: list[list[dict]], n_ctx: int, max_new_tokens: int,
                       image_tokens: int = 0) -> list[list[int]]:
        """Each conversation rendered with an open assistant turn; one too long for the context keeps its
        end (the request and the open turn), leaving room for the answer. A conversation with images must fit
        whole (a cut would split an image's placeholders)."""
        budget = n_ctx - min(max_new_tokens, n_ctx // 2)
        out = []
        for c in conversations:
            ids = self.render_chat(c, for_generation=True, image_tokens=image_tokens)[0]
            if len(ids) > budget and conversation_images(c):
                raise GptstackError(f"a conversation with images is {len(ids)} tokens; {budget} fit before the answer")
            out.append(ids[-budget:])
        return out


def chat_messages(user: str, system: str | None = None, answer: str | None = None) -> list[dict]:
    """The turns of one exchange: the system message if any, the user's request, and the answer if given."""
    return (([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
            + ([{"role": "assistant", "content": answer}] if answer is not None else []))


def conversation_images(messages: list[dict]) -> list:
    """The images of a conversation's image parts, in order (what its placeholders stand for)."""
    return [part["image"] for m in messages if not isinstance(m["content"], str)
            for part in m["content"] if part["type"] == "image"]
