"""The instruction stages end to end on a tiny model: sft -> rm -> ppo (with the RBRM) -> dpo write the run
folder contract, report.json keys and plots, and the PPO policy chats."""
import json

import pytest

from conftest import TINY, run_cli

SMALL = [*TINY, "model.n_ctx=128", "pretrain.steps=30",
         "sft.demonstrations=96", "sft.dev_prompts=12", "sft.eval_prompts=20", "sft.epochs=1", "sft.train.batch_size=16", "sft.max_new_tokens=16",
         "rm.prompts=24", "rm.val_prompts=12", "rm.test_prompts=12", "rm.k=3", "rm.max_new_tokens=16", "rm.train.batch_size=8",
         "ppo.rollouts=2", "ppo.rollout_batch=8", "ppo.minibatches=2", "ppo.ppo_epochs=1", "ppo.train_prompts=16",
         "ppo.dev_prompts=10", "ppo.eval_prompts=12", "ppo.max_new_tokens=12", "ppo.eval_every_rollouts=1", "ppo.rbrm=world",
         "ppo.ptx_seq_len=32", "pretrain.eval_tokens=1024",
         "dpo.dev_prompts=10", "dpo.eval_prompts=12", "dpo.max_new_tokens=12", "dpo.train.batch_size=8"]


