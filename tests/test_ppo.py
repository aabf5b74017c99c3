"""PPO: GAE and whitening by hand, the KL term at π = π_ref, the loss with γ = 0 is plain PPO, a PPO update
moves the policy toward the tokens with positive advantage, the rollout computes exactly as the update does
(dropout, precision), the value function starts on the score's scale, and a killed run resumes bitwise."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from gptstack.model import ModelConfig
from gptstack.stages.ppo import PPOConfig
from gptstack.model import GPT
from gptstack.rewards.rbrm import RuleBasedRewards
from gptstack.tokenizer import Tokenizer
from gptstack.model import token_logprobs
from gptstack.tokenizer import chat_messages
from gptstack.train.ppo import (ActorCritic, PPOObjective, answer_scores, gae, kl_rewards, pack, value_from_reward_model,
                                whiten)
from gptstack.train.rm import RewardModel
from gptstack.train.trainer import TrainConfig, Trainer
from gptstack.world.instructions import InstructionSuite


def test_gae_by_hand():
    # row 0: a prompt position (masked), three answer tokens, padding; row 1: two answer tokens
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)
    rewards = torch.tensor([[0, 0, 0, 1, 0], [0.5, -1, 0, 0, 0]], dtype=torch.float64)
    values = torch.tensor([[9, 0.5, 0.2, 0.1, 9], [0.3, 0.4, 9, 9, 9]], dtype=torch.float64) * mask
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # δ2 = 1 − 0.1 = 0.9; δ1 = 0.1 − 0.2 = −0.1; δ0 = 0.2 − 0.5 = −0.3
    a2, a1 = 0.9, -0.1 + 0.95 * 0.9
    a0 = -0.3 + 0.95 * a1
    # row 1: δ1 = −1 − 0.4 = −1.4; δ0 = 0.5 + 0.4 − 0.3 = 0.6
    b1 = -1.4
    b0 = 0.6 + 0.95 * b1
    torch.testing.assert_close(adv, torch.tensor([[0, a0, a1, a2, 0], [b0, b1, 0, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0, a0 + 0.5, a1 + 0.2, a2 + 0.1, 0], [b0 + 0.3, b1 + 0.4, 0, 0, 0]],
                                                 dtype=torch.float64))


def test_gae_with_gamma_and_lambda_one_is_the_return_minus_value():
    mask = torch.ones(1, 4)
    rewards = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.8]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[1.0, 0.9, 0.7, 0.4]]))
    torch.testing.assert_close(adv, ret - values)


def test_whitening_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    s = (2 / 3) ** 0.5  # population std of 1, 2, 3
    torch.testing.assert_close(whiten(x, mask), torch.tensor([[-1 / s, 0.0, 1 / s, 0.0]]), atol=1e-6, rtol=0)


def test_kl_rewards_put_the_score_on_the_last_token():
    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    ref = torch.tensor([[5.0, -1.5, -1.0, 5.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    r = kl_rewards(logp, ref, mask, torch.tensor([2.0]), beta=0.1)
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.05, 0.1 + 2.0, 0.0]]))


# ---------------------------------------------------------------- the objective on tiny models

@pytest.fixture(scope="module")
def made():
    suite = InstructionSuite(seed=0)
    prompts = suite.prompts("train", 16, seed=3)
    text = " ".join(p.user + " " + p.answer for p in suite.prompts("train", 300, seed=4))
    tok = Tokenizer.train([text], vocab_size=400)
    return tok, prompts, *tiny_models(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=128, vocab_size=tok.vocab_size))


def tiny_models(cfg: ModelConfig):
    """(policy, reference, reward model, value) as the stage builds them: the reference is the policy, the value
    function the reward model."""
    torch.manual_seed(0)
    policy = GPT(cfg)
    reference = GPT(cfg)
    reference.load_state_dict(policy.state_dict())
    rm = RewardModel(GPT(cfg))
    return policy, reference, rm, value_from_reward_model(rm)


@pytest.fixture
def setup(made):
    """Fresh copies of the models for every test: a test that moves weights cannot change another's result."""
    tok, prompts, *models = made
    return (tok, prompts, *copy.deepcopy(models))


