"""The instruction-following verbs of `gptstack`: sft, vision, chat, serve, compare, label, rm, ppo, dpo (parsing and
dispatch only)."""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path


def _stage_folder(source: str, out: str | None, stage: str):
    """(the tokenizer beside `source`, the output folder): `out`, or STAGE/ beside the source folder."""
    from .checkpoint import find_tokenizer
    from .tokenizer import Tokenizer
    return Tokenizer.load(find_tokenizer(source)), Path(out) if out else Path(source).parent / stage


def _keep_tokenizer(tok, folder: Path) -> bool:
    """Once the stage has run: an output outside a run folder gets its own copy of the tokenizer, so chat and later
    stages find it (written last, so a refused run leaves no folder behind). Under torchrun rank 0 writes it and
    speaks: returns whether this is that rank."""
    from .train.distributed import is_main
    if is_main() and not (folder.parent / "tokenizer.json").is_file():
        tok.save(folder / "tokenizer.json")
    return is_main()


def _log(*args, **kwargs) -> None:
    """A stage's progress lines: under torchrun, rank 0's only."""
    from .train.distributed import is_main
    if is_main():
        print(*args, **kwargs)


def add_settings_args(p, section: str, example: str, flags: dict[str, str] | None = None) -> None:
    """--preset, --config and key=value overrides for a verb whose settings live in config `section`, and
    `flags` ({--flag: config key}) that set single keys."""
    p.add_argument("--preset", default="tiny", help=f"preset whose {section}.* settings to use (default: tiny)")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config merged over the preset")
    add_flags(p, flags or {})
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"e.g. {example}")


# What each flag that sets a config key means; the flag's type and choices come from the key's dataclass
# field, and its value becomes the override key=value, so a flag cannot drift from its setting.
FLAG_HELP = {
    "pretrain.strategy": "under torchrun: ddp (a whole model per rank) or fsdp (FSDP2 sharding, for models too big for one device)",
    "finetune.train.strategy": "under torchrun: ddp (a whole model per rank) or fsdp (FSDP2 sharding)",
    "sft.train.strategy": "under torchrun: ddp (a whole model per rank) or fsdp (FSDP2 sharding, for models too big for one device)",
    "rm.train.strategy": "under torchrun: ddp (a whole model per rank) or fsdp (FSDP2 sharding, for models too big for one device)",
    "ppo.train.strategy": "under torchrun: ddp (whole models per rank) or fsdp (FSDP2 sharding of all four models)",
    "vision.train.strategy": "under torchrun: ddp (a whole model per rank) or fsdp (FSDP2 sharding)",
    "sft.data": "SFT records (JSONL: messages / prompt+response / Alpaca) or 'world'",
    "sft.val_data": "validation records: the val loss, which may pick the kept checkpoint (default: every 10th record)",
    "sft.test_data": "test records: the reported test loss, never used for a choice",
    "rm.prompts": "world: how many prompts",
    "rm.k": "answers per prompt",
    "rm.temperatures": "a sampling temperature, cycled over the K answers (repeatable)",
    "rm.labeler": "who ranks the answers: the world's gold or noisy labeler, or a human (`gptstack label`)",
    "rm.agreement": "noisy labeler: pairwise agreement with gold",
    "ppo.prompts": "prompts JSONL ({prompt, [system]} or {messages}) or 'world'",
    "ppo.val_prompts": "validation prompts JSONL: they pick the kept checkpoint (default: every 10th prompt)",
    "ppo.test_prompts": "test prompts JSONL: the reported figures (default: every 10th prompt, offset by 5)",
    "ppo.ptx_coef": "γ of PPO-ptx (0: plain PPO)",
    "ppo.kl_coef": "β of the per-token KL penalty",
    "ppo.kl_target": "adapt β toward this KL per answer, in nats",
    "ppo.rbrm": "rule-based rewards: a rubric YAML, or 'world' for the built-in one",
    "ppo.rounds": "world: > 1 ranks the current policy's answers and retrains the RM between rounds",
    "ppo.versus": "world: also judge the PPO policy against this policy folder, e.g. a larger SFT model (repeatable)",
    "dpo.loss": "sigmoid (DPO's pairwise loss), ipo (squared, toward 1/(2β)) or listwise (Plackett-Luce over the whole ranking)",
    "dpo.beta": "β: the implicit reward is β·log π/π_ref; larger keeps the policy closer to the reference",
    "dpo.label_smoothing": "sigmoid only: the share of preference labels assumed flipped (conservative DPO), in [0, 0.5)",
    "dpo.reference": "model: the frozen SFT model beside the policy; precomputed: its log-probs computed once, no second model",
    "dpo.train.strategy": "under torchrun: ddp (a whole model per rank) or fsdp (FSDP2 sharding of the policy)",
}


