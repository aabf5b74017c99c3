"""The CLI's contract: one-line errors naming the problem, no traceback, no half-written run folder."""
import json

import pytest

from conftest import TINY, run_cli


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptstack: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("setup, args, needles", [
    ("empty", ["--data", "{d}/empty.txt"], ["empty corpus"]),
    ("latin1", ["--data", "{d}/latin1.txt"], ["latin1.txt:3: not valid UTF-8"]),
    ("badjson", ["--data", "{d}/bad.jsonl"], ["bad.jsonl:2: invalid JSON"]),
    ("none", ["--preset", "gpt5"], ["unknown preset 'gpt5'"]),
    ("none", ["pretrain.learning_rate=1"], ["unknown config key 'pretrain.learning_rate'"]),
])
def test_bad_input_gives_one_line_and_no_run_folder(tmp_path, setup, args, needles):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("a\nb\ncaf\xe9\n".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    run = tmp_path / "run"
    proc = run_cli("pipeline", "--out", run, *[a.format(d=tmp_path) for a in args], *TINY)
    assert_clean_error(proc, *needles)
    assert not run.exists()


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("pipeline", "--out", run, "--data", corpus, "--stages", "tokenizer,pretrain,eval", *TINY,
                   "pretrain.steps=40", "pretrain.eval_every=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_pipeline_writes_the_run_folder_contract(trained_run):
    for f in ("config.yaml", "tokenizer.json", "report.md", "report.json", "plots/loss.png",
              "pretrain/model.safetensors", "pretrain/trainer_state.json", "pretrain/optim.pt",
              "pretrain/metrics.jsonl", "pretrain/samples.jsonl"):
        assert (trained_run / f).is_file(), f
    r = json.loads((trained_run / "report.json").read_text())
    for key in ("vocab_size", "bytes_per_token"):
        assert key in r["tokenizer"]
    for key in ("params", "tokens", "val_loss", "val_loss_initial", "unigram_val_loss", "val_bpb",
                "tokens_per_sec", "mfu", "seconds"):
        assert key in r["pretrain"], key
    assert r["pretrain"]["val_loss"] < r["pretrain"]["val_loss_initial"]
    assert r["pretrain"]["tokens"] == 40 * 8 * 64


def test_rerun_skips_finished_stages(trained_run, corpus):
    before = (trained_run / "pretrain" / "model.safetensors").stat().st_mtime_ns
    proc = run_cli("pipeline", "--out", trained_run, "--data", corpus, "--stages", "tokenizer,pretrain,eval", *TINY,
                   "pretrain.steps=40", "pretrain.eval_every=20")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("finished already") == 3
    assert (trained_run / "pretrain" / "model.safetensors").stat().st_mtime_ns == before


def test_rerun_with_another_config_is_refused(trained_run, corpus):
    proc = run_cli("pipeline", "--out", trained_run, "--data", corpus, *TINY, "model.n_layer=3")
    assert_clean_error(proc, "made with another config", "model.n_layer: 2 -> 3")


def test_sample_and_eval_and_tokenizer_verbs(trained_run):
    s = run_cli("sample", "--model", trained_run / "pretrain", "--prompt", "def ", "--max-new-tokens", "30", "--seed", "1")
    assert s.returncode == 0 and s.stdout.startswith("def "), s.stderr
    e = run_cli("eval", "lm", "--model", trained_run / "pretrain")
    assert e.returncode == 0, e.stderr
    report = json.loads((trained_run / "report.json").read_text())
    assert json.loads(e.stdout)["val_loss"] == pytest.approx(report["pretrain"]["val_loss"], rel=1e-6)
    enc = run_cli("tokenizer", "encode", "--tokenizer", trained_run, "x = 1")
    dec = run_cli("tokenizer", "decode", "--tokenizer", trained_run, *enc.stdout.split())
    assert dec.stdout == "x = 1"


def test_eval_lm_scores_windows_shorter_than_the_context(random_model_dir, tmp_path):
    """An imported model's context can be longer than a data file's val split: --seq-len scores shorter windows."""
    (tmp_path / "t.txt").write_text("def f(x): return x + 1\nthe cat sat\n" * 60)
    e = run_cli("eval", "lm", "--model", random_model_dir, "--data", tmp_path / "t.txt", "--seq-len", "16")
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["val_tokens"] % 16 == 0
    assert_clean_error(run_cli("eval", "lm", "--model", random_model_dir, "--data", tmp_path / "t.txt", "--seq-len", "65"),
                       "--seq-len 65 exceeds the model's context of 64 tokens")


def test_corrupt_checkpoint_is_a_one_line_error(trained_run, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    weights = run / "pretrain" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_clean_error(run_cli("sample", "--model", run / "pretrain"), "model.safetensors: corrupt or unreadable checkpoint")


def test_prompting_and_finetune_stages_extend_a_finished_run(trained_run, corpus, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    proc = run_cli("pipeline", "--out", run, "--data", corpus, "--stages", "prompting,finetune", *TINY, "pretrain.steps=40",
                   "prompting.limit=8", "prompting.shots=[0,1]", "finetune.tasks=[value_claim]", "finetune.epochs=0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((run / "report.json").read_text())
    assert set(r["prompting"]) == {"cloze", "continuation", "arithmetic", "docstring_name"}
    cont = r["prompting"]["continuation"]["shots_0"]  # the 64-token test model: long queries are skipped, never cut
    assert cont["n"] + cont["skipped"] == 8 and r["prompting"]["arithmetic"]["shots_1"]["n"] == 8
    ft = r["finetune"]["value_claim"]
    assert {"accuracy", "chance", "from_scratch_accuracy", "lambda0_accuracy"} <= set(ft) and ft["chance"] == pytest.approx(1 / 3)
    assert (run / "plots" / "shots.png").is_file() and "## Fine-tuning" in (run / "report.md").read_text()


def test_pretrain_with_a_given_tokenizer_uses_it(trained_run, corpus, tmp_path):
    out = tmp_path / "given"
    proc = run_cli("pretrain", "--out", out, "--tokenizer", trained_run / "tokenizer.json", "--data", corpus, *TINY,
                   "pretrain.steps=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "tokenizer.json").read_text() == (trained_run / "tokenizer.json").read_text()
