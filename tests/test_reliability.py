"""Nothing lost, nothing half-done: the same weights give the same bytes, a kill between the last checkpoint and
the publish is repaired by the rerun, a finished run asked for more steps says how to continue, and record files
from other tools (BOM, CRLF) or hostile ones (deep nesting, lone surrogates) get a file:line answer."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import TINY, run_cli
from gptstack.checkpoint import read_weights
from gptstack.data.records import read_sft_records
from gptstack.errors import GptstackError
from gptstack.io import iter_jsonl
from gptstack.model import GPT, ModelConfig
from gptstack.train.sft import SFTObjective
from gptstack.train.trainer import TrainConfig, Trainer

SAVE = """
import sys, torch
from gptstack.checkpoint import save_state_dict
meta = {f"key{i}": str(i) for i in range(12)}  # many keys: safetensors would write them in hash-map order
save_state_dict({"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3)}, sys.argv[1], meta)
"""


def test_the_same_weights_give_the_same_bytes_in_every_process(tmp_path):
    blobs = []
    for i in range(3):
        path = tmp_path / f"w{i}.safetensors"
        subprocess.run([sys.executable, "-c", SAVE, str(path)], check=True)
        blobs.append(path.read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]
    state, meta = read_weights(tmp_path / "w0.safetensors")
    assert meta == {f"key{i}": str(i) for i in range(12)} and torch.equal(state["w"], torch.arange(6.0).view(2, 3))


def _fit(out, tok_pad=0):
    from gptstack.data.loader import Demonstrations

    class Tok:  # just what Demonstrations reads
        pad = tok_pad

        @staticmethod
        def render_chat(conv):
            ids = [1 + len(m["content"]) % 50 for m in conv] * 3
            return ids, [i % 2 == 0 for i in range(len(ids))]

    data = Demonstrations([[{"role": "user", "content": "x" * i}, {"role": "assistant", "content": "y"}] for i in range(8)],
                          Tok(), 32)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_embd=16, n_head=2, n_ctx=32, vocab_size=64))
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, log_every=1, ckpt_every=2, eval_every=0)
    return Trainer(cfg, model, SFTObjective(data, data, 0, 0.0), out).fit()


def test_a_kill_before_the_publish_is_repaired_by_the_rerun(tmp_path):
    _fit(tmp_path)
    published = (tmp_path / "model.safetensors").read_bytes()
    for name in ("model.safetensors", "optim.pt", "trainer_state.json"):
        (tmp_path / name).unlink()  # what a kill after the last checkpoint and before the publish leaves
    _fit(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == published
    assert (tmp_path / "optim.pt").is_file() and (tmp_path / "trainer_state.json").is_file()


def test_a_finished_run_asked_for_more_steps_says_how_to_continue(corpus, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("pretrain", "--out", run, "--data", corpus, *TINY, "pretrain.steps=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("pretrain", "--out", run, "--data", corpus, *TINY, "pretrain.steps=6")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "pretrain.steps: 4 -> 6" in proc.stderr and "summary.json" in proc.stderr
    (run / "pretrain" / "summary.json").unlink()  # as the message says: train on from the last checkpoint
    proc = run_cli("pretrain", "--out", run, "--data", corpus, *TINY, "pretrain.steps=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "pretrain" / "trainer_state.json").read_text())["step"] == 6


def test_records_from_windows_tools_are_read(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": "Hi?", "response": "Hello."}, {"prompt": "2+2?", "response": "4"}]
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in rows).encode())
    assert [c[-1]["content"] for c in read_sft_records(path)] == ["Hello.", "4"]


@pytest.mark.parametrize("line, message", [
    ("[" * 100_000 + "]" * 100_000, "bad.jsonl:1: JSON nested too deeply"),
    ('{"prompt": "a\\ud800b", "response": "x"}', r"bad.jsonl:1: an unpaired surrogate \('\\ud800'\) is not text"),
])
def test_hostile_records_get_a_file_line_error(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises(GptstackError, match=message):
        list(iter_jsonl(tmp_path / "bad.jsonl"))
