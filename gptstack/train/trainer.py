"""The one training loop. Every stage (pretrain, fine-tune, SFT, RM, PPO) runs through it.

An objective says what a batch is and what its loss is; everything else lives
here: device and precision, torchrun with DDP or FSDP (plumbing in distributed.py),
gradient accumulation, clipping, the learning-rate schedule, checkpoints and exact
resume, signals, NaN stops, metrics.jsonl and the progress bar.

The objective protocol:
    train_batch(step, n) -> dict of tensors, dim 0 = n examples (the global batch of `step`); runs under the loss's autocast
    weight(micro) -> number   how much this micro-batch counts in the global mean (e.g. its tokens)
    loss(model, micro) -> (mean loss over the micro-batch, {metric: float tensor}); may report "tokens"
    evaluate(model) -> {metric: float}    on held-out data, model in eval mode
    flops_per_token() -> float            for MFU (optional)
    state_dict() / load_state_dict(d)     state of its own, kept in the checkpoint (optional; PPO's KL coefficient)
    steps_per_group                       a signal stops only at a multiple of this (optional; PPO: updates per rollout)
"""
from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..checkpoint import path_sha256, read_weights, save_state_dict
from ..config import at_least, to_dict
from ..errors import GptstackError
from ..io import (append_jsonl, atomic_replace_dir, atomic_write_bytes, atomic_write_json, folder_lock, read_json,
                  read_jsonl_loose)
from ..model import GPT
from ..perf import peak_flops, peak_rss_within
from . import lora
from .distributed import (any_rank, barrier, broadcast_from_main, clip_grad_norm, data_parallel, dist_env, gather_objects,
                          gradient_sync, init_distributed, load_sharded_optimizer, load_whole_state,
                          save_sharded_optimizer, shard_model, whole_state_dict, whole_weights)

LORA_TARGETS = ("qkv", "proj", "fc")  # attention's qkv and proj, the MLP's fc and proj (model.py)

# settings that may change between a run and its resume without changing the result
RESUMABLE_KEYS = {"steps", "log_every", "eval_every", "eval_tokens", "ckpt_every", "keep_checkpoints", "device", "compile"}