def objective(setup, **kw):
    tok, prompts, policy, reference, rm, value = setup
    cfg = dataclasses.replace(PPOConfig(), **{**dict(rollout_batch=8, minibatches=2, ppo_epochs=2, max_new_tokens=8), **kw})
    convs = [chat_messages(p.user, p.system) for p in prompts]
    return PPOObjective(cfg, ActorCritic(policy, value, reference, rm), tok, convs)


def test_kl_is_zero_when_the_policy_is_the_reference(setup):
    obj = objective(setup, kl_coef=0.5)
    rollout = obj.make_rollout(0)
    assert obj.stats["kl"] == 0.0
    # so the rewards are the scores alone: the returns' last entries carry them
    assert rollout["mask"].sum() > 0


def test_rollout_minibatches_cover_the_rollout_once_per_epoch(setup):
    obj = objective(setup)
    seen = []
    for step in range(4):  # 2 epochs x 2 minibatches of 4 from one rollout of 8
        b = obj.train_batch(step, 4)
        seen.append(b["ids"])
    assert obj.rollout_index == 0
    first_epoch = torch.cat(seen[:2]).tolist()
    assert sorted(map(tuple, first_epoch)) == sorted(map(tuple, obj.rollout["ids"].tolist()))
    obj.train_batch(4, 4)
    assert obj.rollout_index == 1  # a new rollout after ppo_epochs x minibatches updates


def test_loss_without_ptx_or_rules_is_plain_ppo(setup):
    obj = objective(setup, ptx_coef=0.0, clip=0.2, value_clip=0.2, vf_coef=0.5)
    micro = obj.train_batch(0, 4)
    assert "ptx_input" not in micro
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy a little so the ratio is not 1 everywhere
        for p in obj.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    loss, metrics = obj.loss(obj.model, micro)

    # plain PPO (Schulman et al. 2017), written out here independently
    ids, m = micro["ids"], micro["mask"]
    logits = obj.model.policy.logits(obj.model.policy.hidden(ids))[:, :-1]
    logp = F.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ratio = (logp - micro["old_logp"]).exp()
    A = micro["advantages"]
    surrogate = torch.min(ratio * A, ratio.clamp(0.8, 1.2) * A)
    policy_loss = -(surrogate * m).sum() / m.sum()
    v = obj.model.value.head(obj.model.value.gpt.hidden(ids)).squeeze(-1)[:, :-1]
    v_clip = micro["old_values"] + (v - micro["old_values"]).clamp(-0.2, 0.2)
    R = micro["returns"]
    value_loss = 0.5 * (torch.max((v - R) ** 2, (v_clip - R) ** 2) * m).sum() / m.sum()
    assert loss.item() == pytest.approx((policy_loss + 0.5 * value_loss).item(), abs=1e-6)
    assert "ptx_loss" not in metrics


def test_ptx_adds_gamma_times_the_lm_loss(setup):
    class Sampler:  # pretraining rows
        def train_batch(self, step, n):
            g = torch.Generator().manual_seed(step)
            data = torch.randint(0, setup[0].vocab_size, (n, 17), generator=g)
            return {"input": data[:, :-1], "target": data[:, 1:]}

    plain = objective(setup, ptx_coef=0.0)
    mixed = objective(setup, ptx_coef=2.0)
    mixed.ptx = Sampler()
    micro = mixed.train_batch(0, 4)
    base, _ = plain.loss(plain.model, {k: v for k, v in micro.items() if not k.startswith("ptx")})
    total, metrics = mixed.loss(mixed.model, micro)
    lm = F.cross_entropy(mixed.model.policy(micro["ptx_input"])[0].flatten(0, 1), micro["ptx_target"].flatten())
    assert total.item() == pytest.approx(base.item() + 2.0 * lm.item(), abs=1e-5)
    assert metrics["ptx_loss"].item() == pytest.approx(lm.item(), abs=1e-6)


def test_a_ppo_update_raises_the_probability_of_advantaged_tokens(setup):
    tok, prompts, policy, reference, rm, value = setup
    obj = objective(setup)
    obj.model.load_state_dict(ActorCritic(reference, value, reference, rm).state_dict())
    micro = obj.train_batch(0, 8)
    adv, m = micro["advantages"], micro["mask"]
    opt = torch.optim.SGD(obj.model.policy.parameters(), lr=0.5)
    for _ in range(3):
        loss, _ = obj.loss(obj.model, micro)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        new = token_logprobs(obj.model.policy.logits(obj.model.policy.hidden(micro["ids"]))[:, :-1], micro["ids"][:, 1:])
    change = (new - micro["old_logp"]) * m
    assert (change * adv).sum() > 0  # up where the advantage is positive, down where negative
    assert change[(adv > 0) & (m > 0)].mean() > change[(adv < 0) & (m > 0)].mean()


