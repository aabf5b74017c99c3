"""The sft stage (InstructGPT step 1): demonstrations -> next-token loss on the assistant's tokens -> Trainer
-> checkpoint chosen on dev -> test eval -> summary.

Demonstrations come from your SFT records (`sft.data: FILE`, TRL/OpenAI formats), or from the built-in world's
demonstrators (`sft.data: world`). With the world, the model kept is the one whose greedy answers to the dev
prompts get the best gold score (InstructGPT picks by RM score; the world has a gold labeler), and the report
compares it with the pretrained model on the test prompts, which chose nothing. With your records, `val_data`
gives the val loss and `test_data` the reported test loss.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import plots
from ..checkpoint import load_model
from ..config import at_least
from ..data.records import read_sft_records
from ..errors import GptstackError
from ..io import atomic_write_json, atomic_write_text, read_jsonl_loose
from ..tokenizer import Tokenizer, chat_messages
from ..train.distributed import barrier, init_distributed, is_main
from ..train.sft import Demonstrations, SFTObjective, demonstrations_loss
from ..train.trainer import TrainConfig, Trainer, autocast, placement
from .base import Context, Stage


def _sft_train() -> TrainConfig:
    return TrainConfig(steps=0, batch_size=32, lr=3e-4, schedule="cosine", min_lr_ratio=0.1, warmup_steps=20,
                       weight_decay=0.0, log_every=10, eval_every=0, ckpt_every=1000, keep_checkpoints=1)


@dataclass
class SFTConfig:
    data: str = "world"  # "world" (the instruction suite's demonstrations) or a JSONL file of SFT records
    val_data: str = ""  # held-out records (default: every 10th record of `data`; world: 5% of its demonstrations)
    test_data: str = ""  # records for the reported test loss (default: none)
    demonstrations: int = 4000  # world: how many
    shares: dict[str, float] = field(default_factory=dict)  # world: demonstrator -> share ({}: the world's mix)
    dev_prompts: int = 200  # world: dev prompts (unseen templates) whose gold score picks the kept checkpoint
    eval_prompts: int = 200  # world: test prompts (unseen templates, not dev's) for the reported figures
    max_new_tokens: int = 64
    epochs: float = 2.0  # when train.steps is 0
    seed: int = 0
    train: TrainConfig = field(default_factory=_sft_train)

    def problems(self):
        yield from at_least(self, 1, "demonstrations", "dev_prompts", "eval_prompts", "max_new_tokens")
        yield from at_least(self, 0, "epochs")


@dataclass
class SFTData:
    """Conversations to train on and to validate on; with your records, maybe a test set; with the world,
    its dev prompts (which pick the kept checkpoint) and test prompts (which only report)."""
    train: list
    val: list
    test: list | None = None
    dev_prompts: list | None = None
    test_prompts: list | None = None


def sft_data(cfg: SFTConfig) -> SFTData:
    if cfg.data == "world":
        from ..world.instructions import InstructionSuite
        suite = InstructionSuite(seed=cfg.seed)
        demos = suite.demonstrations("train", cfg.demonstrations, shares=cfg.shares or None, seed=cfg.seed)
        convs = [chat_messages(p.user, p.system, response) for p, response, _ in demos]
        n_val = max(1, len(convs) // 20)
        return SFTData(convs[n_val:], convs[:n_val], dev_prompts=suite.prompts("dev", cfg.dev_prompts, seed=cfg.seed + 1),
                       test_prompts=suite.prompts("test", cfg.eval_prompts, seed=cfg.seed + 1))
    path = Path(cfg.data)
    convs = read_sft_records(path)
    test = read_sft_records(Path(cfg.test_data)) if cfg.test_data else None
    if cfg.val_data:
        return SFTData(convs, read_sft_records(Path(cfg.val_data)), test)
    if len(convs) < 2:
        raise GptstackError(f"{path}: SFT needs at least two records (one is held out for validation)")
    return SFTData([c for i, c in enumerate(convs) if i % 10], convs[::10], test)  # every 10th record held out


def run_sft(cfg, init: Path, out: Path, tok: Tokenizer, log=print) -> dict:
    """SFT from a pretrained (or any gptstack) model folder into OUT; with the embedded world, the kept
    checkpoint is chosen on dev prompts, and both models (the pretrained one prompted with the same template)
    are evaluated on test prompts. Returns the summary ({"sft": ...}), also written to OUT/summary.json. Under
    torchrun every rank runs all of it (the evaluations' answers are shared among them); rank 0 writes."""
    s = cfg.sft
    t0 = time.time()
    init_distributed(s.train.device)
    device, precision = placement(s.train)
    torch.manual_seed(s.train.seed)
    model = load_model(init)
    model.train()
    data = sft_data(s)
    train = Demonstrations(data.train, tok, model.cfg.n_ctx)
    val = Demonstrations(data.val, tok, model.cfg.n_ctx)
    steps = s.train.steps or max(1, math.ceil(s.epochs * len(train) / s.train.batch_size))
    select_by = s.train.select_by or ("gold_score" if data.dev_prompts else "")
    mean_len = sum(len(ids) for ids, _ in train.examples) / len(train)
    train_cfg = dataclasses.replace(s.train, steps=steps, select_by=select_by,
                                    ckpt_every=min(s.train.ckpt_every, steps), eval_every=s.train.eval_every or steps)
    gold_eval = None
    if data.dev_prompts:
        from ..evals.instruct import evaluate_instructions

        def gold_eval(m):  # on dev: it picks the kept checkpoint
            figures, _ = evaluate_instructions(m, tok, data.dev_prompts, s.max_new_tokens)
            return {"gold_score": figures["gold_score"], "accuracy": figures["accuracy"]}
    objective = SFTObjective(train, val, train_cfg.seed, model.flops_per_token(int(mean_len)), gold_eval)
    trainer = Trainer(train_cfg, model, objective, out, metadata=model.metadata(), desc="sft")
    summary = trainer.fit()  # rank 0's, on every rank, once the model is published
    selected = summary.get("selected")
    result = {"steps": steps, "demonstrations": len(train), "val_demonstrations": len(val),
              "truncated": train.truncated + val.truncated, "val_loss": (summary.get("final") or {}).get("val_loss"),
              "selected": selected, "tokens_per_sec": summary.get("tokens_per_sec"),
              "mfu": summary.get("mfu"), "train_seconds": summary.get("seconds"), "train_peak_rss_mb": summary.get("peak_rss_mb")}
    if result["truncated"]:
        log(f"[sft] note: {result['truncated']} conversations were longer than {model.cfg.n_ctx} tokens; their start was cut")
    samples = None
    with autocast(device, precision):  # the kept model, whole, on the stage's device
        if data.test is not None:
            result |= {"split": "test", "test_loss": demonstrations_loss(load_model(out, device), Demonstrations(data.test, tok, model.cfg.n_ctx))}
        if data.test_prompts:
            from ..evals.instruct import evaluate_instructions
            log(f"[sft] test eval on {len(data.test_prompts)} prompts of unseen templates: the pretrained model (same template), then SFT")
            base, _ = evaluate_instructions(load_model(init, device), tok, data.test_prompts, s.max_new_tokens)
            figures, samples = evaluate_instructions(load_model(out, device), tok, data.test_prompts, s.max_new_tokens)
            result |= {"split": "test", **figures}
            result |= {"base_gold_score": base["gold_score"], "base_accuracy": base["accuracy"],
                       "base_by_family": base["by_family"], "base_refusal_rate_disallowed": base["refusal_rate_disallowed"],
                       "base_refusal_rate_allowed": base["refusal_rate_allowed"]}
            dev = (selected or {}).get("eval") or {}  # the kept checkpoint's figures on the dev prompts that chose it
            result["dev"] = {"n": len(data.dev_prompts), "accuracy": dev.get("accuracy"), "gold_score": dev.get("gold_score")}
    result["seconds"] = time.time() - t0
    summary = {"sft": result}
    if is_main():
        if samples is not None:
            atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
        atomic_write_json(out / "summary.json", summary)
    barrier()
    return summary


def run(ctx: Context) -> dict:
    return run_sft(ctx.cfg, ctx.start_model(), ctx.folder("sft"), ctx.tokenizer(), ctx.log)


# ---------------------------------------------------------------- report

def plot_sft(run: Path, r: dict) -> Path | None:
    """Test correctness accuracy by family: the pretrained model (same template) against SFT."""
    fams = list(r["by_family"])
    x = range(len(fams))
    fig, ax = plots.subplots(figsize=(max(6, 0.8 * len(fams) + 2), 3.8))
    ax.bar([i - 0.2 for i in x], [r["base_by_family"][f]["accuracy"] for f in fams], 0.4, label="pretrained (prompted)")
    ax.bar([i + 0.2 for i in x], [r["by_family"][f]["accuracy"] for f in fams], 0.4, label="SFT")
    ax.set_xticks(list(x), fams, rotation=30, ha="right")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("instruction following on unseen templates")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return plots.save(fig, run / "plots" / "sft.png")


def _fmt(x) -> str:
    return "" if x is None else f"{x:.3f}"


def markdown(run: Path, report: dict) -> list[str]:
    r = report["sft"]
    lines = ["## Instruction tuning (SFT: loss on the assistant's tokens only)", ""]
    if "by_family" not in r:
        test = f"; test loss {r['test_loss']:,.3f}" if "test_loss" in r else ""
        return lines + [f"{r['demonstrations']:,} demonstrations, {r['steps']} steps; val loss {r['val_loss']:,.3f}{test}.", ""]
    plot_sft(run, r)
    sel = r.get("selected") or {}
    dev = r.get("dev") or {}
    kept = f"; kept step {sel['step']} (best {sel['metric']} on {dev.get('n', '')} dev prompts)" if sel else ""
    lines += [f"{r['demonstrations']:,} demonstrations from the world's demonstrators, {r['steps']} steps "
              f"({r['train_seconds']:.0f} s){kept}. "
              f"Test: {r['n']} prompts of templates never trained on and not used for any choice, answered greedily "
              "and scored by the gold labeler. The pretrained model gets the same chat template.", "",
              "| figure | pretrained (test) | SFT (test) | SFT (dev) |", "|---|---|---|---|",
              f"| accuracy (right answer, any style) | {r['base_accuracy']:.3f} | **{r['accuracy']:.3f}** | {_fmt(dev.get('accuracy'))} |",
              f"| gold score | {r['base_gold_score']:.3f} | **{r['gold_score']:.3f}** | {_fmt(dev.get('gold_score'))} |",
              f"| refusal rate, disallowed | {r['base_refusal_rate_disallowed']:.3f} | {r['refusal_rate_disallowed']:.3f} | |",
              f"| refusal rate, allowed | {r['base_refusal_rate_allowed']:.3f} | {r['refusal_rate_allowed']:.3f} | |",
              f"| desired refusal style (share of refusals) | | {r['refusal_style_desired_rate']:.3f} | |", "",
              "| family (test) | n | pretrained | SFT |", "|---|---|---|---|"]
    lines += [f"| {f} | {row['n']} | {r['base_by_family'][f]['accuracy']:.3f} | {row['accuracy']:.3f} |"
              for f, row in r["by_family"].items()]
    lines += ["", "![accuracy by family](plots/sft.png)", ""]
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


def headline(r: dict) -> str:
    if "accuracy" not in r:
        return f"sft: val loss {r['val_loss']:.3f}" + (f", test loss {r['test_loss']:.3f}" if "test_loss" in r else "")
    return (f"sft: test accuracy {r['accuracy']:.3f} on {r['n']} prompts (pretrained {r['base_accuracy']:.3f}; "
            f"dev {_fmt(r['dev']['accuracy'])})")


STAGE = Stage("sft", run, "instruction tuning on demonstrations (world or your records), loss on answers only",
              config=SFTConfig, report=markdown, headline=headline, measured=True)
