"""GPT-1's four kinds of supervised task, derived from the stdlib corpus.

Deterministic from a seed, with fixed splits. Test examples come from modules
the pretraining split holds out, so a test snippet was never pretrained on;
val from another slice of modules; train from the rest.

- module (classification): which of four modules a 6-line snippet comes from.
- value_claim (entailment): does "name == value" follow from a few assignments,
  contradict them, or is it unknown (the name is not assigned)?
- renamed (similarity): are two snippets of code (comments and docstrings
  left out) the same up to a consistent renaming of identifiers, or not (another snippet, or the same one with a line changed)?
- continuation (multiple choice): which of four lines really follows the context?
"""
from __future__ import annotations

import builtins
import io
import keyword
import random
import re
import tokenize
from pathlib import Path

from ..data.tokens import is_val
from ..io import atomic_write_text
from .corpus import stdlib_documents

TASKS = {  # name -> (kind, chance accuracy)
    "module": ("classification", 0.25),
    "value_claim": ("entailment", 1 / 3),
    "renamed": ("similarity", 0.5),
    "continuation": ("multiple_choice", 0.25),
}
SIZES = {"train": 800, "val": 200, "test": 400}
# tasks whose records are short, or that need more examples to learn, get more training records
TRAIN_SIZES = {"value_claim": 8000, "renamed": 3000}
RENAMED_LINES = 3  # code lines per snippet
MODULES = ["_pydecimal.py", "argparse.py", "tarfile.py", "typing.py"]  # large, distinct in vocabulary
MODULE_FALLBACKS = ["inspect.py", "doctest.py", "pathlib.py", "subprocess.py", "ssl.py", "pickle.py"]


def split_of(doc_id: str) -> str:
    """test: the pretraining val split (never pretrained on); val: another 5% slice; train: the rest."""
    if is_val(doc_id, 0.05):
        return "test"
    return "val" if is_val(doc_id + "#finetune", 0.06) else "train"


def code_documents() -> tuple[dict, dict]:
    """Stdlib modules by split, as (id, non-blank lines), and the same with only the lines of code."""
    out = {"train": [], "val": [], "test": []}
    code = {"train": [], "val": [], "test": []}
    for doc_id, text in stdlib_documents():
        if doc_id.startswith("stdlib/"):
            lines = [l.rstrip() for l in text.splitlines() if l.strip() and len(l) < 100]
            if len(lines) > 40:
                out[split_of(doc_id)].append((doc_id, lines))
                code[split_of(doc_id)].append((doc_id, code_lines(text)))
    return out, code


def code_lines(text: str) -> list[str]:
    """The lines that are code: no comments, no docstring or other multi-line string."""
    lines = text.splitlines()
    prose = set()
    try:
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            if t.type == tokenize.COMMENT or (t.type == tokenize.STRING and (t.start[0] != t.end[0] or t.line.strip() == t.string)):
                prose.update(range(t.start[0], t.end[0] + 1))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return []
    return [l.rstrip() for i, l in enumerate(lines, 1) if i not in prose and l.strip() and len(l) < 100]


# ---------------------------------------------------------------- module (classification)

def module_task(docs_by_id: dict[str, list[str]], rng: random.Random) -> dict[str, list[dict]]:
    names = [m for m in MODULES + MODULE_FALLBACKS if f"stdlib/{m}" in docs_by_id][:4]
    out = {s: [] for s in SIZES}
    for split, n in SIZES.items():
        for i in range(n):
            name = names[i % 4]
            lines = docs_by_id[f"stdlib/{name}"]
            # split by region of the file: train 0-80%, val 80-88%, test 88-100%
            lo, hi = {"train": (0, 0.8), "val": (0.8, 0.88), "test": (0.88, 1.0)}[split]
            a, b = int(lo * len(lines)), int(hi * len(lines)) - 6
            start = rng.randint(a, max(a, b))
            out[split].append({"text": "\n".join(lines[start:start + 6]), "label": name[:-3].lstrip("_")})
        rng.shuffle(out[split])
    return out


# ---------------------------------------------------------------- value_claim (entailment)

IDENT = re.compile(r"^[a-z][a-z_]{2,14}$")


def identifiers(docs) -> list[str]:
    seen = set()
    for _, lines in docs:
        for line in lines:
            for w in re.findall(r"[A-Za-z_]+", line):
                if IDENT.match(w) and not keyword.iskeyword(w):
                    seen.add(w)
    return sorted(seen)