@pytest.fixture(scope="module")
def rlhf_run(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("rlhf") / "run"
    proc = run_cli("pipeline", "--out", run, "--data", corpus, "--stages", "tokenizer,pretrain,sft,rm,ppo,dpo", *SMALL,
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
    # every headline figure says its split, and has its dev twin beside it
    assert r["sft"]["split"] == r["rm"]["split"] == r["ppo"]["split"] == "test"
    assert r["sft"]["n"] == 20 and r["sft"]["dev"]["n"] == 12 and r["sft"]["dev"]["accuracy"] is not None
    assert r["sft"]["selected"]["eval"]["accuracy"] == r["sft"]["dev"]["accuracy"]
    assert r["rm"]["test_rankings"] == 12 and "gold_agreement" in r["rm"]["dev"] and "test_accuracy" in r["rm"]
    assert r["ppo"]["n"] == 12 and r["ppo"]["dev"]["n"] == 10
    for key in ("win_rate_vs_sft", "accuracy", "kl", "rbrm_gold_agreement"):
        assert key in r["ppo"]["dev"], key
    assert r["ppo"]["rbrm_gold_pairs"] == 0 or 0 <= r["ppo"]["rbrm_gold_agreement"] <= 1
    assert r["ppo"]["rbrm_coverage"]["disallowed"] == 1.0  # the built-in rubric covers every disallowed request
    # judged against the SFT folder as an "other" policy, the figures must equal the SFT comparison's
    other = r["ppo"]["versus"][str(rlhf_run / "sft")]
    assert other["win_rate"] == r["ppo"]["win_rate_vs_sft"] and other["accuracy"] == r["ppo"]["sft_accuracy"]
    assert other["params"] == r["ppo"]["params"]
    for key in ("win_rate_vs_sft", "accuracy", "kl", "gold_score", "implicit_reward_gold_agreement", "seconds", "loss_type",
                "peak_rss_mb", "wins", "test_accuracy_vs_labeler"):
        assert key in r["dpo"], key
    assert r["dpo"]["split"] == "test" and r["dpo"]["n"] == 12 and r["dpo"]["dev"]["n"] == 10
    assert r["dpo"]["sft_accuracy"] == r["ppo"]["sft_accuracy"]  # the same SFT answers to the same test prompts
    assert r["dpo"]["gold_pairs"] == r["rm"]["gold_pairs"]  # the implicit reward ranks the RM's test rankings
    for plot in ("sft.png", "rm_vs_gold.png", "ppo.png", "dpo.png"):
        assert (rlhf_run / "plots" / plot).is_file(), plot
    md = (rlhf_run / "report.md").read_text()
    assert "## Reward model" in md and "## RLHF" in md and "Sample conversations" in md and "## DPO" in md
    assert f"Against `{rlhf_run / 'sft'}`" in md


def test_rankings_hold_k_answers_and_both_rankings(rlhf_run):
    rows = [json.loads(l) for l in (rlhf_run / "rm" / "rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    for row in rows:
        assert len(row["responses"]) == len(row["ranks"]) == len(row["gold_ranks"]) == 3
        assert min(row["ranks"]) == 1


def test_every_choice_reads_dev_and_every_figure_reads_test(rlhf_run):
    """The prompts behind each stage's choices (SFT's kept checkpoint, the RM's validation, PPO's kept checkpoint)
    are dev prompts, those behind the reported figures are test prompts, and training saw only train templates."""
    from gptstack.stages import RunConfig
    from gptstack.stages.ppo import prompt_sets
    from gptstack.stages.sft import sft_data
    from gptstack.world.instructions import InstructionSuite
    cfg = RunConfig.load(rlhf_run / "config.yaml")
    suite = InstructionSuite(seed=cfg.sft.seed)
    data = sft_data(cfg.sft)
    assert {p.split for p in data.dev_prompts} == {"dev"} and {p.split for p in data.test_prompts} == {"test"}
    train, dev, test = prompt_sets(cfg)
    assert [{p.split for p in ps.suite} for ps in (train, dev, test)] == [{"train"}, {"dev"}, {"test"}]
    for name, split in (("rankings", "train"), ("rankings_val", "dev"), ("rankings_test", "test")):
        rows = [json.loads(l) for l in (rlhf_run / "rm" / f"{name}.jsonl").read_text().splitlines()]
        assert {suite.lookup(r["prompt"], r.get("system")).split for r in rows} == {split}, name
    reported = [json.loads(l)["prompt"] for l in (rlhf_run / "sft" / "samples.jsonl").read_text().splitlines()]
    assert reported == [p.user for p in data.test_prompts]
    ppo, dpo = ([(r["system"], r["prompt"]) for r in map(json.loads, (rlhf_run / stage / "samples.jsonl").read_text().splitlines())]
                for stage in ("ppo", "dpo"))
    assert ppo == dpo and len(dpo) == 12  # PPO and DPO are judged on the same test prompts
    assert {suite.lookup(p, system).split for system, p in dpo} == {"test"}


def test_the_ppo_policy_is_a_plain_model_that_chats(rlhf_run):
    proc = run_cli("sample", "--model", rlhf_run / "ppo", "--chat", "--prompt", "Add 2 and 3.", "--max-new-tokens", "8",
                   "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    assert (rlhf_run / "ppo" / "value.safetensors").is_file()


def test_rounds_rank_the_current_policy_and_retrain_the_rm_on_all_rankings(rlhf_run, tmp_path):
    out = tmp_path / "rounds"
    proc = run_cli("ppo", "--policy", rlhf_run / "sft", "--rm", rlhf_run / "rm", "--out", out, "--rounds", "2",
                   *SMALL, "ppo.baselines=false", "ppo.rbrm=", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = (rlhf_run / "rm" / "rankings.jsonl").read_text().splitlines()
    new = (out / "round_2" / "rankings.jsonl").read_text().splitlines()
    assert len(new) == 24 // 2
    assert (out / "round_2" / "rankings_all.jsonl").read_text().splitlines() == first + new
    assert json.loads((out / "round_2" / "rm" / "summary.json").read_text())["rm"]["rankings"] == len(first + new)
    # the published policy is the last round's; round 2 starts from round 1's policy, its KL still measured to SFT
    assert (out / "model.safetensors").read_bytes() == (out / "round_2" / "model.safetensors").read_bytes()
    def first_kl(folder):
        return next(r["kl"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                    if r.get("event") == "train")

    assert abs(first_kl(out / "round_1")) < 1e-5 < abs(first_kl(out / "round_2"))
    r = json.loads((out / "summary.json").read_text())["ppo"]
    assert r["rounds"] == 2 and [b["rankings"] for b in r["by_round"]] == [24, 36]
    assert all(0 <= b["rm_gold_agreement"] <= 1 for b in r["by_round"])  # the retrained RM is judged against gold too
    assert r["steps"] == sum(b["steps"] for b in r["by_round"])


def test_rounds_without_world_rankings_is_a_clear_error(rlhf_run, tmp_path):
    rm = tmp_path / "rm"
    rm.mkdir()
    for name in ("model.safetensors", "summary.json"):
        (rm / name).write_bytes((rlhf_run / "rm" / name).read_bytes())
    proc = run_cli("ppo", "--policy", rlhf_run / "sft", "--rm", rm, "--out", tmp_path / "p", "--rounds", "2", *SMALL)
    assert proc.returncode != 0 and "rankings.jsonl" in proc.stderr and "Traceback" not in proc.stderr
