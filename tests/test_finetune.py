import json

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from gptstack.model import ModelConfig
from gptstack.train.finetune import FinetuneConfig
from gptstack.train.trainer import TrainConfig
from gptstack.data.records import read_task_records
from gptstack.errors import GptstackError
from gptstack.model import GPT
from gptstack.tokenizer import Tokenizer
from gptstack.train.finetune import FinetuneObjective, TaskData, TaskEncoder, TaskModel, finetune, predict


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["the cat sat on the mat. a dog ran. yes no maybe 0123456789\n"] * 30, vocab_size=300)


def test_input_transformations_have_the_papers_layout(tok):
    s, d, e = (tok.special[t] for t in ("<|start|>", "<|delim|>", "<|extract|>"))
    A, B = tok.encode("the cat"), tok.encode("a dog")
    enc = lambda kind: TaskEncoder(tok, kind, 64)
    assert enc("classification").encode({"text": "the cat"})[0] == [[s, *A, e]]
    assert enc("entailment").encode({"premise": "the cat", "hypothesis": "a dog"})[0] == [[s, *A, d, *B, e]]
    assert enc("similarity").encode({"text_a": "the cat", "text_b": "a dog"})[0] == [[s, *A, d, *B, e], [s, *B, d, *A, e]]
    seqs, lm_row, _ = enc("multiple_choice").encode({"context": "the cat", "choices": ["a dog", "sat"], "label": 1})
    assert seqs == [[s, *A, d, *B, e], [s, *A, d, *tok.encode("sat"), e]] and lm_row == 1


def test_truncation_takes_the_chosen_side_and_is_counted(tok):
    text = "the cat sat on the mat " * 10
    ids = tok.encode(text)
    for side, kept in (("left", ids[-8:]), ("right", ids[:8])):
        seqs, _, cut = TaskEncoder(tok, "classification", 10, side).encode({"text": text})
        assert cut and seqs[0][1:-1] == kept
    seqs, _, cut = TaskEncoder(tok, "entailment", 12, "left").encode({"premise": text, "hypothesis": "a dog"})
    assert cut and len(seqs[0]) == 12 and seqs[0][-1 - len(tok.encode("a dog")):-1] == tok.encode("a dog")


def _task_model(kind, n_labels, seed=0):
    torch.manual_seed(seed)
    gpt = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=32, vocab_size=300))
    return TaskModel(gpt, kind, n_labels, dropout=0.0).eval()


def test_similarity_is_symmetric_in_its_inputs(tok):
    model = _task_model("similarity", 2)
    enc = TaskEncoder(tok, "similarity", 32)
    ab = TaskData([{"text_a": "the cat sat", "text_b": "a dog ran", "label": 0}], enc, [0, 1], "x")
    ba = TaskData([{"text_a": "a dog ran", "text_b": "the cat sat", "label": 0}], enc, [0, 1], "x")
    la, _ = model(**{k: ab.batch([0])[k] for k in ("ids", "extract")})
    lb, _ = model(**{k: ba.batch([0])[k] for k in ("ids", "extract")})
    assert torch.allclose(la, lb, atol=1e-6)


def test_lambda_zero_is_exactly_the_head_only_loss(tok):
    model = _task_model("entailment", 3)
    enc = TaskEncoder(tok, "entailment", 32)
    recs = [{"premise": "the cat", "hypothesis": h, "label": l} for h, l in (("yes", "a"), ("no", "b"), ("maybe", "c"))]
    data = TaskData(recs, enc, ["a", "b", "c"], "x")
    batch = data.batch([0, 1, 2])
    logits, _ = model(batch["ids"], batch["extract"])
    head_only = F.cross_entropy(logits, batch["label"])
    loss0, _ = FinetuneObjective(data, data, 0.0, 0, 3, "entailment").loss(model, batch)
    assert torch.equal(loss0, head_only)
    loss_half, m = FinetuneObjective(data, data, 0.5, 0, 3, "entailment").loss(model, batch)
    assert torch.allclose(loss_half, head_only + 0.5 * m["lm_loss"], atol=1e-6) and m["lm_loss"] > 0


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_multiple_choice_learns_the_one_correct_answer(tok, tmp_path):
    import random
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        choices = ["the cat", "a dog", "sat on", "the mat"]
        rng.shuffle(choices)
        rows.append({"context": rng.choice(["yes", "no", "maybe"]), "choices": choices, "label": choices.index("a dog")})
    _write(tmp_path / "train.jsonl", rows)
    cfg = FinetuneConfig(epochs=6, lm_coef=0.5, head_dropout=0.0,
                         train=TrainConfig(batch_size=16, lr=3e-3, schedule="linear", min_lr_ratio=0.0, log_every=5, device="cpu"))
    res = finetune(cfg, "multiple_choice", tok, tmp_path / "mc", tmp_path / "train.jsonl", tmp_path / "train.jsonl",
                   model_cfg=ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=32, vocab_size=tok.vocab_size))
    assert res["val"]["accuracy"] == 1.0 and res["labels"] == [0, 1, 2, 3]
    preds = predict(tmp_path / "mc", tok, tmp_path / "train.jsonl")
    assert all(p["prediction"] == p["label"] for p in preds)


