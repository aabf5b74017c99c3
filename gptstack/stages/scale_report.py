"""The scale stage's figure (plots/scaling.png) and its report.md section; the numbers come from scale.analyze
(split from stages/scale.py, which holds the ladder itself)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import plots, scaling


def plot_scaling(run: Path, s: dict, recs: list[dict], f: dict, kind: str, used: set) -> Path:
    fig, (ax, bx) = plots.subplots(1, 2, figsize=(12, 4.6))
    fit_recs = [r for r in recs if r["name"] in used]
    out_recs = [r for r in recs if r["role"] == "fit" and r["name"] not in used]
    ch = [r for r in recs if r["role"] == "chinchilla"]
    ax.scatter([r["compute"][kind] for r in fit_recs], [r["val_loss"] for r in fit_recs], s=18, c="C0", label="ladder runs (fitted)")
    if out_recs:
        ax.scatter([r["compute"][kind] for r in out_recs], [r["val_loss"] for r in out_recs], s=18, facecolors="none",
                   edgecolors="C0", label="ladder runs in the bigram regime (not fitted)")
    if ch:
        ax.scatter([r["compute"][kind] for r in ch], [r["val_loss"] for r in ch], s=14, marker="x", c="C2",
                   label="other tokens/param (Chinchilla fit only)")
    t = s["target"]["compute"][kind]
    cmin = min(r["compute"][kind] for r in recs)
    xs = np.logspace(math.log10(cmin / 1.5), math.log10(t * 2), 200)
    a, b, c = (f["fit"][k] for k in "abc")
    ax.plot(xs, scaling.power_law(xs, a, b, c), c="C0", lw=1.2, label=f"L(C) = {a:.3g}·C^{b:.3f} + {c:.3f}")
    boot = f.get("bootstrap", [])
    if boot:
        band = np.array([scaling.power_law(xs, q["a"], q["b"], q["c"]) for q in boot])
        lvl = s["interval_level"]
        ax.fill_between(xs, np.quantile(band, (1 - lvl) / 2, 0), np.quantile(band, (1 + lvl) / 2, 0), color="C0", alpha=0.15)
    lo, hi = s["predicted_interval"]
    ax.errorbar([t], [s["predicted_loss"]], yerr=[[s["predicted_loss"] - lo], [hi - s["predicted_loss"]]], fmt="o",
                c="C1", capsize=4, label=f"prediction {s['predicted_loss']:.3f} [{lo:.3f}, {hi:.3f}]")
    if "actual_loss" in s:
        ax.scatter([t], [s["actual_loss"]], marker="*", s=160, c="C3", zorder=5,
                   label=f"actual {s['actual_loss']:.3f} (error {s['relative_error']:+.1%})")
    ax.axhline(s["bigram_val_loss"], ls="--", c="gray", lw=1, label=f"count bigram {s['bigram_val_loss']:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"training compute C (FLOPs, N {'without embeddings' if kind == 'non_embedding' else 'total'}, + attention)")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"loss: target predicted from ≤1/{s['compute_ratio']:.0f} of its compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    cap = s.get("capability", {})
    if "fit" in cap:
        pts = [(r["compute"][kind], -math.log((r["capability"]["passed"] + 0.5) / (r["capability"]["n"] + 1))) for r in fit_recs]
        bx.scatter(*zip(*pts), s=18, c="C0", label="ladder runs")
        bx.plot(xs, cap["fit"]["k"] * xs ** cap["fit"]["b"], c="C0", lw=1.2, label=f"−log p = {cap['fit']['k']:.3g}·C^{cap['fit']['b']:.3f}")
        bx.scatter([t], [-math.log(cap["predicted_pass_rate"])], c="C1", label=f"prediction p = {cap['predicted_pass_rate']:.3f}")
        tr = [r for r in recs if r["role"] == "target"]
        if tr:
            c0 = tr[0]["capability"]
            bx.scatter([t], [-math.log((c0["passed"] + 0.5) / (c0["n"] + 1))], marker="*", s=160, c="C3", zorder=5,
                       label=f"actual p = {c0['pass_rate']:.3f}")
        bx.set_xscale("log")
        bx.set_yscale("log")
        bx.set_xlabel("training compute C (FLOPs)")
        bx.set_ylabel("−log(pass rate)")
        bx.set_title(f"capability: {cap['task']}", fontsize=9)
        bx.grid(alpha=0.3, which="both")
        bx.legend(fontsize=7)
    return plots.save(fig, Path(run) / "plots" / "scaling.png")


def markdown(run: Path, s: dict) -> list[str]:
    """report.md's section for the scale stage."""
    f = s["fit"]
    lines = ["## Predictable scaling (GPT-4 §3)", "",
             f"L(C) = {f['a']:.4g}·C^{f['b']:.4f} + {f['c']:.4f}, fitted on {s['fitted_runs']} ladder runs. {s['compute_definition']}."
             + (f" Not fitted, still in the bigram regime: {', '.join(s['excluded_sizes'])}." if s.get("excluded_sizes") else ""), "",
             "| figure | value |", "|---|---|",
             f"| target | {s['target']['name']}: {s['target']['params_non_embedding']:,} parameters without embeddings "
             f"({s['target']['params']:,} with), {s['target']['tokens']:,} tokens |",
             f"| compute ratio (target / largest fitted rung) | {s['compute_ratio']:.1f} ({s['compute_ratio_other']:.1f} counting C the other way) |",
             f"| predicted loss{' (before training)' if s['predicted_before_training'] else ''} | {s['predicted_loss']:.4f} "
             f"[{s['predicted_interval'][0]:.4f}, {s['predicted_interval'][1]:.4f}] ({s['interval_level']:.0%} bootstrap over seeds: "
             "run-to-run noise, not the error of the functional form) |"]
    if "actual_loss" in s:
        lines += [f"| actual loss | {s['actual_loss']:.4f} |", f"| relative error | {s['relative_error']:+.2%} |"]
    o = s["other_compute"]
    lines += [f"| the same with C {o['compute']} | {o['predicted_loss']:.4f}"
              + (f" ({o['relative_error']:+.2%})" if "relative_error" in o else "") + " |",
              f"| count-based bigram loss | {s['bigram_val_loss']:.4f} |",
              f"| ladder wall time | {s['ladder_seconds'] / 60:.1f} min |", ""]
    if s.get("extrapolation"):
        lines += ["Extrapolation error against distance (leave-one-out along the ladder):", "",
                  "| predicted | from sizes | distance (compute ×) | predicted | actual | error |", "|---|---|---|---|---|---|"]
        lines += [f"| {e['predicted']} | {e['fitted_sizes']} | {e['distance']:.1f} | {e['predicted_loss']:.4f} | "
                  f"{e['actual_loss']:.4f} | {e['relative_error']:+.2%} |" for e in s["extrapolation"]]
        lines.append("")
    ch = s.get("chinchilla", {})
    if "fit" in ch:
        p = ch["fit"]
        lines += [f"Chinchilla: L(N, D) = {p['E']:.3f} + {p['A']:.4g}/N^{p['alpha']:.3f} + {p['B']:.4g}/D^{p['beta']:.3f} "
                  f"({ch['points']} runs); the target predicted at {ch['predicted_loss']:.4f}"
                  + (f" ({ch['relative_error']:+.2%})" if "relative_error" in ch else "") + "."]
        if ch.get("compute_optimal"):
            co = ch["compute_optimal"]
            lines.append(f"Compute-optimal at the target's budget: N = {co['params']:,.0f}, D = {co['tokens']:,.0f} "
                         f"({co['tokens_per_param']:.1f} tokens/parameter).")
        lines.append("")
    cap = s.get("capability", {})
    if "fit" in cap:
        lines += [f"Capability ({cap['task']}, n = {cap['n']}): −log(pass rate) = {cap['fit']['k']:.4g}·C^{cap['fit']['b']:.4f}; "
                  f"predicted pass rate {cap['predicted_pass_rate']:.3f}"
                  + (f", actual {cap['actual_pass_rate']:.3f}" if "actual_pass_rate" in cap else "") + ".", ""]
    if (Path(run) / "plots" / "scaling.png").is_file():
        lines += ["![scaling](plots/scaling.png)", ""]
    return lines
