"""What a reader of a foreign model format returns (hf.py, gguf.py), apart from the verbs that use it."""
from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer

from ..model import GPT


@dataclass
class Imported:
    model: GPT
    tokenizer: HFTokenizer
    chat_template: str | None  # the Jinja source, as in tokenizer_config.json or tokenizer.chat_template
    bos: str | None  # the tokens' text, e.g. "<|endoftext|>"; None when the model has none
    eos: str | None
    source: str  # what was read, for the folder's provenance
