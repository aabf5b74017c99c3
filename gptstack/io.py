"""Atomic file writes and validated JSONL reading.

Everything a run writes goes through a temp name and os.replace, so a killed
process leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import GptstackError


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run folder's files are as readable as any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place; an older folder of that name is removed first."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def read_json(path: Path):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GptstackError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except OSError as e:
        raise GptstackError(f"{path}: cannot read ({e.strerror})") from None


def read_text(path: Path) -> str:
    """A file's text, with a clear error if it is not UTF-8; a leading byte-order mark (what Windows tools
    write) is dropped, and CRLF line ends split like LF."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GptstackError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise GptstackError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a bad line is an error naming file:line."""
    text = read_text(path)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise GptstackError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise GptstackError(f"{path}:{lineno}: JSON nested too deeply") from None
        if LONE_SURROGATE.search(line):  # only a \uD800-\uDFFF escape can make one; valid UTF-8 cannot
            try:
                json.dumps(rec, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as e:
                raise GptstackError(f"{path}:{lineno}: an unpaired surrogate ({e.object[e.start:e.end]!a}) is not text") from None
        if not isinstance(rec, dict):
            raise GptstackError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def read_jsonl_loose(path: Path) -> list[dict]:
    """Our own logs (metrics.jsonl): a torn last line from a kill is ignored."""
    out = []
    if not Path(path).exists():
        return out
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive lock on `folder` (its `.lock` file) for the life of the block: a second process that wants to
    write there fails at once, naming the holder's pid. The lock is the OS's (flock), so it dies with its process:
    a stale `.lock` left by a killed run is simply taken over."""
    import fcntl
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / ".lock", "a+", encoding="utf-8")
    except OSError as e:
        raise GptstackError(f"{folder}: cannot write here ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise GptstackError(f"{folder}: in use by process {holder}, which is writing there; wait for it to end, "
                            "or use another output folder") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # closing releases the lock
