"""The scale stage and `gptstack scale` (GPT-4's predictable scaling): plan a ladder of small models, train it, fit L(C), predict the big run before it trains.

    RUN/scale/
      tokenizer.json            the ladder's own BPE (scale.vocab_size; small, so embeddings don't dominate)
      capability.jsonl          the identifier-completion queries (evals/capability.py)
      rungs/NAME/               one run folder per rung (the tokenizer, pretrain and eval stages): config.yaml, pretrain/, eval/, report.json
      rungs/NAME/rung.json      the rung's record (sizes, tokens, compute both ways, val loss, pass rate); written
                                last, so a rung with it is finished and `run` skips it
      prediction.json           the target's predicted loss, written *before* the target trains
      fit.json                  the fit and its bootstrap fits (what `scale predict` reads)
      summary.json              {"scale": ...}: the report.json section
    RUN/plots/scaling.png

Rungs: `fit` (the ladder: scale.seeds runs of every size at scale.tokens_per_param), `chinchilla` (the smallest
sizes at other token counts, one seed: L(N, D) needs D to vary apart from N) and `target` (the big run).
"""
from __future__ import annotations

import copy
import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .. import scaling
from ..checkpoint import load_model
from ..config import at_least, preset_dict
from ..data.loader import build_sampler
from ..errors import GptstackError
from ..evals.capability import identifier_queries, pass_rate
from ..io import atomic_write_json, atomic_write_text, iter_jsonl, read_json
from ..model import ModelConfig
from ..tokenizer import Tokenizer
from .base import Context, RunConfig, Stage, run_stages
from .scale_report import markdown, plot_scaling
from .tokenizer import train_tokenizer

Compute = Literal["non_embedding", "total"]
COMPUTE_KINDS = typing.get_args(Compute)
MIN_FIT_SIZES = 3  # a fit of three constants needs three compute values


@dataclass
class ScaleRung:
    """One model size of a scaling ladder: explicit n_layer x n_embd, or a preset's shape."""
    n_layer: int = 0
    n_embd: int = 0
    preset: str = ""


@dataclass
class ScaleConfig:
    """The scaling ladder (`gptstack scale`, the `scale` stage; see below). Every rung is a normal
    pretrain run on `data` with the pretrain recipe below, in its own run folder under RUN/scale/rungs/."""
    vocab_size: int = 1024  # the ladder's own tokenizer: a small vocabulary keeps embeddings from dominating
    n_ctx: int = 128
    n_head: int = 4  # heads of every rung (0: n_embd / head_dim)
    head_dim: int = 16
    # one shape family (2 layers, growing width): rungs of mixed depth and width scatter around L(C)
    rungs: list[ScaleRung] = field(default_factory=lambda: [ScaleRung(2, w) for w in (40, 44, 48, 52, 56, 60, 64)])
    widths: list[int] = field(default_factory=list)  # instead of rungs: n_layer = max(min_layers, round(width / aspect))
    aspect: float = 24.0
    min_layers: int = 2
    target: ScaleRung = field(default_factory=lambda: ScaleRung(2, 128))  # the big run, predicted before it trains
    tokens_per_param: float = 40.0  # D = tokens_per_param x N, N without embeddings
    seeds: int = 2  # runs per fitted rung (the target runs once)
    compute: Compute = "non_embedding"  # the C the fit uses: non_embedding (Kaplan) | total (with the tied unembedding)
    max_compute_ratio: float = 0.1  # every fitted rung has at most this share of the target's compute
    chinchilla_tokens_per_param: list[float] = field(default_factory=lambda: [10.0, 80.0])  # extra runs for L(N, D)
    chinchilla_rungs: int = 2  # ... of this many of the smallest rungs, one seed each
    fit_below_bigram: bool = True  # fit only sizes whose val loss beats the count-based bigram model
    batch_size: int = 16
    lr: float = 3.0e-3
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    huber_delta: float = 1.0e-3
    bootstrap: int = 200
    interval: float = 0.9  # central bootstrap interval of the prediction
    capability_queries: int = 500  # identifier-completion queries from held-out code (the capability law)

    def problems(self):
        yield from at_least(self, 1, "vocab_size", "n_ctx", "head_dim", "min_layers", "seeds", "batch_size", "capability_queries")
        yield from at_least(self, 0, "n_head", "chinchilla_rungs", "bootstrap", "huber_delta", "warmup_fraction", "min_lr_ratio")
        for name in ("aspect", "tokens_per_param", "max_compute_ratio", "lr"):
            if not getattr(self, name) > 0:
                yield name, f"must be > 0, got {getattr(self, name)}"
        if not 0 < self.interval < 1:
            yield "interval", f"must be in (0, 1), got {self.interval}"




