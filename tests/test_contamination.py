import json
import random

import pytest

from conftest import TINY, run_cli
from gptstack.checkpoint import load_model
from gptstack.cli import main
from gptstack.evals.contamination import NgramIndex, Overlap, split_accuracy, words
from gptstack.evals.prompting import evaluate_task, load_task
from gptstack.tokenizer import Tokenizer

TRAINING = [
    ("doc/a", "The reward model is trained on rankings of four answers per prompt, and every pair of a prompt "
              "enters the loss within one batch element so that the answers are encoded only once."),
    ("doc/b", "def parse(args):\n    for key, value in sorted(args.items()):\n        yield key.upper(), value\n"),
]
EXAMPLE = ("Question: every pair of a prompt enters the loss within one batch element so that the answers are "
           "encoded only once. True or false?")
PARAPHRASE = ("Question: all pairs from one prompt go into the loss inside a single batch element, so each answer "
              "gets encoded a single time. True or false?")


def test_a_verbatim_example_is_flagged_and_a_paraphrase_is_not():
    index = NgramIndex.build(TRAINING, n=13)
    overlap = index.check([EXAMPLE, PARAPHRASE])
    assert overlap.dirty == [True, False] and overlap.too_short == [False, False]
    assert overlap.dirty_share == 0.5
    # the paraphrase shares shorter runs ("a prompt", "batch element"): with n = 3 it would collide
    assert NgramIndex.build(TRAINING, n=3).check([PARAPHRASE]).dirty == [True]


def test_normalisation_ignores_case_punctuation_and_whitespace():
    assert words("Yield KEY.upper(),\n\tvalue") == ["yield", "key", "upper", "value"]
    index = NgramIndex.build(TRAINING, n=13)
    shouted = "FOR KEY,VALUE IN SORTED(ARGS.ITEMS()): YIELD key . upper ( ) ,value   -- DEF PARSE ARGS"
    assert index.check([shouted]).dirty == [False]  # 13 words, but in another order
    assert index.check(["def  PARSE(args): for key , value in sorted( args.items() ): yield key.upper()"]).dirty == [True]


def test_short_examples_are_matched_whole_or_counted_untestable():
    index = NgramIndex.build(TRAINING, n=13)
    # 8..12 words: dirty when the whole example occurs in one document, on word edges
    o = index.check(["trained on rankings of four answers per prompt",        # 8 words, inside doc/a
                     "trained on rankings of four answers per prompts",       # 'prompts' is not a word there
                     "encoded only once def parse args for key",              # spans two documents
                     "the reward model"])                                     # 3 words: untestable
    assert o.dirty == [True, False, False, False] and o.too_short == [False, False, False, True]


def test_the_index_is_cached_by_content(tmp_path):
    first = NgramIndex.build(TRAINING, n=13, cache=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"index-{first.key}.npy", f"words-{first.key}.txt"]
    mtime = (tmp_path / files[0]).stat().st_mtime_ns
    again = NgramIndex.build(TRAINING, n=13, cache=tmp_path)
    assert again.key == first.key and (tmp_path / files[0]).stat().st_mtime_ns == mtime
    assert (again.hashes == first.hashes).all() and again.check([EXAMPLE]).dirty == [True]
    changed = NgramIndex.build([TRAINING[0]], n=13, cache=tmp_path)
    assert changed.key != first.key and len(changed) < len(first)
    assert NgramIndex.build(TRAINING, n=12, cache=tmp_path).key != first.key


def test_clean_and_dirty_accuracies_split_the_evals_own_results():
    overlap = Overlap(dirty=[True, False, False, True, False], too_short=[False] * 5)
    correct = {0: True, 1: False, 2: True, 3: True}  # example 4 was not scored (e.g. did not fit)
    r = split_accuracy(correct, overlap)
    assert r == {"acc_all": 0.75, "acc_clean": 0.5, "acc_dirty": 1.0, "n_scored": 4, "n_dirty_scored": 2}
    assert split_accuracy({1: True}, overlap)["acc_dirty"] is None


