"""`gptstack <verb>`: argument parsing and dispatch only."""
from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from .cli_instruct import FLAG_HELP, add_flags, add_instruction_verbs, add_sampling_args, add_settings_args, number, settings
from .errors import GptstackError

EPILOG = """config: --preset NAME, then --config FILE.yaml (repeatable), then key=value overrides,
e.g. `pretrain.lr=3e-4 model.n_layer=6`. `gptstack presets` lists the presets."""


def _add_config_args(p: argparse.ArgumentParser, every_stage: bool = False) -> None:
    p.add_argument("--preset", default="tiny", help="named preset (default: tiny)")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config merged over the preset")
    p.add_argument("--data", action="append", default=[], metavar="SPEC",
                   help="a data source, PATH[@WEIGHT]: stdlib, a file, folder, glob, .jsonl, .parquet, hf:NAME[:split] "
                        "or a saved dataset folder; repeat for a weighted mixture (replaces the preset's sources)")
    if every_stage:  # the pipeline: one strategy for every stage that trains
        p.add_argument("--strategy", choices=["ddp", "fsdp"], help=f"{FLAG_HELP['pretrain.strategy']}, for every stage "
                       f"that trains (sets {', '.join(strategy_keys())}; a key=value override still wins)")
    else:
        add_flags(p, {"--strategy": "pretrain.strategy"})
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def strategy_keys() -> list[str]:
    """The strategy key of every section that trains: pretrain.strategy and each stage's train.strategy."""
    import typing
    from .stages.base import sections
    from .train.trainer import TrainConfig
    return [f"{name}.strategy" if cls is TrainConfig else f"{name}.train.strategy" for name, cls in sections().items()
            if cls is TrainConfig or typing.get_type_hints(cls).get("train") is TrainConfig]


def _resolve(args):
    from . import config
    cfg = settings(args)
    if args.data:
        cfg.data.sources = [_parse_source(s) for s in args.data]
        for i, s in enumerate(cfg.data.sources):
            config.check(s, f"data.sources[{i}]")
    return cfg


def _parse_source(spec: str):
    from .data.sources import SourceConfig
    path, weight = spec, 1.0
    if "@" in spec:
        path, _, w = spec.rpartition("@")
        try:
            weight = float(w)
        except ValueError:
            raise GptstackError(f"--data '{spec}': weight '{w}' is not a number") from None
    return SourceConfig(path=path, weight=weight)


# ---------------------------------------------------------------- verbs

def pipeline_settings(args):
    """The pipeline's RunConfig: its --strategy goes to every stage that trains, before the key=value overrides
    (which win)."""
    if args.strategy:
        args.overrides = [f"{key}={args.strategy}" for key in strategy_keys()] + list(args.overrides)
    return _resolve(args)


def cmd_pipeline(args):
    from .pipeline import all_stages, default_stages, run_pipeline
    cfg = pipeline_settings(args)
    stages = all_stages() if args.stages == "all" else args.stages.split(",") if args.stages else default_stages()
    report = run_pipeline(cfg, Path(args.out), stages)
    if report:
        from .stages import STAGES
        print(f"report: {Path(args.out) / 'report.md'}")
        for stage in STAGES:  # the headline: each stage's figure of merit (on test where there is a split)
            line = stage.headline(report[stage.name]) if stage.headline is not None and stage.name in report else None
            if line:
                print(line)


def cmd_pretrain(args):
    from .pipeline import run_pipeline
    cfg = _resolve(args)
    out = Path(args.out)
    if args.tokenizer:
        from .tokenizer import Tokenizer
        out.mkdir(parents=True, exist_ok=True)
        Tokenizer.load(args.tokenizer).save(out / "tokenizer.json")
    if run_pipeline(cfg, out, ["tokenizer", "pretrain"]):  # the report, on rank 0 only
        print(f"model: {out / 'pretrain' / 'model.safetensors'}")


