"""DPO on K-way rankings: the losses' algebra (ln 2 at the reference, the pairs of a ranking with ties, listwise =
sigmoid for K = 2, precomputed reference = the model), learning on toy rankings, β's pull toward the reference,
LoRA, and clear errors on bad settings."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from gptstack.errors import GptstackError
from gptstack.evals.policy import Prompts, evaluate_policy
from gptstack.model import GPT, ModelConfig
from gptstack.tokenizer import Tokenizer, chat_messages
from gptstack.train.dpo import DPOObjective, Preferences, listwise_loss, preference_loss, ranking_logprobs
from gptstack.train.rm import comparisons, encode_answer_masked
from gptstack.train.trainer import TrainConfig, Trainer

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "light", "paper", "horse", "glass", "bread"]


@pytest.fixture(scope="module")
def tok():
    text = " ".join(f"Tell me about {w}. good {w} bad {w}" for w in WORDS)
    return Tokenizer.train([text + "\n"] * 20, vocab_size=300)


def tiny_gpt(tok, seed=0, dtype=torch.float64) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_embd=32, n_head=2, n_ctx=64, vocab_size=tok.vocab_size)).to(dtype)


RECORDS = [
    {"prompt": "Tell me about apple.", "responses": ["good apple", "bad apple", "apple", "bad bad"], "ranks": [1, 2, 2, 3]},
    {"prompt": "Tell me about river.", "system": "Be brief.", "responses": ["good river", "bad river", "river"], "ranks": [1, 3, 2]},
    {"prompt": "Tell me about stone.", "responses": ["stone", "good stone"], "ranks": [1, 1]},  # a full tie: no pair
    {"prompt": "Tell me about cloud.", "responses": ["bad cloud", "good cloud"], "ranks": [2, 1]},
]


def explicit_logprob(model, tok, rec, y) -> torch.Tensor:
    """log π(y | prompt) one answer at a time, unpadded: the sum over the answer's tokens in the chat template."""
    ids, learn = encode_answer_masked(tok, chat_messages(rec["prompt"], rec.get("system"), y), 64)
    ids = torch.tensor([ids])
    logp = F.log_softmax(model(ids)[0][0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return (logp * torch.tensor(learn[1:], dtype=logp.dtype)).sum()


def test_a_ranking_of_four_with_one_tie_gives_five_pairs(tok):
    data = Preferences(RECORDS[:1], tok, 64)
    assert comparisons(RECORDS[0]["ranks"]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert data.pairs == 5
    # the loss is the mean over exactly those five pairs: only a pair's terms move it
    h = torch.tensor([[0.3, -0.2, 0.5, 1.0]], dtype=torch.float64)
    loss, metrics = preference_loss(h, data.batch([0])["ranks"], beta=0.5)
    want = torch.stack([-F.logsigmoid(0.5 * (h[0, w] - h[0, l])) for w, l in comparisons(RECORDS[0]["ranks"])]).mean()
    assert abs(loss.item() - want.item()) < 1e-12
    assert abs(metrics["accuracy"].item() - 1 / 5) < 1e-12  # of the five pairs, h orders only (0, 1) right


def test_at_the_reference_the_loss_is_ln2_and_the_margins_0(tok):
    policy = tiny_gpt(tok)
    data = Preferences(RECORDS, tok, 64)
    for smoothing in (0.0, 0.2):
        obj = DPOObjective(data, data, beta=0.1, loss_type="sigmoid", label_smoothing=smoothing, seed=0,
                           reference=tiny_gpt(tok))  # the same weights: policy = reference
        loss, metrics = obj.loss(policy, data.batch(range(len(data))))
        assert abs(loss.item() - math.log(2)) < 1e-6
        for key in ("margin", "chosen_reward", "rejected_reward"):
            assert abs(metrics[key].item()) < 1e-9, key
    ipo = DPOObjective(data, data, beta=0.25, loss_type="ipo", label_smoothing=0.0, seed=0, reference=tiny_gpt(tok))
    assert abs(ipo.loss(policy, data.batch(range(len(data))))[0].item() - 1 / (4 * 0.25 ** 2)) < 1e-9  # (0 − 1/(2β))²


def test_the_loss_equals_the_explicit_per_prompt_loop_with_ties_and_mixed_k(tok):
    """Each answer encoded on its own (no padding, no batching); each prompt's mean over its pairs, then the mean over
    the prompts with a pair (the full tie does not count): the reward model's grouping."""
    policy, reference = tiny_gpt(tok, seed=1), tiny_gpt(tok, seed=2)
    beta = 0.7
    losses = []
    for rec in RECORDS:
        h = [explicit_logprob(policy, tok, rec, y) - explicit_logprob(reference, tok, rec, y) for y in rec["responses"]]
        terms = [-F.logsigmoid(beta * (h[w] - h[l])) for w, l in comparisons(rec["ranks"])]
        if terms:
            losses.append(torch.stack(terms).mean())
    data = Preferences(RECORDS, tok, 64)
    obj = DPOObjective(data, data, beta=beta, loss_type="sigmoid", label_smoothing=0.0, seed=0, reference=reference)
    batch = data.batch(range(len(data)))
    assert obj.weight(batch) == 3
    got = obj.loss(policy, batch)[0]
    assert abs(got.item() - torch.stack(losses).mean().item()) < 1e-6  # log-probs in fp32 (token_logprobs)


def test_listwise_is_plackett_luce_and_equals_sigmoid_for_k2():
    torch.manual_seed(0)
    h = torch.randn(6, 2, dtype=torch.float64) * 3
    ranks = torch.tensor([[1, 2], [2, 1], [1, 2], [2, 1], [1, 2], [1, 2]])
    for beta in (0.1, 1.0, 4.0):
        sig, _ = preference_loss(h, ranks, beta, "sigmoid")
        lw, _ = preference_loss(h, ranks, beta, "listwise")
        assert abs(sig.item() - lw.item()) < 1e-6
    # K = 4, strict: −log Π_k exp(s_τk) / Σ_{j ≥ k} exp(s_τj)
    s = torch.tensor([[0.2, -1.0, 0.7, 0.1]], dtype=torch.float64)
    order = [2, 0, 3, 1]  # best first
    ranks = torch.tensor([[2, 4, 1, 3]])
    want = -sum(s[0, order[k]] - torch.logsumexp(s[0, order[k:]], 0) for k in range(4))
    assert abs(listwise_loss(s, ranks).item() - want.item()) < 1e-12
    # ties: an answer competes with itself and the answers strictly below it, never with those tied with it
    ranks = torch.tensor([[1, 2, 2, 3]])
    want = -((s[0, 0] - torch.logsumexp(s[0], 0)) + (s[0, 1] - torch.logsumexp(s[0, [1, 3]], 0))
             + (s[0, 2] - torch.logsumexp(s[0, [2, 3]], 0)))
    assert abs(listwise_loss(s, ranks).item() - want.item()) < 1e-12
    # a full tie has no choice: it does not count, and the gradient is zero but defined
    s = s.clone().requires_grad_(True)
    listwise_loss(s, torch.tensor([[1, 1, 1, 1]])).backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_precomputed_reference_gives_the_same_loss_and_gradient(tok):
    policy, reference = tiny_gpt(tok, seed=1), tiny_gpt(tok, seed=2)
    with_model = Preferences(RECORDS, tok, 64)
    stored = Preferences(RECORDS, tok, 64)
    stored.reference = ranking_logprobs(reference, stored)
    grads = []
    for obj, data in ((DPOObjective(with_model, with_model, 0.3, "listwise", 0.0, 0, reference=reference), with_model),
                      (DPOObjective(stored, stored, 0.3, "listwise", 0.0, 0), stored)):
        policy.zero_grad()
        loss, _ = obj.loss(policy, data.batch(range(len(data))))
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten() for p in policy.parameters()])))
    assert abs(grads[0][0] - grads[1][0]) < 1e-9
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-9)
    assert DPOObjective(stored, stored, 0.3, "sigmoid", 0.0, 0).reference is None  # no second model in memory
    with pytest.raises(ValueError, match="log-probabilities"):
        DPOObjective(with_model, with_model, 0.3, "sigmoid", 0.0, 0)