def test_cli_flags_a_copied_example_and_splits_the_prompting_evals_accuracy(random_model_dir, tmp_path):
    vocab = "def f x return the cat sat what is plus a q".split()  # words the small model's tokenizer knows
    rows = []
    for i in range(6):  # 13 words in another order each: no 13-gram in common (and the query fits 64 tokens)
        random.Random(i).shuffle(vocab)
        rows.append({"context": " ".join(vocab), "choices": ["cat", "sat", "x"], "label": i % 3})
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text("kind: multiple_choice\ndata: qa.jsonl\ntemplate: '{context}'\n")
    leaked = rows[2]["context"] + " " + rows[2]["choices"][rows[2]["label"]]
    (tmp_path / "train.txt").write_text("Some unrelated text about cats.\n" + leaked.upper() + "\n")
    proc = run_cli("eval", "contamination", "--data", tmp_path / "train.txt", "--task", tmp_path / "mc.yaml",
                   "--model", random_model_dir)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)["tasks"]["mc"]
    assert r["n"] == 6 and r["dirty_share"] == pytest.approx(1 / 6) and r["n_dirty_scored"] == 1
    ours = evaluate_task(load_model(random_model_dir), Tokenizer.load(random_model_dir), *load_task(tmp_path / "mc.yaml"), shots=0)
    right = {e["index"]: e["correct"] for e in ours["per_example"]}
    assert r["acc_all"] == pytest.approx(ours["acc"]) and r["acc_dirty"] == float(right[2])
    assert r["acc_clean"] == pytest.approx(sum(c for i, c in right.items() if i != 2) / 5)


def test_cli_needs_training_data(capsys):
    assert main(["eval", "contamination", "--task", "arithmetic"]) == 2
    assert "--run RUN" in capsys.readouterr().err


def test_pipeline_stages_split_the_runs_own_prompting_results(corpus, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("pipeline", "--out", run, "--data", corpus, "--stages",
                   "tokenizer,pretrain,prompting,contamination,calibration", *TINY, "model.n_ctx=256", "pretrain.steps=4",
                   "prompting.limit=8", "prompting.shots=[0,1]", "prompting.tasks=[continuation,arithmetic]",
                   "calibration.tasks=[continuation]", "calibration.limit=8", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((run / "report.json").read_text())
    c = r["contamination"]
    assert set(c) == {"continuation", "arithmetic", "settings"} and c["settings"]["shots"] == 1
    for task in ("continuation", "arithmetic"):
        t, p = c[task], r["prompting"][task]["shots_1"]
        assert t["n"] == 300 and 0 <= t["dirty_share"] <= 1 and t["n_scored"] == p["n"]
        assert t["acc_all"] == pytest.approx(p["acc"])  # the prompting stage's own results, split
    assert c["arithmetic"]["too_short_share"] == 0 and c["arithmetic"]["dirty_share"] == 0  # "q what is 12 plus 34 a 46"
    cal = r["calibration"]
    assert set(cal) == {"pretrain", "settings"} and cal["pretrain"]["format"] == "letters"
    assert cal["pretrain"]["options"]["accuracy"] == pytest.approx(r["prompting"]["continuation"]["shots_0"]["acc"])
    assert (run / "plots" / "calibration.png").is_file()
    report = (run / "report.md").read_text()
    assert "## Contamination" in report and "## Calibration" in report


def test_the_instruction_worlds_prompts_are_checked_against_sft_demonstrations(tmp_path):
    from gptstack.stages import Context, RunConfig
    from gptstack.stages.contamination import instruct_prompts, run
    cfg = RunConfig.resolve("tiny", overrides=["sft.demonstrations=400", "sft.dev_prompts=40", "sft.eval_prompts=60"])
    (tmp_path / "sft").mkdir()  # a run whose only training data is its SFT demonstrations
    _, test = instruct_prompts(cfg)
    right = [i % 3 == 0 for i in range(len(test))]
    rows = [{"prompt": p.user, "correct": c} for p, c in zip(test, right)]
    (tmp_path / "sft" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run(Context(tmp_path, cfg, log=lambda *a: None))["contamination"]
    assert out["settings"]["training_documents"] == {"pretrain": 0, "sft": 380}  # 5% held out for validation
    t = out["instruct_test"]
    assert t["n"] == 60 and t["n_scored"] == 60 and t["acc_all"] == pytest.approx(sum(right) / 60)
    assert out["instruct_dev"]["acc_all"] is None and 0 <= out["instruct_dev"]["dirty_share"] <= 1
    (tmp_path / "sft" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))  # other order
    assert run(Context(tmp_path, cfg, log=lambda *a: None))["contamination"]["instruct_test"]["acc_all"] is None
