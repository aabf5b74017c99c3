"""`gptstack label`: the terminal tool a person uses to rank K answers per prompt.

Reads a to-do file of {prompt, [system], responses} records (what `compare --labeler human` writes),
shows one prompt at a time with its answers lettered A, B, C, ..., and takes a ranking such as
`B > A = C > D` (best first, `=` for a tie) or the shorthand `BA=CD`. Every ranking is appended to
the output file and flushed to disk the moment it is given, so quitting at any point (q, Ctrl-D,
Ctrl-C) loses nothing; running the command again resumes at the first prompt not yet ranked.
"""
from __future__ import annotations

import hashlib
import json
import os
import string
import sys
import textwrap
from pathlib import Path

from .errors import GptstackError, where
from .io import iter_jsonl

HELP = """rank best first: `B > A = C > D` or `BA=CD` (= ties the answers on each side)
  s  skip this prompt for now     u  undo the last ranking     q  quit (Ctrl-D, Ctrl-C too)     ?  this help"""


def item_id(rec: dict) -> str:
    """What identifies a to-do item across sessions: its prompt, system message and answers."""
    key = json.dumps([rec.get("system"), rec["prompt"], rec["responses"]], ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def read_todo(path: Path) -> list[dict]:
    out = []
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec.get("prompt"), str):
            raise GptstackError(f"{where(path, lineno, 'prompt')} missing or not a string")
        rs = rec.get("responses")
        if not isinstance(rs, list) or not 2 <= len(rs) <= 26 or not all(isinstance(r, str) for r in rs):
            raise GptstackError(f"{where(path, lineno, 'responses')} must be a list of 2 to 26 strings")
        out.append(rec)
    if not out:
        raise GptstackError(f"{path}: nothing to label")
    return out


def parse_ranking(text: str, k: int) -> list[int]:
    """`B > A = C > D` or `BA=CD` -> ranks per answer (1 = best, tied answers share a rank)."""
    letters = string.ascii_uppercase[:k]
    groups, current, expect_letter = [], [], True
    for ch in text.upper().replace(" ", ""):
        if ch in letters:
            if current and not expect_letter:  # shorthand: a letter right after a letter starts a new group
                groups.append(current)
                current = []
            current.append(ch)
            expect_letter = False
        elif ch == "=" and current and not expect_letter:
            expect_letter = True
        elif ch == ">" and current and not expect_letter:
            groups.append(current)
            current, expect_letter = [], True
        else:
            raise ValueError(f"unexpected {ch!r}; use the letters {letters[0]}-{letters[-1]}, '>' and '='")
    if expect_letter or not current:
        raise ValueError("the ranking ends with an operator")
    groups.append(current)
    seen = [c for g in groups for c in g]
    if sorted(seen) != list(letters):
        missing = sorted(set(letters) - set(seen))
        twice = sorted({c for c in seen if seen.count(c) > 1})
        raise ValueError("rank every answer exactly once" + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; repeated {', '.join(twice)}" if twice else ""))
    ranks = [0] * k
    for rank, group in enumerate(groups, 1):
        for c in group:
            ranks[letters.index(c)] = rank
    return ranks


class Labeller:
    def __init__(self, todo: Path, out: Path, read=input, write=sys.stdout.write, width: int = 100):
        self.items = read_todo(todo)
        self.out, self.read, self.write, self.width = out, read, write, width
        self.done = self._done_ids()

    def _done_ids(self) -> list[str]:
        if not self.out.exists():
            return []
        ids = []
        for lineno, rec in iter_jsonl(self.out):
            if "label_id" not in rec:
                raise GptstackError(f"{where(self.out, lineno, 'label_id')} missing: this file was not written by `gptstack label`")
            ids.append(rec["label_id"])
        return ids

    def _append(self, rec: dict) -> None:
        with open(self.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _undo(self) -> bool:
        if not self.done:
            return False
        lines = self.out.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [l for l in lines if l.strip()][:-1]
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.out)
        self.done.pop()
        return True

    def _show(self, i: int, rec: dict, position: int, total: int) -> None:
        w = self.write
        bar = "─" * min(self.width, 80)
        w(f"\n{bar}\n[{position}/{total}]  prompt {i + 1} of {len(self.items)}\n")
        if rec.get("system"):
            w(f"system: {rec['system']}\n")
        w("user:   " + "\n        ".join(textwrap.wrap(rec["prompt"], self.width - 8) or [""]) + "\n\n")
        for k, resp in enumerate(rec["responses"]):
            body = "\n     ".join(line for para in resp.split("\n") for line in (textwrap.wrap(para, self.width - 5) or [""]))
            w(f"  {string.ascii_uppercase[k]}) {body}\n")

    def run(self) -> int:
        """Rank until every item is done or the person quits; returns how many were ranked now."""
        ranked = 0
        self.write(f"{len(self.done)} of {len(self.items)} already ranked in {self.out}.\n{HELP}\n")
        skipped: set[str] = set()
        while True:
            pending = [(i, r) for i, r in enumerate(self.items) if item_id(r) not in self.done and item_id(r) not in skipped]
            if not pending:
                left = len(self.items) - len(set(self.done))
                self.write(f"\nall done: {len(self.done)} rankings in {self.out}.\n" if not left else
                           f"\n{left} skipped; run again to rank them.\n")
                return ranked
            i, rec = pending[0]
            self._show(i, rec, len(self.done) + 1, len(self.items))
            while True:
                try:
                    answer = self.read("ranking> ").strip()
                except (EOFError, KeyboardInterrupt):
                    self.write(f"\nquit: {len(self.done)} rankings saved in {self.out}; run again to resume.\n")
                    return ranked
                if answer.lower() in ("q", "quit"):
                    self.write(f"quit: {len(self.done)} rankings saved in {self.out}; run again to resume.\n")
                    return ranked
                if answer in ("?", "h", "help", ""):
                    self.write(HELP + "\n")
                    continue
                if answer.lower() == "s":
                    skipped.add(item_id(rec))
                    break
                if answer.lower() == "u":
                    self.write("undone: the last ranking is removed.\n" if self._undo() else "nothing to undo.\n")
                    skipped.discard(item_id(rec))
                    break
                try:
                    ranks = parse_ranking(answer, len(rec["responses"]))
                except ValueError as e:
                    self.write(f"  ? {e}\n")
                    continue
                self._append({**{k: v for k, v in rec.items() if k != "ranks"}, "ranks": ranks, "labeler": "human",
                              "label_id": item_id(rec)})
                self.done.append(item_id(rec))
                ranked += 1
                break
