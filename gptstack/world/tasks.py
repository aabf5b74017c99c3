"""GPT-1's four kinds of supervised task, derived from the stdlib corpus.

Deterministic from a seed, with fixed splits. Test examples come from modules
the pretraining split holds out, so a test snippet was never pretrained on;
val from another slice of modules; train from the rest. (module is the
exception: its four files are split by region, and three of them are in the
pretraining data.)

Each task is meant to need what pretraining gives: with TRAIN_SIZES records
(and the tiny preset's epochs) the pretrained model learns it and a model
trained from random weights on the same records does not. Sizes, epochs and
designs were compared on val only, pretrained against from scratch.

- module (classification): which of four modules a 6-line snippet comes from.
  200 training records: too few to learn the modules' vocabulary from scratch.
- value_claim (entailment): does "name == value" follow from a few assignments,
  contradict them, or is it unknown (the name is not assigned)?
- renamed (similarity): are two lines of code (comments and docstrings left
  out) the same up to a consistent renaming of identifiers, or is the second
  another line renamed? One short line each: three-line snippets (with a
  changed-line negative) cost about three times the tokens a pair, and the
  tiny pretrained model stayed near chance on them.
- continuation (multiple choice): which of four lines really follows two lines
  of context? The real line uses a name from the context, so the context
  decides it (a line such as `else:` could follow anything); the three others
  are lines of other modules.
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
EVAL_SIZES = {"val": 400, "test": 400}
TRAIN_SIZES = {"module": 200, "value_claim": 8000, "renamed": 4800, "continuation": 1200}
RENAMED_MAX_CHARS = 60  # renamed: short lines keep a pair's cost down
CONTEXT_LINES = 2  # continuation: lines of context before the line to choose
MODULES = ["_pydecimal.py", "argparse.py", "tarfile.py", "typing.py"]  # large, distinct in vocabulary
MODULE_FALLBACKS = ["inspect.py", "doctest.py", "pathlib.py", "subprocess.py", "ssl.py", "pickle.py"]


def sizes(task: str) -> dict[str, int]:
    """Records per split of one task."""
    return {"train": TRAIN_SIZES[task], **EVAL_SIZES}


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
    out = {s: [] for s in sizes("module")}
    for split, n in sizes("module").items():
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
    out = {s: [] for s in sizes("value_claim")}
    for split, n in sizes("value_claim").items():
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


def code_tokens(code: str) -> list[tokenize.TokenInfo] | None:
    try:
        return list(tokenize.generate_tokens(io.StringIO(code + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None


def renamable(t: tokenize.TokenInfo, prev: tokenize.TokenInfo | None) -> bool:
    """A name that is not a keyword, a builtin or an attribute."""
    return t.type == tokenize.NAME and not keyword.iskeyword(t.string) and t.string not in BUILTINS and not (prev and prev.string == ".")


def rename(code: str, pool: list[str], rng: random.Random) -> str | None:
    """The snippet with every renamable name consistently renamed."""
    toks = code_tokens(code)
    if toks is None:
        return None
    mapping, out, prev = {}, [], None
    for t in toks:
        s = t.string
        if renamable(t, prev):
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


def skeleton(code: str) -> tuple | None:
    """The code's tokens, each renamable name replaced by its order of first use: equal for the same code up to renaming."""
    toks = code_tokens(code)
    if toks is None:
        return None
    order, out, prev = {}, [], None
    for t in toks:
        out.append(order.setdefault(t.string, len(order)) if renamable(t, prev) else t.string)
        prev = t
    return tuple(out)


def short_line(docs, rng: random.Random) -> str:
    """A random line of code of at most RENAMED_MAX_CHARS characters, without its indentation."""
    while True:
        _, lines = rng.choice(docs)
        line = rng.choice(lines).strip()
        if len(line) <= RENAMED_MAX_CHARS:
            return line


def renamed_task(docs, names, rng: random.Random) -> dict[str, list[dict]]:
    out = {s: [] for s in sizes("renamed")}
    for split, n in sizes("renamed").items():
        while len(out[split]) < n:
            a, other = short_line(docs[split], rng), short_line(docs[split], rng)
            positive = len(out[split]) % 2 == 0
            if not positive and skeleton(other) == skeleton(a):  # common lines (`return result`) can be a renaming of each other
                continue
            b = rename(a if positive else other, names[split], rng)  # a negative: another line, renamed
            if b is None or b == a:
                continue
            out[split].append({"text_a": a, "text_b": b, "label": "same" if positive else "different"})
        rng.shuffle(out[split])
    return out


# ---------------------------------------------------------------- continuation (multiple choice)

NAME = re.compile(r"[A-Za-z_]\w{2,}")


def continuation_task(docs, rng: random.Random) -> dict[str, list[dict]]:
    out = {s: [] for s in sizes("continuation")}
    for split, n in sizes("continuation").items():
        while len(out[split]) < n:
            _, lines = rng.choice(docs[split])
            s = rng.randrange(len(lines) - CONTEXT_LINES)
            context, real = lines[s:s + CONTEXT_LINES], lines[s + CONTEXT_LINES]
            if not {w for w in NAME.findall(real) if not keyword.iskeyword(w)} & set(NAME.findall("\n".join(context))):
                continue  # nothing in the context points to the real line
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
