"""The InstructGPT recipe on the real SmolLM2-135M-Instruct with LoRA: `gptstack pipeline --preset smollm2` with a
few steps of each stage (import, SFT, rankings and RM, PPO-ptx), its report.json keys, and every LoRA stage's
published model equal to its base plus alpha/r·B·A of its adapters. Skipped without the shipped model, except in
CI (`make test` installs it), where a missing model fails."""
import json
import os

import pytest
import torch

from conftest import run_cli
from gptstack.checkpoint import read_weights
from gptstack.errors import GptstackError

try:
    from gptstack.convert.gguf import shipped_smollm2
    shipped_smollm2()
    MISSING = ""
except GptstackError as e:
    MISSING = str(e)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(MISSING) and not os.environ.get("CI"), reason=MISSING)]

FEW_STEPS = [  # every stage for a few steps on a handful of prompts; the preset's LoRA (r = 16, alpha = 32) and bf16
    "sft.demonstrations=24", "sft.train.steps=2", "sft.train.eval_every=1", "sft.dev_prompts=2", "sft.eval_prompts=3",
    "sft.max_new_tokens=8", "sft.train.lr=1e-3",
    "rm.prompts=4", "rm.val_prompts=2", "rm.test_prompts=3", "rm.k=3", "rm.max_new_tokens=8", "rm.train.steps=2",
    "rm.train.batch_size=2", "rm.train.lr=1e-3",
    "ppo.train_prompts=8", "ppo.dev_prompts=2", "ppo.eval_prompts=3", "ppo.rollouts=2", "ppo.rollout_batch=4",
    "ppo.max_new_tokens=8", "ppo.eval_every_rollouts=1", "ppo.baselines=false", "ppo.ptx_seq_len=16",
    "ppo.train.lr=1e-3", "pretrain.seq_len=128", "pretrain.eval_tokens=256",
]


def assert_merged(published, base, adapters, scaling, adapter="default", prefix=""):
    """published == base + scaling·B·A on every adapted matrix, == base elsewhere; returns how many were adapted."""
    adapted = 0
    for key, w in published.items():
        layer = key.rsplit(".", 1)[0]
        a = adapters.get(f"{prefix}{layer}.lora_A.{adapter}.weight")
        if a is not None and key.endswith(".weight"):
            b = adapters[f"{prefix}{layer}.lora_B.{adapter}.weight"]
            assert b.abs().sum() > 0, f"{key}: the adapter never trained"
            torch.testing.assert_close(w, base[key] + scaling * (b @ a), atol=1e-6, rtol=1e-6, msg=key)
            adapted += 1
        else:
            assert torch.equal(w, base[key]), f"{key}: a frozen weight changed"
    return adapted


def test_lora_sft_rm_ppo_on_smollm2_publish_base_plus_adapters(tmp_path):
    text = tmp_path / "ptx.txt"  # the ptx rows' source: a little text instead of tokenizing the whole stdlib here
    text.write_text("def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n" * 1000)
    run = tmp_path / "smol"
    proc = run_cli("pipeline", "--preset", "smollm2", "--out", run, "--stages", "import,sft,rm,ppo", *FEW_STEPS,
                   f"data.sources=[{{path: {text}}}]", timeout=1200, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    for stage in ("sft", "rm", "ppo"):
        assert report[stage]["lora_rank"] == 16 and report[stage]["peak_rss_mb"] > 300, stage
        assert report[stage]["seconds"] > 0
    assert {"accuracy", "base_accuracy", "by_family", "base_by_family"} <= set(report["sft"])
    assert {"gold_agreement", "baseline_length_agreement", "baseline_loglik_agreement", "by_subset"} <= set(report["rm"])
    assert {"win_rate_vs_sft", "accuracy", "sft_accuracy", "kl"} <= set(report["ppo"])
    assert report["import"]["params"] > 130e6 and (run / "chat_template.json").is_file()  # the run speaks ChatML

    weights = {name: read_weights(run / name / "model.safetensors")[0] for name in ("import", "sft", "rm", "ppo")}
    scaling = 32 / 16
    n_adapted = 30 * 4  # layers x (qkv, attn.proj, mlp.fc, mlp.proj)
    sft_adapters = read_weights(run / "sft" / "adapter.safetensors")[0]
    assert assert_merged(weights["sft"], weights["import"], sft_adapters, scaling) == n_adapted
    rm_adapters = read_weights(run / "rm" / "adapter.safetensors")[0]  # the RM: SFT + its adapter, under its head
    rm_gpt = {k[len("gpt."):]: v for k, v in weights["rm"].items() if k.startswith("gpt.")}
    assert assert_merged(rm_gpt, weights["sft"], rm_adapters, scaling, prefix="gpt.") == n_adapted
    ppo_adapters = read_weights(run / "ppo" / "adapter.safetensors")[0]  # the policy: SFT + adapter "policy"
    assert assert_merged(weights["ppo"], weights["sft"], ppo_adapters, scaling, "policy", prefix="policy.") == n_adapted
    value = {k[len("gpt."):]: v for k, v in read_weights(run / "ppo" / "value.safetensors")[0].items() if k.startswith("gpt.")}
    assert assert_merged(value, weights["sft"], ppo_adapters, scaling, "value", prefix="policy.") == n_adapted
