"""PPO rollouts of tiny models, made by the objective exactly as the ppo stage makes them, in one process or under
torchrun (`python -m torch.distributed.run --nproc_per_node=2 tests/distributed_rollouts.py OUT`): rank 0 saves
them to OUT. tests/test_distributed_recipe.py compares the two, answer by answer."""
import dataclasses
import sys

import torch

from gptstack.model import GPT, ModelConfig
from gptstack.stages.ppo import PPOConfig
from gptstack.tokenizer import Tokenizer, chat_messages
from gptstack.train.distributed import init_distributed, is_main
from gptstack.train.ppo import ActorCritic, PPOObjective, value_from_reward_model
from gptstack.train.rm import RewardModel
from gptstack.world.instructions import InstructionSuite


def rollouts(count: int = 2) -> list[dict]:
    """`count` rollouts of 12 answers (6 per rank on 2 ranks), each with its per-answer rule reward, and the stats."""
    torch.set_num_threads(1)  # as torchrun gives each rank
    init_distributed("cpu")
    suite = InstructionSuite(seed=0)
    prompts = suite.prompts("train", 20, seed=3)
    tok = Tokenizer.train([" ".join(p.user + " " + p.answer for p in suite.prompts("train", 300, seed=4))], vocab_size=400)
    cfg = ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=128, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    policy, reference, rm = GPT(cfg), GPT(cfg), RewardModel(GPT(cfg))
    reference.load_state_dict(policy.state_dict())
    with torch.no_grad():  # a reward model that tells answers apart
        rm.head.proj.weight.normal_(0, 1.0)
    ppo = dataclasses.replace(PPOConfig(), rollout_batch=12, minibatches=2, ppo_epochs=1, max_new_tokens=16, seed=5)
    obj = PPOObjective(ppo, ActorCritic(policy, value_from_reward_model(rm), reference, rm), tok,
                       [chat_messages(p.user, p.system) for p in prompts],
                       extra_rewards=lambda which, texts: [float(sum(c.isdigit() for c in t)) for t in texts])
    out = []
    for index in range(count):
        rollout = obj.make_rollout(index)
        out.append({**rollout, "stats": dict(obj.stats)})
    return out


if __name__ == "__main__":
    got = rollouts()
    if is_main():
        torch.save(got, sys.argv[1])
