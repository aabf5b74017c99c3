"""Every training verb on torchrun, like pretraining (tests/test_distributed.py): sft, rm, finetune, ppo and dpo on 2 CPU
ranks (gloo) against one process with the same global batch, each 2-rank checkpoint resumed in one process, FSDP2
against DDP, PPO's rollouts answer by answer, and every model of the PPO stage on the stage's device."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_ranks, write_own_files
from gptstack.checkpoint import load_model, read_weights

HERE = Path(__file__).resolve().parent
TRAIN = "train.steps=6 train.batch_size=8 train.micro_batch_size=2 train.ckpt_every=3 train.keep_checkpoints=2 " \
        "train.log_every=1 train.warmup_steps=2 train.lr=3e-3"


def argv(verb, d, out) -> list:
    """6 optimizer steps of 8 examples, micro-batches of 2 (so 1 rank and 2 ranks both accumulate), a checkpoint at 3."""
    if verb == "sft":
        return ["sft", "--from", d / "base", "--data", d / "sft.jsonl", "--out", out, *(f"sft.{s}" for s in TRAIN.split())]
    if verb == "rm":
        return ["rm", "--from", d / "sft", "--data", d / "rankings.jsonl", "--out", out, *(f"rm.{s}" for s in TRAIN.split())]
    if verb == "dpo":  # the reference: the frozen SFT model beside the policy on every rank
        return ["dpo", "--policy", d / "sft", "--data", d / "rankings.jsonl", "--out", out, "--loss", "listwise",
                *(f"dpo.{s}" for s in TRAIN.split())]
    if verb == "finetune":  # 36 training records x 1.3 epochs / 8 = 6 steps
        return ["finetune", "--task", "classification", "--data", d / "task.jsonl", "--from", d / "base", "--out", out,
                "finetune.epochs=1.3", "finetune.head_dropout=0",
                *(f"finetune.{s}" for s in TRAIN.split() if not s.startswith("train.steps"))]
    # ppo: 3 rollouts of 8 answers, 2 updates each (one epoch, 2 minibatches of 4: 2 per rank), PPO-ptx on, rule-based
    # rewards on; a checkpoint at update 4 (checkpoints fall on rollout boundaries)
    return ["ppo", "--policy", d / "sft", "--rm", d / "rm", "--prompts", d / "prompts.jsonl", "--out", out,
            "ppo.rollouts=3", "ppo.rollout_batch=8", "ppo.minibatches=2", "ppo.ppo_epochs=1", "ppo.max_new_tokens=8",
            "ppo.eval_every_rollouts=1", "ppo.baselines=false", "ppo.rbrm=world", "ppo.ptx_seq_len=32",
            "ppo.train.ckpt_every=4", "ppo.train.keep_checkpoints=2", "ppo.train.lr=3e-3",
            f"data.sources=[{{path: {d / 'corpus'}}}]"]


def run(args, ranks=1) -> str:
    """The verb under torchrun with `ranks` processes, or in this process at one thread (as torchrun gives each rank)."""
    return run_ranks(args, ranks)


def curve(out) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["event"] == "train"]


def assert_same_curve(a, b, tol=1e-5):
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert [loss for _, loss in a] == pytest.approx([loss for _, loss in b], abs=tol)


def assert_same_weights(a, b, name="model.safetensors"):
    """Equal up to rounding: Adam turns the rounding noise of a near-zero gradient into a visible step (up to ~1e-5,
    tests/test_distributed.py), while a lost or doubled update moves weights by ~lr = 3e-3. The reward model's head
    bias has no gradient at all but rounding noise (a shift of every reward leaves every pair's margin), so Adam
    walks it by up to lr a step; its normalisation (bias = −mean raw score) takes the walk back: their sum is compared."""
    wa, wb = read_weights(Path(a) / name)[0], read_weights(Path(b) / name)[0]
    assert wa.keys() == wb.keys()
    if "gain" in wa:  # a reward model
        assert (wa.pop("head.proj.bias") + wa.pop("bias")).item() == pytest.approx(
            (wb.pop("head.proj.bias") + wb.pop("bias")).item(), abs=1e-4)
        assert wa.pop("gain").item() == pytest.approx(wb.pop("gain").item(), rel=1e-3)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-4), k


@pytest.fixture(scope="module")
def data(tmp_path_factory, random_model_dir, corpus):
    """Your own files for every verb, and an SFT policy and reward model (trained once, in this process) for PPO."""
    d = tmp_path_factory.mktemp("recipe")
    (d / "base").symlink_to(random_model_dir)
    (d / "corpus").symlink_to(corpus)
    write_own_files(d)
    run(["sft", "--from", d / "base", "--data", d / "sft.jsonl", "--out", d / "sft", "sft.epochs=1"])
    run(["rm", "--from", d / "sft", "--data", d / "rankings.jsonl", "--out", d / "rm", "rm.epochs=1"])
    return d


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """Each verb's reference run, in one process: made once, on first use."""
    made = {}

    def get(verb):
        if verb not in made:
            made[verb] = tmp_path_factory.mktemp("one") / verb
            run(argv(verb, data, made[verb]))
        return made[verb]
    return get


def resume_copy(out, to):
    """`out` as it was at its checkpoint before the last: the last one gone (the published files are overwritten)."""
    shutil.copytree(out, to, symlinks=True)
    shutil.rmtree(sorted((to / "checkpoints").glob("step_*"))[-1])
    return to


@pytest.mark.parametrize("verb", ["sft", "rm", "finetune", "ppo", pytest.param("dpo", marks=pytest.mark.slow)])
def test_two_ranks_equal_one_process_and_resume_in_one(verb, data, one_process, tmp_path):
    """The same losses step by step on 2 ranks as in one process (PPO: the same rollouts too, so the same rewards and
    KL every update), and the 2-rank checkpoint before the last resumes in one process to the same end."""
    two = tmp_path / "two"
    stdout = run(argv(verb, data, two), ranks=2)
    one = one_process(verb)
    assert_same_curve(curve(two), curve(one))
    state = json.loads((two / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    lines = stdout.splitlines()
    assert lines and len(set(lines)) == len(lines)  # rank 0 speaks, rank 1 is quiet
    if verb == "ppo":
        rows = {r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two)}
        for a, b in zip(rows[one], rows[two]):  # each update's rollout figures and each validation
            for key in ("reward", "rm_score", "rule_reward", "kl", "entropy", "ptx_loss", "val_rm_score", "val_kl"):
                assert (key in a) == (key in b) and a.get(key, 0) == pytest.approx(b.get(key, 0), abs=1e-5), key
            assert a.get("answer_length") == b.get("answer_length") and a.get("ended") == b.get("ended")
        s1, s2 = (json.loads((r / "summary.json").read_text())["ppo"] for r in (one, two))
        for key in ("rm_score", "kl", "win_rate_vs_sft", "sft_rm_score", "pretrain_val_loss_delta"):  # the evaluation
            assert s1[key] == pytest.approx(s2[key], abs=1e-5), key
        assert s1["selected"]["step"] == s2["selected"]["step"]

    resumed = resume_copy(two, tmp_path / "resumed")
    run(argv(verb, data, resumed))
    assert_same_curve(curve(resumed), curve(one))
    if verb == "ppo":  # the published policy is the best validation's, and two updates' validations may tie within
        # rounding: the last step's weights are the resume's end; the published ones agree when the same update was kept
        last = sorted(p.name for p in (one / "checkpoints").glob("step_*"))[-1]
        assert_same_weights(resumed, one, f"checkpoints/{last}/model.safetensors")
        s1, s3 = (json.loads((r / "summary.json").read_text())["ppo"]["selected"] for r in (one, resumed))
        if s1["step"] != s3["step"]:
            assert s1["value"] == pytest.approx(s3["value"], abs=1e-5)
            return
    assert_same_weights(resumed, one)


def test_ppo_rollouts_are_the_same_answers_and_rewards_on_two_ranks(tmp_path):
    """Each rank samples and scores its share of the rollout (answer i seeded by i), every rank gets all of it: the
    answers token for token, their scores and advantages within rounding, as one process makes them."""
    sys.path.insert(0, str(HERE))
    from distributed_rollouts import rollouts
    one = rollouts()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "distributed_rollouts.py"), str(tmp_path / "two.pt")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    for a, b in zip(one, two):
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["mask"], b["mask"])  # the same answers
        assert a["mask"].sum() > 8 * len(a["mask"])  # real answers: the test would be empty otherwise
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-5)  # the same rewards
        for key in ("old_logp", "old_values", "advantages", "returns"):
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
        assert b["stats"]["rule_reward"] == pytest.approx(a["stats"]["rule_reward"], abs=1e-6) and a["stats"]["rule_reward"] > 0
    assert not torch.equal(one[0]["ids"], one[1]["ids"])


