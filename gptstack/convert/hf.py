"""Hugging Face model folders in and out: GPT-2 (GPT2LMHeadModel) and the Llama family (LlamaForCausalLM, SmolLM2).

A folder holds config.json, the weights in *.safetensors (sharded ones listed in model.safetensors.index.json),
tokenizer.json, and tokenizer_config.json (special tokens, chat template). The weights are gptstack's own up to
their names and three layout choices, each visible below:
  - GPT-2 stores its linears as Conv1D, (in, out): transposed to nn.Linear's (out, in);
  - Llama keeps q, k and v apart: gptstack's qkv is their rows stacked (both rotate halves of a head, so no
    permutation);
  - Llama's SwiGLU keeps gate and up apart: gptstack's fc is [gate; up].
What the model cannot represent (scaled rotary frequencies, Llama biases, ...) is refused naming the file and field.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as HFTokenizer

from ..checkpoint import save_state_dict
from ..config import from_dict
from ..errors import GptstackError
from ..io import atomic_write_json, atomic_write_text, read_json
from ..model import GPT, ModelConfig, ntk_base
from .imported import Imported, assemble, stacked_rows

# gptstack module: Hugging Face module(s), under "transformer." / "model." (lm_head sits at the top). A module's
# .weight and .bias map alike; a tuple is stacked along the rows (dim 0) into the one gptstack matrix.
GPT2 = {
    "wte": "wte",
    "wpe": "wpe",
    "blocks.{i}.ln1": "h.{i}.ln_1",
    "blocks.{i}.attn.qkv": "h.{i}.attn.c_attn",
    "blocks.{i}.attn.proj": "h.{i}.attn.c_proj",
    "blocks.{i}.ln2": "h.{i}.ln_2",
    "blocks.{i}.mlp.fc": "h.{i}.mlp.c_fc",
    "blocks.{i}.mlp.proj": "h.{i}.mlp.c_proj",
    "ln_f": "ln_f",
    "lm_head": "lm_head",
}
GPT2_CONV1D = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # their weights are stored (in, out)
LLAMA = {
    "wte": "embed_tokens",
    "blocks.{i}.ln1": "layers.{i}.input_layernorm",
    "blocks.{i}.attn.qkv": ("layers.{i}.self_attn.q_proj", "layers.{i}.self_attn.k_proj", "layers.{i}.self_attn.v_proj"),
    "blocks.{i}.attn.proj": "layers.{i}.self_attn.o_proj",
    "blocks.{i}.ln2": "layers.{i}.post_attention_layernorm",
    "blocks.{i}.mlp.fc": ("layers.{i}.mlp.gate_proj", "layers.{i}.mlp.up_proj"),
    "blocks.{i}.mlp.proj": "layers.{i}.mlp.down_proj",
    "ln_f": "norm",
    "lm_head": "lm_head",
}
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# Buffers some checkpoints carry (GPT-2's causal mask, old rotary tables): recomputed, not weights.
BUFFERS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


def hf_names(table: dict, name: str) -> list[str]:
    """The Hugging Face tensors (without the body prefix) that make up gptstack's parameter `name`."""
    module, param = name.rsplit(".", 1)
    layer = re.match(r"blocks\.(\d+)\.", module)
    hf = table[re.sub(r"^blocks\.\d+\.", "blocks.{i}.", module)]
    return [f"{h.format(i=layer and layer[1])}.{param}" for h in ((hf,) if isinstance(hf, str) else hf)]


def conv1d(table: dict, name: str) -> bool:
    return table is GPT2 and name.endswith(".weight") and name.rsplit(".", 1)[0].endswith(GPT2_CONV1D)


# ---------------------------------------------------------------- import