@dataclass
class Rung:
    name: str
    role: str  # fit | chinchilla | target
    size: str  # e.g. L2-d48: the model shape, shared by a size's seeds
    n_layer: int
    n_embd: int
    n_head: int
    seed: int
    tokens_per_param: float
    steps: int
    tokens: int
    counts: dict

    def compute(self, kind: str) -> float:
        return self.counts[f"flops_per_token_{kind}"] * self.tokens


# ---------------------------------------------------------------- plan

def _shapes(cfg: RunConfig) -> list[tuple[int, int]]:
    sc = cfg.scale
    if sc.widths:
        return [(max(sc.min_layers, round(w / sc.aspect)), w) for w in sc.widths]
    return [_shape(r, "scale.rungs") for r in sc.rungs]


def _shape(r, where: str) -> tuple[int, int]:
    if r.preset:
        m = preset_dict(r.preset).get("model", {})
        return int(m.get("n_layer", ModelConfig.n_layer)), int(m.get("n_embd", ModelConfig.n_embd))
    if r.n_layer < 1 or r.n_embd < 1:
        raise GptstackError(f"config '{where}': a rung needs n_layer and n_embd (or a preset), got {r}")
    return r.n_layer, r.n_embd


def model_config(cfg: RunConfig, n_layer: int, n_embd: int, vocab_size: int | None = None) -> ModelConfig:
    sc = cfg.scale
    n_head = sc.n_head or n_embd // sc.head_dim
    if n_head < 1 or n_embd % n_head or (not sc.n_head and n_embd % sc.head_dim):
        raise GptstackError(f"scale ladder: n_embd {n_embd} does not split into "
                            + (f"scale.n_head = {sc.n_head} heads" if sc.n_head else f"heads of scale.head_dim = {sc.head_dim}"))
    return ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_ctx=sc.n_ctx,
                       vocab_size=vocab_size or sc.vocab_size, norm_position=cfg.model.norm_position,
                       dropout=0.0, bias=cfg.model.bias, init_std=cfg.model.init_std)


def _rung(cfg, role, n_layer, n_embd, seed, tpp, vocab) -> Rung:
    sc = cfg.scale
    mc = model_config(cfg, n_layer, n_embd, vocab)
    counts = scaling.count_model(mc)
    per_step = sc.batch_size * sc.n_ctx
    steps = max(1, round(tpp * counts["params_non_embedding"] / per_step))
    size = f"L{n_layer}-d{n_embd}"
    return Rung(f"{size}-tpp{tpp:g}-s{seed}", role, size, n_layer, n_embd, mc.n_head, seed, tpp, steps,
                steps * per_step, counts)


