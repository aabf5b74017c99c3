"""LoRA (Hu et al. 2021) through `peft`, for every training verb (`*.train.lora_rank` > 0).

Each targeted Linear W of the decoder (attention `qkv` and `proj`, MLP `fc` and `proj`: `train.lora_targets`)
gains a low-rank update, W x + (alpha / r)·B A x, with A (r × in) random and B (out × r) zero, so training starts
exactly at the base model; the base weights are frozen and only A and B (and the heads a stage adds) train.
peft wraps the layers in place, so the model stays a GPT that every verb drives as before.

The Trainer checkpoints the wrapped model whole (the base weights with the adapters, so resume is exact) and
publishes `model.safetensors` merged, W + (alpha / r)·B A (a plain model every verb loads as before), with the
adapters alone beside it in `adapter.safetensors`.

PPO shares one base between several adapters (the policy's and the value function's; the reference is the base
with adapters off): `use_adapter` picks the adapter a forward runs through.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

LORA_KEY = ".lora_"  # in the state-dict names of the adapters' matrices: qkv.lora_A.default.weight
BASE_KEY = ".base_layer."  # a wrapped layer's own weights: qkv.base_layer.weight


def add_lora(gpt: nn.Module, cfg, name: str = "default") -> nn.Module:
    """Adapter `name` (rank cfg.lora_rank, alpha cfg.lora_alpha, on the Linear layers named in cfg.lora_targets)
    in every block of `gpt`, in place; every other parameter of `gpt` is frozen. A second call adds another adapter
    to the same layers."""
    from peft import LoraConfig, inject_adapter_in_model
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                        lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():  # peft warns that a second adapter makes several: PPO's value and policy, meant
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, gpt, adapter_name=name)
    for n, p in gpt.named_parameters():
        p.requires_grad_(LORA_KEY in f".{n}")
    # a block's activations recomputed in backward (grad_checkpoint) go through the adapter the forward used
    gpt.recompute_context = lambda: (contextlib.nullcontext(), use_adapter(gpt, active_adapter(gpt)))
    return gpt


def layers(model: nn.Module) -> list:
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(layers(model))


def active_adapter(model: nn.Module, wrapped: list | None = None) -> str | None:
    """The adapter forwards of `model` run through now (None: adapters off, the base model). `wrapped`: its LoRA
    layers, when the caller has them already."""
    first = (wrapped or layers(model))[0]
    return None if first.disable_adapters else first.active_adapters[0]


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None):
    """Forwards inside run through adapter `name`, or with None through the base model alone. peft's switches also
    set requires_grad (only the active adapter trains); PPO trains two adapters in one update, so the flags are put
    back as they were: which parameters train never changes."""
    wrapped = layers(model)
    before = active_adapter(model, wrapped)
    if name == before:  # already so (the policy's forwards after sampling): nothing to switch on this hot path
        yield
        return
    trainable = {p: p.requires_grad for m in wrapped for p in m.parameters()}

    def select(adapter):
        for m in wrapped:
            if adapter is None:
                m.enable_adapters(False)
            else:
                m.set_adapter(adapter)
                m.enable_adapters(True)
        for p, flag in trainable.items():
            p.requires_grad_(flag)

    select(name)
    try:
        yield
    finally:
        select(before)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(state: dict[str, torch.Tensor], scaling: float, adapter: str = "default") -> dict[str, torch.Tensor]:
    """A wrapped model's state dict as the plain model's: each wrapped layer's W + scaling·B A of `adapter`
    (computed in fp32), every adapter's matrices dropped."""
    out = {}
    for key, value in state.items():
        if LORA_KEY in key:
            continue
        if BASE_KEY in key:
            layer, param = key.split(BASE_KEY)
            if param == "weight":
                a, b = state[f"{layer}.lora_A.{adapter}.weight"], state[f"{layer}.lora_B.{adapter}.weight"]
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
            key = f"{layer}.{param}"
        out[key] = value
    return out


def adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters' matrices alone (adapter.safetensors)."""
    return {k: v for k, v in state.items() if LORA_KEY in k}


def load_adapter(gpt: nn.Module, state: dict[str, torch.Tensor], source: str, name: str, prefix: str = "") -> None:
    """Copy adapter `source`'s matrices from a state dict (keys under `prefix`, e.g. an RM's `gpt.`) into adapter
    `name` of `gpt`, whose layers must have the same shapes."""
    mine = gpt.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith(prefix) and f".{source}." in key:
                mine[key[len(prefix):].replace(f".{source}.", f".{name}.")].copy_(value)