def cmd_finetune(args):
    import json
    from .checkpoint import find_tokenizer, load_model
    from .tokenizer import Tokenizer
    from .train.finetune import finetune
    cfg = settings(args)
    tok = Tokenizer.load(find_tokenizer(args.init))
    out = Path(args.out)
    model_cfg = load_model(args.init).cfg
    result = finetune(cfg.finetune, args.task, tok, out, Path(args.data), Path(args.val) if args.val else None,
                      Path(args.test) if args.test else None, init=None if args.scratch else Path(args.init), model_cfg=model_cfg)
    from .train.distributed import is_main
    if not is_main():
        return
    print(json.dumps({k: result[k] for k in ("labels", "val", "test") if k in result}))


def cmd_predict(args):
    import json
    from .checkpoint import find_tokenizer
    from .tokenizer import Tokenizer
    from .train.finetune import predict
    tok = Tokenizer.load(args.tokenizer or find_tokenizer(args.model))
    rows = predict(Path(args.model), tok, Path(args.data))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if args.out:
        from .io import atomic_write_text
        atomic_write_text(Path(args.out), text)
        print(f"{len(rows)} predictions: {args.out}")
    else:
        print(text, end="")


def cmd_sample(args):
    import torch

    from .checkpoint import find_tokenizer, load_model
    from .generate import generate
    from .images import read_image
    from .tokenizer import Tokenizer, chat_messages
    model = load_model(args.model, "auto")
    tok = Tokenizer.load(args.tokenizer or find_tokenizer(args.model))
    vision = model.cfg.vision
    if args.image and not vision.image_size:
        raise GptstackError(f"--image: the model {args.model} takes no images (train one with `gptstack vision`)")
    pictures = [read_image(path, vision.image_size) for path in args.image]
    if args.chat:  # the prompt is a user turn (after the pictures, if any); the model writes the assistant's
        messages = chat_messages(args.prompt, args.system)
        if pictures:
            messages[-1]["content"] = [{"type": "image", "image": p} for p in pictures] + [{"type": "text", "text": args.prompt}]
        prompt = tok.render_chat(messages, for_generation=True, image_tokens=vision.tokens if pictures else 0)[0]
        stops, shown = (tok.end, tok.eot), ""
    else:  # the pictures' placeholders, then the text to continue
        prompt = [tok.image_id] * vision.tokens * len(pictures) if pictures else []
        prompt += tok.encode(args.prompt) if args.prompt or pictures else [tok.eot]
        stops, shown = (tok.eot,), args.prompt
    if len(prompt) >= model.cfg.n_ctx:
        raise GptstackError(f"--prompt is {len(prompt)} tokens; the model's context holds {model.cfg.n_ctx}, answer included")
    images = [torch.stack(pictures) if pictures else None] * args.num_samples
    gens = generate(model, [prompt] * args.num_samples, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                    stop_ids=stops, pad_id=tok.pad, seed=args.seed, stop_strings=tuple(args.stop), decode=tok.decode,
                    images=images)
    for i, g in enumerate(gens):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(shown + tok.decode(g.tokens, skip_special=True))


def cmd_import(args):
    from .convert import import_model
    info = import_model(args.src, args.out)
    m = info["model"]
    print(f"{args.out}: {info['params'] / 1e6:.1f}M parameters, {m['n_layer']} layers x {m['n_embd']}, "
          f"{info['vocab_size']} tokens, chat template: {info['chat_template']} (turns end with {info['stop']})")


def cmd_extend(args):
    import dataclasses
    import shutil
    from .checkpoint import find_tokenizer, load_model, save_state_dict
    from .data.sources import iter_documents
    from .evals.long_context import Haystacks
    from .extend import extend
    from .tokenizer import TEMPLATE_FILE, Tokenizer
    from .train.long_context import finetune_at_length
    model = load_model(args.model, "auto")
    longer = extend(model, args.ctx, args.method)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = find_tokenizer(args.model)
    for f in (tok_path, tok_path.parent / TEMPLATE_FILE):  # the model folder stays self-contained
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    if args.steps:
        cfg = _resolve(args)
        tok = Tokenizer.load(tok_path)
        haystacks = Haystacks.from_documents(tok, (d for s in cfg.data.sources for d in iter_documents(s)), cfg.data.val_fraction)
        lc = cfg.long_context
        train = dataclasses.replace(lc.train, steps=args.steps)
        longer, _ = finetune_at_length(longer, tok, cfg.data, haystacks, args.ctx, train, out, lc.retrieval_fraction,
                                       lc.dev_probes, "extend")
    else:
        save_state_dict(longer.state_dict(), out / "model.safetensors", longer.metadata())
    s = longer.cfg.rope_scaling
    how = f", rope_scaling {s.type} x{s.factor:g} of {s.original_ctx}" if s.type != "none" else ""
    print(f"{out}: window {model.cfg.n_ctx} -> {longer.cfg.n_ctx} tokens by {args.method}{how}"
          + (f", fine-tuned {args.steps} steps" if args.steps else ""))