def test_with_select_by_the_reported_figures_are_the_kept_models(tok, tmp_path):
    rows = [{"text": ["the cat sat", "a dog ran", "the mat", "yes no"][i % 4], "label": i % 2} for i in range(48)]
    _write(tmp_path / "train.jsonl", rows)
    _write(tmp_path / "val.jsonl", rows[:16])
    cfg = FinetuneConfig(epochs=4, head_dropout=0.0, train=TrainConfig(batch_size=8, lr=3e-3, schedule="linear", min_lr_ratio=0.0,
                                                                       log_every=5, eval_every=3, select_by="val_accuracy", device="cpu"))
    res = finetune(cfg, "classification", tok, tmp_path / "sel", tmp_path / "train.jsonl", tmp_path / "val.jsonl", tmp_path / "val.jsonl",
                   model_cfg=ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=32, vocab_size=tok.vocab_size))
    assert res["selected"]["metric"] == "val_accuracy"
    assert res["val"]["accuracy"] == res["test"]["accuracy"] == pytest.approx(res["selected"]["value"])


@pytest.mark.parametrize("rows, message", [
    ([{"text": "a"}], "bad.jsonl:1: field 'label' missing"),
    ([{"text": "a", "label": 1}, {"txt": "b", "label": 0}], "bad.jsonl:2: field 'text' missing"),
    ([{"text": 3, "label": 1}], "bad.jsonl:1: field 'text' must be a string"),
    ([{"text": "a", "label": [1]}], "bad.jsonl:1: field 'label' must be a string or an integer"),
])
def test_bad_classification_records(tmp_path, rows, message):
    with pytest.raises(GptstackError, match=message):
        read_task_records(_write(tmp_path / "bad.jsonl", rows), "classification")


def test_bad_multiple_choice_label(tmp_path):
    with pytest.raises(GptstackError, match="bad.jsonl:1: field 'label' 4 is out of range for 2 choices"):
        read_task_records(_write(tmp_path / "bad.jsonl", [{"context": "c", "choices": ["x", "y"], "label": 4}]), "multiple_choice")
    recs = read_task_records(_write(tmp_path / "ok.jsonl", [{"context": "c", "choices": ["x", "y"], "label": "y"}]), "multiple_choice")
    assert recs[0]["label"] == 1


