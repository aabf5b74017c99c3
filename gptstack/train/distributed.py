"""torchrun plumbing: the process group, DDP / FSDP2 wrapping, and checkpoint state that is
whole on rank 0 (the weights) or sharded over the ranks (FSDP's optimizer state).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op
for one process. CPU tensors travel over gloo and CUDA tensors over NCCL, so the small
CPU-side collectives (loss sums, stop flags, RNG states) work next to NCCL gradients.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import load_into, read_weights
from ..errors import GptstackError


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# The barrier's own group: at a barrier the ranks may wait hours for rank 0 (a tokenizer trained or
# a corpus tokenized, a long eval), far past the 10-30 minutes after which a stuck collective fails.
_waiting_room = None


def init_distributed(device: str = "auto") -> None:
    """Join torchrun's process group (once per process; left at exit). A no-op for one process.
    `device` is the config's (auto | cpu | cuda | ...): whether the ranks train on GPUs."""
    _, world, local_rank = dist_env()
    if world == 1 or dist.is_initialized():
        return
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        if local_rank >= torch.cuda.device_count():
            raise GptstackError(f"rank {local_rank} of this machine has no GPU ({torch.cuda.device_count()} visible): "
                                "start at most one process per GPU (torchrun --nproc_per_node), or set pretrain.device=cpu")
        torch.cuda.set_device(local_rank)  # this rank's GPU, for NCCL and for the model
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    global _waiting_room
    _waiting_room = dist.new_group(backend="gloo", timeout=timedelta(days=1))
    atexit.register(dist.destroy_process_group)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """Rank 0, or the one process: the rank that writes files and speaks."""
    return dist_env()[0] == 0


def barrier() -> None:
    if active():
        dist.barrier(group=_waiting_room)


def broadcast_from_main(obj):
    """Rank 0's value of `obj` on every rank: decisions that read files rank 0 may be writing."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def across_ranks(work, n: int) -> list:
    """`work(indices) -> one result per index` for the items 0..n-1 split across the ranks (rank r takes r, r + world,
    r + 2·world, ...), every result gathered on every rank in index order. Sampling, scoring and labeling a rollout or
    an evaluation's answers go through here, so each rank does its share; results must be picklable (CPU tensors, lists).
    A collective: every rank calls it with the same n (never from code that runs on rank 0 alone). With one process
    it is `work(range(n))`."""
    world = dist.get_world_size() if active() else 1
    rank = dist.get_rank() if active() else 0
    mine = list(range(rank, n, world))
    got = list(work(mine)) if mine else []
    if len(got) != len(mine):
        raise ValueError(f"work returned {len(got)} results for {len(mine)} items")
    out = [None] * n
    for r, part in enumerate(gather_objects(got)):
        out[r::world] = part
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a signal may reach one rank a step before another)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@contextlib.contextmanager
def local_main_first():
    """Run the block on each machine's local rank 0 first (it fills the token cache), then on the rest."""
    _, world, local_rank = dist_env()
    if world > 1 and local_rank != 0:
        barrier()
    yield
    if world > 1 and local_rank == 0:
        barrier()


# ---------------------------------------------------------------- wrapping

def shard_model(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """FSDP2 in place: each transformer block is one all-gather unit, the root holds the rest
    (embeddings, final norm, heads). Parameters move to `device` one block at a time as they
    are sharded, so the whole model never has to fit on one GPU (each rank builds it in CPU memory)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16 all-gathers halve the traffic; gradients are still reduced in fp32
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    for blocks in [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]:
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # FSDP takes the first module to run forward as its root. Sampling calls a submodule first (PPO's policy under
    # the actor-critic), so settle the root now. (FSDP2 has no public call for this; it runs on the root's first forward.)
    model._get_fsdp_state()._lazy_init()
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def whole_weights(model: torch.nn.Module):
    """Under FSDP: every rank holds the whole weights inside the block (each unit all-gathered once, on every rank
    together) and computes without collectives, so the ranks may sample different numbers of answers and tokens;
    the shards return afterwards. What inference needs anyway: the whole model in its compute precision on each
    device. Sampling and evaluation run inside it; a no-op for a whole model."""
    if not is_sharded(model) or getattr(model, "_whole_weights", False):  # whole already (an outer block)
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)  # every unit keeps its gathered weights through each forward
    for unit in units:
        unit.unshard()
    model._whole_weights = True
    try:
        yield
    finally:
        model._whole_weights = False
        for unit in units:
            unit.reshard()
        model.set_reshard_after_forward(True)  # FSDP's defaults: the blocks reshard after forward, the root does not
        model.set_reshard_after_forward(False, recurse=False)


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module that trains: DDP around a whole model; an FSDP-sharded model is already parallel."""
    if not active() or is_sharded(model):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Context for one accumulation micro-batch: reduce gradients over ranks only on the last one."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if isinstance(model, DDP) and not enabled:
        return model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm before clipping, a plain tensor (FSDP computes it from the shards)."""
    from torch.distributed.tensor import DTensor
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ---------------------------------------------------------------- checkpoint state

def whole_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights on rank 0 (gathered from the shards on every rank when sharded)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_whole_state(model: torch.nn.Module, path: Path) -> None:
    """model.safetensors into a whole model, or into the shards (rank 0 reads, then broadcasts)."""
    if not is_sharded(model):
        load_into(model, path)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    state = read_weights(path)[0] if dist.get_rank() == 0 else {}
    try:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise GptstackError(f"{path}: weights do not fit the model ({str(e).splitlines()[0]})") from None


def save_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every rank writes its shard of the optimizer state into the folder `path` (DCP); any
    number of ranks can load it back. Only tensors are saved: the hyperparameters come from
    the config (resume checks it is unchanged), so loading unpickles no saved values (DCP's own
    index, `.metadata`, is a pickle; resume checks the folder's sha256 before reading it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    with _one_process_is_fine():
        dcp.save({"state": get_optimizer_state_dict(model, optimizer)["state"]}, checkpoint_id=str(path))


def load_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer)  # this run's layout (and shards), filled in place
    with _one_process_is_fine():
        dcp.load({"state": state["state"]}, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, state)


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns when it runs without a process group; an fsdp run on one rank does that on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        yield