def cmd_export(args):
    from .convert import export_model
    print(f"{export_model(args.model, args.to, args.out, args.dtype)}: written ({args.to})")


def cmd_eval(args):
    from .checkpoint import find_tokenizer, load_model
    from .data.loader import build_sampler
    from .evals.lm import lm_metrics
    from .stages import RunConfig
    from .tokenizer import Tokenizer
    model_dir = Path(args.model)
    run_cfg = model_dir.parent / "config.yaml"
    cfg = RunConfig.load(run_cfg) if run_cfg.is_file() and not args.data else RunConfig.resolve("tiny")
    if args.data:
        cfg.data.sources = [_parse_source(s) for s in args.data]
    model = load_model(model_dir, "auto")
    tok = Tokenizer.load(args.tokenizer or find_tokenizer(model_dir))
    if (args.seq_len or 0) > model.cfg.n_ctx:
        raise GptstackError(f"--seq-len {args.seq_len} exceeds the model's context of {model.cfg.n_ctx} tokens")
    sampler = build_sampler(cfg.data, tok, args.seq_len or model.cfg.n_ctx, seed=0)
    print(json.dumps(lm_metrics(model, sampler, tok.vocab_size), indent=1))


def cmd_eval_prompting(args):
    from .checkpoint import find_tokenizer, load_model
    from .data.tokens import cache_dir
    from .evals.prompting import CHANCE, plot_shots, resolve_tasks, sweep
    from .tokenizer import Tokenizer
    try:
        shots = [int(k) for k in args.shots.split(",")]
    except ValueError:
        raise GptstackError(f"--shots '{args.shots}': expected comma-separated integers, e.g. 0,1,8") from None
    tasks = resolve_tasks(args.task or ["cloze", "continuation", "arithmetic", "docstring_name"],
                          cache_dir() / "prompting" / str(args.seed), args.seed)
    results = {}
    for m in args.model:
        model = load_model(m, "auto")
        tok = Tokenizer.load(find_tokenizer(m))
        results[str(m)], _ = sweep(model, tok, tasks, shots, args.limit, args.seed, log=lambda s: print(s, file=sys.stderr))
    if args.plot:
        plot_shots(results, Path(args.plot), CHANCE)
    print(json.dumps(results if len(results) > 1 else next(iter(results.values())), indent=1))


def cmd_eval_contamination(args):
    from .data.sources import DataConfig
    from .data.tokens import cache_dir
    from .evals.contamination import NgramIndex
    from .evals.prompting import resolve_tasks, sweep
    from .stages import RunConfig
    from .stages.contamination import figures, fmt, pretraining_documents, run_training_documents, task_texts
    if not args.run and not args.data:
        raise GptstackError("name the training data: --run RUN (what that run trained on) and/or --data SOURCE")
    docs = []
    if args.run:
        run = Path(args.run)
        if not (run / "config.yaml").is_file():
            raise GptstackError(f"--run {run}: no config.yaml (not a run folder)")
        docs += run_training_documents(run, RunConfig.load(run / "config.yaml"))[0]
    if args.data:
        docs += list(pretraining_documents(DataConfig(sources=[_parse_source(s) for s in args.data]), args.val_fraction))
    cache = Path(args.run) / "contamination" if args.run else cache_dir() / "contamination"
    index = NgramIndex.build(docs, args.n, cache, desc="contamination index")
    tasks = resolve_tasks(args.task or ["cloze", "continuation", "arithmetic", "docstring_name"],
                          cache_dir() / "prompting" / str(args.seed), args.seed)
    overlaps = {name: index.check(task_texts(path)) for name, path in tasks.items()}
    scored = {}
    if args.model:
        from .checkpoint import find_tokenizer, load_model
        from .tokenizer import Tokenizer
        model = load_model(args.model, "auto")
        _, per_example = sweep(model, Tokenizer.load(find_tokenizer(args.model)), tasks, [args.shots], args.limit,
                               args.seed, log=lambda s: print(s, file=sys.stderr))
        scored = {name: {e["index"]: bool(e["correct"]) for e in per_example[name][f"shots_{args.shots}"]} for name in tasks}
    out = {name: figures(o, scored.get(name)) for name, o in overlaps.items()}
    for name, r in out.items():
        print(f"{name}: {r['dirty_share']:.1%} of {r['n']} dirty ({r['too_short_share']:.0%} too short to test)"
              + (f"; acc all {fmt(r['acc_all'])} clean {fmt(r['acc_clean'])} dirty {fmt(r['acc_dirty'])}" if name in scored else ""),
              file=sys.stderr)
    print(json.dumps({"n_gram": args.n, "index_ngrams": len(index), "training_documents": len(docs), "tasks": out}, indent=1))


