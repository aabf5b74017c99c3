"""1 rank == 2 ranks: `torchrun --nproc_per_node=2` on CPU (gloo) against one process with the
same global batch, and checkpoints that move between world sizes, for DDP and FSDP2."""
import json
import shutil

import pytest
import torch

from conftest import TINY, run_ranks
from gptstack.checkpoint import load_model, read_weights
from gptstack.cli import main
from gptstack.stages import RunConfig
from gptstack.errors import GptstackError

# 6 steps, a checkpoint at 3; micro-batches of 2 so both runs accumulate (4 per step alone, 2 per rank)
SETTINGS = [*TINY, "pretrain.steps=6", "pretrain.log_every=1", "pretrain.ckpt_every=3", "pretrain.warmup_steps=2",
            "pretrain.lr=3e-3", "pretrain.micro_batch_size=2"]


def pretrain(out, corpus, cache, ranks=1, *extra) -> str:
    """`gptstack pretrain` under torchrun with `ranks` processes, or in this process; its stdout."""
    return run_ranks(["pretrain", "--out", out, "--data", corpus, *SETTINGS, *extra], ranks, {"GPTSTACK_CACHE": str(cache)})


def train_losses(run) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["event"] == "train"]


def assert_same_curve(a, b):
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert [loss for _, loss in a] == pytest.approx([loss for _, loss in b], abs=1e-5)


def resume_copy(run, to):
    """`run` as it was at step 3: its last checkpoint and the finished stage's files gone."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "pretrain" / "checkpoints" / "step_0000006")
    (to / "pretrain" / "summary.json").unlink()
    return to


def assert_same_weights(a, b):
    """Equal up to rounding: Adam turns the rounding noise of a near-zero gradient into a visible step
    (measured up to ~1.3e-5), while a lost or doubled update moves weights by ~lr = 3e-3."""
    wa, _ = read_weights(a / "pretrain" / "model.safetensors")
    wb, _ = read_weights(b / "pretrain" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-4), k


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    """The reference: the same global batch in one process, uninterrupted."""
    root = tmp_path_factory.mktemp("dist")
    pretrain(root / "one", corpus, root / "cache")
    return root / "one"


def test_two_ranks_equal_one_process_and_resume_in_one(one_process, corpus, tmp_path):
    cache = tmp_path / "cache"  # empty: rank 0 tokenizes, rank 1 waits and reads the cache
    two = tmp_path / "two"
    stdout = pretrain(two, corpus, cache, 2)
    assert_same_curve(train_losses(two), train_losses(one_process))
    assert stdout.count("[pretrain] running") == stdout.count("model: ") == 1  # rank 0 speaks, rank 1 is quiet
    assert len(list((cache / "tokens").iterdir())) == 1
    state = json.loads((two / "pretrain" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2

    # the 2-rank checkpoint at step 3 resumes in one process and ends where the uninterrupted run does
    resumed = resume_copy(two, tmp_path / "resumed")
    pretrain(resumed, corpus, cache)
    assert_same_curve(train_losses(resumed), train_losses(one_process))
    assert_same_weights(resumed, one_process)


@pytest.fixture(scope="module")
def fsdp_run(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    pretrain(root / "fsdp", corpus, root / "cache", 2, "--strategy", "fsdp")
    return root / "fsdp"


def test_fsdp_on_two_ranks_trains_like_one_process_and_loads_in_one(fsdp_run, one_process):
    losses = train_losses(fsdp_run)
    assert losses[-1][1] < losses[0][1] - 0.2  # it learns
    assert_same_curve(losses, train_losses(one_process))
    shards = sorted(p.name for p in (fsdp_run / "pretrain" / "checkpoints" / "step_0000006" / "optim").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # the optimizer state stays sharded
    # the final weights, gathered on rank 0, load into one plain process
    model = load_model(fsdp_run / "pretrain")
    assert model.num_params() == sum(w.numel() for w in read_weights(fsdp_run / "pretrain" / "model.safetensors")[0].values())
    assert_same_weights(fsdp_run, one_process)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_another_number_of_ranks(fsdp_run, one_process, corpus, tmp_path):
    """The 2-shard checkpoint at step 3 resumes on 1 rank (DCP reshards) and continues identically."""
    resumed = resume_copy(fsdp_run, tmp_path / "resumed")
    pretrain(resumed, corpus, fsdp_run.parent / "cache", 1, "--strategy", "fsdp")
    assert_same_curve(train_losses(resumed), train_losses(one_process))
    assert_same_weights(resumed, one_process)


def test_strategy_is_checked():
    assert RunConfig.resolve("tiny", overrides=["pretrain.strategy=fsdp"]).pretrain.strategy == "fsdp"
    with pytest.raises(GptstackError, match="'pretrain.strategy': 'zero3' is not one of ddp, fsdp"):
        RunConfig.resolve("tiny", overrides=["pretrain.strategy=zero3"])


def test_a_ddp_checkpoint_does_not_resume_as_fsdp(one_process, corpus, tmp_path, monkeypatch, capsys):
    run = resume_copy(one_process, tmp_path / "run")
    (run / "config.yaml").unlink()  # past the run folder's own config check, to the checkpoint's
    monkeypatch.setenv("GPTSTACK_CACHE", str(one_process.parent / "cache"))
    assert main(["pretrain", "--out", str(run), "--data", str(corpus), *SETTINGS, "--strategy", "fsdp"]) == 2
    assert "cannot resume, config changed since the checkpoint: strategy 'ddp' -> 'fsdp'" in capsys.readouterr().err