def read_hf(folder: Path) -> Imported:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise GptstackError(f"{path}: no such file (expected a Hugging Face model folder)")
    c = read_json(path)
    kind = c.get("model_type") if isinstance(c, dict) else None
    if kind not in ("gpt2", "llama"):
        raise GptstackError(f"{path}: model_type {kind!r} is not one gptstack reads (gpt2, llama)")
    cfg = from_dict(ModelConfig, gpt2_config(c, path) if kind == "gpt2" else llama_config(c, path), where=str(path))
    table = GPT2 if kind == "gpt2" else LLAMA

    tensors, source = read_tensors(folder)
    with torch.device("meta"):  # the shapes only; the weights come from the files
        model = GPT(cfg)
    state = assemble(model, tensors, lambda name: hf_names(table, name),
                     lambda name, _, t: t.float().T if conv1d(table, name) else t.float(), str(source))
    extra = [k for k in tensors if not BUFFERS.search(k) and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if extra:
        raise GptstackError(f"{source}: tensors gptstack's {kind} has no place for: {', '.join(sorted(extra)[:5])}")
    model.load_state_dict(state, strict=True, assign=True)

    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise GptstackError(f"{tok_path}: no such file (gptstack reads the fast tokenizer's tokenizer.json)")
    try:
        tokenizer = HFTokenizer.from_file(str(tok_path))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise GptstackError(f"{tok_path}: not a valid tokenizer file ({str(e).splitlines()[0]})") from None
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise GptstackError(f"{tok_path}: {tokenizer.get_vocab_size()} tokens, more than the vocab_size "
                            f"{cfg.vocab_size} of {path}")

    tc_path = folder / "tokenizer_config.json"
    tc = read_json(tc_path) if tc_path.is_file() else {}
    template = folder / "chat_template.jinja"  # where transformers 5 saves it; it wins over tokenizer_config's
    chat = template.read_text(encoding="utf-8") if template.is_file() else tc.get("chat_template")
    if isinstance(chat, list):  # older multi-template form: [{"name": "default", "template": ...}, ...]
        chat = {t.get("name"): t.get("template") for t in chat}.get("default")
    return Imported(model=model.eval(), tokenizer=tokenizer, chat_template=chat,
                    bos=special(tc, c, "bos", tokenizer), eos=special(tc, c, "eos", tokenizer), source=str(folder))


def need(c: dict, field: str, path: Path):
    if field not in c:
        raise GptstackError(f"{path}: no field '{field}'")
    return c[field]


def gpt2_config(c: dict, path: Path) -> dict:
    act = c.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise GptstackError(f"{path}: activation_function '{act}' is not one gptstack has ({', '.join(GPT2_ACTIVATIONS)})")
    if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx", False):
        raise GptstackError(f"{path}: scale_attn_weights / scale_attn_by_inverse_layer_idx: gptstack scales "
                            "attention by 1/sqrt(head size) only")
    return dict(n_layer=need(c, "n_layer", path), n_head=need(c, "n_head", path), n_embd=need(c, "n_embd", path),
                n_ctx=need(c, "n_positions", path), vocab_size=need(c, "vocab_size", path),
                norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5), mlp=GPT2_ACTIVATIONS[act],
                mlp_hidden=c.get("n_inner") or 0, positions="learned", bias=True,
                tie_embeddings=c.get("tie_word_embeddings", True))


def llama_config(c: dict, path: Path) -> dict:
    for field in ("attention_bias", "mlp_bias"):
        if c.get(field, False):
            raise GptstackError(f"{path}: {field} is true; gptstack's Llama shape has no biases")
    if c.get("hidden_act", "silu") != "silu":
        raise GptstackError(f"{path}: hidden_act '{c['hidden_act']}': gptstack's SwiGLU gates with silu")
    # transformers 5 writes rope_parameters (theta inside); 4.x wrote rope_theta and rope_scaling beside it
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "yarn"):
        raise GptstackError(f"{path}: rope type '{rope_type}' is not one gptstack has (default, linear, yarn)")
    if any(rope.get(k) is not None for k in ("attention_factor", "mscale", "mscale_all_dim", "partial_rotary_factor")):
        raise GptstackError(f"{path}: rope_parameters: attention_factor / mscale / partial_rotary_factor are not "
                            "supported (YaRN's own 0.1·ln(factor) + 1 only)")
    d, heads = need(c, "hidden_size", path), need(c, "num_attention_heads", path)
    if c.get("head_dim") not in (None, d // heads):
        raise GptstackError(f"{path}: head_dim {c['head_dim']} is not hidden_size / num_attention_heads ({d // heads})")
    n_ctx = need(c, "max_position_embeddings", path)
    scaling = {}
    if rope_type != "default":  # HF's yarn counts turns in original_max_position_embeddings, else in the whole window
        factor = float(need(rope, "factor", path))
        scaling = {"type": rope_type, "factor": factor,
                   "original_ctx": int(rope.get("original_max_position_embeddings") or (n_ctx if rope_type == "yarn" else n_ctx / factor)),
                   "beta_fast": float(rope.get("beta_fast") or 32.0), "beta_slow": float(rope.get("beta_slow") or 1.0)}
    return dict(n_layer=need(c, "num_hidden_layers", path), n_head=heads, n_kv_head=c.get("num_key_value_heads") or heads,
                n_embd=d, n_ctx=n_ctx, vocab_size=need(c, "vocab_size", path), rope_scaling=scaling,
                norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6), mlp="swiglu",
                mlp_hidden=need(c, "intermediate_size", path), positions="rope",
                rope_base=rope.get("rope_theta", c.get("rope_theta", 10000.0)), bias=False,
                tie_embeddings=c.get("tie_word_embeddings", False))


def special(tc: dict, c: dict, kind: str, tokenizer: HFTokenizer) -> str | None:
    """The bos/eos token's text: tokenizer_config.json's (a string, or {"content": ...}), else config.json's id."""
    token = tc.get(f"{kind}_token")
    if isinstance(token, dict):
        token = token.get("content")
    if token is None:
        i = c.get(f"{kind}_token_id")
        token = tokenizer.id_to_token(i[0] if isinstance(i, list) else i) if i is not None else None
    return token


