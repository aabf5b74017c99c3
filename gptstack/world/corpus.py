"""The pretraining corpus: CPython's standard library sources plus pydoc's topic prose.

Found through `sysconfig`, so it exists wherever Python does. Tests, test data
and codec tables are left out: they are repetitive tables, not language.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings", "lib2to3", "turtledemo", "pydoc_data"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    root = stdlib_root()
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(files) if f.endswith(".py")]
    return out


def stdlib_documents():
    """(id, text) per module file, then one document per pydoc topic (English prose)."""
    root = stdlib_root()
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib files are deliberately non-UTF-8
        if text.strip():
            yield f"stdlib/{path.relative_to(root).as_posix()}", text
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield f"pydoc/{name}", topics[name]


def stdlib_fingerprint() -> str:
    h = hashlib.sha256(f"{sys.version}|{stdlib_root()}".encode())
    for p in stdlib_files():
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