def cmd_eval_calibration(args):
    from .config import check
    from .data.tokens import cache_dir
    from .evals.calibration import plot_reliability
    from .evals.prompting import resolve_tasks
    from .stages.calibration import CalibrationConfig, by_format, calibrate_models, task_formats
    c = CalibrationConfig(tasks=args.task or CalibrationConfig().tasks, shots=args.shots, limit=args.limit, bins=args.bins,
                          formats=args.format or CalibrationConfig().formats, seed=args.seed)
    check(c, "calibration")
    models = {}
    for m in args.model:
        models[Path(m).name if Path(m).name not in models else m] = Path(m)
    folder = cache_dir() / "prompting" / str(args.seed)
    tasks = task_formats(resolve_tasks(c.tasks, folder, args.seed), c.formats, folder / "lettered")
    results = calibrate_models(models, tasks, c, log=lambda s: print(s, file=sys.stderr))
    if args.plot:
        plot_reliability(by_format(results), Path(args.plot))
    print(json.dumps(results, indent=1))


def cmd_eval_long_context(args):
    from .checkpoint import find_tokenizer, load_model
    from .data.sources import iter_documents
    from .evals.long_context import TASKS, Haystacks, heat_map, retrieval_grid
    from .tokenizer import Tokenizer
    model = load_model(args.model, "auto")
    tok = Tokenizer.load(find_tokenizer(args.model))
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
        depths = [float(x) / 100 for x in args.depths.split(",")]
    except ValueError:
        raise GptstackError(f"--lengths '{args.lengths}' / --depths '{args.depths}': expected comma-separated numbers") from None
    tasks = args.task.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise GptstackError(f"--task: unknown {', '.join(unknown)} (known: {', '.join(TASKS)})")
    haystacks = None
    if "needle" in tasks:
        cfg = _resolve(args)
        haystacks = Haystacks.from_documents(tok, (d for s in cfg.data.sources for d in iter_documents(s)), cfg.data.val_fraction)
    grids = {t: retrieval_grid(model, tok, t, lengths, depths, args.probes, "test", prefill_chunk=args.prefill_chunk,
                               haystacks=haystacks, metric=args.metric,
                               progress=lambda t, L, row: print(f"{t} {L}: {row}", file=sys.stderr))
             for t in tasks}
    if args.plot and args.metric == "accuracy":
        heat_map(grids, Path(args.plot), f"{args.model}: retrieval accuracy (test probes)")
    print(json.dumps(grids, indent=1))


def cmd_tokenizer(args):
    from .tokenizer import Tokenizer
    if args.action == "train":
        from .data.sources import DataConfig
        from .stages import RunConfig
        from .stages.tokenizer import train_tokenizer
        from .tokenizer import TokenizerConfig
        out = Path(args.out)
        cfg = RunConfig(tokenizer=TokenizerConfig(vocab_size=args.vocab_size, train_bytes=args.train_bytes),
                        data=DataConfig(sources=[_parse_source(s) for s in (args.data or ["stdlib"])]))
        res = train_tokenizer(cfg, out.parent if out.name == "tokenizer.json" else out)
        print(json.dumps(res["tokenizer"], indent=1))
        return
    tok = Tokenizer.load(args.tokenizer)
    if args.action == "encode":
        text = args.text if args.text is not None else sys.stdin.read()
        print(" ".join(map(str, tok.encode(text))))
    elif args.action == "decode":
        ids = args.ids or sys.stdin.read().split()
        try:
            print(tok.decode([int(i) for i in ids]), end="")
        except ValueError:
            raise GptstackError("decode takes integer token ids") from None
    else:
        print(json.dumps({"vocab_size": tok.vocab_size, "special_tokens": tok.special, "fingerprint": tok.fingerprint()}, indent=1))