def _field(key: str):
    """The type hint of config key 'section.field[.field]'."""
    import typing
    from .stages.base import sections
    section, *path = key.split(".")
    hint = sections()[section]
    for name in path:
        hint = typing.get_type_hints(hint)[name]
    return hint


def add_flags(p, flags: dict[str, str]) -> None:
    import typing
    from .config import choices
    for flag, key in flags.items():
        hint = _field(key)
        kw = {"choices": list(choices(hint))} if choices(hint) else {"type": hint if hint in (int, float) else str}
        if typing.get_origin(hint) is list:
            kw = {"action": "append", "type": typing.get_args(hint)[0]}
        p.add_argument(flag, dest=f"flag:{key}", metavar=None if "choices" in kw else key.split(".")[-1].upper(),
                       help=f"{FLAG_HELP[key]} (sets {key})", **kw)


def settings(args):
    """The resolved RunConfig of a verb: preset, YAML files, flags, then key=value overrides."""
    import json
    from .stages import RunConfig
    flags = [f"{dest[5:]}={json.dumps(v)}" for dest, v in vars(args).items() if dest.startswith("flag:") and v is not None]
    return RunConfig.resolve(args.preset, args.config, flags + list(args.overrides))


def number(kind, low=None, high=None, low_open=False):
    """An argparse type: `kind` (int or float) within [low, high] (low excluded with low_open), else a usage error."""
    import argparse
    import math

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if math.isnan(x) or (low is not None and (x <= low if low_open else x < low)) or (high is not None and x > high):
            side = f"{'>' if low_open else '>='} {low}" if high is None else f"in {'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {side}, got {text}")
        return x
    return parse


def add_sampling_args(p, temperature: float, top_p: float, top_k: int | None = None) -> None:
    """The decoding settings of `sample` and `chat`, each checked on the command line."""
    p.add_argument("--max-new-tokens", type=number(int, 1), default=200)
    p.add_argument("--temperature", type=number(float, 0), default=temperature, help="0 for greedy")
    if top_k is not None:
        p.add_argument("--top-k", type=number(int, 0), default=top_k, help="sample from the k likeliest tokens (0: no limit)")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=top_p, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None)


def _readline() -> None:
    try:
        importlib.import_module("readline")  # line editing and history for input()
    except ImportError:
        pass


def cmd_sft(args):
    from .stages.sft import run_sft
    cfg = settings(args)
    tok, out = _stage_folder(args.init, args.out, "sft")
    r = run_sft(cfg, Path(args.init), out, tok, _log).get("sft", {})
    if not _keep_tokenizer(tok, out):
        return
    print(f"model: {out / 'model.safetensors'}")
    if "test_loss" in r:
        print(f"test loss {r['test_loss']:.3f} (val loss {r['val_loss']:.3f})")
    if "accuracy" in r:
        print(f"test: accuracy {r['accuracy']:.3f} (pretrained {r['base_accuracy']:.3f}), "
              f"gold score {r['gold_score']:.3f} (pretrained {r['base_gold_score']:.3f})")
        for fam, row in r["by_family"].items():
            print(f"  {fam:<12} accuracy {row['accuracy']:.3f} (pretrained {r['base_by_family'][fam]['accuracy']:.3f})")


