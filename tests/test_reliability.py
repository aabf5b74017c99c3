"""Nothing lost, nothing half-done: the same weights give the same bytes, a kill between the last checkpoint and
the publish is repaired by the rerun, a finished run asked for more steps says how to continue, and record files
from other tools (BOM, CRLF) or hostile ones (deep nesting, lone surrogates) get a file:line answer."""
import json
import signal
import subprocess
import sys

import pytest
import torch

from conftest import TINY, run_cli, write_own_files
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
        def render_chat(conv, image_tokens=0):
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


HOLD = """
import sys, time
from pathlib import Path
from gptstack.io import folder_lock
with folder_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_process_on_a_run_folder_stops_at_once_and_a_stale_lock_is_taken_over(corpus, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_cli("pipeline", "--out", run, "--data", corpus, "--stages", "tokenizer", *TINY, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"in use by process {holder.pid}" in proc.stderr
        assert not (run / "tokenizer.json").exists() and run.exists()  # nothing written, the holder's folder kept
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".lock").read_text().strip() == str(holder.pid)  # the dead holder's lock file is still there
    proc = run_cli("pipeline", "--out", run, "--data", corpus, "--stages", "tokenizer", *TINY, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "tokenizer.json").is_file()


@pytest.mark.parametrize("args, needle", [
    (["--temperature", "-1"], "--temperature: must be >= 0"),
    (["--top-p", "2"], "--top-p: must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k: must be >= 0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens: must be >= 1"),
    (["--num-samples", "0"], "--num-samples: must be >= 1"),
    (["--prompt", "x " * 400], "the model's context holds 64"),
])
def test_bad_sampling_arguments_are_one_line(random_model_dir, args, needle):
    proc = run_cli("sample", "--model", random_model_dir, "--max-new-tokens", "4", *args, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("override, needle", [
    ("pretrain.steps=-5", "'pretrain.steps' must be >= 0"), ("pretrain.steps=0", "'pretrain.steps' must be at least 1"),
    ("pretrain.lr=nan", "'pretrain.lr' must be a positive number"), ("pretrain.lr=-1", "'pretrain.lr' must be a positive"),
    ("pretrain.batch_size=0", "'pretrain.batch_size' must be at least 1"), ("sft.train.lr=0", "'sft.train.lr' must be"),
    ("model.dropout=1.5", "'model.dropout' must be in [0, 1)"), ("ppo.rollout_batch=0", "'ppo.rollout_batch' must be >= 1"),
    ("ppo.minibatches=3", "'ppo.rollout_batch' (64) must be divisible by ppo.minibatches (3)"), ("rm.k=1", "'rm.k' must be >= 2"),
    ("tokenizer.vocab_size=10", "'tokenizer.vocab_size' must be at least 266"), ("data.val_fraction=1", "'data.val_fraction'"),
    ("sft.epochs=-1", "'sft.epochs' must be >= 0"), ("rm.agreement=0.2", "'rm.agreement' must be in [0.5, 1]"),
])
def test_numeric_settings_out_of_range_are_refused_before_any_folder(tmp_path, override, needle):
    from gptstack.cli import main
    assert main(["pipeline", "--out", str(tmp_path / "run"), override]) == 2
    assert not (tmp_path / "run").exists()
    with pytest.raises(GptstackError, match=__import__("re").escape(needle)):
        from gptstack.stages import RunConfig
        RunConfig.resolve("tiny", overrides=[override])


def test_a_full_disk_is_one_line_and_the_run_resumes_when_space_returns(corpus, tmp_path, monkeypatch, capsys):
    import errno

    import gptstack.train.trainer as trainer
    from gptstack.cli import main
    args = ["--data", str(corpus), *TINY, "pretrain.steps=6", "pretrain.ckpt_every=2", "pretrain.eval_every=0"]
    assert main(["pretrain", "--out", str(tmp_path / "ref"), *args]) == 0
    real, calls = trainer.save_state_dict, []

    def full_disk(state, path, metadata=None):  # the second checkpoint's weights meet a full disk
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(state, path, metadata)

    monkeypatch.setattr(trainer, "save_state_dict", full_disk)
    capsys.readouterr()
    assert main(["pretrain", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "gptstack:" in line]
    assert len(said) == 1 and "No space left on device" in said[0] and "resumes from the last checkpoint" in said[0]
    assert "Traceback" not in err and err.rstrip().endswith(said[0].split("gptstack:")[-1])  # the last thing shown
    monkeypatch.setattr(trainer, "save_state_dict", real)  # space returns
    assert main(["pretrain", "--out", str(tmp_path / "run"), *args]) == 0
    assert (tmp_path / "run/pretrain/model.safetensors").read_bytes() == (tmp_path / "ref/pretrain/model.safetensors").read_bytes()


def test_a_trainer_state_that_is_json_but_not_ours_is_named(tmp_path):
    _fit(tmp_path)
    state = sorted((tmp_path / "checkpoints").iterdir())[-1] / "trainer_state.json"
    state.write_text(json.dumps({"step": "four"}))
    with pytest.raises(GptstackError, match="trainer_state.json: not a trainer state"):
        _fit(tmp_path)


def test_a_refused_sft_run_leaves_no_folder(random_model_dir, tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    proc = run_cli("sft", "--from", random_model_dir, "--data", tmp_path / "bad.jsonl", "--out", tmp_path / "out", timeout=120)
    assert proc.returncode == 2 and "bad.jsonl:1: field 'response' missing" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- kill drills: SIGKILL at a random moment, then rerun

@pytest.fixture(scope="module")
def drill_data(tmp_path_factory, random_model_dir, corpus):
    """Your own files for every verb, and an SFT policy and reward model (trained once) for PPO."""
    d = tmp_path_factory.mktemp("drill")
    write_own_files(d)
    for verb, argv in (("sft", ["sft", "--from", random_model_dir, "--data", d / "sft.jsonl", "--out", d / "sft", "sft.epochs=1"]),
                       ("rm", ["rm", "--from", d / "sft", "--data", d / "rankings.jsonl", "--out", d / "rm", "rm.epochs=1"])):
        proc = run_cli(*argv, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    (d / "corpus").symlink_to(corpus)
    return d, random_model_dir


DRILLS = {  # verb -> (argv for an output folder, the files it publishes)
    "pretrain": (lambda d, m, out: ["pretrain", "--out", out, "--data", d / "corpus", *TINY, "pretrain.steps=16",
                                    "pretrain.ckpt_every=4", "pretrain.eval_every=8"], ["pretrain/model.safetensors", "pretrain/optim.pt"]),
    "sft": (lambda d, m, out: ["sft", "--from", m, "--data", d / "sft.jsonl", "--out", out, "sft.epochs=4",
                               "sft.train.batch_size=4", "sft.train.ckpt_every=3"], ["model.safetensors", "optim.pt"]),
    "rm": (lambda d, m, out: ["rm", "--from", d / "sft", "--data", d / "rankings.jsonl", "--out", out, "rm.epochs=3",
                              "rm.train.batch_size=4", "rm.train.ckpt_every=3"], ["model.safetensors", "optim.pt"]),
    "finetune": (lambda d, m, out: ["finetune", "--task", "classification", "--data", d / "task.jsonl", "--from", m, "--out", out,
                                    "finetune.epochs=3", "finetune.train.batch_size=8", "finetune.train.ckpt_every=3"],
                 ["model.safetensors", "optim.pt"]),
    "ppo": (lambda d, m, out: ["ppo", "--policy", d / "sft", "--rm", d / "rm", "--prompts", d / "prompts.jsonl", "--out", out,
                               "ppo.rollouts=4", "ppo.rollout_batch=8", "ppo.ppo_epochs=1", "ppo.max_new_tokens=6",
                               "ppo.eval_every_rollouts=2", "ppo.ptx_coef=0", "ppo.train.ckpt_every=2"],
            ["model.safetensors", "value.safetensors", "optim.pt"]),
}
LORA = ["train.lora_rank=4", "train.lora_alpha=8"]
DRILLS |= {  # the same with LoRA: checkpoints hold base and adapters, the published model is merged
    f"{verb}_lora": (lambda d, m, out, verb=verb: [*DRILLS[verb][0](d, m, out), *(f"{verb}." + a for a in LORA)],
                     [*DRILLS[verb][1], "adapter.safetensors"]) for verb in ("sft", "ppo")}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the same kernels in every run, so bitwise comparison is fair


def _drill(verb, drill_data, tmp_path, kills, seed=0):
    import random
    import time
    d, model = drill_data
    argv, published = DRILLS[verb]
    t0 = time.time()
    ref = run_cli(*argv(d, model, tmp_path / "ref"), env=ONE_THREAD, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    took = time.time() - t0
    rng = random.Random(seed)
    for k in range(kills):
        out = tmp_path / f"killed{k}"
        proc = subprocess.Popen([sys.executable, "-m", "gptstack", *map(str, argv(d, model, out))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**__import__("os").environ, **ONE_THREAD})
        time.sleep(rng.uniform(0.3, took))  # any moment: before the first checkpoint, between two, around the publish
        proc.kill()
        proc.wait()
        again = run_cli(*argv(d, model, out), env=ONE_THREAD, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        for name in published:
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), f"{verb}: {name} differs after a kill"


@pytest.mark.parametrize("verb", list(DRILLS))
def test_a_kill_at_a_random_moment_then_a_rerun_gives_the_same_files(verb, drill_data, tmp_path):
    _drill(verb, drill_data, tmp_path, kills=1)


@pytest.mark.slow
@pytest.mark.parametrize("verb", list(DRILLS))
def test_ten_kills_per_verb(verb, drill_data, tmp_path):
    _drill(verb, drill_data, tmp_path, kills=10, seed=1)


def _updates_logged(out) -> int:
    path = out / "metrics.jsonl"
    rows = path.read_text().splitlines() if path.is_file() else []
    return sum('"event": "train"' in row for row in rows)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_ppo_killed_at_a_random_update_resumes_bitwise(seed, drill_data, tmp_path):
    """SIGKILL once the update drawn has been logged (mid-rollout or at its end), then the same command again:
    the published policy, value function and optimizer state equal an uninterrupted run's byte for byte."""
    import random
    import time
    d, model = drill_data
    argv, published = DRILLS["ppo"]
    ref = run_cli(*argv(d, model, tmp_path / "ref"), env=ONE_THREAD, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    total = _updates_logged(tmp_path / "ref")
    at = random.Random(seed).randint(1, total - 1)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gptstack", *map(str, argv(d, model, out))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**__import__("os").environ, **ONE_THREAD})
    while _updates_logged(out) < at and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before the kill"
    again = run_cli(*argv(d, model, out), env=ONE_THREAD, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    for name in published:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), f"{name} differs after a kill at update {at}"


def test_a_finetune_label_error_names_your_file_and_line(random_model_dir, tmp_path):
    rows = [{"text": "first", "label": "rare"}] + [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(19)]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("finetune", "--task", "classification", "--data", tmp_path / "task.jsonl", "--from", random_model_dir,
                   "--out", tmp_path / "out", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{tmp_path / 'task.jsonl'}:1: field 'label' 'rare' is not among the training labels" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_read_only_output_is_one_line(tmp_path, monkeypatch, capsys):
    import errno
    import pathlib

    from gptstack.cli import main
    real = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):  # a read-only file system under tmp_path/ro (root ignores permission bits)
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    assert main(["pipeline", "--out", str(tmp_path / "ro" / "run"), "--stages", "tokenizer"]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(said) == 1 and "Read-only file system" in said[0] and str(tmp_path / "ro" / "run") in said[0], said


@pytest.mark.parametrize("verb", ["pipeline", "pretrain", "sft"])
def test_an_out_that_is_a_file_is_one_line(verb, tmp_path, random_model_dir, capsys):
    from gptstack.cli import main
    (tmp_path / "taken").write_text("mine\n")
    extra = ["--from", str(random_model_dir)] if verb == "sft" else []
    assert main([verb, "--out", str(tmp_path / "taken"), *extra]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(said) == 1 and "taken" in said[0], said
    assert (tmp_path / "taken").read_text() == "mine\n"


def test_sft_trains_on_a_record_file_with_a_bom_and_crlf(random_model_dir, tmp_path, capsys):
    from gptstack.cli import main
    rows = [{"prompt": f"What is {i} plus 1?", "response": str(i + 1)} for i in range(12)]
    (tmp_path / "win.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in rows).encode())
    assert main(["sft", "--from", str(random_model_dir), "--data", str(tmp_path / "win.jsonl"), "--out", str(tmp_path / "sft"),
                 "sft.epochs=1"]) == 0
    assert (tmp_path / "sft" / "model.safetensors").is_file()


def test_sigterm_mid_rollout_stops_at_the_rollouts_end_and_resumes_bitwise(drill_data, tmp_path):
    """A signal lets PPO finish the rollout's updates before it saves, so the resumed run rolls out where an
    uninterrupted one would (not again with newer weights, nor with β updated twice)."""
    import os
    import time
    d, model = drill_data
    argv = lambda out: [*DRILLS["ppo"][0](d, model, out), "ppo.minibatches=4"]  # noqa: E731  4 updates per rollout
    ref = run_cli(*argv(tmp_path / "ref"), env=ONE_THREAD, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "gptstack", *map(str, argv(out))], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and '"step": 1,' in (out / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first update"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # after update 1 of the first rollout's 4
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert saved and int(saved[-1].split("_")[1]) % 4 == 0, saved  # stopped at a rollout's end
    again = run_cli(*argv(out), env=ONE_THREAD, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    for name in DRILLS["ppo"][1]:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
