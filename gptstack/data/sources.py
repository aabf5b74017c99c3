"""Sources of documents: text files, folders, globs, JSONL, Parquet, HF datasets, stdlib.

A source yields Documents (an id and its text). A bad record stops with an
error naming file, line and field, unless `skip_bad` is set, which drops and
counts it.
"""
from __future__ import annotations

import glob as globlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import GptstackError, where
from ..io import iter_jsonl, read_text


@dataclass
class SourceConfig:
    path: str = "stdlib"  # stdlib | file | folder | glob | *.jsonl | *.parquet | hf:NAME[:split] | dataset folder
    weight: float = 1.0  # share of training sequences drawn from this source (GPT-3 Table 2.2)
    text_field: str = "text"  # for JSONL / Parquet / HF datasets

    def problems(self):
        if self.weight <= 0:
            yield "weight", f"must be > 0, got {self.weight}"


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    val_fraction: float = 0.05  # documents go to val by a hash of their id, not by position
    skip_bad: bool = False  # drop (and count) bad records instead of stopping

    def problems(self):
        if not 0 < self.val_fraction < 1:
            yield "val_fraction", f"must be in (0, 1), got {self.val_fraction}"
        if not self.sources:
            yield "sources", "must name at least one data source"


@dataclass
class Document:
    id: str
    text: str


@dataclass
class LoadStats:
    documents: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: why" of each dropped record


def _is_glob(p: str) -> bool:
    return any(c in p for c in "*?[")


def _is_hf_folder(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists())


def source_files(src: SourceConfig) -> list[Path]:
    """The files a path-like source reads, sorted (empty for stdlib / HF sources)."""
    p = src.path
    if p == "stdlib" or p.startswith("hf:") or _is_hf_folder(Path(p)):
        return []
    if _is_glob(p):
        files = sorted(Path(f) for f in globlib.glob(p, recursive=True) if Path(f).is_file())
        if not files:
            raise GptstackError(f"data source '{p}': no files match")
        return files
    path = Path(p)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
        if not files:
            raise GptstackError(f"data source '{p}': folder has no files")
        return files
    if path.is_file():
        return [path]
    raise GptstackError(f"data source '{p}': no such file or folder (or use 'stdlib', 'hf:NAME', a glob)")


def fingerprint(src: SourceConfig) -> str:
    """Changes when the source's content may have changed (path, size, mtime)."""
    h = hashlib.sha256(f"{src.path}|{src.text_field}".encode())
    if src.path == "stdlib":
        from ..world.corpus import stdlib_fingerprint
        h.update(stdlib_fingerprint().encode())
    elif src.path.startswith("hf:"):
        pass  # a hub name; datasets caches it by version itself
    else:
        paths = [Path(src.path)] if _is_hf_folder(Path(src.path)) else source_files(src)
        for f in paths:
            for g in ([f] if f.is_file() else sorted(f.rglob("*"))):
                st = g.stat()
                h.update(f"{g}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def iter_documents(src: SourceConfig, skip_bad: bool = False, stats: LoadStats | None = None) -> Iterator[Document]:
    stats = stats if stats is not None else LoadStats()
    p = src.path
    if p == "stdlib":
        from ..world.corpus import stdlib_documents
        for doc_id, text in stdlib_documents():
            stats.documents += 1
            yield Document(doc_id, text)
        return
    if p.startswith("hf:") or _is_hf_folder(Path(p)):
        yield from _iter_hf(src, skip_bad, stats)
        return
    for f in source_files(src):
        suffix = f.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            yield from _iter_jsonl(f, src.text_field, skip_bad, stats)
        elif suffix == ".parquet":
            yield from _iter_parquet(f, src.text_field, skip_bad, stats)
        else:
            try:
                text = read_text(f)
            except GptstackError as e:
                if not skip_bad:
                    raise
                stats.skipped.append(str(e))
                continue
            if text:
                stats.documents += 1
                yield Document(str(f), text)


def _bad(stats: LoadStats, skip_bad: bool, message: str) -> None:
    if not skip_bad:
        raise GptstackError(message + " (use data.skip_bad=true to drop and count such records)")
    stats.skipped.append(message)


def _iter_jsonl(f: Path, text_field: str, skip_bad: bool, stats: LoadStats):
    for lineno, rec in iter_jsonl(f):
        text = rec.get(text_field)
        if text is None:
            _bad(stats, skip_bad, f"{where(f, lineno, text_field)} missing")
        elif not isinstance(text, str):
            _bad(stats, skip_bad, f"{where(f, lineno, text_field)} must be a string, got {type(text).__name__}")
        elif text:
            stats.documents += 1
            yield Document(f"{f}:{lineno}", text)


def _iter_parquet(f: Path, text_field: str, skip_bad: bool, stats: LoadStats):
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(f, columns=[text_field])
    except KeyError:
        raise GptstackError(f"{f}: no column '{text_field}' (set text_field)") from None
    except Exception as e:
        raise GptstackError(f"{f}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    for row, text in enumerate(table.column(text_field).to_pylist()):
        if not isinstance(text, str):
            _bad(stats, skip_bad, f"{f}: row {row}: field '{text_field}' must be a string, got {type(text).__name__}")
        elif text:
            stats.documents += 1
            yield Document(f"{f}:{row}", text)


def _iter_hf(src: SourceConfig, skip_bad: bool, stats: LoadStats):
    try:
        import datasets
    except ImportError:
        raise GptstackError(f"data source '{src.path}' needs the `datasets` package: pip install 'gptstack[hf]'") from None
    try:
        if src.path.startswith("hf:"):
            name, _, split = src.path[3:].partition(":")
            ds = datasets.load_dataset(name, split=split or "train")
        else:
            ds = datasets.load_from_disk(src.path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    except Exception as e:
        raise GptstackError(f"data source '{src.path}': cannot load dataset ({str(e).splitlines()[0]})") from None
    if src.text_field not in ds.column_names:
        raise GptstackError(f"data source '{src.path}': no column '{src.text_field}' (columns: {', '.join(ds.column_names)})")
    for row, text in enumerate(ds[src.text_field]):
        if not isinstance(text, str):
            _bad(stats, skip_bad, f"{src.path}: row {row}: field '{src.text_field}' must be a string")
        elif text:
            stats.documents += 1
            yield Document(f"{src.path}:{row}", text)
