"""Real pretrained models in and out: Hugging Face folders (hf.py) and GGUF files (gguf.py).

A reader returns an `Imported` (imported.py): the gptstack model with the weights in its own layout, the
model's BPE as an HF `tokenizers` object, its chat template (the Jinja source the model ships) and its special
tokens. `import_model` turns that into an ordinary gptstack model folder (model.safetensors with the config in
its header, tokenizer.json, chat_template.json) that every verb takes. The writers take a loaded model and its Tokenizer.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from ..chat_template import ChatTemplate
from ..checkpoint import find_tokenizer, load_model, save_state_dict
from ..errors import GptstackError
from ..io import atomic_replace_dir, atomic_write_json
from ..tokenizer import Tokenizer
from .imported import Imported


def plain_template(eos: str, bos: str | None) -> ChatTemplate:
    """For a base model that ships no chat template (GPT-2): role names as text, the answer closed by eos."""
    return ChatTemplate(prefix={"system": "System: ", "user": "User: ", "assistant": "Assistant: "},
                        suffix={"system": "\n\n", "user": "\n\n", "assistant": eos + "\n\n"}, stop=eos, eos=eos, bos=bos)


def tokenizer_of(imported: Imported) -> Tokenizer:
    """gptstack's Tokenizer for the imported BPE, with the model's chat template as data."""
    if imported.eos is None:
        raise GptstackError(f"{imported.source}: the model names no end-of-text token")
    specials = [t.content for t in imported.tokenizer.get_added_tokens_decoder().values() if t.special]
    template = (ChatTemplate.from_jinja(imported.chat_template, specials, imported.bos, imported.eos, imported.source)
                if imported.chat_template else plain_template(imported.eos, imported.bos))
    return Tokenizer(HFTokenizer.from_str(imported.tokenizer.to_str()), template)  # a copy: Tokenizer sets its options


def read_model(src) -> Imported:
    """A Hugging Face model folder (config.json + safetensors + tokenizer.json) or a .gguf file."""
    src = Path(src)
    if src.is_dir() and (src / "config.json").is_file():
        from .hf import read_hf
        return read_hf(src)
    if src.is_file() and src.suffix.lower() == ".gguf":
        from .gguf import read_gguf
        return read_gguf(src)
    raise GptstackError(f"{src}: neither a Hugging Face model folder (with config.json) nor a .gguf file")


def import_model(src, out) -> dict:
    """`gptstack import`: the model as an ordinary gptstack model folder, written whole or not at all."""
    imported = read_model(src)
    tok = tokenizer_of(imported)
    out = Path(out)
    tmp = out.with_name(out.name + ".importing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = imported.model
    save_state_dict(model.state_dict(), tmp / "model.safetensors", model.metadata())
    tok.save(tmp / "tokenizer.json")
    info = {"source": imported.source, "params": model.num_params(), "vocab_size": tok.vocab_size,
            "chat_template": "own" if imported.chat_template else "plain (the model ships none)",
            "stop": tok.template.stop, "model": asdict(model.cfg)}
    atomic_write_json(tmp / "import.json", info)
    atomic_replace_dir(tmp, out)
    return info


def export_model(folder, to: str, out, dtype: str = "f16") -> Path:
    """`gptstack export`: a gptstack model folder as a Hugging Face folder or a GGUF file."""
    model, tok = load_model(folder), Tokenizer.load(find_tokenizer(folder))
    out = Path(out)
    if model.vision is not None:  # neither GPT2LMHeadModel, LlamaForCausalLM nor a llama GGUF has an image encoder
        raise GptstackError(f"{folder}: a model with image input cannot be exported (its encoder and projector have "
                            "no place in a Hugging Face GPT-2/Llama folder or a GGUF file)")
    if to == "hf":
        from .hf import write_hf
        write_hf(model, tok, out)
    elif to == "gguf":
        from .gguf import write_gguf
        write_gguf(model, tok, out, dtype=dtype)
    else:
        raise GptstackError(f"export --to: expected hf or gguf, got {to!r}")
    return out
