"""Every verb takes an imported model: a tiny random Llama (untied output, grouped-query attention, rotary
positions) with its own byte-level BPE (no gptstack specials: no <|pad|>, <|end|>, <|user|>, <|extract|>) and a
ChatML template with a default system message, where the turn's stop token (<|im_end|>) is not eos
(<|endoftext|>). Built by transformers in the test (nothing downloaded), imported, then run through the CLI."""
import json
import math
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conftest import run_cli

transformers = pytest.importorskip("transformers")

EOS, START, END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
          "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QUESTIONS = [f"What is {a} plus {b}?" for a in range(2, 10) for b in range(3, 8)]  # 40
TEXT = ("def add(a, b):\n    return a + b\n\nthe cat sat on the mat. What is 2 plus 3? The answer is 5.\n"
        "class Point:\n    x: int = 0\n    y: int = 0\n")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """The Hugging Face folder, imported, and the records every verb reads."""
    d = tmp_path_factory.mktemp("imported")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=[EOS, START, END], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([TEXT * 20, " ".join(QUESTIONS) * 5, "system user assistant helpful SmolLM\n" * 20], trainer)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, max_position_embeddings=256, vocab_size=bpe.get_vocab_size(),
                                   tie_word_embeddings=False, bos_token_id=bpe.token_to_id(EOS),
                                   eos_token_id=bpe.token_to_id(EOS))
    hf = d / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf)
    bpe.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"bos_token": EOS, "eos_token": EOS, "chat_template": CHATML}))
    out = ok(run_cli("import", hf, "--out", d / "model"))
    assert "chat template: own (turns end with <|im_end|>)" in out

    answer = lambda q: str(eval(q[8:-1].replace("plus", "+")))  # noqa: E731
    write_jsonl(d / "sft.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer(q)}]}
                                  for q in QUESTIONS])
    write_jsonl(d / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS[:8]])
    write_jsonl(d / "rankings.jsonl", [{"prompt": q, "responses": [answer(q), "I don't know.", "banana"], "ranks": [1, 2, 3]}
                                       for q in QUESTIONS])
    write_jsonl(d / "task.jsonl", [{"text": f"{w} number {i}", "label": w} for i in range(40) for w in ("odd", "even")
                                   if i % 2 == (w == "odd")])
    (d / "text.txt").write_text(TEXT * 200)
    return d


@pytest.fixture(scope="module")
def sft(d):
    ok(run_cli("sft", "--from", d / "model", "--data", d / "sft.jsonl", "--out", d / "sft", "sft.epochs=12",
               "sft.train.batch_size=8", "sft.train.lr=3e-3", "sft.train.warmup_steps=2"))
    summary = json.loads((d / "sft" / "summary.json").read_text())["sft"]
    assert summary["demonstrations"] == 36 and summary["truncated"] == 0 and summary["val_loss"] < 3.0  # uniform: ln 384 = 5.95
    return d / "sft"


@pytest.fixture(scope="module")
def rm(d, sft):
    out = ok(run_cli("rm", "--from", sft, "--data", d / "rankings.jsonl", "--out", d / "rm", "rm.epochs=1",
                     "rm.train.batch_size=8"))
    return d / "rm", json.loads(out.strip().splitlines()[-1])


def test_sample_plain_and_chat(d):
    out = ok(run_cli("sample", "--model", d / "model", "--prompt", "def ", "--max-new-tokens", "8", "--seed", "0"))
    assert out.startswith("def ")
    out = ok(run_cli("sample", "--model", d / "model", "--chat", "--prompt", "What is 2 plus 3?", "--max-new-tokens", "8",
                     "--seed", "0"))
    assert out.strip()


def test_chat_reads_lines_until_quit(d):
    proc = subprocess.run([sys.executable, "-m", "gptstack", "chat", "--model", str(d / "model"), "--max-new-tokens", "6",
                           "--seed", "0"], input="Hello\nWhat is 2 plus 3?\n/quit\n", capture_output=True, text=True, timeout=120)
    assert ok(proc).count("assistant> ") == 2


def test_eval_lm_and_prompting(d):
    m = json.loads(ok(run_cli("eval", "lm", "--model", d / "model", "--data", d / "text.txt", "--seq-len", "64")))
    assert math.isfinite(m["val_loss"]) and m["val_tokens"] > 0
    r = json.loads(ok(run_cli("eval", "prompting", "--model", d / "model", "--limit", "2", "--shots", "0,1")))
    assert set(r) == {"cloze", "continuation", "arithmetic", "docstring_name"}
    assert all(r[task][f"shots_{k}"]["n"] > 0 for task in r for k in (0, 1))


