"""Validated supervised records (DESIGN §4): each bad record is an error naming file, line and field."""
from __future__ import annotations

from pathlib import Path

from ..errors import GptstackError, where
from ..io import iter_jsonl

TASK_FIELDS = {  # GPT-1 task kinds and the text fields of their records
    "classification": ("text",),
    "entailment": ("premise", "hypothesis"),
    "similarity": ("text_a", "text_b"),
    "multiple_choice": ("context", "choices"),
}


def read_task_records(path: Path, kind: str, labelled: bool = True) -> list[dict]:
    """Records of a GPT-1 task kind, each with '_line'. Multiple-choice labels become choice indices
    (an int index, or the text of one of the choices)."""
    if kind not in TASK_FIELDS:
        raise GptstackError(f"unknown task kind '{kind}' (known: {', '.join(TASK_FIELDS)})")
    out = []
    for lineno, rec in iter_jsonl(path):
        for f in TASK_FIELDS[kind]:
            if f not in rec:
                raise GptstackError(f"{where(path, lineno, f)} missing (a {kind} record has {', '.join(TASK_FIELDS[kind])}, label)")
        for f in TASK_FIELDS[kind]:
            if f == "choices":
                ch = rec[f]
                if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
                    raise GptstackError(f"{where(path, lineno, f)} must be a list of at least two strings")
            elif not isinstance(rec[f], str):
                raise GptstackError(f"{where(path, lineno, f)} must be a string, got {type(rec[f]).__name__}")
        if labelled:
            if "label" not in rec:
                raise GptstackError(f"{where(path, lineno, 'label')} missing")
            label = rec["label"]
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise GptstackError(f"{where(path, lineno, 'label')} must be a string or an integer, got {label!r}")
            if kind == "multiple_choice":
                if isinstance(label, str):
                    if label not in rec["choices"]:
                        raise GptstackError(f"{where(path, lineno, 'label')} {label!r} is not one of the choices")
                    label = rec["choices"].index(label)
                if not 0 <= label < len(rec["choices"]):
                    raise GptstackError(f"{where(path, lineno, 'label')} {label} is out of range for {len(rec['choices'])} choices")
                rec["label"] = label
        rec["_line"] = lineno
        out.append(rec)
    if not out:
        raise GptstackError(f"{path}: no records")
    return out


def label_set(records: list[dict], path: Path) -> list:
    """The sorted labels of a training file; all strings or all integers."""
    labels = {r["label"] for r in records}
    if len({type(l) for l in labels}) > 1:
        raise GptstackError(f"{path}: labels mix strings and integers ({sorted(map(str, labels))[:6]})")
    if len(labels) < 2:
        raise GptstackError(f"{path}: only one label ({next(iter(labels))!r}); a classifier needs at least two")
    return sorted(labels)