def toy_rankings(words, k=3):
    """Prompts about a word; the answers saying 'good' beat those saying nothing, which beat those saying 'bad'."""
    return [{"prompt": f"Tell me about {w}.", "responses": [f"bad {w}", f"good {w}", f"{w}"][:k], "ranks": [3, 1, 2][:k]}
            for w in words]


def train_dpo(tok, tmp_path, beta, loss_type="sigmoid", steps=40, lora_rank=0, lr=3e-3):
    """DPO from a random tiny model on rankings of eight words; the other four words' rankings are held out."""
    policy, reference = tiny_gpt(tok, dtype=torch.float32), tiny_gpt(tok, dtype=torch.float32)
    train, val = Preferences(toy_rankings(WORDS[:8]), tok, 64), Preferences(toy_rankings(WORDS[8:]), tok, 64)
    obj = DPOObjective(train, val, beta, loss_type, 0.0, seed=0, reference=reference)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=lr, warmup_steps=2, weight_decay=0.0, log_every=10,
                      ckpt_every=steps, device="cpu", lora_rank=lora_rank, lora_alpha=8.0)
    summary = Trainer(cfg, policy, obj, tmp_path / f"dpo-{beta}-{loss_type}-{lora_rank}", metadata=policy.metadata()).fit()
    return policy, reference, summary


