"""Scaling laws: compute counting and the fits behind `gptstack scale` (GPT-4 §3, Kaplan 2020, Hoffmann 2022).

- compute: C = 6·N·D plus the attention term 12·L·d·T per token (PaLM appendix B, as `GPT.flops_per_token`),
  with N counted without embeddings (Kaplan) or with the tied unembedding (what the matmuls really cost).
- `fit_power_law`: L(C) = a·C^b + c, Huber loss on log L, L-BFGS-B from a grid of starts.
- `bootstrap`: the same fit on resampled runs (seeds resampled within each model size when every size has
  several), giving an interval for the prediction at any compute.
- `fit_chinchilla`: L(N, D) = E + A/N^α + B/D^β by Hoffmann et al.'s method (Huber on log L, the
  log-sum-exp form, a grid of starts), and `compute_optimal`, the N and D that minimise it for a budget.
- `fit_capability`: −log(pass rate) = k·C^b, GPT-4's form for HumanEval.

Pure numpy/scipy: no torch, no files. The ladder that produces the points lives in `ladder.py`.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.optimize import minimize

from .errors import GptstackError

ATTENTION_FLOPS = "12·n_layer·n_embd·n_ctx per token (PaLM appendix B; forward + backward of QK^T and AV)"


# ---------------------------------------------------------------- compute

def count_model(model_cfg) -> dict:
    """Parameters and training FLOPs per token of a model config, both ways of counting N."""
    import torch

    from .model import GPT
    with torch.device("meta"):
        m = GPT(model_cfg)
    total, non_emb = m.num_params(), m.num_params(embeddings=False)
    attn = 12 * model_cfg.n_layer * model_cfg.n_embd * model_cfg.n_ctx
    unembed = model_cfg.vocab_size * model_cfg.n_embd  # the tied output matmul is real compute; wpe is a lookup
    return {"params": total, "params_non_embedding": non_emb, "embedding_share": 1 - non_emb / total,
            "flops_per_token_non_embedding": 6 * non_emb + attn,
            "flops_per_token_total": 6 * (non_emb + unembed) + attn,
            "attention_flops_per_token": attn}


# ---------------------------------------------------------------- Huber in log space

def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals and its derivative."""
    a = np.abs(r)
    loss = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    return loss, np.clip(r, -delta, delta)


