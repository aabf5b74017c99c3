"""What the converters (hf.py, gguf.py) share, apart from the verbs that use them: what a reader returns, and
how gptstack's stacked matrices split into the separate ones other formats keep."""
from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer

from ..model import GPT, ModelConfig


@dataclass
class Imported:
    model: GPT
    tokenizer: HFTokenizer
    chat_template: str | None  # the Jinja source, as in tokenizer_config.json or tokenizer.chat_template
    bos: str | None  # the tokens' text, e.g. "<|endoftext|>"; None when the model has none
    eos: str | None
    source: str  # what was read, for the folder's provenance


def stacked_rows(cfg: ModelConfig, name: str, rows: int) -> list[int]:
    """The row counts of the matrices stacked in gptstack's parameter `name`: qkv is [q; k; v] heads, SwiGLU's fc
    is [gate; up] (the Llama family keeps them apart); any other parameter, of `rows` rows, is one piece."""
    if cfg.positions == "rope" and name.endswith("attn.qkv.weight"):
        kv = cfg.kv_heads * cfg.head_dim
        return [cfg.n_head * cfg.head_dim, kv, kv]
    if cfg.mlp == "swiglu" and name.endswith("mlp.fc.weight"):
        return [cfg.hidden_width] * 2
    return [rows]
