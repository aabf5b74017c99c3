"""LoRA for every training verb (train/lora.py): adapters start at the base model, the published model is the plain
W + alpha/r·B·A, a tiny model learns with adapters alone, PPO keeps one copy of the base for policy, value and
reference, and gradient checkpointing computes the same gradients."""
import copy
import dataclasses
import json
import shutil

import pytest
import torch

from conftest import run_cli, write_own_files
from gptstack.checkpoint import load_model, read_weights, save_state_dict
from gptstack.model import GPT, KVCache, ModelConfig
from gptstack.train import lora
from gptstack.train.ppo import ActorCritic
from gptstack.train.rm import RewardModel, load_reward_model
from gptstack.train.trainer import TrainConfig, autocast

pytest.importorskip("peft")

LLAMA = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_ctx=48, vocab_size=64, mlp="swiglu", norm="rmsnorm",
                    positions="rope", bias=False)


def lora_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"lora_rank": 4, "lora_alpha": 8.0, **kw})


def randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora.LORA_KEY in f".{name}":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_adapters_start_at_the_base_and_merge_to_base_plus_scaled_BA():
    torch.manual_seed(0)
    base = GPT(LLAMA).eval()
    ids = torch.randint(0, LLAMA.vocab_size, (2, 20))
    want = base(ids)[0]
    wrapped = lora.add_lora(copy.deepcopy(base), lora_cfg())
    assert torch.equal(wrapped(ids)[0], want)  # B = 0: exactly the base model's logits
    # only the adapters train: 2 layers x (qkv 32->64, proj 32->32, fc 32->256, proj 128->32) x r·(in + out)
    assert lora.trainable_params(wrapped) == 2 * 4 * ((32 + 64) + (32 + 32) + (32 + 256) + (128 + 32))
    randomise_adapters(wrapped)
    state = wrapped.state_dict()
    merged = lora.merge(state, 8.0 / 4)
    assert set(merged) == set(base.state_dict())
    for key in merged:
        layer = key.rsplit(".", 1)[0]
        if f"{layer}.base_layer.weight" in state:  # W + alpha/r · B A, exactly as peft's own delta
            peft_layer = wrapped.get_submodule(layer)
            assert torch.equal(merged[key], state[f"{layer}.base_layer.weight"] + peft_layer.get_delta_weight("default"))
        else:
            assert torch.equal(merged[key], base.state_dict()[key])
    plain = GPT(LLAMA).eval()
    plain.load_state_dict(merged)
    assert not torch.equal(plain(ids)[0], want)
    torch.testing.assert_close(plain(ids)[0], wrapped(ids)[0], atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients_through_switched_adapters():
    """PPO's update runs the shared base through two adapters; the recompute in backward must use each forward's."""
    torch.manual_seed(0)
    policy = GPT(LLAMA)
    lora.add_lora(policy, lora_cfg(), "value")
    lora.add_lora(policy, lora_cfg(), "policy")
    randomise_adapters(policy)
    ac = ActorCritic(policy, RewardModel(policy), None, RewardModel(GPT(LLAMA)))
    ids = torch.randint(0, LLAMA.vocab_size, (3, 16))

    def grads(checkpointing):
        policy.grad_checkpoint = checkpointing
        ac.zero_grad()
        logits, values = ac(ids)
        (logits.logsumexp(-1).mean() + values.pow(2).mean()).backward()
        return {n: p.grad.clone() for n, p in ac.named_parameters() if p.requires_grad}

    plain, recomputed = grads(False), grads(True)
    assert any("lora_B.value" in n for n in plain) and any("lora_B.policy" in n for n in plain)
    assert all(p.abs().sum() > 0 for n, p in plain.items() if "lora_A" in n)  # both adapters get gradients
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_kv_cache_and_rotary_attention_compute_in_bf16_under_autocast():
    torch.manual_seed(0)
    model = GPT(LLAMA).eval()
    cache = KVCache(LLAMA, 1, 24)
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
        model.hidden(torch.randint(0, LLAMA.vocab_size, (1, 8)), cache=cache)
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16


# ---------------------------------------------------------------- the verbs, end to end on a tiny model

@pytest.fixture(scope="module")
def runs(tmp_path_factory, random_model_dir):
    """Your own files; LoRA SFT from a random model, then a LoRA RM from that SFT model. The random model's weights
    are larger than GPT's init: with the embeddings and norms frozen, std 0.02 bounds every logit below 1."""
    d = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = GPT(dataclasses.replace(load_model(random_model_dir).cfg, init_std=0.1))
    save_state_dict(base.state_dict(), d / "base" / "model.safetensors", base.metadata())
    shutil.copy(random_model_dir / "tokenizer.json", d / "base" / "tokenizer.json")
    write_own_files(d)
    lora_args = ["train.lora_rank=4", "train.lora_alpha=8"]
    sft = run_cli("sft", "--from", d / "base", "--data", d / "sft.jsonl", "--out", d / "sft", "sft.epochs=8",
                  "sft.train.batch_size=8", "sft.train.lr=1e-2", "sft.train.warmup_steps=2", *("sft." + a for a in lora_args))
    assert sft.returncode == 0, sft.stderr[-2000:]
    rm = run_cli("rm", "--from", d / "sft", "--data", d / "rankings.jsonl", "--out", d / "rm", "rm.epochs=2",
                 "rm.train.batch_size=8", *("rm." + a for a in lora_args))
    assert rm.returncode == 0, rm.stderr[-2000:]
    return d, d / "base"


def test_lora_sft_learns_and_publishes_the_merged_plain_model(runs):
    d, base_dir = runs
    metrics = [json.loads(line) for line in (d / "sft" / "metrics.jsonl").read_text().splitlines()]
    evals = [m["val_loss"] for m in metrics if m.get("event") == "eval"]
    assert evals[-1] < evals[0] - 1.0, evals  # adapters alone learn the answers
    base, merged = load_model(base_dir).state_dict(), load_model(d / "sft").state_dict()  # a plain GPT, as every verb loads
    adapters, meta = read_weights(d / "sft" / "adapter.safetensors")
    assert json.loads(meta["gptstack.lora"]) == {"rank": 4, "alpha": 8.0, "targets": ["qkv", "proj", "fc"]}
    assert len(adapters) == 2 * 4 * 2  # 2 blocks x 4 layers x (A, B)
    for key, w in merged.items():
        layer = key.rsplit(".", 1)[0]
        if f"{layer}.lora_A.default.weight" in adapters and key.endswith("weight"):
            a, b = adapters[f"{layer}.lora_A.default.weight"], adapters[f"{layer}.lora_B.default.weight"]
            assert torch.equal(w, base[key] + 8.0 / 4 * (b @ a)), key
        else:
            assert torch.equal(w, base[key]), key  # embeddings, norms: frozen
    summary = json.loads((d / "sft" / "summary.json").read_text())["sft"]
    assert summary["val_loss"] < evals[0]


def test_lora_rm_keeps_its_head_trained_and_records_its_base(runs):
    d, _ = runs
    rm = load_reward_model(d / "rm")
    sft = load_model(d / "sft").state_dict()
    assert not torch.equal(rm.gpt.state_dict()["blocks.0.attn.qkv.weight"], sft["blocks.0.attn.qkv.weight"])
    assert torch.equal(rm.gpt.state_dict()["wte.weight"], sft["wte.weight"])
    from gptstack.stages.ppo import rm_adapter_fits
    assert rm_adapter_fits(d / "rm", d / "sft", lora_cfg(lora_alpha=8.0))
    assert not rm_adapter_fits(d / "rm", d / "sft", lora_cfg(lora_rank=8))


def test_lora_ppo_shares_one_base_and_starts_at_sft_and_the_reward_model(runs):
    """One copy of the base weights: the reference is the policy with adapters off, the value function reads the
    same base through its own adapter, started from the RM's: V is the RM's normalised score at the start."""
    from gptstack.stages.ppo import actor_critic
    d, _ = runs
    ac = actor_critic(d / "sft", d / "rm", train=lora_cfg(lora_alpha=8.0), log=lambda *a: None)
    sft, rm = load_model(d / "sft"), load_reward_model(d / "rm")
    decoders = [m for m in ac.modules() if isinstance(m, GPT)]
    assert len(decoders) == 2 and ac.value.gpt is ac.policy and ac.reference is None  # policy (shared) + the RM
    base_storages = {p.data_ptr() for n, p in ac.policy.named_parameters() if not p.requires_grad}
    assert sum(p.numel() for p in ac.parameters()) == (sum(p.numel() for p in sft.parameters()) + lora.trainable_params(ac.policy)
                                                        + sum(p.numel() for p in rm.parameters()) + 32 + 1)  # + V's head
    assert len(base_storages) == len([p for p in sft.parameters()])
    ids = torch.randint(0, sft.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        logits, values = ac(ids)
        torch.testing.assert_close(logits, sft(ids)[0][:, :-1], atol=0, rtol=0)
        randomise_adapters(ac.policy, seed=1)  # the policy moves away; the reference does not
        assert not torch.equal(ac.policy.sequence_logprobs(ids), sft.sequence_logprobs(ids))
        assert torch.equal(ac.reference_logprobs(ids), sft.sequence_logprobs(ids))
    ac = actor_critic(d / "sft", d / "rm", train=lora_cfg(lora_alpha=8.0), log=lambda *a: None)
    last = torch.full((2,), 22)  # V of token t reads the state before it: values[:, -1] is at position 22
    with torch.no_grad():
        values = ac(ids)[1]
        torch.testing.assert_close(values[:, -1], rm.score(ids, last), atol=1e-5, rtol=1e-5)


def test_lora_ppo_publishes_a_plain_policy_and_value_function(runs, tmp_path):
    d, _ = runs
    proc = run_cli("ppo", "--policy", d / "sft", "--rm", d / "rm", "--prompts", d / "prompts.jsonl", "--out", tmp_path / "ppo",
                   "ppo.rollouts=2", "ppo.rollout_batch=8", "ppo.ppo_epochs=1", "ppo.max_new_tokens=6", "ppo.ptx_coef=0",
                   "ppo.eval_every_rollouts=1", "ppo.train.lora_rank=4", "ppo.train.lora_alpha=8", "ppo.train.lr=1e-3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "value function starts" not in proc.stdout + proc.stderr  # started from the RM's adapter
    policy, sft = load_model(tmp_path / "ppo").state_dict(), load_model(d / "sft").state_dict()
    adapters = read_weights(tmp_path / "ppo" / "adapter.safetensors")[0]
    assert {k.split(".")[-2] for k in adapters} == {"policy", "value"}
    a, b = (adapters[f"policy.blocks.1.mlp.fc.lora_{m}.policy.weight"] for m in "AB")
    assert b.abs().sum() > 0
    assert torch.equal(policy["blocks.1.mlp.fc.weight"], sft["blocks.1.mlp.fc.weight"] + 2.0 * (b @ a))
    assert torch.equal(policy["wte.weight"], sft["wte.weight"])
    value = load_reward_model(tmp_path / "ppo" / "value.safetensors")
    a, b = (adapters[f"policy.blocks.1.mlp.fc.lora_{m}.value.weight"] for m in "AB")
    assert torch.equal(value.gpt.state_dict()["blocks.1.mlp.fc.weight"], sft["blocks.1.mlp.fc.weight"] + 2.0 * (b @ a))


def test_bad_lora_settings_are_one_line(random_model_dir, tmp_path):
    for override, needle in (("sft.train.lora_rank=-1", "'sft.train.lora_rank' must be >= 0"),
                             ("sft.train.lora_targets=[attn]", "'sft.train.lora_targets' must name"),
                             ("sft.train.lora_alpha=0", "'sft.train.lora_alpha' must be a positive number")):
        proc = run_cli("sft", "--from", random_model_dir, "--data", tmp_path / "none.jsonl", "--out", tmp_path / "out", override)
        assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_lora_finetune_trains_its_head_and_predicts_from_the_merged_model(runs, tmp_path):
    d, base_dir = runs
    (d / "task.jsonl").write_text("".join(json.dumps({"text": f"{w} number {i}", "label": w}) + "\n"
                                          for i in range(40) for w in ("odd", "even") if i % 2 == (w == "odd")))
    proc = run_cli("finetune", "--task", "classification", "--data", d / "task.jsonl", "--from", base_dir, "--out",
                   tmp_path / "ft", "finetune.epochs=1", "finetune.train.batch_size=8", "finetune.train.lora_rank=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = read_weights(tmp_path / "ft" / "model.safetensors")[0]
    assert "head.proj.weight" in state and not any(lora.LORA_KEY in k for k in state)
    assert (tmp_path / "ft" / "adapter.safetensors").is_file()
    proc = run_cli("predict", "--model", tmp_path / "ft", "--data", d / "task.jsonl")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 40, proc.stderr[-2000:]