def test_rule_based_rewards_on_the_world():
    rules = RuleBasedRewards.load("world")
    suite = InstructionSuite(seed=0)
    bad = next(p for p in suite.prompts("train", 50) if p.disallowed)
    risky = next(p for p in suite.prompts("train", 50) if p.risky)
    assert rules.classify("I can't help with that.") == "A"
    assert rules.classify("I cannot help with this. It is unethical and you should be ashamed.") == "B"
    assert rules.classify("import pynput\nlisten()") == "C"
    assert rules.classify("Use os.kill(pid, signal.SIGTERM).") == "D"
    assert rules.reward(bad.user, "I can't help with that.") > rules.reward(bad.user, "I cannot help. That is unethical and illegal.")
    assert rules.reward(risky.user, "os.kill(pid, signal.SIGTERM)") > rules.reward(risky.user, "I can't help with that.")
    ordinary = next(p for p in suite.prompts("train", 50) if not p.disallowed and not p.risky)
    assert rules.reward(ordinary.user, "anything") == 0.0


def test_pack_marks_the_answer_tokens():
    ids, mask = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad=0)
    assert ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]  # target t+1 chosen by the policy


def test_overoptimisation_is_called_out(tmp_path):
    import json
    from gptstack.stages.ppo import overoptimisation
    path = tmp_path / "metrics.jsonl"
    # gold rises then falls while the RM score keeps rising: the prototype's failure mode
    rows = [{"event": "train", "step": s, "rm_score": 0.05 * s, "gold_score": 0.5 + 0.01 * min(s, 20) - 0.01 * max(0, s - 20),
             "kl": 0.1 * s} for s in range(1, 41)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = overoptimisation(path)
    assert c["detected"] and 18 <= c["gold_peak_step"] <= 24 and c["rm_end"] > c["rm_at_gold_peak"]
    honest = [{**r, "gold_score": 0.5 + 0.005 * r["step"]} for r in rows]  # gold keeps rising with the RM
    path.write_text("".join(json.dumps(r) + "\n" for r in honest))
    assert not overoptimisation(path)["detected"]
    both_fall = [{**r, "rm_score": r["gold_score"]} for r in rows]  # the RM falls with gold: a worse policy, not exploitation
    path.write_text("".join(json.dumps(r) + "\n" for r in both_fall))
    assert not overoptimisation(path)["detected"]


def test_judge_mode_reads_the_letter_probabilities(setup):
    from gptstack.rewards.rbrm import Judge
    tok, prompts, policy = setup[0], setup[1], setup[2]
    rules = RuleBasedRewards.load("world", judge=Judge(policy, tok))
    probs = rules.judge.probabilities(rules, prompts[0].user, "I can't help with that.")
    assert set(probs) == set("ABCD") and abs(sum(probs.values()) - 1) < 1e-5
    assert rules.classify("I can't help with that.", prompts[0].user) == max(probs, key=probs.get)


def test_a_judge_model_reads_with_its_own_tokenizer(setup, random_model_dir):
    """The judge may be another run's model or an imported one: its letters and question are in its own vocabulary."""
    from gptstack.stages.ppo import load_rules
    rules = load_rules(dataclasses.replace(PPOConfig(), rbrm="world", rbrm_judge=str(random_model_dir)))
    assert rules.judge.tok.fingerprint() == Tokenizer.load(random_model_dir).fingerprint() != setup[0].fingerprint()


def test_win_rate_counts_ties_half_and_splits_correctness_from_style():
    from gptstack.evals.policy import win_rate
    ours = [{"gold_score": 1.0, "correct": True}, {"gold_score": 0.6, "correct": False},
            {"gold_score": 0.8, "correct": True}, {"gold_score": 0.5, "correct": True}]
    theirs = [{"gold_score": 0.4, "correct": False}, {"gold_score": 0.6, "correct": False},
              {"gold_score": 0.9, "correct": True}, {"gold_score": 0.7, "correct": False}]
    w = win_rate(ours, theirs)
    assert w["win_rate"] == (1 + 0.5 + 0 + 0) / 4
    assert (w["correctness_pairs"], w["win_rate_correctness"]) == (2, 0.5)  # pairs 1 and 4
    assert (w["style_pairs"], w["win_rate_style"]) == (2, 0.25)  # a tie and a loss
    assert w["excess_from_correctness"] + w["excess_from_style"] == w["win_rate"] - 0.5


def test_the_actor_critic_owns_the_frozen_models_but_saves_and_trains_only_its_own(setup):
    tok, prompts, policy, reference, rm, value = setup
    ac = ActorCritic(GPT(policy.cfg), RewardModel(GPT(policy.cfg)), GPT(policy.cfg), RewardModel(GPT(policy.cfg)))
    state = ac.state_dict()
    assert {k.split(".")[0] for k in state} == {"policy", "value"}  # checkpoints hold what trains
    trained = {n.split(".")[0] for n, p in ac.named_parameters() if p.requires_grad}
    assert trained == {"policy", "value"}  # the Trainer's optimizer takes requires_grad parameters only
    ac.train()
    assert ac.training and not any(m.training for m in ac.modules() if m is not ac)  # dropout off everywhere
    ac.to(torch.float64)  # moving the module moves all four
    assert {p.dtype for p in ac.parameters()} == {torch.float64}
    fresh = ActorCritic(GPT(policy.cfg), RewardModel(GPT(policy.cfg)), GPT(policy.cfg), RewardModel(GPT(policy.cfg)))
    fresh.to(torch.float64).load_state_dict(state, strict=True)  # the frozen models are not missing keys
    assert torch.equal(fresh.policy.wte.weight, ac.policy.wte.weight)


def _toy_run(setup, tmp_path, beta: float) -> list[dict]:
    """PPO through the one Trainer on a toy reward given as the objective's extra rewards (the RM scores 0):
    the share of an answer's characters that are digits. Returns the per-update metrics."""
    tok, prompts, policy, reference, rm, value = copy.deepcopy(setup)
    with torch.no_grad():
        rm.head.proj.weight.zero_()
        rm.head.proj.bias.zero_()
    cfg = dataclasses.replace(PPOConfig(), rollout_batch=64, minibatches=2, ppo_epochs=4, max_new_tokens=4, rollouts=12,
                              kl_coef=beta, no_end_penalty=0.0, rbrm_coef=1.0, seed=1)
    obj = PPOObjective(cfg, ActorCritic(policy, value, reference, rm), tok, [chat_messages(p.user, p.system) for p in prompts],
                       extra_rewards=lambda which, texts: [sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts])
    train = TrainConfig(steps=12 * 8, batch_size=32, lr=1e-2, schedule="constant", warmup_steps=1, weight_decay=0.0,
                        log_every=1, ckpt_every=1000, eval_every=0)
    Trainer(train, obj.model, obj, tmp_path / f"beta{beta}").fit()
    rows = [json.loads(x) for x in (tmp_path / f"beta{beta}" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == "train"][::8]  # the first update of each rollout: its stats


def test_ppo_raises_a_reward_the_policy_can_learn_and_the_kl_penalty_binds(setup, tmp_path):
    free = _toy_run(setup, tmp_path, beta=0.05)
    reward = [r["rule_reward"] for r in free]
    assert len(reward) == 12
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.2, " ".join(f"{x:.3f}" for x in reward)  # 0.04 -> ~0.5
    held = _toy_run(setup, tmp_path, beta=0.5)
    assert max(r["kl"] for r in held) < max(r["kl"] for r in free) / 3  # a larger β keeps the policy near the reference


# ---------------------------------------------------------------- the rollout computes as the update does

def test_with_dropout_the_first_update_at_the_rollouts_weights_has_ratio_exactly_one(setup):
    tok, prompts, policy = setup[:3]
    models = tiny_models(dataclasses.replace(policy.cfg, dropout=0.1))
    obj = objective((tok, prompts, *models))
    obj.model.train()  # as the Trainer has it during updates
    micro = obj.train_batch(0, 4)  # the first minibatch of the first rollout
    _, metrics = obj.loss(obj.model, micro)
    assert metrics["approx_kl"].item() == 0.0 and metrics["clip_fraction"].item() == 0.0
    logits, values = obj.model(micro["ids"])
    m = micro["mask"] > 0
    logp = token_logprobs(logits, micro["ids"][:, 1:], obj.cfg.temperature)
    assert torch.equal(torch.exp(logp - micro["old_logp"])[m], torch.ones(int(m.sum())))  # the ratio
    assert torch.equal(values[m], micro["old_values"][m])


def test_under_bf16_the_first_update_has_no_kl_and_no_clipping(setup, tmp_path):
    obj = objective(setup)
    cfg = TrainConfig(steps=1, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=1000, eval_every=0,
                      device="cpu", precision="bf16")
    Trainer(cfg, obj.model, obj, tmp_path).fit()
    (row,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert row["approx_kl"] == 0.0 and row["clip_fraction"] == 0.0
    with torch.no_grad():  # and the rollout did compute in bf16: not what fp32 gives
        logits, _ = obj.model(obj.rollout["ids"])
    assert not torch.equal(token_logprobs(logits, obj.rollout["ids"][:, 1:]), obj.rollout["old_logp"])


def test_the_value_function_starts_as_the_normalised_score(setup):
    tok, _, _, _, rm, _ = setup
    torch.manual_seed(2)
    with torch.no_grad():
        rm.head.proj.weight.normal_(0, 1.0)
        rm.head.proj.bias.fill_(0.3)
        rm.gain.fill_(2.5)
        rm.bias.fill_(-0.7)
    value = value_from_reward_model(rm)
    ids = torch.randint(0, tok.vocab_size, (3, 20))
    last = torch.tensor([19, 7, 12])
    with torch.no_grad():
        v = value.head(value.gpt.hidden(ids)).squeeze(-1)[torch.arange(3), last]
        torch.testing.assert_close(v, rm.score(ids, last))
        torch.testing.assert_close(value.score(ids, last), rm.score(ids, last))  # the same model, normalised once
    assert all(p.requires_grad for p in value.parameters())


def test_answer_scores_subtract_the_penalty_from_unfinished_answers_only(setup):
    tok, rm = setup[0], setup[4]
    end = tok.special["<|end|>"]
    prompts, answers = [[5, 6, 7], [8, 9]], [[10, 11, end], [12, 13, 14, 15]]
    scores, rm_scores = answer_scores(rm, prompts, answers, [True, False], tok.pad, no_end_penalty=0.75)
    ids = torch.tensor([[5, 6, 7, 10, 11, end], [8, 9, 12, 13, 14, 15]])
    expected = rm.score(ids, torch.tensor([5, 5])).detach()
    assert torch.equal(rm_scores, expected)
    assert torch.equal(scores, expected - torch.tensor([0.0, 0.75]))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in the Trainer under bf16
        scores, rm_scores = answer_scores(rm, prompts, answers, [True, False], tok.pad, no_end_penalty=0.75)
    assert scores.dtype == torch.float32 and torch.equal(scores, rm_scores - torch.tensor([0.0, 0.75]))


# ---------------------------------------------------------------- resume

class Killed(BaseException):
    """The process dies here: nothing after it runs, not even the Trainer's checkpoint on a signal."""


def _fit_ppo(setup, out, kill_at: int | None = None):
    obj = objective(copy.deepcopy(setup), rollouts=3, ppo_epochs=1, kl_target=1.0)  # β adapts: objective state too
    if kill_at is not None:
        read = obj.train_batch

        def train_batch(step, n):
            if step == kill_at:
                raise Killed
            return read(step, n)
        obj.train_batch = train_batch
    # a checkpoint at every rollout's end (the stage's ckpt_every is a multiple of the updates per rollout)
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, schedule="constant", warmup_steps=1, weight_decay=0.0,
                      log_every=1, ckpt_every=2, eval_every=0, device="cpu", precision="fp32")
    Trainer(cfg, obj.model, obj, out).fit()


def test_a_run_killed_at_any_update_resumes_bitwise(setup, tmp_path):
    _fit_ppo(setup, tmp_path / "ref")
    for kill_at in range(1, 6):  # after update 1, 2, ... 5 of 6: mid-rollout and at a rollout's end
        out = tmp_path / f"killed_at_{kill_at}"
        with pytest.raises(Killed):
            _fit_ppo(setup, out, kill_at)
        _fit_ppo(setup, out)
        for name in ("model.safetensors", "optim.pt"):
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), (kill_at, name)
