"""Configs as dataclasses; presets are YAML data in gptstack/configs/.

Resolution order: preset (following `base:`) -> user YAML files -> key=value
overrides. Every key is checked: an unknown one is an error naming it.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import GptstackError

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_ctx: int = 256
    vocab_size: int = 4096
    norm_position: str = "pre"  # "post": GPT-1 (LayerNorm after each residual add); "pre": GPT-2/3
    dropout: float = 0.0  # residual, embedding and attention dropout (GPT-1 used 0.1)
    bias: bool = True
    init_std: float = 0.02


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2
    train_bytes: int = 0  # train the BPE on at most this many bytes of the corpus (0: all)


@dataclass
class SourceConfig:
    path: str = "stdlib"  # stdlib | file | folder | glob | *.jsonl | *.parquet | hf:NAME[:split] | dataset folder
    weight: float = 1.0  # share of training sequences drawn from this source (GPT-3 Table 2.2)
    text_field: str = "text"  # for JSONL / Parquet / HF datasets


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    val_fraction: float = 0.05  # documents go to val by a hash of their id, not by position
    skip_bad: bool = False  # drop (and count) bad records instead of stopping


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 16  # sequences per optimizer step, summed over ranks and accumulation
    micro_batch_size: int = 0  # sequences per forward on one rank (0: the whole per-rank batch)
    seq_len: int = 0  # tokens per sequence (0: model.n_ctx)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (GPT-3: 10%)
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 0  # 0: only before and after training
    eval_tokens: int = 65536  # tokens of val data per in-training eval
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    precision: str = "auto"  # auto | fp32 | bf16 | fp32-tf32 (what each computes: train/trainer.py)
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    select_by: str = ""  # an eval metric (higher is better) whose best eval gives the published model; "": the last
    strategy: str = "ddp"  # under torchrun: ddp (a whole model per rank) | fsdp (FSDP2: parameters, gradients, optimizer sharded)


def _finetune_train() -> "TrainConfig":
    # GPT-1's fine-tuning recipe: lr 6.25e-5, batch 32, linear decay to 0 (warmup: FinetuneConfig)
    return TrainConfig(steps=0, batch_size=32, lr=6.25e-5, schedule="linear", min_lr_ratio=0.0, warmup_steps=0,
                       weight_decay=0.01, log_every=10, eval_every=0, ckpt_every=1000, keep_checkpoints=1)


@dataclass
class FinetuneConfig:
    tasks: list[str] = field(default_factory=lambda: ["module", "value_claim", "renamed", "continuation"])
    epochs: float = 3.0
    task_epochs: dict[str, float] = field(default_factory=dict)  # built-in task -> epochs, where it differs from `epochs`
    warmup_fraction: float = 0.002  # GPT-1: 0.2% of training
    lm_coef: float = 0.5  # λ in L3 = L2 + λ·L1 (0 turns the auxiliary LM loss off)
    head_dropout: float = 0.1
    max_len: int = 0  # tokens per input sequence (0: the model's context)
    truncate: str = "left"  # over-long inputs lose tokens from this side
    baselines: bool = True  # the pipeline also trains from scratch and with λ = 0, for the report
    train: TrainConfig = field(default_factory=_finetune_train)


@dataclass
class PromptingConfig:
    tasks: list[str] = field(default_factory=lambda: ["cloze", "continuation", "arithmetic", "docstring_name"])
    shots: list[int] = field(default_factory=lambda: [0, 1, 4, 8])
    limit: int = 0  # queries per task (0: all)
    seed: int = 0  # which few-shot examples each query gets


def _sft_train() -> "TrainConfig":
    return TrainConfig(steps=0, batch_size=32, lr=3e-4, schedule="cosine", min_lr_ratio=0.1, warmup_steps=20,
                       weight_decay=0.0, log_every=10, eval_every=0, ckpt_every=1000, keep_checkpoints=1)


@dataclass
class SFTConfig:
    data: str = "world"  # "world" (the instruction suite's demonstrations) or a JSONL file of SFT records
    val_data: str = ""  # held-out records (default: every 10th record of `data`; world: 5% of its demonstrations)
    demonstrations: int = 4000  # world: how many
    shares: dict[str, float] = field(default_factory=dict)  # world: demonstrator -> share ({}: the world's mix)
    eval_prompts: int = 200  # world: held-out prompts (unseen templates) for the gold-labeler eval
    max_new_tokens: int = 64
    epochs: float = 2.0  # when train.steps is 0
    seed: int = 0
    train: TrainConfig = field(default_factory=_sft_train)


@dataclass
class ScaleRung:
    """One model size of a scaling ladder: explicit n_layer x n_embd, or a preset's shape."""
    n_layer: int = 0
    n_embd: int = 0
    preset: str = ""