def value_claim_task(names: dict[str, list[str]], rng: random.Random) -> dict[str, list[dict]]:
    labels = ["entailment", "contradiction", "neutral"]
    out = {s: [] for s in SIZES}
    for split, n in {**SIZES, "train": TRAIN_SIZES["value_claim"]}.items():
        pool = names[split]
        for i in range(n):
            k = rng.randint(1, 2)
            chosen = rng.sample(pool, k + 1)
            assigned, absent = chosen[:k], chosen[k]
            values = [rng.randint(0, 99) for _ in assigned]
            premise = "\n".join(f"{a} = {v}" for a, v in zip(assigned, values))
            label = labels[i % 3]
            j = rng.randrange(k)
            if label == "entailment":
                hyp = f"{assigned[j]} == {values[j]}"
            elif label == "contradiction":
                wrong = rng.choice([v for v in range(100) if v != values[j]])
                hyp = f"{assigned[j]} == {wrong}"
            else:
                hyp = f"{absent} == {rng.choice(values)}"
            out[split].append({"premise": premise, "hypothesis": hyp, "label": label})
        rng.shuffle(out[split])
    return out


# ---------------------------------------------------------------- renamed (similarity)

BUILTINS = set(dir(builtins))


def rename(code: str, pool: list[str], rng: random.Random) -> str | None:
    """The snippet with every non-keyword, non-builtin, non-attribute name consistently renamed."""
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(code + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    mapping, out, prev = {}, [], None
    for t in toks:
        s = t.string
        if t.type == tokenize.NAME and not keyword.iskeyword(s) and s not in BUILTINS and not (prev and prev.string == "."):
            while s not in mapping:
                new = rng.choice(pool)
                if new != s and new not in mapping.values():
                    mapping[s] = new
            t = t._replace(string=mapping[s])
        out.append(t)
        prev = t
    if not mapping:
        return None
    try:
        return tokenize.untokenize(out).rstrip("\n")
    except ValueError:
        return None


def snippets(docs, n_lines: int, rng: random.Random, count: int) -> list[str]:
    out = []
    while len(out) < count:
        _, lines = rng.choice(docs)
        if len(lines) <= n_lines:
            continue
        s = rng.randrange(len(lines) - n_lines)
        block = lines[s:s + n_lines]
        indent = min(len(l) - len(l.lstrip()) for l in block)
        out.append("\n".join(l[indent:] for l in block))
    return out


def renamed_task(docs, names, rng: random.Random) -> dict[str, list[dict]]:
    out = {s: [] for s in SIZES}
    for split, n in {**SIZES, "train": TRAIN_SIZES["renamed"]}.items():
        while len(out[split]) < n:
            a, other = snippets(docs[split], RENAMED_LINES, rng, 2)
            positive = len(out[split]) % 2 == 0
            if positive:
                b = rename(a, names[split], rng)
            elif rng.random() < 0.5:  # another snippet, renamed the same way
                b = rename(other, names[split], rng)
            else:  # the same snippet with one line replaced by another snippet's
                lines = a.split("\n")
                lines[rng.randrange(len(lines))] = other.split("\n")[0]
                b = rename("\n".join(lines), names[split], rng)
            if b is None or b == a:
                continue
            out[split].append({"text_a": a, "text_b": b, "label": "same" if positive else "different"})
        rng.shuffle(out[split])
    return out


# ---------------------------------------------------------------- continuation (multiple choice)

def continuation_task(docs, rng: random.Random) -> dict[str, list[dict]]:
    out = {s: [] for s in SIZES}
    for split, n in SIZES.items():
        while len(out[split]) < n:
            _, lines = rng.choice(docs[split])
            s = rng.randrange(len(lines) - 7)
            context, real = lines[s:s + 5], lines[s + 5]
            distractors = []
            while len(distractors) < 3:
                _, other = rng.choice(docs[split])
                cand = rng.choice(other)
                if cand.strip() != real.strip() and cand not in distractors:
                    distractors.append(cand)
            choices = distractors + [real]
            rng.shuffle(choices)
            out[split].append({"context": "\n".join(context), "choices": choices, "label": choices.index(real)})
    return out


# ---------------------------------------------------------------- build

def build_tasks(folder: Path, seed: int = 0) -> dict[str, dict]:
    """Write every task's train/val/test JSONL under folder/<task>/; returns {task: {kind, chance, files}}."""
    import json
    docs, code = code_documents()
    names = {s: identifiers(d) for s, d in code.items()}
    by_id = {doc_id: lines for d in docs.values() for doc_id, lines in d}
    built = {
        "module": module_task(by_id, random.Random(seed)),
        "value_claim": value_claim_task(names, random.Random(seed + 1)),
        "renamed": renamed_task(code, names, random.Random(seed + 2)),
        "continuation": continuation_task(docs, random.Random(seed + 3)),
    }
    info = {}
    for task, splits in built.items():
        files = {}
        for split, rows in splits.items():
            path = Path(folder) / task / f"{split}.jsonl"
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
            files[split] = str(path)
        kind, chance = TASKS[task]
        info[task] = {"kind": kind, "chance": chance, "files": files}
    return info
