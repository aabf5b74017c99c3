"""The instruction stages end to end on a tiny model: sft -> rm -> ppo (with the RBRM) write the run
folder contract, report.json keys and plots, and the PPO policy chats."""
import json

import pytest

from conftest import TINY, run_cli

SMALL = [*TINY, "model.n_ctx=128", "pretrain.steps=30",
         "sft.demonstrations=96", "sft.eval_prompts=20", "sft.epochs=1", "sft.train.batch_size=16", "sft.max_new_tokens=16",
         "rm.prompts=24", "rm.val_prompts=12", "rm.k=3", "rm.max_new_tokens=16", "rm.train.batch_size=8",
         "ppo.rollouts=2", "ppo.rollout_batch=8", "ppo.minibatches=2", "ppo.ppo_epochs=1", "ppo.prompts=16",
         "ppo.eval_prompts=12", "ppo.max_new_tokens=12", "ppo.eval_every_rollouts=1", "ppo.rbrm=world",
         "ppo.ptx_seq_len=32", "pretrain.eval_tokens=1024"]


@pytest.fixture(scope="module")
def rlhf_run(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("rlhf") / "run"
    proc = run_cli("pipeline", "--out", run, "--data", corpus, "--stages", "tokenizer,pretrain,sft,rm,ppo", *SMALL,
                   f"ppo.versus=[{run / 'sft'}]", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_instruction_stages_write_their_report_keys(rlhf_run):
    r = json.loads((rlhf_run / "report.json").read_text())
    for key in ("gold_score", "accuracy", "base_gold_score", "base_accuracy", "refusal_rate_disallowed",
                "refusal_rate_allowed", "refusal_style_desired_rate"):
        assert key in r["sft"], key
    assert set(r["sft"]["by_family"]) == {"arithmetic", "string", "list", "sort", "docstring", "module", "format", "cot",
                                          "refusal", "risky"}
    for key in ("pairs", "val_accuracy", "gold_agreement", "labeler_agreement", "tie_fraction",
                "baseline_length_agreement", "baseline_loglik_agreement"):
        assert key in r["rm"], key
    assert set(r["rm"]["by_subset"]) <= {"correctness_differs", "correctness_same"}
    for key in ("win_rate_vs_sft", "accuracy", "gold_score", "rm_score", "kl", "pretrain_val_loss_delta",
                "pretrain_val_loss_delta_no_ptx", "refusal_rate_disallowed", "refusal_rate_allowed",
                "refusal_style_desired_rate"):
        assert key in r["ppo"], key
    assert 0.0 <= r["ppo"]["win_rate_vs_sft"] <= 1.0
    # judged against the SFT folder as an "other" policy, the figures must equal the SFT comparison's
    other = r["ppo"]["versus"][str(rlhf_run / "sft")]
    assert other["win_rate"] == r["ppo"]["win_rate_vs_sft"] and other["accuracy"] == r["ppo"]["sft_accuracy"]
    assert other["params"] == r["ppo"]["params"]
    for plot in ("sft.png", "rm_vs_gold.png", "ppo.png"):
        assert (rlhf_run / "plots" / plot).is_file(), plot
    md = (rlhf_run / "report.md").read_text()
    assert "## Reward model" in md and "## RLHF" in md and "Sample conversations" in md
    assert f"Against `{rlhf_run / 'sft'}`" in md


def test_rankings_hold_k_answers_and_both_rankings(rlhf_run):
    rows = [json.loads(l) for l in (rlhf_run / "rm" / "rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    for row in rows:
        assert len(row["responses"]) == len(row["ranks"]) == len(row["gold_ranks"]) == 3
        assert min(row["ranks"]) == 1


def test_the_ppo_policy_is_a_plain_model_that_chats(rlhf_run):
    proc = run_cli("sample", "--model", rlhf_run / "ppo", "--chat", "--prompt", "Add 2 and 3.", "--max-new-tokens", "8",
                   "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    assert (rlhf_run / "ppo" / "value.safetensors").is_file()