def cmd_vision(args):
    from .stages.vision import run_vision
    cfg = settings(args)
    tok, out = _stage_folder(args.init, args.out, "vision")
    r = run_vision(cfg, Path(args.init), out, tok, _log).get("vision", {})
    from .train.distributed import is_main
    if not (out / "tokenizer.json").is_file():  # (run_vision writes its own there when it adds <|image|>)
        _keep_tokenizer(tok, out)
    if not is_main():
        return
    print(f"model: {out / 'model.safetensors'} ({r['image_tokens']} image tokens per {r['image_size']}×{r['image_size']} picture)")
    print(f"test: accuracy {r['accuracy']:.3f} on {r['n']} image questions (without the picture {r['no_image_accuracy']:.3f}, "
          f"chance {r['chance']:.3f}; dev {r['dev']['accuracy']:.3f})")
    for t, row in r["by_type"].items():
        print(f"  {t:<10} accuracy {row['accuracy']:.3f}  without the picture {row['no_image_accuracy']:.3f}  "
              f"chance {row['chance']:.3f}  n {row['n']}")


def cmd_chat(args):
    from .chat import chat
    from .checkpoint import find_tokenizer, load_model
    from .tokenizer import Tokenizer
    _readline()
    model = load_model(args.model, "auto")
    tok = Tokenizer.load(args.tokenizer or find_tokenizer(args.model))
    chat(model, tok, args.system, args.max_new_tokens, args.temperature, args.top_p, args.seed)


def cmd_serve(args):
    from .serve.app import serve
    serve(args.model, args.host, args.port, args.api_key, args.max_batch, args.tokenizer)


def cmd_compare(args):
    from .checkpoint import find_tokenizer
    from .comparisons import compare, read_prompts
    from .tokenizer import Tokenizer
    from .world.instructions import InstructionSuite
    cfg = settings(args)
    r = cfg.rm
    tok = Tokenizer.load(find_tokenizer(args.policy[0]))
    suite = InstructionSuite(seed=cfg.sft.seed)
    if args.prompts == "world":
        prompts = suite.prompts(args.split, r.prompts, seed=r.seed + 100)
    else:
        prompts = read_prompts(Path(args.prompts), suite)
    out = Path(args.out)
    summary = compare(args.policy, tok, prompts, r.k, r.labeler, out, r.temperatures, r.agreement, r.tie_threshold,
                      r.max_new_tokens, r.seed, r.train.device)
    from .train.distributed import is_main
    if not is_main():
        return
    print(json.dumps(summary))
    if summary["labeler"] == "human":
        print(f"now rank them: gptstack label {out}")


def cmd_rm(args):
    from .stages.rm import run_rm
    cfg = settings(args)
    tok, out = _stage_folder(args.init, args.out, "rm")
    r = run_rm(cfg, Path(args.init), out, tok, *(Path(f) if f else None for f in (args.data, args.val, args.test)),
               log=_log).get("rm", {})
    if not _keep_tokenizer(tok, out):
        return
    print(f"reward model: {out / 'model.safetensors'}")
    print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}))


def cmd_ppo(args):
    from .stages.ppo import run_ppo
    cfg = settings(args)
    tok, out = _stage_folder(args.policy, args.out, "ppo")
    r = run_ppo(cfg, Path(args.policy), Path(args.rm), out, tok, _log).get("ppo", {})
    if not _keep_tokenizer(tok, out):
        return
    print(f"policy: {out / 'model.safetensors'}")
    print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}))