def plan(cfg: RunConfig, vocab: int | None = None) -> list[Rung]:
    """Every run of the ladder, cheapest first, the target last. Checks the ladder's promise: every fitted
    rung has at most scale.max_compute_ratio of the target's compute."""
    sc = cfg.scale
    shapes = sorted(set(_shapes(cfg)), key=lambda s: scaling.count_model(model_config(cfg, *s, vocab))["params_non_embedding"])
    if len(shapes) < MIN_FIT_SIZES:
        raise GptstackError(f"config 'scale.rungs': the fit needs at least {MIN_FIT_SIZES} model sizes, got {len(shapes)}")
    seed0 = cfg.pretrain.seed
    rungs = [_rung(cfg, "fit", L, d, seed0 + s, sc.tokens_per_param, vocab) for L, d in shapes for s in range(sc.seeds)]
    rungs += [_rung(cfg, "chinchilla", L, d, seed0, t, vocab) for L, d in shapes[:sc.chinchilla_rungs]
              for t in sc.chinchilla_tokens_per_param if t != sc.tokens_per_param]
    target = _rung(cfg, "target", *_shape(sc.target, "scale.target"), seed0, sc.tokens_per_param, vocab)
    for r in rungs:
        if r.role == "fit" and r.compute(sc.compute) > sc.max_compute_ratio * target.compute(sc.compute):
            raise GptstackError(
                f"scale ladder: rung {r.name} has {r.compute(sc.compute) / target.compute(sc.compute):.3f} of the target's "
                f"compute, more than scale.max_compute_ratio = {sc.max_compute_ratio}; use smaller rungs or a larger target")
    rungs.sort(key=lambda r: r.compute("total"))
    return rungs + [target]