def cmd_presets(args):
    import torch
    from .config import list_presets
    from .model import GPT
    from .stages import RunConfig
    print(f"{'preset':<14}{'layers':>7}{'d_model':>8}{'heads':>6}{'kv':>4}{'ctx':>6}{'vocab':>7}  {'block':<34}{'params':>8}")
    for name in list_presets():
        cfg = RunConfig.resolve(name)
        m = cfg.model
        with torch.device("meta"):
            n = GPT(m).num_params()
        block = f"{m.norm_position}-{m.norm} {m.mlp} {m.positions}"
        print(f"{name:<14}{m.n_layer:>7}{m.n_embd:>8}{m.n_head:>6}{m.kv_heads:>4}{m.n_ctx:>6}{m.vocab_size:>7}  {block:<34}{_human(n):>8}")


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def cmd_scale(args):
    from .stages import scale as ladder
    cfg = _resolve(args)
    run = Path(args.out)
    if args.action == "plan":
        print(ladder.plan_table(ladder.plan(cfg), cfg.scale.compute))
    elif args.action == "predict":
        print(json.dumps(ladder.predict_compute(run / "scale", args.compute), indent=1))
    else:
        if args.action == "run":
            ladder.run_ladder(cfg, run / "scale", target=not args.no_target)
        from .report import write_report
        _print_scale(ladder.analyze(cfg, run)["scale"])
        write_report(run)  # report.json's scale section (once the target has trained) and report.md
        print(f"report: {run / 'report.md'}; plot: {run / 'plots' / 'scaling.png'}")


