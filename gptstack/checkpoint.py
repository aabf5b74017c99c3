"""Model weights as safetensors (config in the header), loaded without unpickling."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .errors import GptstackError
from .io import atomic_write_bytes


def save_state_dict(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(Path(path), canonical(st_save(state, metadata=metadata or {})))


def canonical(blob: bytes) -> bytes:
    """The same safetensors file with its metadata keys sorted: safetensors writes them in hash-map order, which
    changes from process to process, so the same weights would otherwise give different bytes."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text + blob[8 + n:]


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise GptstackError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise GptstackError(f"{path}: corrupt or unreadable checkpoint ({str(e).splitlines()[0]})") from None


def load_into(module: torch.nn.Module, path: Path) -> dict[str, str]:
    state, meta = read_weights(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise GptstackError(f"{path}: weights do not fit the model ({str(e).splitlines()[0]})") from None
    return meta


def model_path(where) -> Path:
    """Accept RUN/STAGE or a .safetensors file."""
    p = Path(where)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise GptstackError(f"{where}: no model here (expected a stage folder with model.safetensors)")
    return p


def load_model(where, device="cpu"):
    """A GPT from RUN/STAGE/model.safetensors; its config travels in the file's header.
    device="auto": the GPU when there is one (for inference: sampling, evals)."""
    from .model import GPT
    device = inference_device(device)
    path = model_path(where)
    state, meta = read_weights(path)
    if "gptstack.model_config" not in meta:
        raise GptstackError(f"{path}: not a gptstack model (no model config in its header)")
    model = GPT(GPT.config_from_metadata(meta))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise GptstackError(f"{path}: weights do not fit the model ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


def inference_device(device="auto") -> str:
    """"auto": the GPU when there is one (for inference: sampling, evals, scoring)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def find_tokenizer(where) -> Path:
    """The tokenizer.json beside a model: in the stage folder or its run folder."""
    p = Path(where)
    folder = p if p.is_dir() else p.parent
    for cand in (folder / "tokenizer.json", folder.parent / "tokenizer.json"):
        if cand.is_file():
            return cand
    raise GptstackError(f"{where}: no tokenizer.json in the stage folder or its run folder")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def path_sha256(path: Path) -> str:
    """A file's sha256, or a folder's: over its files' relative names and contents."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()