@pytest.mark.parametrize("verb", [pytest.param("sft", marks=pytest.mark.slow), "ppo"])
def test_fsdp_on_two_ranks_trains_like_ddp_and_loads_in_one_process(verb, data, one_process, tmp_path):
    fsdp = tmp_path / "fsdp"
    run([*argv(verb, data, fsdp), f"{verb}.train.strategy=fsdp"], ranks=2)
    assert_same_curve(curve(fsdp), curve(one_process(verb)), tol=1e-4)
    assert sorted(p.name for p in (fsdp / "optim").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    model = load_model(fsdp)  # the policy, gathered on rank 0, is a plain model in one process
    assert model.num_params() == sum(w.numel() for w in read_weights(fsdp / "model.safetensors")[0].values())
    assert_same_weights(fsdp, one_process(verb))
    if verb == "ppo":
        from gptstack.train.rm import load_reward_model
        load_reward_model(fsdp / "value.safetensors")


def test_lora_ppo_on_two_ranks_trains_like_one_process(data, tmp_path):
    """DDP around the LoRA actor-critic: one base, both adapters trained in every update (switched per forward),
    the same curve and published policy and value function on 2 ranks as in one process."""
    lora = ["ppo.train.lora_rank=4", "ppo.train.lora_alpha=8"]
    run([*argv("ppo", data, tmp_path / "two"), *lora], ranks=2)
    run([*argv("ppo", data, tmp_path / "one"), *lora])
    assert_same_curve(curve(tmp_path / "two"), curve(tmp_path / "one"))
    for name in ("model.safetensors", "value.safetensors", "adapter.safetensors"):
        assert_same_weights(tmp_path / "two", tmp_path / "one", name)


def test_the_pipelines_strategy_is_every_training_stages_and_a_key_still_wins():
    from gptstack.cli import build_parser, pipeline_settings
    cfg = pipeline_settings(build_parser().parse_args(["pipeline", "--out", "x", "--strategy", "fsdp", "rm.train.strategy=ddp"]))
    assert (cfg.pretrain.strategy, cfg.sft.train.strategy, cfg.ppo.train.strategy, cfg.finetune.train.strategy,
            cfg.rm.train.strategy) == ("fsdp", "fsdp", "fsdp", "fsdp", "ddp")
    for verb, extra in (("sft", ["--from", "x"]), ("rm", ["--from", "x"]), ("ppo", ["--policy", "x", "--rm", "y"]),
                        ("finetune", ["--from", "x", "--task", "classification", "--data", "d", "--out", "o"])):
        args = build_parser().parse_args([verb, *extra, "--strategy", "fsdp"])
        assert vars(args)[f"flag:{verb}.train.strategy"] == "fsdp"


def test_every_model_of_the_ppo_stage_lives_on_the_stage_device(data, tmp_path, monkeypatch):
    """Built on the `meta` device (no GPU here; a model left on the CPU would show): the four models the Trainer holds,
    the rule-based rewards' judge, and the models the evaluation loads."""
    from gptstack.stages import RunConfig
    from gptstack.stages import ppo as stage
    from gptstack.train.trainer import placement
    cfg = RunConfig.resolve("tiny", overrides=["ppo.train.device=meta", "ppo.rbrm=world", f"ppo.rbrm_judge={data / 'sft'}"])
    device, _ = placement(cfg.ppo.train)
    assert device == torch.device("meta")
    held, load_rules = {}, stage.load_rules

    class Started(Exception):
        pass

    def fit(trainer):  # the stage's Trainer, as it would start training: it holds the actor-critic
        held["actor_critic"] = trainer.model
        raise Started

    monkeypatch.setattr(stage.Trainer, "fit", fit)
    monkeypatch.setattr(stage, "load_rules", lambda p, device="cpu": held.setdefault("rules", load_rules(p, device)))
    from gptstack.tokenizer import Tokenizer
    tok = Tokenizer.load(data / "sft" / "tokenizer.json")
    prompts = stage.Prompts([[{"role": "user", "content": "What is 2 plus 3?"}]])
    with pytest.raises(Started):
        stage.train_ppo(cfg, data / "sft", data / "rm", tmp_path / "ppo", tok, 0.0, prompts, prompts)
    ac = held["actor_critic"]
    assert {n.split(".")[0] for n, _ in ac.named_parameters()} == {"policy", "value", "reference", "reward_model"}
    models = {"actor_critic": ac, "judge": held["rules"].judge.model}
    # the evaluation's: SFT, PPO (here any policy folder), PPO without ptx, the reward model
    models |= dict(zip(("sft", "ppo", "no_ptx", "rm"), stage.evaluation_models(data / "sft", data / "sft", data / "sft",
                                                                                data / "rm", device)))
    for name, model in models.items():
        tensors = [*model.parameters(), *model.buffers()]
        assert tensors and {t.device for t in tensors} == {device}, name



def same_figures(a, b, path=""):
    """Two report.json sections alike: every string, count and list equal, every figure within 1e-4 (timings and memory aside)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k not in ("seconds", "train_seconds", "stage_seconds", "tokens_per_sec", "mfu", "world_size", "versus", "name", "peak_rss_mb", "train_peak_rss_mb"):
                same_figures(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same_figures(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4), path
    else:
        assert a == b, path


@pytest.mark.slow
def test_the_instruction_pipeline_on_two_fsdp_ranks_reports_what_one_process_does(corpus, tmp_path):
    """InstructGPT's steps on the world, rounds of new rankings included (the world's dev prompts pick SFT's and PPO's
    kept checkpoints, so every figure of report.json depends on sampling split across the ranks): under torchrun
    with FSDP2 the report is one process's."""
    from test_rlhf_pipeline import SMALL
    args = ["pipeline", "--data", corpus, "--stages", "tokenizer,pretrain,sft,rm,ppo", *SMALL, "ppo.rounds=2"]
    run([*args, "--out", tmp_path / "one"])
    run([*args, "--out", tmp_path / "two", "--strategy", "fsdp"], ranks=2)
    one, two = (json.loads((tmp_path / r / "report.json").read_text()) for r in ("one", "two"))
    assert len(one["ppo"]["by_round"]) == 2 and one["rm"]["test_rankings"] == 12
    for stage in ("sft", "rm", "ppo"):
        same_figures(one[stage], two[stage], stage)
    assert (tmp_path / "one" / "rm" / "rankings.jsonl").read_bytes() == (tmp_path / "two" / "rm" / "rankings.jsonl").read_bytes()
