"""report.json (the stable figures) and report.md (the same, for people, with plots)."""
from __future__ import annotations

import json
from pathlib import Path

from . import plots
from .config import deep_merge
from .io import atomic_write_json, atomic_write_text, read_json, read_jsonl_loose

STAGE_ORDER = ["tokenizer", "pretrain", "eval", "prompting", "finetune", "sft", "rm", "ppo", "scale"]


def collect(run: Path) -> dict:
    report: dict = {"run": {"name": run.name}}
    for stage in STAGE_ORDER:
        path = run / stage / "summary.json"
        if path.is_file():
            report = deep_merge(report, read_json(path))
    return report


def plot_loss(run: Path) -> Path | None:
    rows = read_jsonl_loose(run / "pretrain" / "metrics.jsonl")
    train = [r for r in rows if r.get("event") == "train"]
    evals = [r for r in rows if r.get("event") == "eval" and "val_loss" in r]
    if not train:
        return None
    fig, ax = plots.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss", ms=4)
    rep = collect(run).get("pretrain", {})
    if "unigram_val_loss" in rep:
        ax.axhline(rep["unigram_val_loss"], ls="--", c="gray", label="unigram floor (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"pretraining: {run.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    return plots.save(fig, run / "plots" / "loss.png")


def plot_sft(run: Path, report: dict) -> Path | None:
    """Held-out correctness accuracy by family: the pretrained model (same template) against SFT."""
    r = report.get("sft", {})
    if "by_family" not in r:
        return None
    fams = list(r["by_family"])
    x = range(len(fams))
    fig, ax = plots.subplots(figsize=(max(6, 0.8 * len(fams) + 2), 3.8))
    ax.bar([i - 0.2 for i in x], [r["base_by_family"][f]["accuracy"] for f in fams], 0.4, label="pretrained (prompted)")
    ax.bar([i + 0.2 for i in x], [r["by_family"][f]["accuracy"] for f in fams], 0.4, label="SFT")
    ax.set_xticks(list(x), fams, rotation=30, ha="right")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("instruction following on unseen templates")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return plots.save(fig, run / "plots" / "sft.png")


def sft_markdown(run: Path, r: dict) -> list[str]:
    lines = ["## Instruction tuning (SFT: loss on the assistant's tokens only)", ""]
    if "by_family" not in r:
        return lines + [f"{r['demonstrations']:,} demonstrations, {r['steps']} steps; val loss {_f(r['val_loss'])}.", ""]
    sel = r.get("selected") or {}
    kept = f"; kept step {sel['step']} (best held-out {sel['metric']})" if sel else ""
    lines += [f"{r['demonstrations']:,} demonstrations from the world's demonstrators, {r['steps']} steps "
              f"({r['train_seconds']:.0f} s){kept}. "
              f"Held out: {r['n']} prompts of templates never trained on, answered greedily and scored by the gold labeler. "
              "The pretrained model gets the same chat template.", "",
              "| figure | pretrained | SFT |", "|---|---|---|",
              f"| accuracy (right answer, any style) | {r['base_accuracy']:.3f} | **{r['accuracy']:.3f}** |",
              f"| gold score | {r['base_gold_score']:.3f} | **{r['gold_score']:.3f}** |",
              f"| refusal rate, disallowed | {r['base_refusal_rate_disallowed']:.3f} | {r['refusal_rate_disallowed']:.3f} |",
              f"| refusal rate, allowed | {r['base_refusal_rate_allowed']:.3f} | {r['refusal_rate_allowed']:.3f} |",
              f"| desired refusal style (share of refusals) | | {r['refusal_style_desired_rate']:.3f} |", "",
              "| family | n | pretrained | SFT |", "|---|---|---|---|"]
    lines += [f"| {f} | {row['n']} | {r['base_by_family'][f]['accuracy']:.3f} | {row['accuracy']:.3f} |"
              for f, row in r["by_family"].items()]
    lines.append("")
    if (run / "plots" / "sft.png").is_file():
        lines += ["![accuracy by family](plots/sft.png)", ""]
    samples = read_jsonl_loose(run / "sft" / "samples.jsonl")
    seen, shown = set(), []
    for s in samples:  # one conversation per family
        if s["family"] not in seen:
            seen.add(s["family"])
            shown.append(s)
    if shown:
        lines += ["### Sample conversations (SFT, greedy)", ""]
        for s in shown:
            system = f"system: {s['system']}\n" if s.get("system") else ""
            lines += [f"*{s['family']}*, {'correct' if s['correct'] else 'wrong'} (gold score {s['gold_score']:.2f}):", "",
                      "```", f"{system}user: {s['prompt']}\nassistant: {s['answer']}", "```", ""]
    return lines


def plot_rm(run: Path) -> Path | None:
    """Every held-out answer's reward against its gold score."""
    rows = read_jsonl_loose(run / "rm" / "val_scores.jsonl")
    if not rows:
        return None
    fig, ax = plots.subplots(figsize=(6.5, 4.5))
    fams = sorted({r["family"] for r in rows})
    for i, f in enumerate(fams):
        pts = [r for r in rows if r["family"] == f]
        ax.scatter([r["gold_score"] for r in pts], [r["reward"] for r in pts], s=9, alpha=0.6, color=f"C{i % 10}", label=f)
    ax.set_xlabel("gold score")
    ax.set_ylabel("reward (normalised: SFT answers mean 0, std 1)")
    ax.set_title("reward model on held-out answers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, markerscale=1.5, ncol=2)
    return plots.save(fig, run / "plots" / "rm_vs_gold.png")


def rm_markdown(run: Path, r: dict) -> list[str]:
    lines = ["## Reward model (all C(K,2) pairs of a K-way ranking per batch element)", "",
             f"{r['rankings']:,} rankings ({r['pairs']:,} non-tied pairs), {r['steps']} steps; held-out accuracy against "
             f"the labeler's pairs: **{r['val_accuracy']:.3f}** on {r['val_pairs']:,} pairs.", ""]
    if "gold_agreement" not in r:
        return lines
    lines += [f"Rankings: K = {r['k']} answers from {', '.join(r['samplers'])}, ranked by the {r['labeler']} labeler, "
              f"whose measured agreement with gold is {r['labeler_agreement']:.3f}; {r['tie_fraction']:.1%} of pairs tie.", "",
              "Agreement with the gold ranking on held-out prompts (unseen templates), non-tied pairs:", "",
              "| pairs | n | RM | shorter first | SFT log-likelihood |", "|---|---|---|---|---|",
              f"| all | {r['gold_pairs']:,} | **{r['gold_agreement']:.3f}** | {r['baseline_length_agreement']:.3f} | "
              f"{r['baseline_loglik_agreement']:.3f} |"]
    for name, row in r["by_subset"].items():
        lines.append(f"| {name.replace('_', ' ')} | {row['pairs']:,} | {row['gold_agreement']:.3f} | "
                     f"{row['baseline_length_agreement']:.3f} | {row['baseline_loglik_agreement']:.3f} |")
    for name, row in r["by_family"].items():
        lines.append(f"| family: {name} | {row['pairs']:,} | {row['gold_agreement']:.3f} | "
                     f"{row['baseline_length_agreement']:.3f} | {row['baseline_loglik_agreement']:.3f} |")
    lines.append("")
    if (run / "plots" / "rm_vs_gold.png").is_file():
        lines += ["![reward against gold score](plots/rm_vs_gold.png)", ""]
    return lines


def plot_ppo(run: Path) -> Path | None:
    """Rollouts through PPO: RM score beside gold score (over-optimisation shows as the two parting), and KL."""
    rows = [r for r in read_jsonl_loose(run / "ppo" / "metrics.jsonl") if r.get("event") == "train" and "rm_score" in r]
    if not rows:
        return None
    fig, (a, b) = plots.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["step"] for r in rows]
    a.plot(steps, [r["rm_score"] for r in rows], label="RM score (normalised)")
    a.set_xlabel("update")
    a.set_ylabel("RM score")
    g = a.twinx()
    g.plot(steps, [r["gold_score"] for r in rows], color="C1", label="gold score")
    g.set_ylabel("gold score", color="C1")
    a.set_title("rollouts: RM score and gold score")
    a.grid(alpha=0.3)
    a.legend(loc="upper left", fontsize=8)
    b.plot(steps, [r["kl"] for r in rows], color="C2")
    b.set_xlabel("update")
    b.set_ylabel("KL to SFT per answer (nats)")
    b.set_title("KL")
    b.grid(alpha=0.3)
    return plots.save(fig, run / "plots" / "ppo.png")


def ppo_markdown(run: Path, r: dict) -> list[str]:
    w = r["wins"]
    sel = r.get("selected")
    kept = f"; kept update {sel['step']} (best validation {sel['metric']})" if sel else ""
    lines = ["## RLHF (PPO-ptx against the reward model, per-token KL to SFT)", "",
             f"{r['rollouts']} rollouts, {r['steps']} updates{kept}. Held-out prompts, greedy answers; the gold labeler judges.", ""]
    if r.get("by_round"):
        lines += [f"{r['rounds']} rounds: before each round after the first, the current policy's answers were ranked "
                  "and the RM retrained on all rankings so far.", "", "| round | rankings | RM gold agreement | updates |",
                  "|---|---|---|---|"]
        lines += [f"| {b['round']} | {b['rankings']} | {b['rm_gold_agreement'] or float('nan'):.3f} | {b['steps']} |"
                  for b in r["by_round"]]
        lines.append("")
    lines += [f"Win rate against SFT: **{r['win_rate_vs_sft']:.3f}** (ties count half). Where correctness differs "
              f"({w['correctness_pairs']} prompts) PPO wins {w['win_rate_correctness']:.3f}; where it is the same "
              f"({w['style_pairs']}, style: length, refusal style, over-refusal) {w['win_rate_style']:.3f}.", "",
              "| figure | SFT | PPO |", "|---|---|---|",
              f"| accuracy | {r['sft_accuracy']:.3f} | {r['accuracy']:.3f} |",
              f"| gold score | {r['sft_gold_score']:.3f} | {r['gold_score']:.3f} |",
              f"| RM score | {r['sft_rm_score']:.3f} | {r['rm_score']:.3f} |",
              f"| mean answer length (chars) | {r['sft_mean_length']:.1f} | {r['mean_length']:.1f} |",
              f"| refusal rate, disallowed | {r['sft_refusal_rate_disallowed']:.3f} | {r['refusal_rate_disallowed']:.3f} |",
              f"| refusal rate, allowed | {r['sft_refusal_rate_allowed']:.3f} | {r['refusal_rate_allowed']:.3f} |",
              f"| desired refusal style | {r['sft_refusal_style_desired_rate']:.3f} | {r['refusal_style_desired_rate']:.3f} |",
              f"| KL to SFT per answer (nats) | 0 | {r['kl']:.2f} |",
              f"| pretraining val loss change | | {r['pretrain_val_loss_delta']:+.3f} (without ptx: "
              f"{r.get('pretrain_val_loss_delta_no_ptx', float('nan')):+.3f}) |", ""]
    for folder, v in (r.get("versus") or {}).items():
        w = v["wins"]
        lines += [f"Against `{folder}` ({v['params'] / 1e6:.1f}M parameters, {v['params'] / r['params']:.1f}x PPO's "
                  f"{r['params'] / 1e6:.1f}M): PPO's win rate **{v['win_rate']:.3f}** (correctness pairs "
                  f"{w['win_rate_correctness']:.3f} of {w['correctness_pairs']}, style pairs {w['win_rate_style']:.3f} of "
                  f"{w['style_pairs']}); its accuracy {v['accuracy']:.3f}, gold score {v['gold_score']:.3f}.", ""]
    n = r.get("no_ptx")
    if n:
        lines += [f"The same run without the ptx term (γ = 0): win rate {n['win_rate_vs_sft']:.3f}, accuracy "
                  f"{n['accuracy']:.3f}, gold score {n['gold_score']:.3f}, KL {n['kl']:.2f} nats, pretraining val loss "
                  f"{r['pretrain_val_loss_delta_no_ptx']:+.3f} (with ptx: {r['pretrain_val_loss_delta']:+.3f}).", ""]
    c = r.get("rollout_curves") or {}
    if c:
        verdict = ("**Over-optimisation:** after the gold score of rollouts peaked, the RM score kept rising while gold fell."
                   if c["detected"] else "No over-optimisation seen: gold did not fall while the RM score rose.")
        lines += [f"Rollouts (moving average of 5 updates): gold score {c['gold_start']:.3f} at the start, peak "
                  f"{c['gold_peak']:.3f} at update {c['gold_peak_step']} (KL {c['kl_at_gold_peak']:.2f} nats), "
                  f"{c['gold_end']:.3f} at the end; RM score {c['rm_start']:.3f} -> {c['rm_at_gold_peak']:.3f} -> "
                  f"{c['rm_end']:.3f}. {verdict}", ""]
    if (run / "plots" / "ppo.png").is_file():
        lines += ["![PPO curves](plots/ppo.png)", ""]
    samples = read_jsonl_loose(run / "ppo" / "samples.jsonl")
    changed = [s for s in samples if s["sft"] != s["ppo"]][:6]
    if changed:
        lines += ["### Before and after (greedy)", "", "| family | prompt | SFT | PPO |", "|---|---|---|---|"]
        for s in changed:
            cell = lambda t: t.replace("|", "\\|").replace("\n", " ")[:90]  # noqa: E731
            lines.append(f"| {s['family']} | {cell(s['prompt'])} | {cell(s['sft'])} ({s['sft_gold']:.2f}) | "
                         f"{cell(s['ppo'])} ({s['ppo_gold']:.2f}) |")
        lines.append("")
    return lines


def write_report(run: Path) -> dict:
    run = Path(run)
    report = collect(run)
    atomic_write_json(run / "report.json", report)
    plot = plot_loss(run)
    plot_sft(run, report)
    plot_rm(run)
    plot_ppo(run)
    atomic_write_text(run / "report.md", render_markdown(run, report, plot))
    return report


def _f(x, digits=3):
    return f"{x:,.{digits}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def render_markdown(run: Path, r: dict, plot: Path | None) -> str:
    lines = [f"# gptstack run `{run.name}`", ""]
    if "tokenizer" in r:
        t = r["tokenizer"]
        lines += ["## Tokenizer", "", f"Byte-level BPE, {t['vocab_size']:,} tokens, trained on {t['train_bytes']:,} bytes "
                  f"in {t['seconds']:.1f} s; {t['bytes_per_token']:.2f} bytes per token on held-out text.", ""]
    if "pretrain" in r:
        p = r["pretrain"]
        lines += ["## Pretraining (L1: next-token cross-entropy)", ""]
        if "params" in p:
            lines += [
                "| figure | value |", "|---|---|",
                f"| parameters | {p['params']:,} ({p['params_non_embedding']:,} without embeddings) |",
                f"| tokens trained | {p['tokens']:,} |",
                f"| wall time | {p['seconds']:.0f} s on {p['device']} ({p['precision']}, {p['world_size']} rank(s)) |",
                f"| throughput | {p['tokens_per_sec']:,.0f} tokens/s, MFU {p['mfu']:.1%} of the measured matmul peak |",
                f"| val loss at init | {p['val_loss_initial']:.3f} |", ""]
        if "val_loss" in p:
            lines += [
                "| held-out metric | value |", "|---|---|",
                f"| val loss (nats/token) | {p['val_loss']:.3f} |",
                f"| unigram floor | {p['unigram_val_loss']:.3f} |",
                f"| perplexity | {p['val_ppl']:.1f} |",
                f"| bits per byte | {p['val_bpb']:.3f} |",
                f"| val tokens | {p['val_tokens']:,} |", ""]
        if p.get("mixture"):
            lines += ["Data mixture (GPT-3 Table 2.2 style):", "", "| source | weight | train tokens | epochs |", "|---|---|---|---|"]
            lines += [f"| {m['source']} | {m['weight']:.0%} | {m['train_tokens']:,} | {m['epochs']:.2f} |" for m in p["mixture"]]
            lines.append("")
        if plot:
            lines += [f"![loss curve]({plot.relative_to(run).as_posix()})", ""]
        samples = read_jsonl_loose(run / "pretrain" / "samples.jsonl")
        if samples:
            lines += ["### Samples (temperature 0.8, top-k 50)", ""]
            for s in samples:
                lines += ["```python", s["prompt"] + s["completion"], "```", ""]
    if "prompting" in r:
        lines += ["## Prompting (GPT-2 zero-shot, GPT-3 few-shot)", "",
                  "Accuracy of the pretrained model with K solved examples in its context, no gradient step. "
                  "*fit*: the mean number of examples that fit the context window.", ""]
        for task, by_k in r["prompting"].items():
            ks = list(by_k)
            lines += [f"**{task}** (n = {by_k[ks[0]]['n']})", "", "| K | " + " | ".join(k.split("_")[1] for k in ks) + " |",
                      "|---|" + "---|" * len(ks),
                      "| acc | " + " | ".join(f"{by_k[k]['acc']:.3f}" for k in ks) + " |"]
            if "acc_norm" in by_k[ks[0]]:
                lines.append("| acc_norm | " + " | ".join(f"{by_k[k]['acc_norm']:.3f}" for k in ks) + " |")
            lines += ["| fit | " + " | ".join(f"{by_k[k]['shots_fit']:.1f}" for k in ks) + " |", ""]
        if (run / "plots" / "shots.png").is_file():
            lines += ["![accuracy against K](plots/shots.png)", ""]
    if "finetune" in r:
        lines += ["## Fine-tuning (GPT-1: L3 = L2 + λ·L1, a linear head on the Extract token)", "",
                  "Test accuracy on held-out modules. *from scratch*: the same recipe from random weights; "
                  "*λ = 0*: without the auxiliary LM loss.", "",
                  "| task | kind | chance | accuracy | F1 | from scratch | λ = 0 | train examples |", "|---|---|---|---|---|---|---|---|"]
        for task, t in r["finetune"].items():
            f1 = f"{t['f1']:.3f}" if "f1" in t else ""
            lines.append(f"| {task} | {t['kind']} | {t['chance']:.3f} | **{t['accuracy']:.3f}** | {f1} | "
                         f"{t.get('from_scratch_accuracy', float('nan')):.3f} | {t.get('lambda0_accuracy', float('nan')):.3f} | {t['n_train']} |")
        lines.append("")
    if "sft" in r:
        lines += sft_markdown(run, r["sft"])
    if "rm" in r:
        lines += rm_markdown(run, r["rm"])
    if "ppo" in r:
        lines += ppo_markdown(run, r["ppo"])
    if "scale" in r:
        from .scale_report import markdown as scale_markdown
        lines += scale_markdown(run, r["scale"])  # plots/scaling.png is drawn by the stage (ladder.analyze)
    lines += ["## report.json", "", "```json", json.dumps(r, indent=1)[:4000], "```", ""]
    return "\n".join(lines)