def read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Every tensor of the folder's safetensors files, by name without the "transformer." / "model." prefix;
    and what to name in errors (the index, the one file, or the folder)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise GptstackError(f"{index}: no weight_map")
        files, source = sorted({folder / f for f in weight_map.values()}), index
    else:
        files = sorted(folder.glob("*.safetensors"))
        source = files[0] if len(files) == 1 else folder / "*.safetensors"
    if not files:
        raise GptstackError(f"{folder}: no *.safetensors weights")
    tensors = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    tensors[k.removeprefix("transformer.").removeprefix("model.")] = st.get_tensor(k)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise GptstackError(f"{f}: corrupt or unreadable weights ({str(e).splitlines()[0]})") from None
    return tensors, source


# ---------------------------------------------------------------- export

WRITTEN = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def write_hf(model: GPT, tokenizer, out: Path) -> None:
    """A Hugging Face folder that transformers' AutoModelForCausalLM and AutoTokenizer load."""
    cfg, out = model.cfg, Path(out)
    exportable(cfg)
    table = GPT2 if cfg.positions == "learned" else LLAMA
    if out.exists():  # a stale index, shard or chat_template.jinja would win over what is written here
        other = sorted(p.name for p in out.iterdir() if p.name not in WRITTEN) if out.is_dir() else [out.name]
        if other:
            raise GptstackError(f"{out}: holds {', '.join(other[:5])}, which an export would not replace; "
                                "give a new or empty folder")

    template = getattr(tokenizer, "template", None)
    jinja, bos, eos = (getattr(template, k, None) for k in ("jinja", "bos", "eos"))
    if eos is None and tokenizer.hf.token_to_id("<|endoftext|>") is not None:
        eos = "<|endoftext|>"  # gptstack's own document separator ends a generation, as in GPT-2
    # null when absent: transformers would otherwise put in its own defaults (GPT-2's 50256, Llama's 1)
    ids = {f"{k}_token_id": None if t is None else tokenizer.hf.token_to_id(t) for k, t in (("bos", bos), ("eos", eos))}

    body = "transformer." if table is GPT2 else "model."
    state = {}
    for name, t in model.state_dict().items():
        hs = hf_names(table, name)
        for h, piece in zip(hs, t.split(stacked_rows(cfg, name, len(t))), strict=True):
            state[h if h.startswith("lm_head.") else body + h] = piece.T if conv1d(table, name) else piece
    save_state_dict(state, out / "model.safetensors", {"format": "pt"})  # transformers checks the format

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    atomic_write_json(out / "config.json", hf_config(cfg, dtype) | ids)
    atomic_write_json(out / "generation_config.json", ids)
    atomic_write_text(out / "tokenizer.json", tokenizer.hf.to_str(pretty=True))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "chat_template": jinja,
          "model_max_length": cfg.n_ctx, "clean_up_tokenization_spaces": False}
    atomic_write_json(out / "tokenizer_config.json", {k: v for k, v in tc.items() if v is not None})


def exportable(cfg: ModelConfig) -> None:
    """Positions pick the family; every other switch must be what that Hugging Face architecture has."""
    if cfg.positions == "learned":
        arch, wants = "GPT2LMHeadModel", {"norm": ("layernorm",), "mlp": ("gelu_tanh", "gelu"), "bias": (True,),
                                          "norm_position": ("pre",), "kv_heads": (cfg.n_head,)}
    else:
        arch, wants = "LlamaForCausalLM", {"norm": ("rmsnorm",), "mlp": ("swiglu",), "bias": (False,),
                                           "norm_position": ("pre",)}
    for switch, ok in wants.items():
        if getattr(cfg, switch) not in ok:
            raise GptstackError(f"model {switch}={getattr(cfg, switch)!r}: Hugging Face has no architecture for it with "
                                f"positions={cfg.positions!r} ({arch} has {switch} {' or '.join(map(repr, ok))})")


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
    if cfg.positions == "learned":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_inner": cfg.mlp_hidden or None, "n_positions": cfg.n_ctx,
                "vocab_size": cfg.vocab_size, "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "attn_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "resid_pdrop": cfg.dropout, "dtype": dtype}
    s = cfg.rope_scaling
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if s.type == "ntk" and s.factor != 1:  # NTK-aware scaling is a larger base, which every reader understands
        rope["rope_theta"] = ntk_base(cfg.rope_base, cfg.head_dim, s.factor)
    elif s.type in ("linear", "yarn") and s.factor != 1:
        rope |= {"rope_type": s.type, "factor": s.factor}
        if s.type == "yarn":
            rope |= {"original_max_position_embeddings": s.original_ctx, "beta_fast": s.beta_fast, "beta_slow": s.beta_slow}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "hidden_size": cfg.n_embd,
            "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_width, "max_position_embeddings": cfg.n_ctx,
            "vocab_size": cfg.vocab_size, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
            # both spellings: transformers 5 reads rope_parameters, 4.x rope_theta and rope_scaling
            "rope_parameters": rope, "rope_theta": rope["rope_theta"], 
            "rope_scaling": {**rope, "type": rope["rope_type"]} if rope["rope_type"] != "default" else None,
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings, "dtype": dtype}
