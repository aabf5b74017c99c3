"""PPO rollout throughput: answers/s of `PPOObjective.make_rollout` (sample the answers, then score them with the
policy, value function, reference and reward model) on 2 ranks against 1, each rank one thread.

The rollout is the ppo stage's own (the objective, the one generation engine, `across_ranks`); the models have the
preset's shape and random weights, so no answer ends early and every rollout does the same work. Each round times
`--rollouts` rollouts in a fresh 1-rank process, then in a fresh 2-rank `torchrun` (CPU, gloo), alternately, after a
warm-up rollout; the 2-rank run must make the same rollouts as the 1-rank one (the answers are compared). The last
line printed is one JSON object: answers/s of each, and `speedup` (the median of the per-round ratios). On a machine
other jobs share, the wall-clock speedup is capped by the cores left; `cpu_speedup` divides the 1-rank CPU time by
the busiest rank's (what each rank would take on a core of its own).

    python benchmarks/rollout_throughput.py                    # the `tiny` preset's shape, rollouts of 64 x 48 tokens
    python benchmarks/rollout_throughput.py --rounds 5 --rollout-batch 32
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def worker(args) -> None:
    """One measurement, on however many ranks torchrun started (or one): rank 0 prints one JSON line."""
    import torch.distributed as dist

    from gptstack.model import GPT
    from gptstack.stages import RunConfig
    from gptstack.stages.ppo import PPOConfig
    from gptstack.tokenizer import Tokenizer, chat_messages
    from gptstack.train.distributed import gather_objects, init_distributed, is_main
    from gptstack.train.ppo import ActorCritic, PPOObjective, value_from_reward_model
    from gptstack.train.rm import RewardModel
    from gptstack.world.instructions import InstructionSuite

    torch.set_num_threads(1)
    init_distributed("cpu")
    suite = InstructionSuite(seed=0)
    prompts = suite.prompts("train", 256, seed=1)
    tok = Tokenizer.train([" ".join(p.user + " " + p.answer for p in suite.prompts("train", 500, seed=2))], vocab_size=1024)
    cfg = dataclasses.replace(RunConfig.resolve(args.preset).model, vocab_size=tok.vocab_size, dropout=0.0)
    torch.manual_seed(0)
    policy, rm = GPT(cfg), RewardModel(GPT(cfg))
    reference = GPT(cfg)
    reference.load_state_dict(policy.state_dict())
    ppo = dataclasses.replace(PPOConfig(), rollout_batch=args.rollout_batch, max_new_tokens=args.new_tokens)
    model = ActorCritic(policy, value_from_reward_model(rm), reference, rm).eval()
    obj = PPOObjective(ppo, model, tok, [chat_messages(p.user, p.system) for p in prompts])
    obj.make_rollout(0)  # warm-up
    digest = hashlib.sha256()
    if dist.is_initialized():
        dist.barrier()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for index in range(1, args.rollouts + 1):
        rollout = obj.make_rollout(index)
        digest.update(rollout["ids"].numpy().tobytes())
    cpu = time.process_time() - cpu0  # this rank's CPU time: what it would take on a core of its own
    if dist.is_initialized():
        dist.barrier()
    seconds = time.perf_counter() - t0
    cpus = gather_objects(cpu)
    if is_main():
        answers = args.rollouts * args.rollout_batch
        print(json.dumps({"ranks": len(cpus), "answers": answers, "seconds": seconds, "answers_per_sec": answers / seconds,
                          "cpu_seconds_per_rank": cpus, "answers_per_cpu_sec_of_busiest_rank": answers / max(cpus),
                          "answer_tokens": int(rollout["mask"].sum()), "rollouts_sha256": digest.hexdigest()}), flush=True)


def measure(ranks: int, args) -> dict:
    me = [os.path.abspath(__file__), "--worker", "--preset", args.preset, "--rollouts", str(args.rollouts),
          "--rollout-batch", str(args.rollout_batch), "--new-tokens", str(args.new_tokens)]
    cmd = [sys.executable, *me] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *me]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTSTACK_CACHE": cache}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def cpu_ratio(one: dict, two: dict) -> float:
    return two["answers_per_cpu_sec_of_busiest_rank"] / one["answers_per_cpu_sec_of_busiest_rank"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model shape from this preset, random weights (default: tiny)")
    ap.add_argument("--rollouts", type=int, default=3, help="rollouts timed per measurement, after one warm-up")
    ap.add_argument("--rollout-batch", type=int, default=64, help="answers per rollout (ppo.rollout_batch)")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens per answer (ppo.max_new_tokens)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    print(f"the {args.preset} preset's shape, random weights; rollouts of {args.rollout_batch} answers x {args.new_tokens} "
          f"tokens; {args.rollouts} rollouts per measurement; CPU, 1 thread per rank; torch {torch.__version__}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    one, two = [], []
    for r in range(args.rounds):
        one.append(measure(1, args))
        two.append(measure(2, args))
        same = one[-1]["rollouts_sha256"] == two[-1]["rollouts_sha256"]
        print(f"round {r + 1}: 1 rank {one[-1]['answers_per_sec']:.2f} answers/s | 2 ranks {two[-1]['answers_per_sec']:.2f} "
              f"answers/s | {two[-1]['answers_per_sec'] / one[-1]['answers_per_sec']:.2f}x wall, "
              f"{cpu_ratio(one[-1], two[-1]):.2f}x CPU time | load average {os.getloadavg()[0]:.2f} | same rollouts: {same}",
              flush=True)
        if not same:
            raise SystemExit("2 ranks made other rollouts than 1 rank")
    print(json.dumps({"preset": args.preset, "rollout_batch": args.rollout_batch, "new_tokens": args.new_tokens,
                      "answers_per_sec_1_rank": statistics.median(x["answers_per_sec"] for x in one),
                      "answers_per_sec_2_ranks": statistics.median(x["answers_per_sec"] for x in two),
                      "speedup": statistics.median(b["answers_per_sec"] / a["answers_per_sec"] for a, b in zip(one, two)),
                      "cpu_speedup": statistics.median(cpu_ratio(a, b) for a, b in zip(one, two)),
                      "same_rollouts": True, "load_average_end": os.getloadavg()[0], "torch": torch.__version__}))


if __name__ == "__main__":
    main()
