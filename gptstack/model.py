"""The decoder-only Transformer of GPT-1/2/3, in one file.

    h0 = U·We + Wp                      token + learned position embeddings
    h_l = block(h_{l-1})                l = 1..n
    P(u) = softmax(h_n · We^T)          output tied to the token embedding

`norm_position="post"` is GPT-1 (LayerNorm after each residual add);
`"pre"` is GPT-2/3 (LayerNorm at each sub-block's input, plus a final one).

The same model reads the Llama family (SmolLM2, Llama 3) through a few switches,
not a class per architecture: `norm` (LayerNorm or RMSNorm), `mlp` (GELU, GPT-2's
tanh GELU, or SwiGLU), `positions` (learned, or rotary: q and k rotated by their
position instead of adding Wp), `n_kv_head` (grouped-query attention: fewer key and
value heads, each shared by n_head / n_kv_head query heads), `bias` and
`tie_embeddings` (an output matrix of its own instead of We^T).

Image input (GPT-4; LLaVA's design): a small ViT (`VisionEncoder`: a Conv2d patch embedding, learned
positions, the decoder's own `Block` attending both ways) reads each image, a projector pixel-shuffles its
patch grid (s×s neighbouring patches become one vector, s² times wider and s² fewer) and maps it to the decoder's
width, and `splice_images` puts those vectors where the text holds `<|image|>` placeholders, a fixed number
per image (`VisionConfig.tokens`). The switches live in `ModelConfig.vision` (image_size 0: text only).

The model returns hidden states so task heads (classifier, scalar reward /
value) can sit on top; it imports nothing from the training or eval code.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, noop_context_fn

from .config import at_least, from_dict
from .errors import GptstackError


@dataclass
class VisionConfig:
    """The image encoder and projector: image_size² RGB pixels -> (image_size / patch_size)² patches of width
    `width` through `layers` bidirectional blocks -> pixel shuffle by `shuffle` -> `tokens` decoder vectors."""
    image_size: int = 0  # 0: no image input
    patch_size: int = 4
    width: int = 96
    layers: int = 2
    heads: int = 4
    shuffle: int = 2  # pixel shuffle: shuffle × shuffle neighbouring patches become one image token
    image_token: int = -1  # the id of <|image|> in the model's vocabulary (set when the encoder is attached)

    def problems(self):
        if not self.image_size:
            return
        yield from at_least(self, 1, "patch_size", "width", "layers", "heads", "shuffle")
        if self.image_size % (self.patch_size * self.shuffle):
            yield "image_size", (f"({self.image_size}) must be a multiple of patch_size × shuffle "
                                 f"({self.patch_size} × {self.shuffle})")
        if self.width % self.heads:
            yield "width", f"({self.width}) must be divisible by heads ({self.heads})"

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        """Decoder positions one image takes: its <|image|> placeholders."""
        return (self.grid // self.shuffle) ** 2


@dataclass
class RopeScaling:
    """Rotary positions stretched past the window a model was trained on (`gptstack extend`); applied at inference
    too, so a model read with this setting runs longer prompts without fine-tuning.

    linear: positions divided by `factor` (position interpolation, Chen et al. 2023).
    ntk: the base raised to base · factor^(d / (d - 2)) ("NTK-aware" scaling: high frequencies kept, low ones
         interpolated).
    yarn: each frequency pair interpolated by how many turns it makes in `original_ctx` tokens (fewer than
          `beta_slow`: divided by `factor`; more than `beta_fast`: kept; a linear ramp between), and the
          attention logits scaled by (0.1·ln(factor) + 1)^2 (Peng et al. 2023, sqrt(1/t) = 0.1·ln(s) + 1)."""
    type: Literal["none", "linear", "ntk", "yarn"] = "none"
    factor: float = 1.0
    original_ctx: int = 0  # the window the model was trained on (yarn's turn counts use it)
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def problems(self):
        if not self.factor >= 1.0:
            yield "factor", f"must be >= 1, got {self.factor}"
        if self.type == "yarn" and self.original_ctx < 1:
            yield "original_ctx", "yarn needs the trained window (original_ctx >= 1)"
        if not 0 < self.beta_slow < self.beta_fast:
            yield "beta_slow", f"must satisfy 0 < beta_slow < beta_fast, got {self.beta_slow}, {self.beta_fast}"


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_ctx: int = 256
    vocab_size: int = 4096
    norm_position: Literal["pre", "post"] = "pre"  # "post": GPT-1 (LayerNorm after each residual add); "pre": GPT-2/3
    dropout: float = 0.0  # residual, embedding and attention dropout (GPT-1 used 0.1)
    bias: bool = True  # biases in every linear layer and norm (GPT); none in the Llama family
    init_std: float = 0.02
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu_tanh"  # gelu_tanh: GPT-2's approximation
    mlp_hidden: int = 0  # the MLP's inner width (0: 4 · n_embd)
    positions: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    n_kv_head: int = 0  # key/value heads (0: n_head; fewer is grouped-query attention)
    tie_embeddings: bool = True  # the output matrix is We^T
    vision: VisionConfig = field(default_factory=VisionConfig)  # image input (GPT-4): the encoder and projector

    def problems(self):
        for name in ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size"):
            if getattr(self, name) < 1:
                yield name, f"must be at least 1, got {getattr(self, name)}"
        if not 0 <= self.dropout < 1:
            yield "dropout", f"must be in [0, 1), got {self.dropout}"
        if self.n_embd % self.n_head:
            yield "n_embd", f"({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            yield "n_kv_head", f"({self.n_kv_head}) must divide model.n_head ({self.n_head}) (0: as many as n_head)"
        if self.mlp_hidden < 0:
            yield "mlp_hidden", f"must be at least 0, got {self.mlp_hidden}"
        if self.norm_eps <= 0:
            yield "norm_eps", f"must be positive, got {self.norm_eps}"
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            yield "positions", f"rope needs an even head size, got {self.n_embd // self.n_head}"
        for key, message in self.vision.problems():
            yield f"vision.{key}", message

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_width(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd


class KVCache:
    """Keys and values of earlier positions, preallocated for `max_len` tokens on first use
    (in the dtype the attention computes in, so it follows autocast)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int):
        self.shape = (cfg.n_layer, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = self.v = None
        self.len = 0  # positions already stored

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k is None:
            self.k = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
            self.v = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
        end = self.len + k.size(2)
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def rows(self, n: int) -> "KVCache":
        """A cache over the first n rows that shares this one's memory (the engine's running batch)."""
        view = KVCache.__new__(KVCache)
        view.shape = (self.shape[0], n, *self.shape[2:])
        view.k, view.v, view.len = self.k[:, :n], self.v[:, :n], self.len
        return view


def rope_frequencies(head_dim: int, base: float, scaling: RopeScaling | None = None, device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequency of each pair, attention factor): pair i turns by base^(-2i/head_dim) per position, as
    `scaling` changes it; the factor multiplies cos and sin, so q·k is scaled by its square (YaRN's temperature)."""
    kind = scaling.type if scaling is not None and scaling.factor != 1.0 else "none"
    if kind == "ntk":
        base = ntk_base(base, head_dim, scaling.factor)
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if kind == "linear":
        return inv_freq / scaling.factor, 1.0
    if kind == "yarn":
        # the pair index at which a frequency makes `turns` turns in original_ctx tokens (HF's find_correction_dim)
        def pair(turns):
            return head_dim * math.log(scaling.original_ctx / (turns * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(pair(scaling.beta_fast)), 0)
        high = min(math.ceil(pair(scaling.beta_slow)), head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, device=device, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        # ramp 0: fast pairs kept as trained (extrapolated); ramp 1: slow pairs interpolated
        return inv_freq * (1 - ramp) + inv_freq / scaling.factor * ramp, yarn_attention_factor(scaling.factor)
    return inv_freq, 1.0


def ntk_base(base: float, head_dim: int, factor: float) -> float:
    """NTK-aware scaling's base: base · factor^(d / (d - 2)), so the lowest frequency is interpolated by `factor`."""
    return base * factor ** (head_dim / (head_dim - 2))


def yarn_attention_factor(factor: float) -> float:
    """YaRN's sqrt(1/t) = 0.1·ln(s) + 1, applied to q and k alike (1 when s <= 1)."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def rotary(positions: torch.Tensor, head_dim: int, base: float, dtype, scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles, (T, head_dim) or (B, T, head_dim): pair i of a head turns by
    position · base^(-2i/head_dim) (as `scaling` changes it), the two halves of the head being the pair's two
    coordinates (Llama's layout)."""
    inv_freq, attention_factor = rope_frequencies(head_dim, base, scaling, positions.device)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated: (x1, x2) -> (x1·cos - x2·sin, x2·cos + x1·sin) for the halves x1, x2."""
    if cos.dim() == 3:  # per-row positions (left-padded batches): broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # in the compute dtype (bf16 under autocast), so is the KV cache
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        # one matrix for q (n_head heads), then k and v (n_kv_head heads each)
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, attn_mask=None, rope=None):
        B, T, C = x.shape
        D = self.head_dim
        q, k, v = self.qkv(x).split([self.n_head * D, self.n_kv_head * D, self.n_kv_head * D], dim=2)
        q = q.view(B, T, self.n_head, D).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, D).transpose(1, 2) for t in (k, v))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        sdpa = dict(dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head)
        if attn_mask is not None:  # padded batches: the caller says who may see whom
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **sdpa)
        elif k.size(2) == T:  # no earlier positions: plain causal (flash kernels on GPU)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa)
        elif T == 1:  # one new token after the cache: it sees every position, no mask to build
            y = F.scaled_dot_product_attention(q, k, v, **sdpa)
        else:  # T new queries after k.size(2) - T cached positions
            past = k.size(2) - T
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **sdpa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """GELU: proj(gelu(fc(x))). SwiGLU: fc holds the gate and the up projection, proj(silu(gate) * up)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        width = cfg.hidden_width
        self.fc = nn.Linear(cfg.n_embd, 2 * width if cfg.mlp == "swiglu" else width, bias=cfg.bias)
        self.proj = nn.Linear(width, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.drop(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.ln1 = norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, layer=0, attn_mask=None, rope=None):
        if self.pre_norm:  # GPT-2/3, Llama
            x = x + self.attn(self.ln1(x), cache, layer, attn_mask, rope)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, cache, layer, attn_mask, rope))  # GPT-1
        return self.ln2(x + self.mlp(x))


class VisionEncoder(nn.Module):
    """A small ViT and its projector: images (N, 3, S, S) -> (N, tokens, n_embd).

        patches = Conv2d(3, width, patch, stride=patch)(2x - 1) + Wpos      a (grid × grid) patch grid
        h = blocks(patches), every patch seeing every other (the decoder's Block, bidirectional)
        projector: pixel shuffle (s × s patches -> one vector of width·s²), then a linear map to n_embd
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v = cfg.vision
        self.cfg = v
        # the decoder's block at the encoder's width (same norm, MLP and bias switches), no dropout
        block_cfg = replace(cfg, n_embd=v.width, n_head=v.heads, n_kv_head=0, mlp_hidden=0, norm_position="pre",
                            dropout=0.0, positions="learned", vision=VisionConfig())
        self.patch = nn.Conv2d(3, v.width, v.patch_size, stride=v.patch_size)
        self.pos = nn.Parameter(torch.zeros(v.grid * v.grid, v.width))
        self.blocks = nn.ModuleList(Block(block_cfg) for _ in range(v.layers))
        self.ln = norm(block_cfg)
        self.projector = nn.Linear(v.width * v.shuffle ** 2, cfg.n_embd)
        self.register_buffer("everyone", torch.ones(v.grid * v.grid, v.grid * v.grid, dtype=torch.bool), persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's patch features, (N, grid², width). Pixels are uint8 (0..255) or floats in [0, 1]."""
        v = self.cfg
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, v.image_size, v.image_size):
            raise GptstackError(f"images must be (N, 3, {v.image_size}, {v.image_size}), got {tuple(images.shape)}")
        pixels = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = self.patch(pixels * 2 - 1).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x, attn_mask=self.everyone)  # a mask of all True: attention both ways, not causal
        return self.ln(x)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Pixel shuffle, then the projector: (N, grid², width) -> (N, tokens, n_embd)."""
        N, _, C = features.shape
        g, s = self.cfg.grid, self.cfg.shuffle
        x = features.view(N, g // s, s, g // s, s, C).permute(0, 1, 3, 2, 4, 5).reshape(N, (g // s) ** 2, s * s * C)
        return self.projector(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(images))


def splice_images(embeddings: torch.Tensor, idx: torch.Tensor, image_vectors: torch.Tensor | None,
                  image_token: int) -> torch.Tensor:
    """The decoder's input with each `<|image|>` placeholder's row replaced by the next image vector, in reading
    order (row by row, left to right): image_vectors (N, tokens, n_embd) fill N images' runs of placeholders.
    The one splice, used by training and generation alike."""
    where = idx == image_token
    found, given = int(where.sum()), 0 if image_vectors is None else image_vectors.size(0)
    per_image = 0 if image_vectors is None else image_vectors.size(1)
    if found != given * per_image:
        raise GptstackError(f"{found} <|image|> placeholders for {given} image(s) of {per_image or 'k'} tokens each: "
                            f"each image needs its {per_image or 'k'} placeholders, and each run of placeholders an image")
    if not found:
        return embeddings
    return embeddings.masked_scatter(where[..., None], image_vectors.to(embeddings.dtype))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.n_embd) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.vision = VisionEncoder(cfg) if cfg.vision.image_size else None
        # training switches (the Trainer's train.grad_checkpoint): recompute each block's activations in backward
        # instead of keeping them; recompute_context() -> (forward's, recompute's) context managers, for state the
        # recompute must share with the forward (train/lora.py: the adapter a forward ran through)
        self.grad_checkpoint = False
        self.recompute_context = noop_context_fn
        self._initialise(self)

    def _initialise(self, module: nn.Module) -> None:
        module.apply(self._init)
        # GPT-2: scale the residual projections by 1/sqrt(2·n_layer) so the residual stream's variance stays put
        for name, p in module.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer))

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, self.cfg.init_std)
        if isinstance(m, VisionEncoder):
            nn.init.normal_(m.pos, 0.0, self.cfg.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def add_vision(self, vision: VisionConfig) -> None:
        """Attach a freshly initialised image encoder and projector of this shape (`vision.image_token` set)."""
        self.cfg.vision = vision
        self.vision = VisionEncoder(self.cfg).to(self.wte.weight.device)
        self._initialise(self.vision)

    def input_embeddings(self, idx, images: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's input before positions: token embeddings, with the images' projected vectors spliced in
        at the `<|image|>` placeholders. A model with an image encoder checks every forward from the start of a
        sequence for placeholders without images; decode steps (after a cache) take none."""
        x = self.wte(idx)
        if self.vision is not None:
            x = splice_images(x, idx, None if images is None else self.vision(images), self.cfg.vision.image_token)
        elif images is not None:
            raise GptstackError("this model takes no images (it has no image encoder)")
        return x

    def hidden(self, idx, *, cache: KVCache | None = None, positions=None, attn_mask=None, images=None):
        """Final hidden states h_n, shape (B, T, n_embd). `images` (N, 3, S, S): the pictures whose vectors
        replace the `<|image|>` placeholders of idx, in reading order."""
        B, T = idx.shape
        start = cache.len if cache is not None else 0
        if positions is None:
            if start + T > self.cfg.n_ctx:
                raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.cfg.n_ctx} "
                                 "(`gptstack extend` makes a longer window)")
            positions = torch.arange(start, start + T, device=idx.device)
        x = self.input_embeddings(idx, images) if images is not None or start == 0 else self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            rope = rotary(positions, self.cfg.head_dim, self.cfg.rope_base, x.dtype, self.cfg.rope_scaling)
        x = self.drop(x)
        recompute = self.grad_checkpoint and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, None, i, attn_mask, rope, use_reentrant=False, context_fn=self.recompute_context)
            else:
                x = block(x, cache, i, attn_mask, rope)
        if cache is not None:
            cache.len += T
        return self.ln_f(x)

    def logits(self, h):
        if self.lm_head is not None:
            return self.lm_head(h)
        return F.linear(h, self.wte.weight)  # tied output: softmax(h_n · We^T)

    def sequence_logprobs(self, ids, temperature: float = 1.0, images=None):
        """log P(ids[:, t] | ids[:, <t]) for t = 1..L-1 under softmax(logits / temperature): (B, L-1)."""
        return token_logprobs(self.logits(self.hidden(ids, images=images))[:, :-1], ids[:, 1:], temperature)

    def forward(self, idx, targets=None, **kw):
        """(logits, loss). Targets of -100 are ignored (prompt tokens in SFT, padding)."""
        logits = self.logits(self.hidden(idx, **kw))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def grow_vocab(self, vocab_size: int) -> None:
        """Rows for tokens added to the vocabulary, each the mean of the existing rows: a new token starts as
        an average token instead of a random direction the pretrained model never saw."""
        for table in [t for t in (self.wte, self.lm_head) if t is not None]:
            old = table.weight
            new = old.mean(0, keepdim=True).expand(vocab_size - old.size(0), -1)
            table.weight = nn.Parameter(torch.cat([old, new]))
        self.wte.num_embeddings = vocab_size
        self.cfg.vocab_size = vocab_size

    # -------------------------------------------------------------- accounting

    def num_params(self, embeddings: bool = True) -> int:
        """All parameters, or (Kaplan et al.'s N) without the token and position embeddings and the output matrix
        (the image encoder counted in both)."""
        n = sum(p.numel() for p in self.parameters())
        if embeddings:
            return n
        tables = [self.wte, self.wpe, self.lm_head]
        return n - sum(t.weight.numel() for t in tables if t is not None)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N for the matmuls, the output matrix's V·d included (the lookup tables
        are not matmuls), plus 12·L·d·T for attention scores (PaLM appendix B)."""
        n = self.num_params(embeddings=False) + self.cfg.vocab_size * self.cfg.n_embd
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.n_embd * seq_len

    def metadata(self) -> dict[str, str]:
        return {"gptstack.model_config": json.dumps(asdict(self.cfg))}

    @staticmethod
    def config_from_metadata(meta: dict[str, str]) -> ModelConfig:
        return from_dict(ModelConfig, json.loads(meta["gptstack.model_config"]))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log P(targets[t] | what came before) under softmax(logits / temperature), with logits (..., T, V) and the
    targets (..., T) they predict: the one per-token log-probability of sampling, PPO, DPO and the evals."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1)


class Head(nn.Module):
    """A linear head on hidden states: GPT-1's classifier (P(y|x) = softmax(h·W_y)), or a scalar
    (reward, value, a multiple-choice score) when n_out = 1. Dropout first, as GPT-1's classifier."""

    def __init__(self, n_embd: int, n_out: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(n_embd, n_out)
        nn.init.normal_(self.proj.weight, 0.0, 0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h):
        return self.proj(self.drop(h))
