"""Zero-, one- and few-shot prompting evals (GPT-2, GPT-3), in lm-evaluation-harness's conventions.

A task is a YAML file next to its data:
    kind: multiple_choice | generation | greedy
    data: test.jsonl          queries, relative to the YAML file
    fewshot: train.jsonl      where the K examples come from (default: data; never the query itself)
    template: "{context}"     the query text, formatted from the record's fields
    answer: "{answer}"        the target (generation / greedy); multiple choice uses choices[label]
    target_delimiter: " "     between query and answer
    fewshot_delimiter: "\n\n" between examples
    description: ""           an instruction before everything (GPT-2-style task statement)
    stop: ["\n"]              generation stops at the first of these
    max_gen_tokens: 32
Scoring: multiple choice by the summed log-likelihood of each choice given the context (`acc`),
and divided by the choice's length in characters (`acc_norm`); generation by greedy decoding and
exact match; greedy (LAMBADA) by whether the answer is the model's greedy continuation.
Each figure is the mean of per-query results that evaluate_task also returns (`per_example`: the query's
position in the data, whether it was right, and for multiple choice every choice's log-likelihood): the
clean/dirty split of the contamination eval and the calibration eval are computed from these, not rescored.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from .. import plots
from ..config import from_dict
from ..data.loader import right_pad
from ..errors import GptstackError, where
from ..generate import generate
from ..io import iter_jsonl
from ..model import token_logprobs
from ..tokenizer import Tokenizer


@dataclass
class PromptTask:
    name: str = ""
    kind: str = "multiple_choice"
    data: str = ""
    fewshot: str = ""
    template: str = "{context}"
    answer: str = "{answer}"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    stop: list[str] = field(default_factory=lambda: ["\n"])
    max_gen_tokens: int = 32


def load_task(path: Path) -> tuple[PromptTask, list[dict], list[dict]]:
    """The task, its query records and its few-shot pool, all validated."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise GptstackError(f"{path}: cannot read task ({str(e).splitlines()[0]})") from None
    try:
        task = from_dict(PromptTask, raw)
    except GptstackError as e:
        raise GptstackError(f"{path}: {e}") from None
    task.name = task.name or path.stem
    if task.kind not in ("multiple_choice", "generation", "greedy"):
        raise GptstackError(f"{path}: field 'kind' must be multiple_choice, generation or greedy, got {task.kind!r}")
    if not task.data:
        raise GptstackError(f"{path}: field 'data' missing (the JSONL file of queries)")
    data = _records(path.parent / task.data, task)
    pool = _records(path.parent / task.fewshot, task) if task.fewshot else data
    return task, data, pool


def _records(path: Path, task: PromptTask) -> list[dict]:
    out = []
    for lineno, rec in iter_jsonl(path):
        try:
            _text(task.template, rec)
            if task.kind == "multiple_choice":
                ch, label = rec.get("choices"), rec.get("label")
                if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
                    raise GptstackError(f"{where(path, lineno, 'choices')} must be a list of at least two strings")
                if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(ch):
                    raise GptstackError(f"{where(path, lineno, 'label')} must be the index of the right choice")
            else:
                _text(task.answer, rec)
        except KeyError as e:
            raise GptstackError(f"{where(path, lineno, e.args[0])} missing (the task's template uses it)") from None
        out.append(rec)
    if not out:
        raise GptstackError(f"{path}: no records")
    return out


def _text(template: str, rec: dict) -> str:
    return template.format(**rec)


def target(task: PromptTask, rec: dict) -> str:
    return rec["choices"][rec["label"]] if task.kind == "multiple_choice" else _text(task.answer, rec)


def query_text(task: PromptTask, rec: dict) -> str:
    """A query as the model reads it (before any answer)."""
    return _text(task.template, rec)


def example_text(task: PromptTask, rec: dict) -> str:
    """A query as the model reads it followed by its gold answer: the text a contamination check looks for."""
    return query_text(task, rec) + task.target_delimiter + target(task, rec)


# ---------------------------------------------------------------- the model side

