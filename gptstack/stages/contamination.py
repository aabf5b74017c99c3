"""The contamination stage (GPT-3 section 4, GPT-4's exams scored twice): 13-gram overlap between every eval
example and the training data the run used, and each eval's accuracy on its full, clean and dirty subsets.

The run's training data: the training split of its pretraining sources (documents the val split holds out were
never trained on), its SFT demonstrations, the prompts of its RM's training rankings and its PPO rollout prompts
(each when that stage exists in the run). The index is built once and cached in RUN/contamination/, keyed by
the content's hash. The evals checked: the prompting stage's tasks (the query as the model reads it plus the
gold answer) and, with the built-in instruction world, its dev and test prompts (request plus gold answer).

Accuracies are the prompting stage's own per-example results (prompting/per_example.json) at the largest K of
its sweep, and the SFT stage's per-prompt test results (sft/samples.jsonl): split, never rescored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import at_least
from ..data.sources import DataConfig, iter_documents
from ..data.tokens import is_val
from ..errors import GptstackError
from ..evals.contamination import MIN_WORDS, NgramIndex, Overlap, split_accuracy
from ..evals.prompting import example_text, load_task
from ..io import read_json, read_jsonl_loose
from .base import Context, Stage
from .prompting import PER_EXAMPLE, run_tasks


@dataclass
class ContaminationConfig:
    n: int = 13  # words per gram (GPT-3: 13 at most, 8 at least on non-synthetic tasks)
    # Called out in the report when above: a dirty share d can move the full-set accuracy away from the clean
    # subset's by at most d, so 5% bounds what contamination can add to a reported accuracy by 5 points.
    # Fixed before any measurement; never tuned on results.
    call_out: float = 0.05

    def problems(self):
        yield from at_least(self, MIN_WORDS, "n")
        if not 0 <= self.call_out <= 1:
            yield "call_out", f"must be a share in [0, 1], got {self.call_out}"


# ---------------------------------------------------------------- what the run trained on

def pretraining_documents(data: DataConfig, val_fraction: float | None = None):
    """(id, text) of each source's documents outside the val split (`val_fraction`: data.val_fraction; 0: all).
    A source whose documents all fall in val is trained on whole but its tail (the tokenizer stage's fallback):
    all of it counts."""
    fraction = data.val_fraction if val_fraction is None else val_fraction
    for src in data.sources:
        docs = [(d.id, d.text) for d in iter_documents(src, data.skip_bad)]
        train = [d for d in docs if not (fraction and is_val(d[0], fraction))]
        yield from (train or docs)


def _contents(conversation: list[dict]) -> str:
    return "\n".join(m["content"] for m in conversation)


def run_training_documents(run: Path, cfg) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Every training document of the run (pretraining split, SFT demonstrations, RM ranking prompts, PPO
    rollout prompts, each when its stage is in the run) and how many came from each."""
    docs = list(pretraining_documents(cfg.data)) if (run / "pretrain").exists() else []
    counts = {"pretrain": len(docs)}
    if (run / "sft").exists():
        from .sft import sft_data
        sft = [(f"sft/{i}", _contents(c)) for i, c in enumerate(sft_data(cfg.sft).train)]
        docs += sft
        counts["sft"] = len(sft)
    rankings = run / "rm" / "rankings.jsonl"  # the RM trains on these (rankings_val/test only measure it)
    if rankings.is_file():
        rm = [(f"rm/{i}", "\n".join(x for x in (r.get("system"), r.get("prompt")) if isinstance(x, str)))
              for i, r in enumerate(read_jsonl_loose(rankings))]
        docs += rm
        counts["rm"] = len(rm)
    if (run / "ppo").exists():
        from .ppo import prompt_sets
        ppo = [(f"ppo/{i}", _contents(c)) for i, c in enumerate(prompt_sets(cfg)[0].conversations)]
        docs += ppo
        counts["ppo"] = len(ppo)
    if not docs:
        raise GptstackError(f"{run}: no training data to check against (no pretrain, sft, rm or ppo stage in the run)")
    return docs, counts


# ---------------------------------------------------------------- the evals checked

def task_texts(path: Path) -> list[str]:
    """Each query of a prompting task as the model reads it, plus its gold answer."""
    task, data, _ = load_task(path)
    return [example_text(task, rec) for rec in data]


def instruct_prompts(cfg):
    """The instruction world's (dev, test) prompts of the SFT stage, or None when SFT is not on the world."""
    if cfg.sft.data != "world":
        return None
    from .sft import sft_data
    data = sft_data(cfg.sft)
    return data.dev_prompts, data.test_prompts


def figures(overlap: Overlap, correct: dict[int, bool] | None) -> dict:
    out = {"n": len(overlap.dirty), "dirty_share": overlap.dirty_share,
           "too_short_share": sum(overlap.too_short) / max(len(overlap.too_short), 1)}
    if correct is None:
        return out | {"acc_all": None, "acc_clean": None, "acc_dirty": None}
    return out | split_accuracy(correct, overlap)


def run(ctx: Context) -> dict:
    c = ctx.cfg.contamination
    docs, counts = run_training_documents(ctx.run, ctx.cfg)
    ctx.log(f"[contamination] training data: {', '.join(f'{v} {k}' for k, v in counts.items())} documents")
    index = NgramIndex.build(docs, c.n, ctx.folder("contamination"), desc="contamination index")
    result: dict = {"n_gram": c.n, "call_out": c.call_out, "index_ngrams": len(index), "index_key": index.key,
                    "training_documents": counts}
    tasks: dict = {}
    p = ctx.cfg.prompting
    per_example = read_json(ctx.folder("prompting") / PER_EXAMPLE) if (ctx.folder("prompting") / PER_EXAMPLE).is_file() else {}
    if (ctx.run / "prompting").exists():
        shots = f"shots_{max(p.shots)}"
        result["shots"] = max(p.shots)
        for name, path in run_tasks(ctx, p.tasks).items():
            scored = per_example.get(name, {}).get(shots)
            correct = {e["index"]: bool(e["correct"]) for e in scored} if scored is not None else None
            tasks[name] = figures(index.check(task_texts(path)), correct) | {"scored_by": "pretrain"}
    sets = instruct_prompts(ctx.cfg) if (ctx.run / "sft").exists() else None
    if sets is not None:
        dev, test = sets
        tasks["instruct_dev"] = figures(index.check([pr.user + " " + pr.answer for pr in dev]), None)
        samples = read_jsonl_loose(ctx.folder("sft") / "samples.jsonl") if (ctx.folder("sft") / "samples.jsonl").is_file() else []
        if [s["prompt"] for s in samples] != [pr.user for pr in test]:
            samples = []  # not this config's test prompts (or none): the share only
        correct = {i: bool(s["correct"]) for i, s in enumerate(samples)} or None
        tasks["instruct_test"] = figures(index.check([pr.user + " " + pr.answer for pr in test]), correct) | (
            {"scored_by": "sft"} if correct else {})
    for name, r in tasks.items():
        ctx.log(f"[contamination] {name}: {r['dirty_share']:.1%} dirty of {r['n']}"
                + (f"; acc all {r['acc_all']:.3f}, clean {fmt(r['acc_clean'])}, dirty {fmt(r['acc_dirty'])}"
                   if r["acc_all"] is not None else ""))
    # report.json's stable keys: contamination.<task>.{dirty_share, acc_all, acc_clean, acc_dirty, n}
    return {"contamination": {**tasks, "settings": result}}


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(run: Path, r: dict) -> list[str]:
    section = r["contamination"]
    s = section["settings"]
    tasks = {k: v for k, v in section.items() if k != "settings"}
    docs = ", ".join(f"{v} {k}" for k, v in s["training_documents"].items())
    lines = ["## Contamination (GPT-3's n-gram overlap)", "",
             f"An eval example is *dirty* when one of its {s['n_gram']}-grams of normalised words (lower case, no "
             f"punctuation) occurs in the run's training data ({docs} documents: the pretraining split, SFT "
             f"demonstrations, RM and PPO prompts; {s['index_ngrams']:,} distinct {s['n_gram']}-grams). Examples of "
             f"{MIN_WORDS}..{s['n_gram'] - 1} words are dirty when they occur whole; *short*: under {MIN_WORDS} words, "
             "untestable, counted clean. Accuracies are the evals' own per-example results split by that flag: the "
             f"prompting tasks' at K = {s.get('shots', '-')} (the pretrained model, test queries; n scored = the "
             "prompting stage's limit), instruct_test's from the SFT model's test answers. "
             f"Called out (**bold**): a dirty share above {s['call_out']:.0%}, a bound fixed in advance on how far "
             "contamination can move a full-set accuracy from the clean one.", "",
             "| eval | n | dirty | short | scored | acc all | acc clean | acc dirty (n) |", "|---|---|---|---|---|---|---|---|"]
    for name, t in tasks.items():
        flag = t["dirty_share"] > s["call_out"]
        share = f"**{t['dirty_share']:.1%}**" if flag else f"{t['dirty_share']:.1%}"
        scored = f"{t['n_scored']} ({t.get('scored_by', '')})" if t["acc_all"] is not None else "-"
        dirty = f"{fmt(t['acc_dirty'])} ({t['n_dirty_scored']})" if t["acc_all"] is not None else "-"
        lines.append(f"| {name} | {t['n']} | {share} | {t['too_short_share']:.0%} | {scored} | {fmt(t['acc_all'])} | "
                     f"{fmt(t['acc_clean'])} | {dirty} |")
    called = [name for name, t in tasks.items() if t["dirty_share"] > s["call_out"]]
    lines += ["", (f"Above {s['call_out']:.0%} dirty: {', '.join(called)}; read their accuracies on the clean subset."
                   if called else f"No eval is above {s['call_out']:.0%} dirty."), ""]
    return lines


def headline(section: dict) -> str | None:
    s = section["settings"]
    called = [k for k, t in section.items() if k != "settings" and t["dirty_share"] > s["call_out"]]
    return f"contamination: {len(called)} eval(s) over {s['call_out']:.0%} dirty" + (f" ({', '.join(called)})" if called else "")


STAGE = Stage("contamination", run, "13-gram overlap of every eval with the run's training data; clean/dirty accuracy",
              config=ContaminationConfig, depends=("data", "prompting", "sft", "rm", "ppo"), report=markdown,
              all_ranks=False, headline=headline)
