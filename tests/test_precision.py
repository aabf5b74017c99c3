"""Training precisions: what each sets, and that bf16 autocast trains like fp32.
(Their speed is measured in benchmarks/train_throughput.py, the longer loss comparison in
benchmarks/precision_loss.py.)"""
import json

import pytest
import torch

from gptstack.data.sources import DataConfig, SourceConfig
from gptstack.stages import RunConfig
from gptstack.train.trainer import TrainConfig
from gptstack.data.loader import build_sampler
from gptstack.model import GPT
from gptstack.tokenizer import Tokenizer
from gptstack.train.lm import LMObjective
from gptstack.train.trainer import Trainer, resolve_precision


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_auto_is_fp32_on_cpu_and_each_precision_sets_the_fp32_matmul_mode(restore_matmul_precision):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert torch.get_float32_matmul_precision() == "highest"
    assert resolve_precision("fp32-tf32", cpu) == "fp32-tf32"
    assert torch.get_float32_matmul_precision() == "high"
    # a later run in the same process must not inherit TF32 from an earlier one
    assert resolve_precision("bf16", cpu) == "bf16"
    assert torch.get_float32_matmul_precision() == "highest"


def losses(sampler, out, precision: str, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = GPT(RunConfig.resolve("tiny", overrides=["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.n_ctx=32",
                                           "model.vocab_size=512"]).model)
    cfg = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=5, log_every=1, ckpt_every=steps,
                      eval_tokens=256, device="cpu", precision=precision)
    Trainer(cfg, model, LMObjective(sampler, model.flops_per_token(32), cfg.eval_tokens), out).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


def test_bf16_autocast_follows_the_fp32_loss_curve(corpus, tmp_path, restore_matmul_precision):
    tok = Tokenizer.train([p.read_text() for p in sorted(corpus.iterdir())], vocab_size=512)
    sampler = build_sampler(DataConfig(sources=[SourceConfig(path=str(corpus))]), tok, seq_len=32, seed=0)
    steps, window = 40, 10
    fp32 = losses(sampler, tmp_path / "fp32", "fp32", steps)
    bf16 = losses(sampler, tmp_path / "bf16", "bf16", steps)
    assert fp32 != bf16  # autocast really computed in bf16
    assert sum(fp32[-window:]) / window < fp32[0] - 0.5  # and there is a curve to follow
    smooth = [[sum(c[i - window:i]) / window for i in range(window, steps + 1)] for c in (fp32, bf16)]
    assert max(abs(b - a) / a for a, b in zip(*smooth)) < 0.01
