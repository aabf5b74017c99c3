import json
import math
import random

import pytest

from conftest import multiple_choice_task, run_cli
from gptstack.checkpoint import load_model
from gptstack.cli import main
from gptstack.errors import GptstackError
from gptstack.evals.calibration import calibrate, confidences, lettered, option_probabilities, reliability
from gptstack.evals.prompting import evaluate_task, load_task
from gptstack.tokenizer import Tokenizer


def test_a_perfectly_calibrated_predictor_has_ece_near_zero():
    rng = random.Random(0)
    conf = [rng.uniform(0.25, 1.0) for _ in range(200_000)]
    right = [rng.random() < c for c in conf]  # right exactly as often as it says
    ece, rows = reliability(conf, right, bins=10)
    assert ece < 0.005
    assert sum(r["n"] for r in rows) == len(conf) and rows[0]["n"] == 0 and rows[0]["accuracy"] is None


def test_an_over_confident_predictor_has_the_hand_computed_ece():
    # 10 answers at 0.95 of which 5 right, 10 at 0.75 of which 6 right, 5 at 0.55 of which 3 right:
    # ECE = 10/25 * |0.5 - 0.95| + 10/25 * |0.6 - 0.75| + 5/25 * |0.6 - 0.55| = 0.18 + 0.06 + 0.01
    conf = [0.95] * 10 + [0.75] * 10 + [0.55] * 5
    right = [True] * 5 + [False] * 5 + [True] * 6 + [False] * 4 + [True] * 3 + [False] * 2
    ece, rows = reliability(conf, right, bins=10)
    assert ece == pytest.approx(0.25)
    assert [(r["n"], r["accuracy"]) for r in rows if r["n"]] == [(5, 0.6), (10, 0.6), (10, 0.5)]
    # one bin pools them: |0.56 - 0.79| = 0.23
    assert reliability(conf, right, bins=1)[0] == pytest.approx(abs(14 / 25 - (9.5 + 7.5 + 2.75) / 25))
    assert reliability([1.0, 0.0], [True, False], bins=10)[0] == 0.0  # the edges fall in the end bins


def test_the_ece_interval_holds_the_ece_and_narrows_with_more_questions():
    from gptstack.evals.calibration import ece_interval, figures
    rng = random.Random(1)
    conf = [rng.uniform(0.4, 1.0) for _ in range(2000)]
    right = [rng.random() < c - 0.2 for c in conf]  # over-confident by 0.2
    wide, narrow = ece_interval(conf[:100], right[:100]), ece_interval(conf, right)
    assert narrow[0] <= figures(conf, right)["ece"] <= narrow[1] and narrow[1] - narrow[0] < wide[1] - wide[0]
    assert 0.15 < narrow[0] and narrow[1] < 0.25


def test_option_probabilities_are_a_softmax_over_the_options():
    p = option_probabilities([-3.0, -1.0, -1.0 - math.log(3)])
    assert sum(p) == pytest.approx(1) and p[1] == pytest.approx(0.75 * (1 - p[0]))
    conf, right = confidences([{"loglik": [-5.0, -2.0, -9.0], "label": 1}, {"loglik": [-1.0, -1.5], "label": 1}])
    assert right == [True, False] and conf[0] == max(option_probabilities([-5.0, -2.0, -9.0]))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(GptstackError, match="as many outcomes"):
        reliability([0.5, 0.6], [True])
    with pytest.raises(GptstackError, match=r"in \[0, 1\]"):
        reliability([1.5], [True])


def test_calibration_accuracy_is_the_prompting_evals(random_model_dir, tmp_path):
    model, tok = load_model(random_model_dir), Tokenizer.load(random_model_dir)
    task = multiple_choice_task(tmp_path)
    r = calibrate(model, tok, {"mc": task}, shots=2, bins=5)
    ours = evaluate_task(model, tok, *load_task(task), shots=2)
    assert r["accuracy"] == pytest.approx(ours["acc"]) and r["n"] == ours["n"] == 8
    assert 1 / 3 <= r["mean_confidence"] <= 1 and len(r["bins"]) == 5 and r["by_task"]["mc"]["ece"] == pytest.approx(r["ece"])


def test_the_lettered_format_lists_the_options_and_answers_with_one_letter(random_model_dir, tmp_path):
    path = lettered(multiple_choice_task(tmp_path), tmp_path / "out")
    task, data, pool = load_task(path)
    assert data[1] == {"context": "the cat b\nA. sat\nB. ran\nC. slept\nAnswer:", "choices": ["A", "B", "C"], "label": 1}
    assert task.target_delimiter == " " and len(pool) == 8
    tok = Tokenizer.load(random_model_dir)
    r = calibrate(load_model(random_model_dir), tok, {"mc": path})
    assert r["n"] == 8 and 1 / 3 <= r["mean_confidence"] < 1


def test_cli_compares_models_and_draws_the_diagram(random_model_dir, tmp_path, capsys):
    task = multiple_choice_task(tmp_path)
    proc = run_cli("eval", "calibration", "--model", random_model_dir, "--model", random_model_dir, "--task", task,
                   "--plot", tmp_path / "cal.png")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out) == 2 and all(m["format"] == "letters" and 0 <= m["ece"] <= 1 and m["n"] == 8 for m in out.values())
    assert all(0 <= m["options"]["ece"] <= 1 and m["options"]["n"] == 8 for m in out.values())
    assert (tmp_path / "cal.png").stat().st_size > 1000
    (tmp_path / "gen.yaml").write_text("kind: generation\ndata: g.jsonl\ntemplate: '{prompt}'\n")
    (tmp_path / "g.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    assert main(["eval", "calibration", "--model", str(random_model_dir), "--task", str(tmp_path / "gen.yaml")]) == 2
    assert "needs a multiple_choice task" in capsys.readouterr().err
