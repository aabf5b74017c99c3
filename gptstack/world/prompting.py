"""Prompting tasks (GPT-2 zero-shot, GPT-3 few-shot) from the held-out stdlib split.

Queries (the `test` split) come from modules the pretraining split holds out;
few-shot examples (the `train` split) come from the modules it trained on.
- cloze: LAMBADA-style, the last identifier of a line, which appears earlier in its context
  (scored as LAMBADA is: is the answer the model's greedy continuation?)
- continuation: HellaSwag-style, which of 4 lines follows the context
- arithmetic: GPT-3's 2-digit addition and subtraction, as generation
- docstring_name: which of 4 names belongs to the function with this docstring
"""
from __future__ import annotations

import ast
import json
import random
import re
from pathlib import Path

from ..io import atomic_write_text
from .corpus import stdlib_documents
from .tasks import split_of

SIZES = {"train": 200, "test": 300}
TASK_FILES = Path(__file__).parent / "prompting_tasks"
IDENT_AT_END = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\W*$")


def _modules():
    by_split = {"train": [], "test": []}
    for doc_id, text in stdlib_documents():
        if doc_id.startswith("stdlib/"):
            split = split_of(doc_id)
            by_split["test" if split == "test" else "train"].append((doc_id, text))
    return by_split


def cloze(modules, rng: random.Random, n: int) -> list[dict]:
    out = []
    while len(out) < n:
        _, text = rng.choice(modules)
        lines = [l for l in text.splitlines() if l.strip()]
        if len(lines) < 12:
            continue
        i = rng.randrange(8, len(lines))
        m = re.search(r"([A-Za-z_][A-Za-z0-9_]{2,})$", lines[i].rstrip())
        context = "\n".join(lines[i - 8:i])
        if not m or m.group(1) not in context:  # solvable only from the context, as in LAMBADA
            continue
        out.append({"prompt": context + "\n" + lines[i][:m.start(1)], "answer": m.group(1)})
    return out


def continuation(modules, rng: random.Random, n: int) -> list[dict]:
    out = []
    while len(out) < n:
        _, text = rng.choice(modules)
        lines = [l.rstrip() for l in text.splitlines() if l.strip() and len(l) < 100]
        if len(lines) < 10:
            continue
        s = rng.randrange(len(lines) - 6)
        real = lines[s + 5]
        pool = [l for _, t in rng.sample(modules, 3) for l in [rng.choice([x for x in t.splitlines() if x.strip()] or ["pass"])]]
        if real.strip() in {p.strip() for p in pool}:
            continue
        choices = pool + [real]
        rng.shuffle(choices)
        out.append({"context": "\n".join(lines[s:s + 5]), "choices": choices, "label": choices.index(real)})
    return out


def arithmetic(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if i % 2:
            out.append({"prompt": f"Q: What is {a} minus {b}?\nA:", "answer": str(a - b)})
        else:
            out.append({"prompt": f"Q: What is {a} plus {b}?\nA:", "answer": str(a + b)})
    return out


def _functions(modules) -> list[tuple[str, str]]:
    found = []
    for _, text in modules:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("__"):
                doc = ast.get_docstring(node)
                if doc and 20 <= len(doc.split("\n\n")[0]) <= 300:
                    found.append((doc.split("\n\n")[0].strip(), node.name))
    return found


def docstring_name(modules, rng: random.Random, n: int) -> list[dict]:
    funcs = _functions(modules)
    names = sorted({name for _, name in funcs})
    out = []
    for doc, name in rng.sample(funcs, min(n, len(funcs))):
        distractors = rng.sample([x for x in names if x != name], 3)
        choices = distractors + [name]
        rng.shuffle(choices)
        out.append({"context": f'"""{doc}"""\nThe function with this docstring is named:', "choices": choices,
                    "label": choices.index(name)})
    return out


def build_prompting_tasks(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write each task's data (train/test JSONL) and its YAML definition; returns {task: yaml path}."""
    modules = _modules()
    rows = {}
    for split, n in SIZES.items():
        rng = random.Random(f"{seed}-{split}")
        rows.setdefault("cloze", {})[split] = cloze(modules[split], rng, n)
        rows.setdefault("continuation", {})[split] = continuation(modules[split], rng, n)
        rows.setdefault("arithmetic", {})[split] = arithmetic(rng, n)
        rows.setdefault("docstring_name", {})[split] = docstring_name(modules[split], rng, n)
    out = {}
    for task, splits in rows.items():
        for split, recs in splits.items():
            atomic_write_text(folder / task / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
        definition = (TASK_FILES / f"{task}.yaml").read_text()
        atomic_write_text(folder / task / "task.yaml", definition)
        out[task] = folder / task / "task.yaml"
    return out