def _rm_train() -> "TrainConfig":
    # batch: rankings (each K answers) per step; InstructGPT trains its RM for one epoch
    return TrainConfig(steps=0, batch_size=16, lr=1e-4, schedule="cosine", min_lr_ratio=0.1, warmup_steps=10,
                       weight_decay=0.0, log_every=10, eval_every=0, ckpt_every=1000, keep_checkpoints=1)


@dataclass
class RMConfig:
    prompts: int = 2000  # world: training prompts to compare (train templates)
    val_prompts: int = 300  # world: held-out prompts (unseen templates) for the RM's accuracy
    k: int = 4  # answers per prompt
    temperatures: list[float] = field(default_factory=lambda: [1.0])  # each answer cycles through these
    labeler: str = "noisy"  # gold | noisy (for `compare`, also human)
    agreement: float = 0.73  # the noisy labeler's pairwise agreement with gold (InstructGPT: ~73% between labelers)
    tie_threshold: float = 0.0  # gold scores this close tie
    max_new_tokens: int = 64
    epochs: float = 1.0  # when train.steps is 0
    seed: int = 0
    train: TrainConfig = field(default_factory=_rm_train)


def _ppo_train() -> "TrainConfig":
    # one step = one minibatch update; steps = rollouts x ppo_epochs x minibatches (set by the stage)
    return TrainConfig(steps=0, batch_size=32, lr=3e-5, schedule="constant", min_lr_ratio=1.0, warmup_steps=1,
                       weight_decay=0.0, log_every=1, eval_every=0, ckpt_every=1000, keep_checkpoints=1)


@dataclass
class PPOConfig:
    prompts: int = 2000  # world: training prompts the rollouts cycle through (train templates)
    eval_prompts: int = 200  # world: held-out prompts (unseen templates) for evals and the win rate
    rollouts: int = 40  # how many rollouts (each followed by ppo_epochs x minibatches updates)
    rollout_batch: int = 64  # answers per rollout (train.batch_size = rollout_batch / minibatches)
    ppo_epochs: int = 2
    minibatches: int = 2
    temperature: float = 1.0  # sampling temperature; log-probs use logits / temperature
    max_new_tokens: int = 48
    kl_coef: float = 0.05  # β of the per-token KL penalty (the initial β when kl_target > 0)
    kl_target: float = 0.0  # > 0: adapt β so the KL per answer approaches this (nats)
    kl_horizon: int = 10000
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    no_end_penalty: float = 1.0  # subtracted from the score of an answer that ends without <|end|>
    ptx_coef: float = 0.2  # γ of PPO-ptx: γ·L1 on pretraining data in the same update (0: plain PPO)
    ptx_seq_len: int = 64  # tokens per pretraining row in the ptx term (one row per answer in the minibatch)
    rbrm: str = ""  # rule-based rewards: a rubric YAML, or "world" for the built-in one ("": none)
    rbrm_coef: float = 1.0
    rbrm_judge: str = ""  # a model folder: the rubric's class is asked of this model (GPT-4's judge mode) instead of the patterns
    rounds: int = 1  # > 1: new rankings from the current policy, RM retrained on all, PPO continued
    select_by: str = "val_rm_score"  # the kept checkpoint (validation RM score; "" keeps the last)
    versus: list[str] = field(default_factory=list)  # other policies (e.g. a larger SFT model) the PPO policy is also judged against
    eval_every_rollouts: int = 10
    baselines: bool = True  # the stage also runs γ = 0 (the ptx comparison)
    seed: int = 0
    train: TrainConfig = field(default_factory=_ppo_train)


@dataclass
class ScaleConfig:
    """The scaling ladder (`gptstack scale`, the `scale` stage; see gptstack/ladder.py). Every rung is a normal
    pretrain run on `data` with the pretrain recipe below, in its own run folder under RUN/scale/rungs/."""
    vocab_size: int = 1024  # the ladder's own tokenizer: a small vocabulary keeps embeddings from dominating
    n_ctx: int = 128
    n_head: int = 4  # heads of every rung (0: n_embd / head_dim)
    head_dim: int = 16
    # one shape family (2 layers, growing width): rungs of mixed depth and width scatter around L(C)
    rungs: list[ScaleRung] = field(default_factory=lambda: [ScaleRung(2, w) for w in (40, 44, 48, 52, 56, 60, 64)])
    widths: list[int] = field(default_factory=list)  # instead of rungs: n_layer = max(min_layers, round(width / aspect))
    aspect: float = 24.0
    min_layers: int = 2
    target: ScaleRung = field(default_factory=lambda: ScaleRung(2, 128))  # the big run, predicted before it trains
    tokens_per_param: float = 40.0  # D = tokens_per_param x N, N without embeddings
    seeds: int = 2  # runs per fitted rung (the target runs once)
    compute: str = "non_embedding"  # the C the fit uses: non_embedding (Kaplan) | total (with the tied unembedding)
    max_compute_ratio: float = 0.1  # every fitted rung has at most this share of the target's compute
    chinchilla_tokens_per_param: list[float] = field(default_factory=lambda: [10.0, 80.0])  # extra runs for L(N, D)
    chinchilla_rungs: int = 2  # ... of this many of the smallest rungs, one seed each
    fit_below_bigram: bool = True  # fit only sizes whose val loss beats the count-based bigram model
    batch_size: int = 16
    lr: float = 3.0e-3
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    huber_delta: float = 1.0e-3
    bootstrap: int = 200
    interval: float = 0.9  # central bootstrap interval of the prediction
    capability_queries: int = 500  # identifier-completion queries from held-out code (the capability law)


