import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import TINY
from gptstack.checkpoint import read_weights
from gptstack.data.sources import DataConfig, SourceConfig
from gptstack.stages import RunConfig
from gptstack.train.trainer import TrainConfig
from gptstack.data.loader import build_sampler
from gptstack.errors import GptstackError
from gptstack.model import GPT
from gptstack.tokenizer import Tokenizer
from gptstack.train.lm import LMObjective
from gptstack.train.trainer import Trainer, lr_at


@pytest.fixture(scope="module")
def sampler(corpus, tmp_path_factory):
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    tok = Tokenizer.train(texts, vocab_size=512)
    return build_sampler(DataConfig(sources=[SourceConfig(path=str(corpus))]), tok, seq_len=32, seed=0)


def make_trainer(sampler, out, dropout=0.1, **train):
    torch.manual_seed(0)
    model = GPT(RunConfig.resolve("tiny", overrides=["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.n_ctx=32",
                                           "model.vocab_size=512", f"model.dropout={dropout}"]).model)
    cfg = TrainConfig(**{"steps": 4, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 100,
                         "eval_tokens": 256, "device": "cpu", **train})
    return Trainer(cfg, model, LMObjective(sampler, model.flops_per_token(32), cfg.eval_tokens), out, metadata=model.metadata())


def test_batch_times_accumulation_is_invariant(sampler, tmp_path):
    """batch 8 x accumulation 1 == micro-batch 1 x accumulation 8 (the TRL invariant): the same gradient,
    then the same loss curve. (Weights are not compared after Adam: it turns the rounding noise of
    gradients that are zero in exact arithmetic, like the key bias's, into full-size steps.)"""
    a = make_trainer(sampler, tmp_path / "a", dropout=0.0, micro_batch_size=8)
    b = make_trainer(sampler, tmp_path / "b", dropout=0.0, micro_batch_size=1)
    assert (a.accum, b.accum) == (1, 8)
    for t in (a, b):
        t._step(t.model, step=0)
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-7, rtol=1e-5), name
    for t in (a, b):
        t.model.zero_grad()
        t.fit()
    la = [json.loads(l)["loss"] for l in (tmp_path / "a/metrics.jsonl").read_text().splitlines() if '"train"' in l]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "b/metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert len(la) == 4 and la == pytest.approx(lb, abs=1e-5)


def test_loss_falls_and_files_are_written(sampler, tmp_path):
    t = make_trainer(sampler, tmp_path, steps=30, eval_every=10, ckpt_every=10, keep_checkpoints=2)
    summary = t.fit()
    assert summary["final"]["val_loss"] < summary["initial"]["val_loss"] - 0.5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000020", "step_0000030"]
    for name in ("model.safetensors", "optim.pt", "trainer_state.json", "metrics.jsonl"):
        assert (tmp_path / name).is_file()
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["finished"]
    _, meta = read_weights(tmp_path / "model.safetensors")
    assert json.loads(meta["gptstack.model_config"])["n_layer"] == 2


def test_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.55) and lr_at(cfg, 100) == pytest.approx(0.1)
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1) for s in range(10, 100))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(sampler, tmp_path):
    t = make_trainer(sampler, tmp_path, steps=6, ckpt_every=2)
    original = t.objective.loss

    def poisoned(model, micro, calls=[0]):
        calls[0] += 1
        loss, m = original(model, micro)
        return (loss * float("nan") if calls[0] > 3 else loss), m

    t.objective.loss = poisoned
    with pytest.raises(GptstackError, match=r"loss became nan at step 4 .*last good checkpoint: .*step_0000002"):
        t.fit()
    ck = tmp_path / "checkpoints" / "step_0000002"
    state, _ = read_weights(ck / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_corrupt_checkpoint_is_named(sampler, tmp_path):
    make_trainer(sampler, tmp_path, steps=2, ckpt_every=2).fit()
    ck = tmp_path / "checkpoints" / "step_0000002" / "model.safetensors"
    data = bytearray(ck.read_bytes())
    data[-5] ^= 0xFF
    os.unlink(tmp_path / "model.safetensors")  # the published copy shares the file; break only the checkpoint
    ck.write_bytes(bytes(data))
    with pytest.raises(GptstackError, match=r"step_0000002/model.safetensors: corrupt checkpoint"):
        make_trainer(sampler, tmp_path, steps=4, ckpt_every=2).fit()


def test_resume_refuses_a_changed_config(sampler, tmp_path):
    make_trainer(sampler, tmp_path, steps=2, ckpt_every=2).fit()
    with pytest.raises(GptstackError, match="config changed since the checkpoint: lr"):
        make_trainer(sampler, tmp_path, steps=4, lr=1e-2).fit()


def _weights(path):
    return (path / "pretrain" / "model.safetensors").read_bytes()


def _pretrain_cmd(corpus, out, steps):
    return [sys.executable, "-m", "gptstack", "pretrain", "--out", str(out), "--data", str(corpus), *TINY,
            "model.dropout=0.1", f"pretrain.steps={steps}", "pretrain.ckpt_every=20", "pretrain.eval_every=0"]


def test_killed_run_resumes_to_a_bitwise_identical_model(corpus, tmp_path):
    steps = 160
    ref = subprocess.run(_pretrain_cmd(corpus, tmp_path / "ref", steps), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    proc = subprocess.Popen(_pretrain_cmd(corpus, tmp_path / "killed", steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckdir = tmp_path / "killed" / "pretrain" / "checkpoints"
    deadline = time.time() + 120
    while not (ckdir.is_dir() and any(p.name.startswith("step_") for p in ckdir.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "pretrain" / "summary.json").exists(), "killed too late to test resume"

    resumed = subprocess.run(_pretrain_cmd(corpus, tmp_path / "killed", steps), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _weights(tmp_path / "killed") == _weights(tmp_path / "ref")
    steps_logged = [json.loads(l)["step"] for l in (tmp_path / "killed/pretrain/metrics.jsonl").read_text().splitlines()
                    if '"train"' in l]
    assert steps_logged == sorted(set(steps_logged))  # no step logged twice after the resume


def test_sigterm_saves_and_exits_cleanly(corpus, tmp_path):
    proc = subprocess.Popen(_pretrain_cmd(corpus, tmp_path / "r", 100000), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "r" / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143  # 128 + SIGTERM, as a shell expects
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    state = json.loads(next((tmp_path / "r/pretrain/checkpoints").iterdir()).joinpath("trainer_state.json").read_text())
    assert state["step"] > 0 and not state["finished"]