def split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Trailing spaces of the context belong to the continuation, as lm-eval does (BPE merges ' x')."""
    n = len(context) - len(context.rstrip(" "))
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


@torch.no_grad()
def loglikelihood(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                  desc: str = "") -> list[tuple[float, bool]]:
    """(sum of log P(continuation | context), is the continuation the greedy one) for each request.
    The context is cut from the left to fit the window; the continuation never is. `desc`: a progress bar."""
    device = model.wte.weight.device
    n_ctx = model.cfg.n_ctx
    was = model.training
    model.eval()
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    out: list = [None] * len(requests)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not desc, unit="batch", mininterval=2.0):
        idx = order[start:start + batch_size]
        rows = []
        for i in idx:
            ctx, cont = requests[i]
            if len(cont) > n_ctx:
                raise GptstackError(f"a continuation of {len(cont)} tokens does not fit the context of {n_ctx}")
            seq = (ctx + cont)[-(n_ctx + 1):]
            rows.append((seq, len(cont)))
        hidden = model.hidden(right_pad([seq[:-1] for seq, _ in rows], 0).to(device))
        for r, (i, (seq, n)) in enumerate(zip(idx, rows)):
            L = len(seq) - 1
            cont = torch.tensor(seq[-n:], device=device)
            logits = model.logits(hidden[r, L - n:L])  # only where the continuation is predicted: V is large
            lp = token_logprobs(logits, cont)
            out[i] = (lp.sum().item(), bool((logits.argmax(-1) == cont).all()))
    model.train(was)
    return out


@torch.no_grad()
def loglikelihood_rolling(model, tokens: list[int], prefix: int) -> float:
    """Log-likelihood of a whole token sequence (after a `prefix` token such as <|endoftext|>),
    scored in windows of the model's context, each token predicted once with as much context as fits."""
    n_ctx = model.cfg.n_ctx
    seq = [prefix] + tokens
    total, pos = 0.0, 1
    while pos < len(seq):
        end = min(pos + n_ctx, len(seq))  # predict seq[pos:end]
        start = max(0, end - n_ctx - 1)
        ctx, cont = seq[start:pos], seq[pos:end]
        total += loglikelihood(model, [(ctx, cont)])[0][0]
        pos = end
    return total