def plan_table(rungs: list[Rung], kind: str) -> str:
    target = rungs[-1]
    head = (f"{'rung':<22}{'role':<11}{'N':>9}{'N no emb':>10}{'emb %':>7}{'tokens':>11}{'steps':>7}"
            f"{'C no emb':>11}{'C total':>11}{'C/target':>10}")
    lines = [head]
    for r in rungs:
        c = r.counts
        lines.append(f"{r.name:<22}{r.role:<11}{c['params']:>9,}{c['params_non_embedding']:>10,}"
                     f"{100 * c['embedding_share']:>6.0f}%{r.tokens:>11,}{r.steps:>7,}{r.compute('non_embedding'):>11.3g}"
                     f"{r.compute('total'):>11.3g}{r.compute(kind) / target.compute(kind):>10.4f}")
    total = sum(r.compute("total") for r in rungs)
    lines.append(f"{len(rungs)} runs, {total:.3g} FLOPs in all (C total), the target {target.compute('total') / total:.0%} of it. "
                 f"C = 6·N·D + attention ({scaling.ATTENTION_FLOPS}); 'no emb': N without the embeddings "
                 f"(Kaplan), 'total': with the tied unembedding; the fit uses C {kind}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- run

def rung_config(cfg: RunConfig, r: Rung, vocab: int) -> RunConfig:
    sc = cfg.scale
    rc = copy.deepcopy(cfg)
    rc.model = model_config(cfg, r.n_layer, r.n_embd, vocab)
    rc.tokenizer.vocab_size = vocab
    p = rc.pretrain
    p.steps, p.batch_size, p.seq_len, p.lr, p.seed = r.steps, sc.batch_size, 0, sc.lr, r.seed
    p.warmup_steps, p.min_lr_ratio, p.schedule = round(sc.warmup_fraction * r.steps), sc.min_lr_ratio, "cosine"
    p.eval_every, p.ckpt_every, p.log_every = 0, max(50, r.steps // 4), max(10, r.steps // 100)
    return rc


def _tokenizer(cfg: RunConfig, folder: Path, log):
    if not (folder / "tokenizer.json").is_file():
        tc = copy.deepcopy(cfg)
        tc.tokenizer.vocab_size = cfg.scale.vocab_size
        log(f"[scale] tokenizer: vocabulary {cfg.scale.vocab_size}")
        train_tokenizer(tc, folder)
    return Tokenizer.load(folder / "tokenizer.json")


def _queries(cfg: RunConfig, folder: Path) -> list[dict]:
    path = folder / "capability.jsonl"
    if not path.is_file():
        qs = identifier_queries(cfg.data, cfg.scale.capability_queries, seed=cfg.pretrain.seed)
        atomic_write_text(path, "".join(json.dumps(q) + "\n" for q in qs))
    return [q for _, q in iter_jsonl(path)]


def train_rung(cfg: RunConfig, folder: Path, r: Rung, tok, queries, log=print) -> dict:
    """One rung = one normal pipeline run (tokenizer given, pretrain, eval) in folder/rungs/NAME, then its
    pass rate; rung.json is written last, so a finished rung is skipped."""
    rdir = folder / "rungs" / r.name
    if (rdir / "rung.json").is_file():
        return read_json(rdir / "rung.json")
    rdir.mkdir(parents=True, exist_ok=True)
    if not (rdir / "tokenizer.json").is_file():
        tok.save(rdir / "tokenizer.json")
    t0 = time.time()
    log(f"[scale] {r.role} rung {r.name}: N {r.counts['params_non_embedding']:,} (+{r.counts['params'] - r.counts['params_non_embedding']:,} "
        f"embedding), {r.tokens:,} tokens, {r.steps:,} steps")
    rc = rung_config(cfg, r, tok.vocab_size)
    rc.save(rdir / "config.yaml")
    report = run_stages(Context(rdir, rc, log=lambda *a, **k: None), ["tokenizer", "pretrain", "eval"])
    atomic_write_json(rdir / "report.json", report)
    p = report["pretrain"]
    cap = pass_rate(load_model(rdir / "pretrain", "auto"), tok, queries)
    rec = {"name": r.name, "role": r.role, "size": r.size, "n_layer": r.n_layer, "n_embd": r.n_embd, "n_head": r.n_head,
           "seed": r.seed, "params": r.counts["params"], "params_non_embedding": r.counts["params_non_embedding"],
           "tokens": r.tokens, "tokens_per_param": r.tokens_per_param,
           "compute": {k: r.compute(k) for k in COMPUTE_KINDS}, "val_loss": p["val_loss"],
           "unigram_val_loss": p["unigram_val_loss"], "final_train_loss": p["final_train_loss"],
           "epochs": p["mixture"][0]["epochs"] if len(p.get("mixture", [])) == 1 else None,
           "capability": cap, "seconds": time.time() - t0}
    atomic_write_json(rdir / "rung.json", rec)
    log(f"[scale]   val loss {rec['val_loss']:.4f}, pass rate {cap['pass_rate']:.3f}, {rec['seconds']:.0f} s")
    return rec


def run_ladder(cfg: RunConfig, folder: Path, log=print, target: bool = True) -> list[dict]:
    """Train every rung (finished ones skipped); before the target trains, write prediction.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(cfg, folder, log)
    queries = _queries(cfg, folder)
    bigram_loss(cfg, tok, folder)
    rungs = plan(cfg, tok.vocab_size)
    log(plan_table(rungs, cfg.scale.compute))
    recs = []
    for r in rungs:
        if r.role == "target":
            if not target:
                break
            if not (folder / "prediction.json").is_file():
                pre = fit_ladder(cfg, folder, recs, rungs[-1])
                atomic_write_json(folder / "prediction.json", {**pre["prediction"], "written": time.time(),
                                                                "trained_rungs": len(recs)})
                log(f"[scale] predicted before training {r.name}: loss {pre['prediction']['loss']:.4f} "
                    f"({cfg.scale.interval:.0%} interval {pre['prediction']['interval'][0]:.4f}-{pre['prediction']['interval'][1]:.4f})")
        recs.append(train_rung(cfg, folder, r, tok, queries, log))
    return recs


def records(folder: Path) -> list[dict]:
    return sorted((read_json(p) for p in Path(folder).glob("rungs/*/rung.json")), key=lambda r: r["compute"]["total"])


# ---------------------------------------------------------------- fit

def _fit(recs: list[dict], kind: str, sc, n_boot: int | None = None) -> tuple[dict, list[dict]]:
    C = [r["compute"][kind] for r in recs]
    L = [r["val_loss"] for r in recs]
    fit = scaling.fit_power_law(C, L, sc.huber_delta)
    boot = scaling.bootstrap(C, L, [r["size"] for r in recs], n=sc.bootstrap if n_boot is None else n_boot,
                             seed=0, delta=sc.huber_delta)
    return fit, boot


def _sizes(recs: list[dict], kind: str) -> list[tuple[str, float, float]]:
    """(size, mean compute, mean val loss) per model size, cheapest first."""
    by: dict[str, list] = {}
    for r in recs:
        by.setdefault(r["size"], []).append(r)
    rows = [(s, float(np.mean([r["compute"][kind] for r in rs])), float(np.mean([r["val_loss"] for r in rs]))) for s, rs in by.items()]
    return sorted(rows, key=lambda t: t[1])


def fitted(cfg: RunConfig, folder: Path, recs: list[dict]) -> tuple[list[dict], list[str]]:
    """The `fit` rungs the law is fitted on, and the sizes left out because they have not left the bigram regime
    (mean val loss not below the count-based bigram model's; scale.fit_below_bigram)."""
    recs = [r for r in recs if r["role"] == "fit"]
    bigram = read_json(folder / "bigram.json")["bigram_val_loss"] if (folder / "bigram.json").is_file() else None
    if not cfg.scale.fit_below_bigram or bigram is None:
        return recs, []
    out = [s for s, _, loss in _sizes(recs, cfg.scale.compute) if loss >= bigram]
    return [r for r in recs if r["size"] not in out], out


def fit_ladder(cfg: RunConfig, folder: Path, recs: list[dict] | None = None, target: Rung | None = None) -> dict:
    """The L(C) fit on the finished `fit` rungs and the target's predicted loss; writes fit.json."""
    sc = cfg.scale
    recs, excluded = fitted(cfg, folder, records(folder) if recs is None else recs)
    if len({r["size"] for r in recs}) < MIN_FIT_SIZES:
        raise GptstackError(f"{folder}: {len({r['size'] for r in recs})} model size(s) of the ladder finished"
                            + (f" past the bigram regime ({', '.join(excluded)} not)" if excluded else "")
                            + f"; the fit needs {MIN_FIT_SIZES} (run `gptstack scale run` first)")
    if target is None:
        vocab = read_json(folder / "tokenizer" / "summary.json")["tokenizer"]["vocab_size"] if (folder / "tokenizer" / "summary.json").is_file() else None
        target = plan(cfg, vocab)[-1]
    fit, boot = _fit(recs, sc.compute, sc)
    pred = scaling.predict(fit, boot, target.compute(sc.compute), sc.interval)
    out = {"compute_definition": sc.compute, "fit": fit, "bootstrap": [{k: f[k] for k in "abc"} for f in boot],
           "prediction": {**pred, "target": target.name}, "fitted_runs": len(recs), "excluded_sizes": excluded}
    atomic_write_json(folder / "fit.json", out)
    return out


def predict_compute(folder: Path, compute: float) -> dict:
    path = Path(folder) / "fit.json"
    if not path.is_file():
        raise GptstackError(f"{path}: no fit yet; run `gptstack scale fit` (or `scale run`) first")
    f = read_json(path)
    level = f["prediction"].get("level", 0.9)
    out = {**scaling.predict(f["fit"], f["bootstrap"], compute, level), "compute_definition": f["compute_definition"]}
    if f.get("chinchilla"):  # from `scale fit`: the compute-optimal N, D for this budget (C = 6·N·D)
        out["chinchilla_compute_optimal"] = scaling.compute_optimal(f["chinchilla"], compute)
    return out


def bigram_loss(cfg: RunConfig, tok, folder: Path) -> float:
    """Cross-entropy of val under the train bigram counts (add-0.1): the regime the rungs must leave.
    Cached in folder/bigram.json."""
    path = Path(folder) / "bigram.json"
    if path.is_file():
        return read_json(path)["bigram_val_loss"]
    s = build_sampler(cfg.data, tok, 8, 0).splits[0]
    V = tok.vocab_size
    tr, va = np.asarray(s.train, dtype=np.int64), np.asarray(s.val, dtype=np.int64)
    counts = np.bincount(tr[:-1] * V + tr[1:], minlength=V * V).reshape(V, V).astype(np.float64) + 0.1
    logp = np.log(counts / counts.sum(1, keepdims=True))
    loss = float(-logp[va[:-1], va[1:]].mean())
    atomic_write_json(path, {"bigram_val_loss": loss, "smoothing": 0.1})
    return loss


def analyze(cfg: RunConfig, run: Path, log=print) -> dict:
    """report.json's `scale` section from the finished rungs; writes RUN/scale/summary.json and plots/scaling.png."""
    sc = cfg.scale
    folder = Path(run) / "scale"
    tok = Tokenizer.load(folder / "tokenizer.json")
    all_recs = records(folder)
    bigram = bigram_loss(cfg, tok, folder)
    fit_recs, excluded = fitted(cfg, folder, all_recs)
    target = plan(cfg, tok.vocab_size)[-1]
    done = [r for r in all_recs if r["role"] == "target"]
    kind = sc.compute
    f = fit_ladder(cfg, folder, fit_recs, target)
    pre = read_json(folder / "prediction.json") if (folder / "prediction.json").is_file() else f["prediction"]
    c_fit_max = max(r["compute"][kind] for r in fit_recs)
    out = {"compute_definition": f"C = 6·N·D + attention ({scaling.ATTENTION_FLOPS}); the fit uses N "
                                  + ("without embeddings" if kind == "non_embedding" else "with the tied unembedding"),
           "compute": kind, "fit": {k: f["fit"][k] for k in "abc"}, "predicted_loss": pre["loss"],
           "predicted_interval": pre["interval"], "interval_level": sc.interval,
           "predicted_before_training": (folder / "prediction.json").is_file(),
           "target": {"name": target.name, "params": target.counts["params"],
                      "params_non_embedding": target.counts["params_non_embedding"], "tokens": target.tokens,
                      "compute": {k: target.compute(k) for k in COMPUTE_KINDS}},
           "compute_ratio": target.compute(kind) / c_fit_max,
           "compute_ratio_other": target.compute(_other(kind)) / max(r["compute"][_other(kind)] for r in fit_recs),
           "bigram_val_loss": bigram, "fitted_runs": len(fit_recs), "excluded_sizes": excluded,
           "ladder_seconds": sum(r["seconds"] for r in all_recs)}
    if done:
        actual = done[0]["val_loss"]
        out.update(actual_loss=actual, relative_error=(pre["loss"] - actual) / actual)
    # the same prediction with the other way of counting compute
    fo, bo = _fit(fit_recs, _other(kind), sc, n_boot=min(sc.bootstrap, 100))
    po = scaling.predict(fo, bo, target.compute(_other(kind)), sc.interval)
    out["other_compute"] = {"compute": _other(kind), "fit": {k: fo[k] for k in "abc"}, "predicted_loss": po["loss"],
                            "predicted_interval": po["interval"]}
    if done:
        out["other_compute"]["relative_error"] = (po["loss"] - done[0]["val_loss"]) / done[0]["val_loss"]
    out["extrapolation"] = extrapolation(fit_recs, done[0] if done else None, kind, sc)
    out["rungs"] = [{k: r[k] for k in ("name", "role", "size", "params", "params_non_embedding", "tokens", "compute",
                                       "val_loss", "epochs", "seconds")} | {"pass_rate": r["capability"]["pass_rate"]}
                    for r in all_recs]
    out["chinchilla"] = _chinchilla(all_recs, target, done, sc)
    if "fit" in out["chinchilla"] and min(out["chinchilla"]["fit"]["alpha"], out["chinchilla"]["fit"]["beta"]) > 0:
        atomic_write_json(folder / "fit.json", {**read_json(folder / "fit.json"), "chinchilla": out["chinchilla"]["fit"]})
    out["capability"] = _capability(fit_recs, target, done, kind)
    if done:  # the stage's "finished" marker: only once the target has trained
        atomic_write_json(folder / "summary.json", {"scale": out})
    plot_scaling(Path(run), out, all_recs, f, kind, {r["name"] for r in fit_recs})
    return {"scale": out}


def _other(kind: str) -> str:
    return "total" if kind == "non_embedding" else "non_embedding"


def extrapolation(fit_recs, target_rec, kind, sc) -> list[dict]:
    """Leave-one-out along the ladder: each model size (and the target) predicted from the sizes below it,
    and the target predicted from ever shorter ladders; the error against the extrapolation distance."""
    sizes = _sizes(fit_recs, kind)
    out = []

    def one(upto, name, compute, actual):
        use = [r for r in fit_recs if r["size"] in {s for s, _, _ in sizes[:upto]}]
        fit, _ = _fit(use, kind, sc, n_boot=0)
        pred = float(scaling.power_law(compute, fit["a"], fit["b"], fit["c"]))
        out.append({"predicted": name, "fitted_sizes": upto, "distance": compute / sizes[upto - 1][1],
                    "predicted_loss": pred, "actual_loss": actual, "relative_error": (pred - actual) / actual})

    for k in range(MIN_FIT_SIZES, len(sizes)):  # the next size up from the sizes below it
        one(k, sizes[k][0], sizes[k][1], sizes[k][2])
    if target_rec:
        for k in range(MIN_FIT_SIZES, len(sizes) + 1):
            one(k, target_rec["size"], target_rec["compute"][kind], target_rec["val_loss"])
    return sorted(out, key=lambda e: e["distance"])


def _chinchilla(recs, target: Rung, done, sc) -> dict:
    use = [r for r in recs if r["role"] in ("fit", "chinchilla")]
    N = [r["params_non_embedding"] for r in use]
    D = [r["tokens"] for r in use]
    try:
        p = scaling.fit_chinchilla(N, D, [r["val_loss"] for r in use], sc.huber_delta)
    except GptstackError as e:
        return {"error": str(e)}
    n_t, d_t = target.counts["params_non_embedding"], target.tokens
    out = {"fit": {k: p[k] for k in ("E", "A", "B", "alpha", "beta")}, "points": p["points"],
           "predicted_loss": float(scaling.chinchilla_loss(n_t, d_t, p)),
           "compute_optimal": scaling.compute_optimal(p, 6 * n_t * d_t) if p["alpha"] > 0 and p["beta"] > 0 else None,
           "note": "N without embeddings; the budget is C = 6·N·D at the target's N and D"}
    if done:
        out["relative_error"] = (out["predicted_loss"] - done[0]["val_loss"]) / done[0]["val_loss"]
    return out


def _capability(fit_recs, target: Rung, done, kind) -> dict:
    caps = [r["capability"] for r in fit_recs]
    try:
        p = scaling.fit_capability([r["compute"][kind] for r in fit_recs], [c["passed"] for c in caps], [c["n"] for c in caps])
    except GptstackError as e:
        return {"error": str(e)}
    out = {"task": "identifier completion (greedy) on held-out code", "law": "-log(pass rate) = k·C^b",
           "fit": {"k": p["k"], "b": p["b"]}, "n": caps[0]["n"],
           "predicted_pass_rate": scaling.capability_pass_rate(p, target.compute(kind))}
    if done:
        out["actual_pass_rate"] = done[0]["capability"]["pass_rate"]
    return out


def run(ctx: Context) -> dict:
    """The whole ladder, the prediction before the target, the comparison."""
    from ..train.distributed import dist_env
    if dist_env()[1] > 1:
        raise GptstackError("the scale stage runs in one process (its rungs are small); start it without torchrun")
    run_ladder(ctx.cfg, ctx.folder("scale"), ctx.log)
    return analyze(ctx.cfg, ctx.run, ctx.log)


# a ladder of pretrain runs (~30 CPU minutes): only when --stages names it, never by "all"
STAGE = Stage("scale", run, "predictable scaling: a ladder of small runs, L(C) fitted, the big run predicted",
              config=ScaleConfig, depends=("data",), report=lambda run, r: markdown(run, r["scale"]), default=False,
              named_only=True)
