"""The instruction-following verbs of `gptstack`: sft, chat, compare, label, rm, ppo (parsing and dispatch only)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path


def _stage_folder(source: str, out: str | None, stage: str):
    """(the tokenizer beside `source`, the output folder): `out`, or STAGE/ beside the source folder.
    An output outside a run folder gets its own copy of the tokenizer, so chat and later stages find it."""
    from .checkpoint import find_tokenizer
    from .tokenizer import Tokenizer
    tok = Tokenizer.load(find_tokenizer(source))
    folder = Path(out) if out else Path(source).parent / stage
    if not (folder.parent / "tokenizer.json").is_file():
        tok.save(folder / "tokenizer.json")
    return tok, folder


def add_settings_args(p, section: str, example: str) -> None:
    """--preset, --config and key=value overrides for a verb whose settings live in config `section`."""
    p.add_argument("--preset", default="tiny", help=f"preset whose {section}.* settings to use (default: tiny)")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config merged over the preset")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"e.g. {example}")


def _readline() -> None:
    try:
        importlib.import_module("readline")  # line editing and history for input()
    except ImportError:
        pass


def cmd_sft(args):
    from . import config
    from .train.sft import run_sft
    overrides = list(args.overrides) + ([f"sft.data={args.data}"] if args.data else [])
    cfg = config.resolve(args.preset, args.config, overrides)
    tok, out = _stage_folder(args.init, args.out, "sft")
    r = run_sft(cfg, Path(args.init), out, tok).get("sft", {})
    print(f"model: {out / 'model.safetensors'}")
    if "accuracy" in r:
        print(f"held-out: accuracy {r['accuracy']:.3f} (pretrained {r['base_accuracy']:.3f}), "
              f"gold score {r['gold_score']:.3f} (pretrained {r['base_gold_score']:.3f})")
        for fam, row in r["by_family"].items():
            print(f"  {fam:<12} accuracy {row['accuracy']:.3f} (pretrained {r['base_by_family'][fam]['accuracy']:.3f})")


def cmd_chat(args):
    from .chat import chat
    from .checkpoint import find_tokenizer, load_model
    from .tokenizer import Tokenizer
    _readline()
    model = load_model(args.model, "auto")
    tok = Tokenizer.load(args.tokenizer or find_tokenizer(args.model))
    chat(model, tok, args.system, args.max_new_tokens, args.temperature, args.top_p, args.seed)


def cmd_compare(args):
    from . import config
    from .checkpoint import find_tokenizer
    from .comparisons import compare, read_prompts
    from .tokenizer import Tokenizer
    from .world.instructions import InstructionSuite
    cfg = config.resolve(args.preset, args.config, args.overrides)
    r = cfg.rm
    tok = Tokenizer.load(find_tokenizer(args.policy[0]))
    suite = InstructionSuite(seed=cfg.sft.seed)
    if args.prompts == "world":
        prompts = suite.prompts(args.split, args.n or r.prompts, seed=r.seed + 100)
    else:
        prompts = read_prompts(Path(args.prompts), suite)
    temps = [float(t) for t in args.temperatures.split(",")] if args.temperatures else r.temperatures
    out = Path(args.out)
    summary = compare(args.policy, tok, prompts, args.k or r.k, args.labeler or r.labeler, out, temps,
                      r.agreement if args.agreement is None else args.agreement, r.tie_threshold, r.max_new_tokens, r.seed)
    print(json.dumps(summary))
    if summary["labeler"] == "human":
        print(f"now rank them: gptstack label {out}")


def cmd_rm(args):
    from . import config
    from .train.rm import run_rm
    cfg = config.resolve(args.preset, args.config, args.overrides)
    tok, out = _stage_folder(args.init, args.out, "rm")
    r = run_rm(cfg, Path(args.init), out, tok, Path(args.data) if args.data else None,
               Path(args.val) if args.val else None).get("rm", {})
    print(f"reward model: {out / 'model.safetensors'}")
    print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}))


def cmd_ppo(args):
    from . import config
    from .train.ppo_stage import run_ppo
    overrides = list(args.overrides)
    for key, value in (("ptx_coef", args.ptx_coef), ("kl_coef", args.kl_coef), ("kl_target", args.kl_target),
                       ("rbrm", args.rbrm), ("rounds", args.rounds)):
        if value is not None:
            overrides.append(f"ppo.{key}={value}")
    cfg = config.resolve(args.preset, args.config, overrides)
    if args.versus:
        cfg.ppo.versus = args.versus
    tok, out = _stage_folder(args.policy, args.out, "ppo")
    r = run_ppo(cfg, Path(args.policy), Path(args.rm), out, tok).get("ppo", {})
    print(f"policy: {out / 'model.safetensors'}")
    print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}))


def cmd_label(args):
    from .label import Labeller
    _readline()
    todo = Path(args.todo)
    out = Path(args.out) if args.out else todo.with_name(todo.name.replace("_todo", "").replace(".jsonl", "") + "_ranked.jsonl")
    Labeller(todo, out).run()


def add_instruction_verbs(sub) -> None:
    p = sub.add_parser("sft", help="instruction tuning (InstructGPT step 1): loss on the assistant's tokens only",
                       epilog="records (JSONL): {messages: [{role, content}, ...]}, {prompt, response[, system]} or "
                              "Alpaca {instruction, input, output}; or `world` for the built-in instruction suite "
                              "(its held-out gold-labeler eval then picks the best checkpoint). "
                              "Settings: sft.epochs, sft.train.lr, sft.train.batch_size, sft.demonstrations, ...")
    p.add_argument("--from", dest="init", required=True, help="the pretrained stage folder, e.g. runs/demo/pretrain")
    p.add_argument("--data", help="SFT records (JSONL) or 'world' (default: the preset's sft.data, world)")
    p.add_argument("--out", help="output folder (default: sft/ beside the --from folder)")
    add_settings_args(p, "sft", "sft.train.lr=1e-4 sft.val_data=val.jsonl")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("compare", help="sample K answers per prompt and have them ranked (gold, noisy or human labeler)",
                       epilog="Writes rankings JSONL {prompt, system, responses, ranks, gold_ranks, sources}; with "
                              "--labeler human, a to-do file for `gptstack label`. Settings: rm.agreement, rm.tie_threshold, "
                              "rm.max_new_tokens, ...")
    p.add_argument("--policy", action="append", required=True, help="policy folder (e.g. runs/demo/sft); repeat to sample from several")
    p.add_argument("--prompts", default="world", help="'world' (the instruction suite) or JSONL of {prompt, [system]}")
    p.add_argument("--split", default="train", choices=["train", "heldout"], help="world: which templates")
    p.add_argument("--n", type=int, default=0, help="world: how many prompts (default: rm.prompts)")
    p.add_argument("--k", type=int, default=0, help="answers per prompt (default: rm.k, 4)")
    p.add_argument("--temperatures", help="comma-separated sampling temperatures, cycled over the K answers (default: rm.temperatures)")
    p.add_argument("--labeler", choices=["gold", "noisy", "human"], help="default: rm.labeler (noisy)")
    p.add_argument("--agreement", type=float, help="noisy: pairwise agreement with gold (default: rm.agreement, 0.73)")
    p.add_argument("--out", required=True, help="rankings JSONL to write")
    add_settings_args(p, "rm", "rm.agreement=0.8 rm.max_new_tokens=48")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("rm", help="train a reward model on rankings: all C(K,2) pairs of a prompt in one batch element",
                       epilog="rankings (JSONL): {prompt, [system], responses, ranks} (1 = best, ties allowed) or pairs "
                              "{prompt, chosen, rejected}. Without --data: samples and ranks the world's prompts first. "
                              "Settings: rm.epochs, rm.train.lr, rm.train.batch_size, rm.k, rm.labeler, rm.agreement, ...")
    p.add_argument("--from", dest="init", required=True, help="the SFT stage folder, e.g. runs/demo/sft")
    p.add_argument("--data", help="rankings JSONL (default: compare on the world's prompts)")
    p.add_argument("--val", help="held-out rankings JSONL (default: every 10th ranking of --data)")
    p.add_argument("--out", help="output folder (default: rm/ beside the --from folder)")
    add_settings_args(p, "rm", "rm.train.lr=5e-5 rm.epochs=2")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("ppo", help="RLHF: PPO-ptx against a reward model, per-token KL to SFT, rule-based rewards",
                       epilog="Settings: ppo.rollouts, ppo.rollout_batch, ppo.ppo_epochs, ppo.minibatches, ppo.train.lr, "
                              "ppo.clip, ppo.vf_coef, ppo.no_end_penalty, ppo.max_new_tokens, ppo.baselines, ...")
    p.add_argument("--policy", required=True, help="the SFT stage folder (the policy starts there and the KL is to it)")
    p.add_argument("--rm", required=True, help="the reward-model folder, e.g. runs/demo/rm")
    p.add_argument("--ptx-coef", type=float, help="γ of PPO-ptx (default: ppo.ptx_coef; 0: plain PPO)")
    p.add_argument("--kl-coef", type=float, help="β of the per-token KL penalty (default: ppo.kl_coef)")
    p.add_argument("--kl-target", type=float, help="adapt β toward this KL per answer, in nats")
    p.add_argument("--rbrm", help="rule-based rewards: a rubric YAML, or 'world' for the built-in one")
    p.add_argument("--rounds", type=int, help="> 1: new rankings from the current policy and a retrained RM between rounds")
    p.add_argument("--versus", action="append", metavar="POLICY",
                   help="also judge the PPO policy against this policy folder, e.g. a larger SFT model (repeatable)")
    p.add_argument("--out", help="output folder (default: ppo/ beside the --policy folder)")
    add_settings_args(p, "ppo", "ppo.rollouts=80 ppo.train.lr=1e-5")
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("label", help="rank K answers per prompt yourself (terminal UI; resumes where you stopped)",
                       description="Shows each prompt with its answers A, B, C, ... and takes a ranking, best first: "
                                   "`B > A = C > D` or `BA=CD` (= is a tie). s skips, u undoes, q quits. Each ranking "
                                   "is saved the moment it is given; rerun to resume.")
    p.add_argument("todo", help="JSONL of {prompt, [system], responses} (e.g. from `compare --labeler human`)")
    p.add_argument("--out", help="rankings file to append to (default: beside the to-do file, *_ranked.jsonl)")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("chat", help="talk to a model in the terminal, streamed; /system, /reset, /quit")
    p.add_argument("--model", required=True, help="RUN/STAGE folder, e.g. runs/demo/sft")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in the run folder)")
    p.add_argument("--system", help="system message that sets the assistant's behaviour")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_chat)