def _check_points(x, y, what: str, need: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise GptstackError(f"{what}: compute and loss must be equal-length lists")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise GptstackError(f"{what}: every point needs a positive, finite compute and loss")
    if len(np.unique(x)) < need:
        raise GptstackError(f"{what}: needs points at {need} or more distinct compute values, got {len(np.unique(x))}")
    return x, y


# ---------------------------------------------------------------- L(C) = a·C^b + c

def power_law(C, a: float, b: float, c: float):
    return a * np.asarray(C, dtype=np.float64) ** b + c


def fit_power_law(C, L, delta: float = 1e-3, starts=None) -> dict:
    """Fit L(C) = a·C^b + c (b < 0, 0 <= c < min L) minimising Σ Huber_δ(log L̂ − log L).

    C is normalised by its geometric mean inside the fit, so the optimiser sees numbers near 1;
    the returned a is for C in its own units. `starts`: (b, c/min L) pairs to start L-BFGS-B from."""
    C, L = _check_points(C, L, "power-law fit", 3)
    c0 = float(np.exp(np.log(C).mean()))
    x, logL = np.log(C / c0), np.log(L)
    cmax = float(L.min()) * (1 - 1e-9)

    def objective(p):
        la, b, c = p
        t = np.exp(la + b * x)
        pred = t + c
        r = np.log(pred) - logL
        h, dh = _huber(r, delta)
        g = np.array([np.sum(dh * t / pred), np.sum(dh * t * x / pred), np.sum(dh / pred)])
        return float(h.sum()), g

    best = None
    grid = starts if starts is not None else itertools.product((-0.03, -0.1, -0.3, -0.7, -1.5), (0.0, 0.4, 0.7, 0.9))
    for b0, cf in grid:
        c_init = cf * cmax
        la0 = float(np.log(max(np.exp(np.mean(np.log(np.maximum(L - c_init, 1e-12)) - b0 * x)), 1e-12)))
        res = minimize(objective, np.array([la0, b0, c_init]), jac=True, method="L-BFGS-B",
                       bounds=[(-50, 50), (-5.0, 0.0), (0.0, cmax)], options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
        if best is None or res.fun < best.fun:
            best = res
    la, b, c = best.x
    a = float(np.exp(la) * c0 ** (-b))
    return {"a": a, "b": float(b), "c": float(c), "objective": float(best.fun), "points": int(len(C)),
            "delta": delta, "c_scale": c0}


def bootstrap(C, L, groups=None, n: int = 200, seed: int = 0, delta: float = 1e-3) -> list[dict]:
    """Fits of L(C) on `n` resamples of the points. With `groups` (one id per point, e.g. the model size)
    and every group holding two or more points, points are resampled within each group (so every size
    stays in, and the spread is the seed-to-seed one); otherwise points are resampled as a whole."""
    C, L = _check_points(C, L, "bootstrap", 3)
    rng = np.random.default_rng(seed)
    ids = np.asarray(groups if groups is not None else np.arange(len(C)))
    members = [np.flatnonzero(ids == g) for g in np.unique(ids)]
    stratified = groups is not None and all(len(m) >= 2 for m in members)
    full = fit_power_law(C, L, delta)
    start = [(full["b"], full["c"] / (L.min() * (1 - 1e-9)))]
    fits = []
    for _ in range(n * 3):
        if len(fits) >= n:
            break
        if stratified:
            idx = np.concatenate([rng.choice(m, size=len(m)) for m in members])
        else:
            idx = rng.choice(len(C), size=len(C))
        if len(np.unique(C[idx])) < 3:
            continue  # a resample that cannot determine three constants
        starts = start + [(-0.1, 0.5), (-0.4, 0.0), (-0.05, 0.9)]
        fits.append(fit_power_law(C[idx], L[idx], delta, starts=starts))
    return fits


def predict(fit: dict, boot: list[dict], compute: float, level: float = 0.9) -> dict:
    """The fit's loss at `compute`, with the central `level` interval of the bootstrap fits' losses there."""
    if compute <= 0 or not math.isfinite(compute):
        raise GptstackError(f"compute must be a positive number of FLOPs, got {compute}")
    value = float(power_law(compute, fit["a"], fit["b"], fit["c"]))
    out = {"compute": float(compute), "loss": value, "interval": [value, value], "level": level, "bootstrap": len(boot)}
    if boot:
        vals = np.array([power_law(compute, f["a"], f["b"], f["c"]) for f in boot])
        lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
        out["interval"] = [float(lo), float(hi)]
    return out


# ---------------------------------------------------------------- Chinchilla: L(N, D) = E + A/N^α + B/D^β

def chinchilla_loss(N, D, p: dict):
    N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def fit_chinchilla(N, D, L, delta: float = 1e-3, starts: int = 12) -> dict:
    """Hoffmann et al. (2022) approach 3: minimise Σ Huber_δ(LSE(a − α log N, b − β log D, e) − log L)
    over a grid of starts with L-BFGS; A = e^a, B = e^b, E = e^e. N and D are scaled by their geometric
    means inside the fit (conditioning only)."""
    N, L = _check_points(N, L, "Chinchilla fit", 2)
    D = np.asarray(D, dtype=np.float64)
    if D.shape != N.shape or not np.all(D > 0):
        raise GptstackError("Chinchilla fit: D must be positive and as long as N")
    if len(np.unique(D / N)) < 2:
        raise GptstackError("Chinchilla fit: every point has the same tokens per parameter, so A/N^α and B/D^β "
                            "cannot be told apart; add runs with other token counts (scale.chinchilla_tokens_per_param)")
    n0, d0 = float(np.exp(np.log(N).mean())), float(np.exp(np.log(D).mean()))
    lN, lD, logL = np.log(N / n0), np.log(D / d0), np.log(L)

    def objective(p):
        a, b, e, al, be = p
        z = np.stack([a - al * lN, b - be * lD, np.full_like(lN, e)])
        m = z.max(0)
        w = np.exp(z - m)
        s = w.sum(0)
        r = m + np.log(s) - logL
        h, dh = _huber(r, delta)
        sm = w / s  # softmax weights: d LSE / d z
        g = np.array([np.sum(dh * sm[0]), np.sum(dh * sm[1]), np.sum(dh * sm[2]),
                      np.sum(dh * sm[0] * -lN), np.sum(dh * sm[1] * -lD)])
        return float(h.sum()), g

    lmin = float(np.log(L.min()))
    # a coarse grid of starts (Hoffmann et al. optimise from every point of theirs); L-BFGS from the best few
    grid = [np.array([lmin + a, lmin + b, lmin + np.log(ef), al, be]) for al, be, ef, a, b in itertools.product(
        (0.1, 0.25, 0.5, 1.0, 2.0), (0.1, 0.25, 0.5, 1.0, 2.0), (0.2, 0.5, 0.8, 0.95), (-4.0, -2.0, -1.0, 0.0, 1.0),
        (-4.0, -2.0, -1.0, 0.0, 1.0))]
    scored = sorted(grid, key=lambda x0: objective(x0)[0])
    best = None
    for x0 in scored[:starts]:
        res = minimize(objective, x0, jac=True, method="L-BFGS-B",
                       bounds=[(-30, 30), (-30, 30), (-30, lmin), (0.0, 3.0), (0.0, 3.0)],
                       options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12})
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, al, be = best.x
    return {"E": float(np.exp(e)), "A": float(np.exp(a) * n0 ** al), "B": float(np.exp(b) * d0 ** be),
            "alpha": float(al), "beta": float(be), "objective": float(best.fun), "points": int(len(N)), "delta": delta}


def compute_optimal(p: dict, compute: float) -> dict:
    """The N and D minimising L(N, D) under C = 6·N·D (Hoffmann et al. eq. 4):
    N_opt = G·(C/6)^(β/(α+β)), D_opt = (C/6)/N_opt, G = (αA / (βB))^(1/(α+β))."""
    if compute <= 0:
        raise GptstackError(f"compute must be positive, got {compute}")
    al, be = p["alpha"], p["beta"]
    if al <= 0 or be <= 0:
        raise GptstackError(f"Chinchilla fit has α = {al:.3g}, β = {be:.3g}: no finite compute-optimal size")
    G = (al * p["A"] / (be * p["B"])) ** (1 / (al + be))
    n = G * (compute / 6) ** (be / (al + be))
    d = compute / 6 / n
    return {"compute": float(compute), "params": float(n), "tokens": float(d), "tokens_per_param": float(d / n),
            "loss": float(chinchilla_loss(n, d, p))}


# ---------------------------------------------------------------- capability: −log(pass rate) = k·C^b

def fit_capability(C, passed, n) -> dict:
    """GPT-4's capability law: −log(pass rate) = k·C^b, a straight line in log-log, fitted by least squares.
    A pass rate of 0 (or 1) is smoothed to (passed + 0.5)/(n + 1) so its log stays finite."""
    C = np.asarray(C, dtype=np.float64)
    passed, n = np.asarray(passed, dtype=np.float64), np.asarray(n, dtype=np.float64)
    if len(np.unique(C)) < 2:
        raise GptstackError("capability fit: needs points at 2 or more distinct compute values")
    rate = (passed + 0.5) / (n + 1)
    y = -np.log(rate)
    b, lk = np.polyfit(np.log(C), np.log(y), 1)
    return {"k": float(np.exp(lk)), "b": float(b), "points": int(len(C))}


def capability_pass_rate(p: dict, compute: float) -> float:
    return float(np.exp(-p["k"] * compute ** p["b"]))
