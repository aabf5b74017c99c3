"""What the converters (hf.py, gguf.py) share, apart from the verbs that use them: what a reader returns, and
how gptstack's stacked matrices split into the separate ones other formats keep."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tokenizers import Tokenizer as HFTokenizer

from ..errors import GptstackError
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


def assemble(model: GPT, tensors: dict[str, torch.Tensor], names_of: Callable[[str], list[str]],
             take: Callable[[str, str, torch.Tensor], torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """gptstack's state dict from a file's tensors: each parameter is the tensors `names_of` it gives, each through
    `take(name, its name there, tensor)` (a layout change), stacked along the rows. Used tensors are removed from `tensors`, so what is left over
    is what the model has no place for."""
    state = {}
    for name, want in model.state_dict().items():
        names = names_of(name)
        missing = next((n for n in names if n not in tensors), None)
        if missing is not None:
            raise GptstackError(f"{where}: no tensor '{missing}' (gptstack's {name})")
        state[name] = torch.cat([take(name, n, tensors.pop(n)) for n in names])
        if state[name].shape != want.shape:
            raise GptstackError(f"{where}: {' + '.join(names)} make a {tuple(state[name].shape)} matrix; "
                                f"the model's config implies {tuple(want.shape)}")
    return state