class Interrupted(GptstackError):
    """SIGINT/SIGTERM: a checkpoint was saved; rerunning the command resumes. The process exits 128 + the signal's
    number, as a shell expects of a process a signal stopped (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signal_name: str | None):
        super().__init__(message)
        self.exit_code = 128 + (signal.Signals[signal_name].value if signal_name else signal.SIGINT.value)


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 16  # sequences per optimizer step, summed over ranks and accumulation
    micro_batch_size: int = 0  # sequences per forward on one rank (0: the whole per-rank batch)
    seq_len: int = 0  # tokens per sequence (0: model.n_ctx)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (GPT-3: 10%)
    warmup_steps: int = 50
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # cosine | linear | constant
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
    precision: Literal["auto", "fp32", "bf16", "fp32-tf32"] = "auto"  # auto | fp32 | bf16 | fp32-tf32 (what each computes: train/trainer.py)
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    select_by: str = ""  # an eval metric (higher is better) whose best eval gives the published model; "": the last
    strategy: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: ddp (a whole model per rank) | fsdp (FSDP2: parameters, gradients, optimizer sharded)
    lora_rank: int = 0  # > 0: LoRA adapters of this rank train and the base weights stay frozen (train/lora.py); 0: full fine-tuning
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # the decoder's Linear layers that get adapters
    grad_checkpoint: bool = False  # recompute each block's activations in backward: less memory, about a third more compute

    def problems(self):
        """Ranges, checked when the config is resolved (before any folder exists). steps 0: the stage decides."""
        yield from at_least(self, 0, "steps", "micro_batch_size", "seq_len", "warmup_steps", "eval_every", "eval_tokens")
        for name in ("batch_size", "log_every", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                yield name, f"must be at least 1, got {getattr(self, name)}"
        for name in ("lr", "eps"):
            if not 0 < getattr(self, name) < float("inf"):
                yield name, f"must be a positive number, got {getattr(self, name)}"
        yield from at_least(self, 0, "weight_decay", "grad_clip")
        for name in ("min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                yield name, f"must be in [0, 1], got {getattr(self, name)}"
        yield from at_least(self, 0, "lora_rank")
        if not 0 < self.lora_alpha < float("inf"):
            yield "lora_alpha", f"must be a positive number, got {self.lora_alpha}"
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS + ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
        if unknown or not self.lora_targets:
            yield "lora_targets", (f"must name one or more of the decoder's Linear layers (qkv, proj, fc, or attn.proj, "
                                   f"mlp.proj for one of the two proj), got {self.lora_targets}")
        if self.lora_rank and self.strategy == "fsdp":
            yield "lora_rank", "LoRA is not supported under strategy fsdp (use ddp: the frozen base is small enough to replicate)"


# ---------------------------------------------------------------- environment

def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


# The numerics of training (benchmarks/ measures their speed and loss curves):
#   fp32       IEEE fp32 everywhere.
#   bf16       autocast: matmuls and attention take bf16 inputs; softmax, norms and the loss stay fp32,
#              and so do weights, gradients and AdamW state.
#   fp32-tf32  fp32 tensors, but matmuls may round their inputs to TF32 (10-bit mantissa): CUDA tensor
#              cores (Ampere and later); on CPU, oneDNN does so only on CPUs with TF32 units, elsewhere
#              (AVX-512, AVX2) this is plain fp32.
#   auto       bf16 on GPUs with bf16 units, fp32 elsewhere: on CPU, bf16 is fast only with AVX512_BF16
#              or AMX, and fp32 keeps the exact invariants (accumulation, resume, ranks) bit-for-bit.
PRECISIONS = ("auto", "fp32", "bf16", "fp32-tf32")


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision to train in, with `auto` decided; sets the process's fp32 matmul mode to match."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    use_matmul_precision(name)
    return name


def use_matmul_precision(precision: str) -> None:
    """Process-wide, because backward runs outside `autocast` and must compute like the forward did."""
    torch.set_float32_matmul_precision("high" if precision == "fp32-tf32" else "highest")


def placement(cfg: TrainConfig) -> tuple[torch.device, str]:
    """The device and precision a stage trains in on this rank; the stage loads and evaluates every other model
    it uses (reference, reward model, judge, the policies it compares) there too."""
    device = pick_device(cfg.device, dist_env()[2])
    return device, resolve_precision(cfg.precision, device)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine (GPT-3) or linear (GPT-1 fine-tuning) decay to lr·min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def slice_batch(batch: dict, start: int, end: int) -> dict:
    return {k: v[start:end] for k, v in batch.items()}


def _rng_b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _rng_from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


# ---------------------------------------------------------------- the loop

class Trainer:
    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, objective, out_dir: Path,
                 metadata: dict[str, str] | None = None, desc: str = "train"):
        self.cfg, self.objective, self.out = cfg, objective, Path(out_dir)
        self.metadata, self.desc = metadata or {}, desc
        self.rank, self.world, _ = dist_env()
        init_distributed(cfg.device)
        if cfg.batch_size % self.world:
            raise GptstackError(f"config 'batch_size' ({cfg.batch_size}) must be divisible by the {self.world} ranks")
        self.per_rank = cfg.batch_size // self.world
        self.micro = cfg.micro_batch_size or self.per_rank
        if self.per_rank % self.micro:
            raise GptstackError(f"config 'micro_batch_size' ({self.micro}) must divide the per-rank batch ({self.per_rank})")
        self.accum = self.per_rank // self.micro
        self.device, self.precision = placement(cfg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        decoders = [m for m in model.modules() if isinstance(m, GPT)]
        if cfg.lora_rank and not lora.has_lora(model):  # PPO brings its own adapters (several on one base)
            for gpt in decoders:
                lora.add_lora(gpt, cfg)
        for gpt in decoders:
            gpt.grad_checkpoint = cfg.grad_checkpoint
        # the module that is saved and evaluated: whole, or FSDP-sharded in place
        self.sharded = cfg.strategy == "fsdp" and self.world > 1
        self.model = shard_model(model, self.device, self.precision) if self.sharded else model.to(self.device)
        self.parallel = data_parallel(self.model, self.device)  # the module that trains: DDP around it, or itself
        # FSDP's optimizer state stays sharded on disk too (a DCP folder any number of ranks can load)
        self.optim_name = "optim" if cfg.strategy == "fsdp" else "optim.pt"
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self._stop: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ optimizer

    def _optimizer(self) -> torch.optim.Optimizer:
        # weight decay on matrices only, not on biases, LayerNorm gains or embeddings' positions
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2), eps=self.cfg.eps,
                                 fused=self.device.type == "cuda")

    # ------------------------------------------------------------ checkpoints

    def _checkpoints(self) -> list[Path]:
        if not self.ckpt_dir.is_dir():
            return []
        return sorted(p for p in self.ckpt_dir.glob("step_*") if (p / "trainer_state.json").exists())

    def _save(self, step: int, optimizer, stats: dict) -> Path:
        rng = {"torch": _rng_b64(torch.get_rng_state())}
        if self.device.type == "cuda":
            rng["cuda"] = _rng_b64(torch.cuda.get_rng_state(self.device))
        rngs = gather_objects(rng)
        weights = whole_state_dict(self.model)  # gathered from the shards on rank 0 when sharded
        final = self.ckpt_dir / f"step_{step:07d}"
        tmp = self.ckpt_dir / f".tmp_step_{step:07d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_state_dict(weights, tmp / "model.safetensors", self.metadata)
            if self.optim_name == "optim.pt":
                atomic_write_bytes(tmp / "optim.pt", _torch_bytes(optimizer.state_dict()))
        if self.optim_name == "optim":
            barrier()  # the folder exists before every rank writes its shard into it
            save_sharded_optimizer(self.model, optimizer, tmp / "optim")
        if self.is_main:
            atomic_write_json(tmp / "trainer_state.json", {
                "step": step, "finished": step >= self.cfg.steps, "rng": rngs,
                "model_sha256": path_sha256(tmp / "model.safetensors"),
                "optim_sha256": path_sha256(tmp / self.optim_name),
                "train_config": to_dict(self.cfg), "world_size": self.world, **stats,
            })
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # a checkpoint exists only once complete
            for old in self._checkpoints()[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def _resume(self, optimizer) -> tuple[int, dict]:
        ckpts = self._checkpoints()
        if not ckpts:
            return 0, {}
        ck = ckpts[-1]
        state = read_json(ck / "trainer_state.json")
        missing = [k for k, kind in (("step", int), ("train_config", dict), ("rng", list)) if not isinstance(state.get(k), kind)]
        if missing:  # the one checkpoint file without a checksum: valid JSON, but not ours
            raise GptstackError(f"{ck / 'trainer_state.json'}: not a trainer state ({', '.join(missing)} missing or "
                                f"of the wrong type); delete {ck} to resume from an earlier checkpoint")
        old = {k: v for k, v in state["train_config"].items() if k not in RESUMABLE_KEYS}
        new = {k: v for k, v in to_dict(self.cfg).items() if k not in RESUMABLE_KEYS}
        changed = sorted(k for k in new if old.get(k) != new[k])
        if changed:
            raise GptstackError(f"{self.out}: cannot resume, config changed since the checkpoint: "
                                + ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in changed)
                                + f" (use a new output folder, or delete {self.ckpt_dir})")
        # checksums only now: a checkpoint of the other strategy names its optimizer state differently
        for name, key in (("model.safetensors", "model_sha256"), (self.optim_name, "optim_sha256")):
            if not (ck / name).exists() or path_sha256(ck / name) != state.get(key):
                raise GptstackError(f"{ck / name}: corrupt checkpoint (checksum mismatch); delete {ck} to resume from an earlier one")
        load_whole_state(self.model, ck / "model.safetensors")
        try:
            if self.optim_name == "optim":
                load_sharded_optimizer(self.model, optimizer, ck / "optim")
            else:
                optimizer.load_state_dict(torch.load(ck / "optim.pt", map_location=self.device, weights_only=True))
        except Exception as e:
            raise GptstackError(f"{ck / self.optim_name}: corrupt optimizer state ({str(e).splitlines()[0]})") from None
        rngs = state["rng"]
        rng = rngs[self.rank] if self.rank < len(rngs) and state.get("world_size") == self.world else rngs[0]
        torch.set_rng_state(_rng_from_b64(rng["torch"]))
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(_rng_from_b64(rng["cuda"]), self.device)
        # metrics written after the checkpoint belong to the lost part of the run
        if self.is_main:
            rows = [r for r in read_jsonl_loose(self.metrics_path) if r.get("step", 0) <= state["step"]]
            atomic_write_bytes(self.metrics_path, "".join(_json_line(r) for r in rows).encode())
        return state["step"], state

    # ------------------------------------------------------------ signals

    def _on_signal(self, signum, frame):
        if self._stop:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop = signal.Signals(signum).name

    @contextlib.contextmanager
    def _signals(self):
        if threading_main():
            old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        else:
            yield

    # ------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        """The objective's eval, on every rank together: its sampling is split across them (`across_ranks`), and
        under FSDP each rank holds the whole weights meanwhile."""
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.precision), whole_weights(self.model):
            out = self.objective.evaluate(self.model)
        self.model.train()
        return out

    def _main_eval(self) -> dict:
        """The eval, run by every rank; rank 0's figures ({} on the other ranks)."""
        out = self.evaluate()
        return out if self.is_main else {}

    # ------------------------------------------------------------ fit

    def fit(self) -> dict:
        """Train to `steps` (resuming from the newest checkpoint) and publish; rank 0 holds the output folder's
        lock throughout, so a second process writing there stops at once. Returns rank 0's summary on every rank,
        once the published files exist, so every rank may go on to read them."""
        with folder_lock(self.out) if self.is_main else contextlib.nullcontext(), peak_rss_within() as memory:
            summary = self._fit()
        summary["peak_rss_mb"] = memory.mb  # training's own peak (the stage's evaluation aside)
        barrier()
        return broadcast_from_main(summary)

    def _fit(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        optimizer = self._optimizer()
        start, state = self._resume(optimizer)
        if start == 0:
            torch.manual_seed(cfg.seed + self.rank)
        if start >= cfg.steps:  # finished; publishing is part of finishing, so a kill before it is repaired here
            if self.is_main:
                self._publish(self._checkpoints()[-1])
            return state.get("summary", {})
        model = torch.compile(self.parallel) if cfg.compile else self.parallel

        stats = {k: state.get(k, 0) for k in ("tokens", "train_seconds", "wall_seconds")}
        stats["best"] = state.get("best")
        if "objective" in state:  # an objective with state of its own (PPO's adaptive KL coefficient)
            self.objective.load_state_dict(state["objective"])
        initial = state.get("initial_eval") or self._main_eval()
        if start == 0 and self.is_main:
            append_jsonl(self.metrics_path, {"event": "eval", "step": 0, **initial})
        fpt = getattr(self.objective, "flops_per_token", lambda: 0.0)()
        peak = peak_flops(self.device, torch.bfloat16 if self.precision == "bf16" else torch.float32) if fpt else 0.0

        model.train()
        bar = tqdm(total=cfg.steps, initial=start, desc=self.desc, disable=not self.is_main,
                   dynamic_ncols=True, mininterval=1.0, unit="step")
        window_tokens, window_time = 0, 0.0
        last = {}
        # the bar closes on the way out of an error too, so the error's one line is the last the user sees
        with self._signals(), contextlib.closing(bar):
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                lr = lr_at(cfg, step)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                loss_sum, tokens, metrics = self._step(model, step)
                grad_norm = clip_grad_norm(self.model, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                if not (math.isfinite(loss_sum) and torch.isfinite(grad_norm)):
                    good = self._checkpoints()
                    raise GptstackError(
                        f"loss became {loss_sum} at step {step + 1} (grad norm {grad_norm.item():.3g}, lr {lr:.3g}); "
                        f"nothing was saved from this step; last good checkpoint: {good[-1] if good else 'none'}. "
                        "Lower the learning rate or check the data.")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                done = step + 1
                stats["tokens"] += tokens
                stats["train_seconds"] += dt
                stats["wall_seconds"] += dt
                window_tokens += tokens
                window_time += dt
                if done % cfg.log_every == 0 or done == cfg.steps:
                    tps = window_tokens / max(window_time, 1e-9)
                    mfu = tps * fpt / (peak * self.world) if peak else 0.0
                    last = {"event": "train", "step": done, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm.item(),
                            "tokens": stats["tokens"], "tokens_per_sec": tps, "mfu": mfu, **metrics}
                    if self.is_main:
                        append_jsonl(self.metrics_path, last)
                    bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.1%}", refresh=False)
                    window_tokens, window_time = 0, 0.0
                bar.update(1)
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    t1 = time.perf_counter()
                    row = self._main_eval()
                    if self.is_main:
                        append_jsonl(self.metrics_path, {"event": "eval", "step": done, **row})
                    self._select(done, row, stats)
                    stats["wall_seconds"] += time.perf_counter() - t1
                # every rank saves and stops at the same step; an objective whose steps come in groups (PPO: the
                # updates of one rollout) stops at a group's end, so a resume starts where an uninterrupted run would
                stopping = any_rank(self._stop is not None) and done % getattr(self.objective, "steps_per_group", 1) == 0
                if stopping or done % cfg.ckpt_every == 0 or done == cfg.steps:
                    final = self._main_eval() if done == cfg.steps else None
                    if final is not None:
                        if self.is_main:
                            append_jsonl(self.metrics_path, {"event": "eval", "step": done, **final})
                        self._select(done, final, stats)
                    summary = self._summary(stats, initial, final, last, fpt, peak) if final is not None else {}
                    if summary and stats["best"]:
                        summary["selected"] = stats["best"]
                    extra = {"objective": self.objective.state_dict()} if hasattr(self.objective, "state_dict") else {}
                    ck = self._save(done, optimizer, {**stats, "initial_eval": initial, "summary": summary, **extra})
                    if stopping:
                        raise Interrupted(f"stopped by {self._stop or 'a signal to another rank'} at step {done}; "
                                          f"checkpoint {ck} saved; run the same command again to resume", self._stop)
        if self.is_main:
            self._publish(self._checkpoints()[-1])
        return summary

    def _select(self, step: int, row: dict, stats: dict) -> None:
        """With `select_by`, keep the weights of the best eval so far in best/ (published at the end)."""
        key = self.cfg.select_by
        if not key:
            return
        if self.is_main and key not in row:
            raise GptstackError(f"config 'select_by': the eval reports no {key!r} (it reports {', '.join(row) or 'nothing'})")
        best = stats["best"]
        better = any_rank(self.is_main and (best is None or row[key] > best["value"]))
        if not better:
            return
        weights = whole_state_dict(self.model)
        if self.is_main:
            save_state_dict(weights, self.out / "best" / "model.safetensors", self.metadata)
            # the kept model's whole eval row: its figures on the selection (dev) data, for the report
            stats["best"] = {"step": step, "metric": key, "value": row[key], "eval": row}

    def _step(self, model, step: int) -> tuple[float, int, dict]:
        """Forward/backward over the accumulation micro-batches of one optimizer step."""
        with autocast(self.device, self.precision):  # PPO's rollouts compute as its updates do
            batch = self.objective.train_batch(step, self.cfg.batch_size)
        mine = slice_batch(batch, self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        micros = [slice_batch(mine, i * self.micro, (i + 1) * self.micro) for i in range(self.accum)]
        weights = [float(self.objective.weight(mb)) for mb in micros]
        total = torch.tensor(sum(weights), dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(total)
        total = total.item() or 1.0  # nothing to learn in this batch (e.g. every ranking a tie): a zero gradient
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        tokens, sums = 0, {}
        for i, mb in enumerate(micros):
            mb = {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}
            with gradient_sync(self.parallel, i == self.accum - 1):
                with autocast(self.device, self.precision):
                    loss, metrics = self.objective.loss(model, mb)
                # each micro-batch counts by its weight in the global mean; DDP and FSDP average over ranks, so scale by world
                (loss * (weights[i] / total * self.world)).backward()
            loss_sum += loss.detach().double() * weights[i] / total
            tokens += int(metrics.pop("tokens", 0))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * weights[i] / total
        if self.world > 1:
            packed = torch.tensor([loss_sum.item(), tokens, *sums.values()], dtype=torch.float64)
            dist.all_reduce(packed)
            loss_sum, tokens = packed[0], int(packed[1].item())
            sums = dict(zip(sums, packed[2:].tolist()))
        return float(loss_sum), tokens, sums

    def _summary(self, stats, initial, final, last, fpt, peak) -> dict:
        tps = stats["tokens"] / max(stats["train_seconds"], 1e-9)
        return {"steps": self.cfg.steps, "tokens": stats["tokens"], "seconds": stats["wall_seconds"],
                "tokens_per_sec": tps, "mfu": tps * fpt / (peak * self.world) if peak else 0.0,
                "final_train_loss": last.get("loss"), "initial": initial, "final": final,
                "precision": self.precision, "device": str(self.device), "world_size": self.world,
                "lora_rank": self.cfg.lora_rank, "trainable_params": lora.trainable_params(self.model)}

    def _publish(self, ck: Path) -> None:
        """The stage's final files: the last checkpoint, linked (or copied) beside it; with `select_by`,
        the model is the best eval's (the optimizer and trainer state stay the last step's, for resuming)."""
        best = self.out / "best" / "model.safetensors"
        for name in ("model.safetensors", self.optim_name, "trainer_state.json"):
            src = best if name == "model.safetensors" and self.cfg.select_by and best.exists() else ck / name
            if name == "model.safetensors" and self.cfg.lora_rank:
                self._publish_merged(src)
                continue
            tmp = self.out / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.unlink(missing_ok=True)
            if src.is_dir():  # FSDP's sharded optimizer state
                shutil.copytree(src, tmp, copy_function=_link_or_copy)
                atomic_replace_dir(tmp, self.out / name)
            else:
                _link_or_copy(src, tmp)
                os.replace(tmp, self.out / name)

    def _publish_merged(self, src: Path) -> None:
        """LoRA: the plain model with the adapters merged into its weights (what every later verb loads), and the
        adapters alone beside it. A module with several adapters on one base (PPO's) says how it merges."""
        state, meta = read_weights(src)
        scaling = self.cfg.lora_alpha / self.cfg.lora_rank
        merge = getattr(self.model, "merged_state", lora.merge)
        lora_meta = {"gptstack.lora": json.dumps({"rank": self.cfg.lora_rank, "alpha": self.cfg.lora_alpha,
                                                  "targets": self.cfg.lora_targets})}
        save_state_dict(lora.adapters(state), self.out / "adapter.safetensors", {**meta, **lora_meta})
        save_state_dict(merge(state, scaling), self.out / "model.safetensors", meta)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _torch_bytes(obj) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _json_line(row: dict) -> str:
    return json.dumps(row) + "\n"