def cmd_dpo(args):
    from .stages.dpo import run_dpo
    cfg = settings(args)
    tok, out = _stage_folder(args.policy, args.out, "dpo")
    r = run_dpo(cfg, Path(args.policy), out, tok, Path(args.data), *(Path(f) if f else None for f in (args.val, args.test, args.rm)),
                log=_log).get("dpo", {})
    if not _keep_tokenizer(tok, out):
        return
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
                              "(the gold labeler's score on its dev prompts then picks the kept checkpoint, and its test "
                              "prompts give the reported figures). "
                              "Settings: sft.epochs, sft.train.lr, sft.train.batch_size, sft.demonstrations, ...")
    p.add_argument("--from", dest="init", required=True, help="the pretrained stage folder, e.g. runs/demo/pretrain")
    p.add_argument("--out", help="output folder (default: sft/ beside the --from folder)")
    add_settings_args(p, "sft", "sft.train.lr=1e-4 sft.epochs=3",
                      {"--data": "sft.data", "--val": "sft.val_data", "--test": "sft.test_data", "--strategy": "sft.train.strategy"})
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("vision", help="image input (GPT-4): a patch encoder and projector trained in LLaVA's two stages",
                       description="Gives a chat model eyes: a small ViT patch encoder and a pixel-shuffle projector whose "
                                   "vectors replace <|image|> placeholders. Stage 1 trains the projector alone on captions "
                                   "of the built-in image world, stage 2 the decoder and projector (and the encoder) on "
                                   "image questions in the chat template, keeping the checkpoint with the best dev "
                                   "accuracy, and prints accuracy by question type on test pictures holding held-out "
                                   "colour-shape pairs, with and without the picture, against chance.",
                       epilog="Settings: vision.encoder.image_size, vision.encoder.patch_size, vision.encoder.shuffle, "
                              "vision.questions, vision.captions, vision.align.lr, vision.train.lr, vision.epochs, "
                              "vision.train_encoder, ... Then: gptstack chat --model OUT (/image PATH), gptstack sample "
                              "--model OUT --chat --image PATH --prompt '...', gptstack serve --model OUT.")
    p.add_argument("--from", dest="init", required=True, help="the chat model to give eyes, e.g. runs/demo/sft")
    p.add_argument("--out", help="output folder (default: vision/ beside the --from folder)")
    add_settings_args(p, "vision", "vision.questions=20000 vision.train.lr=1e-3", {"--strategy": "vision.train.strategy"})
    p.set_defaults(func=cmd_vision)

    p = sub.add_parser("compare", help="sample K answers per prompt and have them ranked (gold, noisy or human labeler)",
                       epilog="Writes rankings JSONL {prompt, system, responses, ranks, gold_ranks, sources}; with "
                              "--labeler human, a to-do file for `gptstack label`. Settings: rm.agreement, rm.tie_threshold, "
                              "rm.max_new_tokens, ...")
    p.add_argument("--policy", action="append", required=True, help="policy folder (e.g. runs/demo/sft); repeat to sample from several")
    p.add_argument("--prompts", default="world", help="'world' (the instruction suite) or JSONL of {prompt, [system]}")
    p.add_argument("--split", default="train", choices=["train", "dev", "test"], help="world: which templates")
    p.add_argument("--out", required=True, help="rankings JSONL to write")
    add_settings_args(p, "rm", "rm.tie_threshold=0.05 rm.max_new_tokens=48",
                      {"--n": "rm.prompts", "--k": "rm.k", "--temperature": "rm.temperatures", "--labeler": "rm.labeler",
                       "--agreement": "rm.agreement"})
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("rm", help="train a reward model on rankings: all C(K,2) pairs of a prompt in one batch element",
                       epilog="rankings (JSONL): {prompt, [system], responses, ranks} (1 = best, ties allowed) or pairs "
                              "{prompt, chosen, rejected}. Without --data: samples and ranks the world's prompts first. "
                              "Settings: rm.epochs, rm.train.lr, rm.train.batch_size, rm.k, rm.labeler, rm.agreement, ...")
    p.add_argument("--from", dest="init", required=True, help="the SFT stage folder, e.g. runs/demo/sft")
    p.add_argument("--data", help="rankings JSONL (default: compare on the world's prompts)")
    p.add_argument("--val", help="validation rankings JSONL (default: every 10th ranking of --data)")
    p.add_argument("--test", help="test rankings JSONL: the reported accuracy, never used for a choice (default: none)")
    p.add_argument("--out", help="output folder (default: rm/ beside the --from folder)")
    add_settings_args(p, "rm", "rm.train.lr=5e-5 rm.epochs=2", {"--strategy": "rm.train.strategy"})
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("ppo", help="RLHF: PPO-ptx against a reward model, per-token KL to SFT, rule-based rewards",
                       epilog="Settings: ppo.rollouts, ppo.rollout_batch, ppo.ppo_epochs, ppo.minibatches, ppo.train.lr, "
                              "ppo.clip, ppo.vf_coef, ppo.no_end_penalty, ppo.max_new_tokens, ppo.baselines, ...")
    p.add_argument("--policy", required=True, help="the SFT stage folder (the policy starts there and the KL is to it)")
    p.add_argument("--rm", required=True, help="the reward-model folder, e.g. runs/demo/rm")
    p.add_argument("--out", help="output folder (default: ppo/ beside the --policy folder)")
    add_settings_args(p, "ppo", "ppo.rollouts=80 ppo.train.lr=1e-5",
                      {"--prompts": "ppo.prompts", "--val-prompts": "ppo.val_prompts", "--test-prompts": "ppo.test_prompts",
                       "--ptx-coef": "ppo.ptx_coef",
                       "--kl-coef": "ppo.kl_coef", "--kl-target": "ppo.kl_target", "--rbrm": "ppo.rbrm",
                       "--rounds": "ppo.rounds", "--versus": "ppo.versus", "--strategy": "ppo.train.strategy"})
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("dpo", help="direct preference optimisation on rankings: pairwise (sigmoid, IPO) or listwise, no reward model",
                       description="Trains the policy on K-way rankings directly, with the frozen --policy model as the "
                                   "reference: every non-tied pair of a prompt grouped per prompt as the reward model's, or "
                                   "the whole ranking (Plackett-Luce). Log-probabilities are summed over the answer's tokens "
                                   "in the model's chat template.",
                       epilog="rankings (JSONL): {prompt, [system], responses, ranks} (1 = best, ties allowed) or pairs "
                              "{prompt, chosen, rejected}. With the world's rankings (`gptstack rm` writes them) the policy "
                              "is also judged against SFT on the world's dev prompts, and on its test prompts with --test. "
                              "Settings: dpo.epochs, dpo.train.lr, dpo.train.batch_size, dpo.train.lora_rank, ...")
    p.add_argument("--policy", required=True, help="the SFT stage folder: the policy starts there and it is the reference")
    p.add_argument("--data", required=True, help="rankings JSONL, e.g. runs/demo/rm/rankings.jsonl")
    p.add_argument("--val", help="validation rankings JSONL: the held-out figures (default: every 10th ranking of --data)")
    p.add_argument("--test", help="test rankings JSONL: the reported figures, never used for a choice (default: none)")
    p.add_argument("--rm", help="a reward-model folder: the evaluation adds its score of the answers (default: none)")
    p.add_argument("--out", help="output folder (default: dpo/ beside the --policy folder)")
    add_settings_args(p, "dpo", "dpo.train.lr=5e-5 dpo.epochs=2",
                      {"--loss": "dpo.loss", "--beta": "dpo.beta", "--label-smoothing": "dpo.label_smoothing",
                       "--reference": "dpo.reference", "--strategy": "dpo.train.strategy"})
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("label", help="rank K answers per prompt yourself (terminal UI; resumes where you stopped)",
                       description="Shows each prompt with its answers A, B, C, ... and takes a ranking, best first: "
                                   "`B > A = C > D` or `BA=CD` (= is a tie). s skips, u undoes, q quits. Each ranking "
                                   "is saved the moment it is given; rerun to resume.")
    p.add_argument("todo", help="JSONL of {prompt, [system], responses} (e.g. from `compare --labeler human`)")
    p.add_argument("--out", help="rankings file to append to (default: beside the to-do file, *_ranked.jsonl)")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("chat", help="talk to a model in the terminal, streamed; /system, /image, /reset, /quit")
    p.add_argument("--model", required=True, help="RUN/STAGE folder, e.g. runs/demo/sft")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in the run folder)")
    p.add_argument("--system", help="system message that sets the assistant's behaviour")
    add_sampling_args(p, temperature=0.7, top_p=0.9)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP API (continuous batching) and a web chat page",
                       description="Serves GET /health, GET /v1/models, POST /v1/completions and POST /v1/chat/completions "
                                   "(streaming with server-sent events) as OpenAI's clients expect them, and a chat page "
                                   "at /. The model's id in requests is --model as given.",
                       epilog="e.g. gptstack serve --model runs/demo/ppo, then open http://127.0.0.1:8000/ or point an "
                              "OpenAI client at http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="RUN/STAGE or model folder, e.g. runs/demo/ppo or models/smollm2")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only; "
                   "0.0.0.0 opens it to the network, so give it an --api-key)")
    p.add_argument("--port", type=number(int, 0, 65535), default=8000, help="default: 8000")
    p.add_argument("--api-key", default=os.environ.get("GPTSTACK_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/ (default: $GPTSTACK_API_KEY, else none)")
    p.add_argument("--max-batch", type=number(int, 1), default=16,
                   help="sequences decoded together: the running batch's slots (default: 16); more requests wait")
    p.set_defaults(func=cmd_serve)