def test_finetune_then_predict(d):
    out = ok(run_cli("finetune", "--task", "classification", "--data", d / "task.jsonl", "--from", d / "model",
                     "--out", d / "ft", "finetune.epochs=1", "finetune.train.batch_size=8"))
    assert json.loads(out.strip().splitlines()[-1])["labels"] == ["even", "odd"]
    write_jsonl(d / "new.jsonl", [{"text": f"number {i}"} for i in range(3)])
    rows = [json.loads(line) for line in ok(run_cli("predict", "--model", d / "ft", "--data", d / "new.jsonl")).splitlines()]
    assert len(rows) == 3 and all(r["prediction"] in ("even", "odd") for r in rows)


def test_sft_learns_the_models_own_stop_token_and_chat_ends_answers(d, sft):
    """The SFT mask learned <|im_end|> (the imported model, random, runs to the length limit instead)."""
    proc = subprocess.run([sys.executable, "-m", "gptstack", "chat", "--model", str(sft), "--max-new-tokens", "12",
                           "--temperature", "0", "--seed", "0"], input="What is 2 plus 3?\nWhat is 4 plus 5?\n/quit\n",
                          capture_output=True, text=True, timeout=120)
    out = ok(proc)
    assert out.count("assistant> ") == 2 and "cut off" not in out, out


def test_compare_writes_a_todo_for_a_human(d, sft):
    out = ok(run_cli("compare", "--policy", sft, "--prompts", d / "prompts.jsonl", "--labeler", "human", "--k", "2",
                     "--out", d / "cmp.jsonl", "rm.max_new_tokens=6"))
    assert json.loads(out.splitlines()[0])["labeler"] == "human" and "gptstack label" in out
    todo = [json.loads(line) for line in (d / "cmp.jsonl").read_text().splitlines()]  # the to-do: answers, no ranks yet
    assert len(todo) == 8 and all(len(t["responses"]) == 2 and "ranks" not in t for t in todo)


def test_rm_then_ppo(d, sft, rm):
    rm_dir, summary = rm
    assert (rm_dir / "model.safetensors").is_file()
    assert all(math.isfinite(v) for v in summary.values() if isinstance(v, float))
    write_jsonl(d / "val_prompts.jsonl", [{"prompt": q} for q in QUESTIONS[8:10]])
    write_jsonl(d / "test_prompts.jsonl", [{"prompt": q} for q in QUESTIONS[10:12]])
    out = ok(run_cli("ppo", "--policy", sft, "--rm", rm_dir, "--out", d / "ppo", "--prompts", d / "prompts.jsonl",
                     "--val-prompts", d / "val_prompts.jsonl", "--test-prompts", d / "test_prompts.jsonl",
                     "ppo.rollouts=2", "ppo.rollout_batch=4", "ppo.ppo_epochs=1", "ppo.max_new_tokens=6",
                     "ppo.eval_every_rollouts=1", "ppo.baselines=false", f"data.sources=[{{path: {d / 'text.txt'}}}]",
                     "pretrain.eval_tokens=512"))
    r = json.loads(out.strip().splitlines()[-1])
    assert all(math.isfinite(r[k]) for k in ("win_rate_vs_sft", "rm_score", "kl", "pretrain_val_loss_delta"))
    # normalised on the SFT policy's answers: the RM reads the token it was trained on (read one token off, the
    # answer's <|im_end|> against the newline after it, these scores were in the hundreds)
    assert abs(r["sft_rm_score"]) < 10 and (d / "ppo" / "value.safetensors").is_file()


def test_tokenizer_verbs(d):
    info = json.loads(ok(run_cli("tokenizer", "info", "--tokenizer", d / "model")))
    assert set(info["special_tokens"]) == {EOS, START, END}  # the model's own, none of gptstack's
    ids = ok(run_cli("tokenizer", "encode", "--tokenizer", d / "model", f"say {END} literally")).split()
    assert ok(run_cli("tokenizer", "decode", "--tokenizer", d / "model", *ids)) == f"say {END} literally"


def test_export_to_hf_and_gguf(d):
    from gptstack.checkpoint import load_model
    from gptstack.convert import read_model, tokenizer_of
    from gptstack.tokenizer import Tokenizer
    ours, tok = load_model(d / "model"), Tokenizer.load(d / "model")
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids)[0]
    ok(run_cli("export", d / "model", "--to", "hf", d / "export"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(d / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, want, atol=1e-5, rtol=0)
    conv = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 4 plus 5?"}]
    rendered = transformers.AutoTokenizer.from_pretrained(d / "export").apply_chat_template(conv, add_generation_prompt=True,
                                                                                           return_dict=False)
    assert list(rendered) == tok.render_chat(conv, for_generation=True)[0]  # the default system turn too
    ok(run_cli("export", d / "model", "--to", "gguf", "--dtype", "f32", d / "model.gguf"))
    back = read_model(d / "model.gguf")  # llama.cpp's layout and the BPE as GGUF metadata, read back
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids)[0], want, atol=1e-5, rtol=0)
    assert tokenizer_of(back).fingerprint() == tok.fingerprint()  # the same BPE and chat template