FORMATS = {
    "classification": lambda i: {"text": ["the cat sat", "a dog ran"][i % 2], "label": ["cat", "dog"][i % 2]},
    "entailment": lambda i: {"premise": "the cat sat", "hypothesis": ["the cat", "a dog"][i % 2], "label": i % 2},
    "similarity": lambda i: {"text_a": "the cat", "text_b": ["the cat", "a dog"][i % 2], "label": ["same", "different"][i % 2]},
    "multiple_choice": lambda i: {"context": "the cat", "choices": ["sat", "ran"], "label": "sat"},
}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=32, vocab_size=tok.vocab_size))
    from gptstack.checkpoint import save_state_dict
    save_state_dict(gpt.state_dict(), folder / "model.safetensors", gpt.metadata())
    tok.save(folder / "tokenizer.json")
    return folder


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_user_jsonl_trains_and_predicts_from_the_cli(kind, base_model, tmp_path):
    train = _write(tmp_path / "train.jsonl", [FORMATS[kind](i) for i in range(40)])
    out = tmp_path / "model"
    proc = run_cli("finetune", "--task", kind, "--data", train, "--from", base_model, "--out", out,
                   "finetune.epochs=4", "finetune.train.lr=3e-3", "finetune.train.batch_size=8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["val"]["accuracy"] == 1.0
    unlabeled = _write(tmp_path / "new.jsonl", [{k: v for k, v in FORMATS[kind](i).items() if k != "label"} for i in range(4)])
    pred = run_cli("predict", "--model", out, "--data", unlabeled)
    assert pred.returncode == 0, pred.stderr
    rows = [json.loads(l) for l in pred.stdout.splitlines()]
    expected = [FORMATS[kind](i)["label"] for i in range(4)]
    if kind == "multiple_choice":
        expected = [0] * 4
    assert [r["prediction"] for r in rows] == expected


def test_the_stage_reports_test_with_val_beside_it():
    from pathlib import Path
    from gptstack.stages.finetune import markdown, task_row
    run = lambda val, test: {"val": {"accuracy": val, "n": 400}, "test": {"accuracy": test, "n": 400, "f1": 0.5},
                             "n_train": 200, "labels": ["different", "same"], "truncated": 0}
    got = {"pretrained": run(0.9, 0.8), "scratch": run(0.6, 0.55), "lambda0": run(0.85, 0.75)}
    row = task_row({"kind": "similarity", "chance": 0.5}, got)
    assert row["split"] == "test" and (row["accuracy"], row["val_accuracy"], row["n_val"], row["f1"]) == (0.8, 0.9, 400, 0.5)
    assert (row["from_scratch_accuracy"], row["from_scratch_val_accuracy"]) == (0.55, 0.6)
    assert (row["lambda0_accuracy"], row["lambda0_val_accuracy"]) == (0.75, 0.85)
    assert "from_scratch_accuracy" not in task_row({"kind": "similarity", "chance": 0.5}, {"pretrained": got["pretrained"]})
    header, _, line = markdown(Path("run"), {"finetune": {"renamed": row}})[4:7]
    cells = lambda l: [c.strip() for c in l.strip("|").split("|")]
    assert dict(zip(cells(header), cells(line))).items() >= {"val": "0.900", "test": "**0.800**", "from scratch val": "0.600",
                                                    "from scratch test": "0.550", "λ = 0 test": "0.750"}.items()


CODE = ["def area(width, height):", "    total = width * height", "    return total", "result = area(3, 4)",
        "print(result + 1)", "items = [result, total]", "for item in items:", "    print(item)"]


def test_renamed_pairs_are_one_line_renamed_or_another_line(monkeypatch):
    import random
    from gptstack.world import tasks
    monkeypatch.setitem(tasks.TRAIN_SIZES, "renamed", 40)
    docs = {s: [("doc", CODE)] for s in ("train", "val", "test")}
    names = {s: ["alpha", "beta", "gamma", "delta", "omega"] for s in docs}
    out = tasks.renamed_task(docs, names, random.Random(0))
    assert [len(out[s]) for s in ("train", "val", "test")] == [40, 400, 400]
    for rec in out["train"]:
        a, b = rec["text_a"], rec["text_b"]
        assert a in [l.strip() for l in CODE] and a != b
        assert (tasks.skeleton(a) == tasks.skeleton(b)) == (rec["label"] == "same"), rec
    assert {r["label"] for r in out["train"]} == {"same", "different"}
    assert tasks.skeleton("return result") == tasks.skeleton("return value") != tasks.skeleton("return self.value")


def test_a_continuations_real_line_uses_a_name_from_its_context(monkeypatch):
    import random
    from gptstack.world import tasks
    monkeypatch.setitem(tasks.TRAIN_SIZES, "continuation", 30)
    monkeypatch.setitem(tasks.EVAL_SIZES, "val", 30)
    monkeypatch.setitem(tasks.EVAL_SIZES, "test", 30)
    docs = {s: [("doc", CODE), ("other", ["x = 1", "pass", "else:", "import os"] * 3)] for s in ("train", "val", "test")}
    for rec in tasks.continuation_task(docs, random.Random(0))["train"]:
        real = rec["choices"][rec["label"]]
        assert set(tasks.NAME.findall(real)) & set(tasks.NAME.findall(rec["context"])), rec


def test_a_tokenizer_without_gpt1_tokens_gets_them_and_the_model_grows_to_fit(tmp_path):
    """An imported model (SmolLM2's BPE has no <|extract|>): the three tokens join the vocabulary as mean rows."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from gptstack.convert import plain_template
    from gptstack.checkpoint import save_state_dict
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator(["the cat sat on the mat. a dog ran.\n"] * 20,
                           trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(hf, plain_template("<|endoftext|>", None))
    torch.manual_seed(0)
    base = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=32, vocab_size=tok.vocab_size, norm="rmsnorm", mlp="swiglu",
                           positions="rope", bias=False, tie_embeddings=False))
    save_state_dict(base.state_dict(), tmp_path / "base" / "model.safetensors", base.metadata())
    rows = [{"text": ["the cat sat", "a dog ran"][i % 2], "label": ["cat", "dog"][i % 2]} for i in range(32)]
    _write(tmp_path / "train.jsonl", rows)
    cfg = FinetuneConfig(epochs=4, head_dropout=0.0, train=TrainConfig(batch_size=8, lr=3e-3, log_every=5, device="cpu"))
    res = finetune(cfg, "classification", tok, tmp_path / "ft", tmp_path / "train.jsonl", tmp_path / "train.jsonl", init=tmp_path / "base")
    assert res["val"]["accuracy"] == 1.0
    grown = Tokenizer.load(tmp_path / "ft")
    assert grown.vocab_size == tok.vocab_size + 3 and grown.template == tok.template
    assert [grown.special[t] for t in ("<|start|>", "<|delim|>", "<|extract|>")] == [tok.vocab_size, tok.vocab_size + 1, tok.vocab_size + 2]
    assert [p["prediction"] for p in predict(tmp_path / "ft", grown, tmp_path / "train.jsonl")] == [r["label"] for r in rows]


def test_grown_rows_are_the_mean_row_and_the_old_logits_do_not_change():
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=1, n_embd=16, n_head=2, n_ctx=16, vocab_size=50, tie_embeddings=False)).eval()
    ids = torch.randint(0, 50, (1, 8))
    before = m(ids)[0]
    m.grow_vocab(53)
    after = m(ids)[0]
    assert after.shape[-1] == 53 and torch.equal(after[..., :50], before)
    assert torch.allclose(m.wte.weight[50:], m.wte.weight[:50].mean(0).expand(3, -1))