def _print_scale(s):
    f = s["fit"]
    print(f"L(C) = {f['a']:.4g}·C^{f['b']:.4f} + {f['c']:.4f} ({s['compute_definition']})")
    print(f"target {s['target']['name']}: predicted {s['predicted_loss']:.4f} {s['predicted_interval']}"
          + (f", actual {s['actual_loss']:.4f}, error {s['relative_error']:+.2%}" if "actual_loss" in s else "")
          + f"; compute ratio {s['compute_ratio']:.1f}")


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptstack", description="The GPT-series recipe as one small PyTorch stack.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("pipeline", help="run all stages into one run folder, then write report.md / report.json",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the run folder, e.g. runs/demo")
    from .pipeline import all_stages, default_stages
    from .stages import STAGES
    p.add_argument("--stages", help="comma-separated stages, in any order (they run in recipe order), or 'all': "
                   + "; ".join(f"{s.name}: {s.help}" for s in STAGES)
                   + f". Default: {','.join(default_stages())}; 'all' leaves out "
                   + f"{','.join(s.name for s in STAGES if s.name not in all_stages()) or 'nothing'}. Finished stages are skipped.")
    _add_config_args(p, every_stage=True)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("pretrain", help="next-token pretraining (GPT-1 L1) into RUN/pretrain; resumes if interrupted",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the run folder (a tokenizer is trained into it if none is there)")
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="GPT-1 fine-tuning: a task head on a pretrained model, L3 = L2 + λ·L1",
                       epilog="records (JSONL): classification {text, label}; entailment {premise, hypothesis, label}; "
                              "similarity {text_a, text_b, label}; multiple_choice {context, choices, label}. "
                              "Settings: finetune.lm_coef (λ), finetune.epochs, finetune.train.lr, finetune.truncate, ...")
    p.add_argument("--task", required=True, choices=["classification", "entailment", "similarity", "multiple_choice"])
    p.add_argument("--data", required=True, help="training records (JSONL)")
    p.add_argument("--val", help="validation records (default: every 10th training record)")
    p.add_argument("--test", help="test records, scored at the end")
    p.add_argument("--from", dest="init", required=True, help="the pretrained stage folder, e.g. runs/demo/pretrain")
    p.add_argument("--scratch", action="store_true", help="same architecture, random weights (the baseline)")
    p.add_argument("--out", required=True, help="output folder for the fine-tuned model")
    add_settings_args(p, "finetune", "finetune.lm_coef=0 finetune.train.lr=1e-4", {"--strategy": "finetune.train.strategy"})
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("predict", help="label new records with a fine-tuned model")
    p.add_argument("--model", required=True, help="a fine-tuned model folder")
    p.add_argument("--data", required=True, help="records (JSONL) of the model's task kind; labels not needed")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the model)")
    p.add_argument("--out", help="write JSONL here (default: stdout)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("sample", help="generate text from a model")
    p.add_argument("--model", required=True, help="RUN/STAGE folder (or a model.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in the run folder)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    add_sampling_args(p, temperature=0.8, top_p=1.0, top_k=50)
    p.add_argument("--num-samples", type=number(int, 1), default=1)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when the sample contains TEXT (repeatable)")
    p.add_argument("--chat", action="store_true", help="the prompt is a user turn in the chat template (for SFT/RLHF models)")
    p.add_argument("--system", help="with --chat: a system message")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="a picture (PNG, JPEG, ...) before the prompt, for a model with image input (repeatable)")
    p.set_defaults(func=cmd_sample)

    add_instruction_verbs(sub)

    p = sub.add_parser("eval", help="evaluate a model")
    esub = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    e = esub.add_parser("lm", help="val loss, perplexity, bits per byte and the unigram floor on held-out data")
    e.add_argument("--model", required=True, help="RUN/STAGE folder")
    e.add_argument("--tokenizer", help="tokenizer.json (default: the one in the run folder)")
    e.add_argument("--data", action="append", default=[], metavar="SPEC", help="data source(s) (default: the run's)")
    e.add_argument("--seq-len", type=number(int, 1), help="tokens per scored window (default: the model's context; "
                   "shorter for an imported model whose context is longer than your data's val split)")
    e.set_defaults(func=cmd_eval)
    e = esub.add_parser("prompting", help="zero-, one- and few-shot prompting tasks (GPT-2/GPT-3 style), a K sweep",
                        epilog="A task is a built-in name (cloze, continuation, arithmetic, docstring_name) or a task "
                               ".yaml beside its JSONL data; see gptstack/evals/prompting.py for the fields.")
    e.add_argument("--model", required=True, action="append", help="RUN/STAGE folder; repeat to compare models")
    e.add_argument("--task", action="append", help="task name or task.yaml (repeatable; default: all built-in)")
    e.add_argument("--shots", default="0,1,8", help="comma-separated K values (default: 0,1,8)")
    e.add_argument("--limit", type=int, default=0, help="at most this many queries per task (0: all)")
    e.add_argument("--seed", type=int, default=0, help="which few-shot examples each query gets")
    e.add_argument("--plot", help="write the accuracy-against-K plot here (PNG)")
    e.set_defaults(func=cmd_eval_prompting)
    e = esub.add_parser("contamination", help="n-gram overlap of eval examples with training data (GPT-3's method); "
                        "with --model, accuracy on the full, clean and dirty subsets",
                        description="An eval example is dirty when one of its N-grams of normalised words (lower case, "
                        "punctuation and whitespace ignored) occurs in a training document; one of 8..N-1 words when it "
                        "occurs whole; under 8 words it cannot be tested (counted clean). The index is cached, keyed by "
                        "the training content's hash.")
    e.add_argument("--run", help="a run folder: check against what it trained on (pretraining split, SFT "
                   "demonstrations, RM and PPO prompts); the index is cached in RUN/contamination/")
    e.add_argument("--data", action="append", default=[], metavar="SOURCE",
                   help="training data source(s) (stdlib, file, folder, glob, *.jsonl, ...); repeatable")
    e.add_argument("--val-fraction", type=number(float, 0, 0.999), default=0.0,
                   help="with --data: leave out the documents a run with this data.val_fraction holds out (default 0: all)")
    e.add_argument("--task", action="append", help="task name or task.yaml (repeatable; default: all built-in)")
    e.add_argument("--n", type=number(int, 8), default=13, help="words per gram (default 13, GPT-3's; at least 8)")
    e.add_argument("--model", help="also score the tasks with this model folder: accuracy on all, clean and dirty")
    e.add_argument("--shots", type=number(int, 0), default=0, help="with --model: examples in context (default 0)")
    e.add_argument("--limit", type=number(int, 0), default=0, help="with --model: at most this many queries per task (0: all)")
    e.add_argument("--seed", type=int, default=0, help="built-in tasks' seed and the few-shot draw")
    e.set_defaults(func=cmd_eval_contamination)
    e = esub.add_parser("calibration", help="expected calibration error and reliability diagrams on multiple choice",
                        description="Each model's probability of its chosen answer (softmax over the options' summed "
                        "log-likelihoods) against how often it is right; ECE over equal-width confidence bins.")
    e.add_argument("--model", required=True, action="append", help="model folder; repeat to compare (same questions)")
    e.add_argument("--task", action="append", help="multiple-choice task name or task.yaml (repeatable; default: "
                   "continuation, docstring_name)")
    e.add_argument("--shots", type=number(int, 0), default=0, help="solved examples in each prompt (default 0)")
    e.add_argument("--limit", type=number(int, 0), default=0, help="at most this many questions per task (0: all)")
    e.add_argument("--bins", type=number(int, 1), default=10, help="equal-width confidence bins (default 10)")
    e.add_argument("--format", action="append", choices=["letters", "options"],
                   help="letters: options listed, the answer a letter (MMLU's, GPT-4's); options: each option's text "
                        "as the answer; repeatable (default: both, letters first)")
    e.add_argument("--seed", type=int, default=0, help="built-in tasks' seed and the few-shot draw")
    e.add_argument("--plot", help="write the reliability diagrams here (PNG)")
    e.set_defaults(func=cmd_eval_calibration)

    e = esub.add_parser("long-context", help="passkey and needle retrieval over prompt lengths x depths (test probes)",
                        epilog="The needle's haystacks are held-out documents of the data sources (--data, default: the "
                               "stdlib corpus). A length past the model's window is not run (null). See "
                               "gptstack/evals/long_context.py.\n\n" + EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--model", required=True, help="RUN/STAGE or model folder")
    e.add_argument("--lengths", required=True, help="comma-separated prompt lengths in tokens, e.g. 256,512,1024")
    e.add_argument("--depths", default="0,25,50,75,100", help="comma-separated depths of the fact, in percent")
    e.add_argument("--task", default="passkey,needle", help="passkey, needle or both (default: both)")
    e.add_argument("--probes", type=number(int, 1), default=10, help="test probes per cell (default: 10)")
    e.add_argument("--prefill-chunk", type=number(int, 0), default=2048, help="prompt tokens per prefill forward (0: at once)")
    e.add_argument("--metric", choices=["accuracy", "logprob"], default="accuracy",
                   help="accuracy: greedy answers right; logprob: the right answer's mean log-probability (no heat map)")
    e.add_argument("--plot", help="write the heat map here (PNG; accuracy)")
    _add_config_args(e)
    e.set_defaults(func=cmd_eval_long_context)

    p = sub.add_parser("tokenizer", help="train / use a byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train on data sources")
    t.add_argument("--data", action="append", default=[], metavar="SPEC", help="data source(s) (default: stdlib)")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--train-bytes", type=int, default=0, help="train on at most this many bytes (0: all)")
    t.add_argument("--out", default="tokenizer.json", help="output file or folder")
    for action, helptext in (("encode", "text -> token ids"), ("decode", "token ids -> text"), ("info", "vocabulary and special tokens")):
        t = tsub.add_parser(action, help=helptext)
        t.add_argument("--tokenizer", required=True, help="tokenizer.json or a run folder")
        if action == "encode":
            t.add_argument("text", nargs="?", help="text (default: stdin)")
        if action == "decode":
            t.add_argument("ids", nargs="*", help="token ids (default: stdin)")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("scale", help="predictable scaling: a ladder of small models, L(C) = a·C^b + c, the big run predicted")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, helptext in (("plan", "the ladder's runs: sizes, tokens, compute with and without embeddings"),
                             ("run", "train every rung into OUT/scale (finished ones skipped), predict, train the target"),
                             ("fit", "fit L(C), L(N, D) and the capability law on the finished rungs; plots/scaling.png"),
                             ("predict", "the predicted loss at --compute FLOPs, with its bootstrap interval")):
        s = ssub.add_parser(action, help=helptext, epilog="ladder settings: scale.* (ScaleConfig in gptstack/stages/scale.py)")
        s.add_argument("--out", default="runs/scale", help="the run folder; the ladder lives in OUT/scale (default: runs/scale)")
        if action == "predict":
            s.add_argument("--compute", type=float, required=True, help="training FLOPs, counted as the fit counts them")
        if action == "run":
            s.add_argument("--no-target", action="store_true", help="train the ladder and predict, but not the target")
        _add_config_args(s)
        s.set_defaults(func=cmd_scale)

    p = sub.add_parser("import", help="a pretrained model (Hugging Face folder or GGUF file) as a gptstack model folder",
                       epilog="GPT-2 and Llama-family models (SmolLM2, Llama 3). GGUF: F16/BF16/Q8_0/Q4_x/K-quants are "
                              "dequantized to float32; the tokenizer and chat template come from the file's metadata.")
    p.add_argument("src", help="a Hugging Face model folder (config.json, *.safetensors, tokenizer.json) or a .gguf file")
    p.add_argument("--out", required=True, help="the model folder to write (model.safetensors, tokenizer.json, chat_template.json)")
    p.set_defaults(func=cmd_import)
    from .extend import LEARNED_METHODS, ROPE_METHODS
    p = sub.add_parser("extend", help="a longer context window for a trained model (position interpolation, RoPE scaling)",
                       epilog="learned positions: interpolate (rows resampled so new position j reads old j·T/T') or tile "
                              "(rows copied end to end). rotary: linear, ntk, yarn (saved as model.rope_scaling, applied at "
                              "inference without fine-tuning) or none (longer window, positions unscaled). --steps N then "
                              "fine-tunes N steps at the new length on corpus windows mixed with passkey/needle examples "
                              "(settings: long_context.train.*, long_context.retrieval_fraction; the checkpoint kept is "
                              "the best on dev probes: the right answer's mean log-probability).\n\n" + EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="RUN/STAGE or model folder")
    p.add_argument("--ctx", required=True, type=number(int, 1), help="the new window, in tokens")
    p.add_argument("--method", required=True, choices=[*LEARNED_METHODS, *ROPE_METHODS], help="how positions are extended")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--steps", type=number(int, 0), default=0, help="fine-tuning steps at the new length (default 0: none)")
    _add_config_args(p)
    p.set_defaults(func=cmd_extend)
    p = sub.add_parser("export", help="a gptstack model folder as a Hugging Face folder or a GGUF file")
    p.add_argument("model", help="RUN/STAGE or model folder")
    p.add_argument("--to", required=True, choices=["hf", "gguf"], help="hf: a folder transformers loads; gguf: a file llama.cpp reads")
    p.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"], help="GGUF weight type (default: f16)")
    p.add_argument("out", help="the folder (hf) or .gguf file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("presets", help="list the model presets with their parameter counts")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .train.trainer import Interrupted
    try:
        args.func(args)
    except Interrupted as e:
        print(f"gptstack: {e}", file=sys.stderr)
        return e.exit_code
    except GptstackError as e:
        print(f"gptstack: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or foreign folder, a file where a folder should be
        print(f"gptstack: error: {os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptstack: interrupted", file=sys.stderr)
        return 130
    return 0


OS_HINTS = {errno.ENOSPC: "free some space, then run the same command again: it resumes from the last checkpoint",
            errno.EDQUOT: "free some space, then run the same command again: it resumes from the last checkpoint",
            errno.EROFS: "choose a writable output folder", errno.EACCES: "choose a folder you may write to",
            errno.EPERM: "choose a folder you may write to", errno.EEXIST: "it is in the way; choose another path",
            errno.ENOTDIR: "a file stands where a folder should be; choose another path"}


def os_error(e: OSError) -> str:
    """An OS error as one line: the path, what went wrong, and what to do."""
    where = f"{e.filename}: " if e.filename else ""
    hint = OS_HINTS.get(e.errno)
    return f"{where}{e.strerror or e}" + (f" ({hint})" if hint else "")


if __name__ == "__main__":
    sys.exit(main())