def generate_until(model, tok: Tokenizer, prompts: list[list[int]], stop: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations, cut at the first stop string."""
    room = model.cfg.n_ctx - max_new_tokens
    gens = generate(model, [p[-room:] for p in prompts], max_new_tokens, temperature=0.0,
                    stop_ids=(tok.eot,), pad_id=tok.pad)
    out = []
    for g in gens:
        text = tok.decode(g.tokens, skip_special=True)
        for s in stop:
            if s and s in text:
                text = text[:text.index(s)]
        out.append(text)
    return out


# ---------------------------------------------------------------- k-shot evaluation

def build_prompt(task: PromptTask, tok: Tokenizer, query: dict, examples: list[dict], budget: int) -> tuple[str, int]:
    """Description, then as many of the examples as fit in `budget` tokens, then the query.
    Examples are dropped from the end until it fits; the query is never cut."""
    def render(k):
        shots = [_text(task.template, e) + task.target_delimiter + target(task, e) for e in examples[:k]]
        head = task.description + task.fewshot_delimiter if task.description else ""
        return head + "".join(s + task.fewshot_delimiter for s in shots) + _text(task.template, query)
    k = len(examples)
    while k > 0 and len(tok.encode(render(k))) > budget:
        k -= 1
    return render(k), k


def evaluate_task(model, tok: Tokenizer, task: PromptTask, data: list[dict], pool: list[dict], shots: int,
                  limit: int = 0, seed: int = 0, desc: str = "") -> dict:
    queries = data[:limit] if limit else data
    rng = random.Random(seed)
    n_ctx = model.cfg.n_ctx
    fits, skipped = [], 0
    prompts, kept, positions = [], [], []
    for position, q in enumerate(queries):
        candidates = [e for e in pool if e is not q and e != q]  # never the query itself
        examples = rng.sample(candidates, min(shots, len(candidates)))
        answers = q["choices"] if task.kind == "multiple_choice" else [target(task, q)]
        longest = max(len(tok.encode(task.target_delimiter + a)) for a in answers)
        reserve = task.max_gen_tokens if task.kind == "generation" else longest
        text, k = build_prompt(task, tok, q, examples, n_ctx - reserve)
        if len(tok.encode(text)) > n_ctx - reserve:
            skipped += 1  # the query alone does not fit: never cut it
            continue
        fits.append(k)
        prompts.append(text)
        kept.append(q)
        positions.append(position)
    result = {"n": len(kept), "shots": shots, "shots_fit": sum(fits) / max(len(fits), 1), "skipped": skipped}
    if not kept:
        return {**result, "acc": 0.0, "per_example": []}
    if task.kind == "generation":
        outs = generate_until(model, tok, [tok.encode(p) for p in prompts], task.stop, task.max_gen_tokens)
        right = [o.strip() == target(task, q).strip() for o, q in zip(outs, kept)]
        result["acc"] = sum(right) / len(kept)
        result["examples"] = [{"prompt": p[-200:], "output": o, "target": target(task, q)} for p, o, q in list(zip(prompts, outs, kept))[:3]]
        result["per_example"] = [{"index": i, "correct": c} for i, c in zip(positions, right)]
        return result
    requests, owners = [], []
    for i, (p, q) in enumerate(zip(prompts, kept)):
        answers = q["choices"] if task.kind == "multiple_choice" else [target(task, q)]
        for a in answers:
            ctx, cont = split_whitespace(p, task.target_delimiter + a)
            requests.append((tok.encode(ctx), tok.encode(cont)))
            owners.append((i, len(a)))
    scores = loglikelihood(model, requests, desc=desc)
    if task.kind == "greedy":
        result["acc"] = sum(greedy for _, greedy in scores) / len(kept)
        result["per_example"] = [{"index": i, "correct": greedy} for i, (_, greedy) in zip(positions, scores)]
        return result
    per_query: list[list] = [[] for _ in kept]
    for (i, chars), (ll, _) in zip(owners, scores):
        per_query[i].append((ll, ll / max(chars, 1)))
    examples = []
    for i, s, q in zip(positions, per_query, kept):
        lls = [ll for ll, _ in s]
        examples.append({"index": i, "label": q["label"], "loglik": lls,
                         "correct": max(range(len(s)), key=lambda j: s[j][0]) == q["label"],
                         "correct_norm": max(range(len(s)), key=lambda j: s[j][1]) == q["label"]})
    result["acc"] = sum(e["correct"] for e in examples) / len(kept)
    result["acc_norm"] = sum(e["correct_norm"] for e in examples) / len(kept)
    result["per_example"] = examples
    return result


def sweep(model, tok: Tokenizer, task_paths: dict[str, Path], shots: list[int], limit: int = 0, seed: int = 0,
          log=print) -> tuple[dict, dict]:
    """({task: {shots_K: {acc, acc_norm?, n, shots_fit, ...}}}, {task: {shots_K: per-example results}}) for every
    task and K: the figures, and what they are averages of (by position in the task's data)."""
    out, per_example = {}, {}
    for name, path in task_paths.items():
        task, data, pool = load_task(path)
        out[name], per_example[name] = {}, {}
        for k in shots:
            r = evaluate_task(model, tok, task, data, pool, k, limit, seed)
            per_example[name][f"shots_{k}"] = r.pop("per_example")
            out[name][f"shots_{k}"] = r
            norm = f", acc_norm {r['acc_norm']:.3f}" if "acc_norm" in r else ""
            log(f"[prompting] {name} {k}-shot: acc {r['acc']:.3f}{norm} (n={r['n']}, {r['shots_fit']:.1f} examples fit)")
    return out, per_example


def builtin_tasks(folder: Path, seed: int = 0) -> dict[str, Path]:
    from ..world.prompting import build_prompting_tasks
    return build_prompting_tasks(Path(folder), seed)


def resolve_tasks(names: list[str], cache: Path, seed: int = 0) -> dict[str, Path]:
    """Task names (built-in) or paths to task YAML files -> {name: yaml path}."""
    builtin = None
    out = {}
    for n in names:
        if n.endswith((".yaml", ".yml")) or Path(n).is_file():
            if not Path(n).is_file():
                raise GptstackError(f"{n}: no such task file")
            out[Path(n).stem] = Path(n)
            continue
        builtin = builtin or builtin_tasks(cache, seed)
        if n not in builtin:
            raise GptstackError(f"unknown prompting task '{n}' (built-in: {', '.join(builtin)}; or a task .yaml)")
        out[n] = builtin[n]
    return out


def plot_shots(results: dict[str, dict], path: Path, chance: dict[str, float] | None = None) -> Path:
    """Accuracy against K per task, one line per model (GPT-3's zero/one/few-shot figure)."""
    tasks = sorted({t for r in results.values() for t in r})
    fig, axes = plots.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for model, r in results.items():
            if task not in r:
                continue
            ks = sorted(int(k.split("_")[1]) for k in r[task])
            accs = [r[task][f"shots_{k}"]["acc"] for k in ks]
            ax.plot(range(len(ks)), accs, "o-", label=model)
            ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        if chance and task in chance:
            ax.axhline(chance[task], ls="--", c="gray", lw=1, label="chance")
        ax.set_title(task)
        ax.set_xlabel("examples in context (K)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=8)
    return plots.save(fig, path)


CHANCE = {"continuation": 0.25, "docstring_name": 0.25}
