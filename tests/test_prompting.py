import json
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import multiple_choice_task, run_cli
from gptstack.checkpoint import load_model
from gptstack.errors import GptstackError
from gptstack.evals.prompting import (PromptTask, build_prompt, evaluate_task, load_task, loglikelihood,
                                      loglikelihood_rolling)
from gptstack.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model(random_model_dir):
    return load_model(random_model_dir)


@pytest.fixture(scope="module")
def tok(random_model_dir):
    return Tokenizer.load(random_model_dir)


def naive_loglik(model, ctx, cont):
    seq = (ctx + cont)[-(model.cfg.n_ctx + 1):]
    logp = F.log_softmax(model(torch.tensor([seq[:-1]]))[0][0], -1)
    n = len(cont)
    return sum(logp[len(seq) - 1 - n + j, seq[len(seq) - n + j]].item() for j in range(n))


def test_choice_loglikelihoods_equal_a_naive_forward_each(model):
    rng, V = random.Random(0), model.cfg.vocab_size
    reqs = [([rng.randrange(V) for _ in range(rng.randint(1, 90))], [rng.randrange(V) for _ in range(rng.randint(1, 6))])
            for _ in range(40)]  # some contexts longer than the 64-token window: cut from the left
    ref = [naive_loglik(model, c, x) for c, x in reqs]
    for batch_size in (1, 7, 64):
        got = [ll for ll, _ in loglikelihood(model, reqs, batch_size)]
        assert got == pytest.approx(ref, abs=1e-5)


def test_is_greedy_and_rolling(model):
    ctx = [5, 6, 7]
    greedy = []
    for _ in range(3):
        greedy.append(int(model(torch.tensor([ctx + greedy]))[0][0, -1].argmax()))
    (ll, is_greedy), (_, other) = loglikelihood(model, [(ctx, greedy), (ctx, [(greedy[0] + 1) % model.cfg.vocab_size, *greedy[1:]])])
    assert is_greedy and not other
    rng = random.Random(1)
    tokens = [rng.randrange(model.cfg.vocab_size) for _ in range(150)]  # longer than the window: scored in pieces
    short = tokens[:40]
    assert loglikelihood_rolling(model, short, 0) == pytest.approx(naive_loglik(model, [0], short), abs=1e-4)
    assert loglikelihood_rolling(model, tokens, 0) < loglikelihood_rolling(model, tokens[:100], 0)


def test_examples_are_dropped_to_fit_and_the_query_is_never_cut(tok):
    task = PromptTask(kind="generation", template="{prompt}", answer="{answer}")
    examples = [{"prompt": f"Q: What is {i} plus {i}?\nA:", "answer": str(2 * i)} for i in range(20)]
    query = {"prompt": "Q: What is 7 plus 8?\nA:", "answer": "15"}
    text, k = build_prompt(task, tok, query, examples, budget=60)
    assert 0 < k < 20 and len(tok.encode(text)) <= 60 and text.endswith(query["prompt"])
    assert text.startswith(examples[0]["prompt"] + " " + examples[0]["answer"] + "\n\n")
    text, k = build_prompt(task, tok, query, examples, budget=5)
    assert k == 0 and text == query["prompt"]


def test_the_query_is_never_its_own_example(model, tok):
    task = PromptTask(kind="multiple_choice", template="{context}")
    data = [{"context": f"the cat {i}", "choices": ["sat", "ran"], "label": i % 2} for i in range(3)]
    seen = []
    import gptstack.evals.prompting as P
    original = P.build_prompt
    P.build_prompt = lambda t, tk, q, ex, b: (seen.append((q, ex)), original(t, tk, q, ex, b))[1]
    try:
        r = evaluate_task(model, tok, task, data, data, shots=5)
    finally:
        P.build_prompt = original
    assert all(q not in ex and len(ex) == 2 for q, ex in seen)
    assert r["n"] == 3 and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1


def test_a_users_task_runs_from_the_cli(random_model_dir, tmp_path):
    task = multiple_choice_task(tmp_path, "mytask")
    proc = run_cli("eval", "prompting", "--model", random_model_dir, "--task", task, "--shots", "0,2", "--plot", tmp_path / "s.png")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out["mytask"]) == {"shots_0", "shots_2"} and out["mytask"]["shots_2"]["n"] == 8
    assert out["mytask"]["shots_2"]["shots_fit"] == 2.0 and (tmp_path / "s.png").is_file()


@pytest.mark.parametrize("yaml_text, rows, message", [
    ("kind: essay\ndata: d.jsonl\n", [{"context": "x"}], "field 'kind' must be"),
    ("kind: multiple_choice\ndata: d.jsonl\nshots: 3\n", [{"context": "x"}], "unknown config key 'shots'"),
    ("kind: multiple_choice\ndata: d.jsonl\n", [{"context": "x", "choices": ["a", "b"], "label": 5}], r"d.jsonl:1: field 'label'"),
    ("kind: generation\ndata: d.jsonl\ntemplate: '{prompt}'\n", [{"prompt": "x"}], r"d.jsonl:1: field 'answer' missing"),
])
def test_bad_tasks_name_the_problem(tmp_path, yaml_text, rows, message):
    (tmp_path / "t.yaml").write_text(yaml_text)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(GptstackError, match=message):
        load_task(tmp_path / "t.yaml")


def test_lm_eval_harness_scores_a_local_task_as_we_do(random_model_dir, tmp_path, model, tok):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from gptstack.evals.harness import GptstackLM
    task_yaml = multiple_choice_task(tmp_path, "mytask")
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "local_mc.yaml").write_text(
        "task: gptstack_local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'qa.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    res = lm_eval.simple_evaluate(model=GptstackLM(str(random_model_dir)), tasks=["gptstack_local_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "harness")), num_fewshot=0)
    theirs = res["results"]["gptstack_local_mc"]
    ours = evaluate_task(model, tok, *load_task(task_yaml), shots=0)
    assert theirs["acc,none"] == pytest.approx(ours["acc"]) and theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])