@dataclass
class RunConfig:
    preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    prompting: PromptingConfig = field(default_factory=PromptingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)


# ---------------------------------------------------------------- dict <-> dataclass

def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise GptstackError(f"config {where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise GptstackError(f"unknown config key '{path}' (known: {', '.join(sorted(fields))})")
        f = fields[key]
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            value = deep_merge(to_dict(f.default_factory()), value)  # keep this field's own defaults under partial settings
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(hint, value, path):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, path)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise GptstackError(f"config '{path}': expected a list, got {value!r}")
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise GptstackError(f"config '{path}': expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise GptstackError(f"config '{path}': expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _looks_numeric(value):  # YAML 1.1 reads 6e-05 as a string
            return float(value)
        raise GptstackError(f"config '{path}': expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise GptstackError(f"config '{path}': expected a string, got {value!r}")
    return value


# ---------------------------------------------------------------- presets and overrides

def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise GptstackError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise GptstackError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise GptstackError(f"{path}: expected a mapping at the top level")
    return data


def preset_dict(name: str) -> dict:
    """The preset's raw dict, with its `base:` chain merged in."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise GptstackError(f"unknown preset '{name}' (known: {', '.join(list_presets())})")
    data = _load_yaml(path)
    base = data.pop("base", None)
    merged = deep_merge(preset_dict(base), data) if base else data
    merged["preset"] = name
    return merged


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """'pretrain.lr=3e-4' -> {'pretrain': {'lr': 0.0003}} (values parsed as YAML)."""
    if "=" not in text:
        raise GptstackError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def resolve(preset: str | None = None, files: list[str] = (), overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    data = dict(base or {})
    if preset:
        data = deep_merge(data, preset_dict(preset))
    for f in files:
        data = deep_merge(data, _load_yaml(Path(f)))
    for o in overrides:
        data = deep_merge(data, parse_override(o))
    data.pop("base", None)
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    m, t = cfg.model, cfg.pretrain
    if m.n_embd % m.n_head:
        raise GptstackError(f"config 'model.n_embd' ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if m.norm_position not in ("pre", "post"):
        raise GptstackError(f"config 'model.norm_position' must be 'pre' or 'post', got {m.norm_position!r}")
    if t.schedule not in ("cosine", "linear", "constant"):
        raise GptstackError(f"config 'pretrain.schedule' must be cosine, linear or constant, got {t.schedule!r}")
    if t.precision not in ("auto", "fp32", "bf16", "fp32-tf32"):
        raise GptstackError(f"config 'pretrain.precision' must be auto, fp32, bf16 or fp32-tf32, got {t.precision!r}")
    if t.strategy not in ("ddp", "fsdp"):
        raise GptstackError(f"config 'pretrain.strategy' must be ddp or fsdp, got {t.strategy!r}")
    if cfg.finetune.train.strategy != "ddp":  # task models are small; their evals run whole on rank 0
        raise GptstackError(f"config 'finetune.train.strategy' must be ddp, got {cfg.finetune.train.strategy!r}")
    if t.seq_len > m.n_ctx:
        raise GptstackError(f"config 'pretrain.seq_len' ({t.seq_len}) exceeds model.n_ctx ({m.n_ctx})")
    if cfg.finetune.truncate not in ("left", "right"):
        raise GptstackError(f"config 'finetune.truncate' must be left or right, got {cfg.finetune.truncate!r}")
    for i, s in enumerate(cfg.data.sources):
        if s.weight <= 0:
            raise GptstackError(f"config 'data.sources[{i}].weight' must be > 0, got {s.weight}")


def save(cfg: RunConfig, path: Path) -> None:
    from .io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load(path: Path) -> RunConfig:
    return from_dict(RunConfig, _load_yaml(Path(path)))