@pytest.mark.parametrize("loss_type", ["sigmoid", "listwise"])
def test_held_out_pair_accuracy_rises_above_chance_within_50_steps(tok, tmp_path, loss_type):
    _, _, summary = train_dpo(tok, tmp_path, beta=0.1, loss_type=loss_type)
    assert summary["initial"]["val_accuracy"] == 0.0  # at the reference every margin is 0: no pair ordered yet
    assert summary["final"]["val_accuracy"] > 0.8, summary["final"]
    assert summary["final"]["val_margin"] > 0 and summary["final"]["val_loss"] < summary["initial"]["val_loss"]


def test_a_larger_beta_ends_closer_to_the_reference(tok, tmp_path):
    """The KL to the reference on sampled answers to held-out prompts (the evaluation PPO's KL comes from)."""
    class Sampling:
        max_new_tokens, no_end_penalty, seed = 8, 1.0, 0

    prompts = Prompts([chat_messages(f"Tell me about {w}.", None) for w in WORDS[8:] * 4])
    kl = {}
    for beta in (0.05, 2.0):
        policy, reference, _ = train_dpo(tok, tmp_path, beta=beta, steps=30)
        kl[beta] = evaluate_policy(policy.eval(), reference.eval().sequence_logprobs, None, tok, prompts, Sampling)[0]["kl"]
    assert kl[2.0] < kl[0.05] and kl[0.05] > 0.1, kl


def test_lora_trains_adapters_only_and_publishes_a_plain_model(tok, tmp_path):
    from gptstack.checkpoint import load_model, read_weights
    policy, _, summary = train_dpo(tok, tmp_path, beta=0.1, steps=20, lora_rank=4, lr=1e-2)
    assert 0 < summary["trainable_params"] < sum(p.numel() for p in tiny_gpt(tok).parameters()) // 5  # the adapters alone
    assert summary["final"]["val_accuracy"] > 0.5, summary["final"]
    out = tmp_path / "dpo-0.1-sigmoid-4"
    assert load_model(out).num_params() == tiny_gpt(tok).num_params()  # merged: a plain GPT for chat and serve
    assert all("lora" in k for k in read_weights(out / "adapter.safetensors")[0])


@pytest.mark.parametrize("overrides, message", [
    (["dpo.beta=0"], "config 'dpo.beta' must be a positive number, got 0.0"),
    (["dpo.loss=listwise", "dpo.label_smoothing=0.1"], "applies to the sigmoid loss only"),
    (["dpo.label_smoothing=0.5"], r"must be in \[0, 0.5\)"),
    (["dpo.loss=pairwise"], "'pairwise' is not one of sigmoid, ipo, listwise"),
])
def test_bad_settings_are_clear_errors(overrides, message):
    from gptstack.stages import RunConfig
    with pytest.raises(GptstackError, match=message):
        RunConfig.resolve("tiny", overrides=overrides)


def test_the_dpo_verb_trains_on_a_rankings_file_and_refuses_a_bad_one(tmp_path, random_model_dir):
    rankings = toy_rankings(WORDS) + [{"prompt": "Tell me about tea.", "chosen": "good tea", "rejected": "bad tea"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rankings))
    proc = run_cli("dpo", "--policy", random_model_dir, "--data", tmp_path / "r.jsonl", "--out", tmp_path / "dpo",
                   "--loss", "listwise", "--beta", "0.5", "--reference", "precomputed", "dpo.train.steps=3",
                   "dpo.train.batch_size=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "dpo" / "summary.json").read_text())["dpo"]
    assert r["loss_type"] == "listwise" and r["reference"] == "precomputed" and r["steps"] == 3
    assert r["rankings"] == 11 and r["val_rankings"] == 2  # every 10th ranking held out
    assert 0 <= r["val_accuracy"] <= 1 and "win_rate_vs_sft" not in r  # no world: no gold labeler, no prompts to judge
    assert (tmp_path / "dpo" / "model.safetensors").is_file() and (tmp_path / "dpo" / "tokenizer.json").is_file()
    (tmp_path / "bad.jsonl").write_text(json.dumps(rankings[0]) + "\n" + json.dumps({"prompt": "x", "responses": ["a", "b"]}) + "\n")
    proc = run_cli("dpo", "--policy", random_model_dir, "--data", tmp_path / "bad.jsonl", "--out", tmp_path / "bad")
    assert proc.returncode == 2 and "bad.jsonl:2: field 'ranks'" in proc.stderr.strip().splitlines()[-1]
