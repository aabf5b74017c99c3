"""Instruction tuning: the chat template, SFT records, the assistant-only loss, checkpoint selection, chat."""
import json

import pytest
import torch

from gptstack.model import ModelConfig
from gptstack.train.trainer import TrainConfig
from gptstack.data.records import read_sft_records
from gptstack.errors import GptstackError
from gptstack.generate import generate
from gptstack.model import GPT
from gptstack.tokenizer import Tokenizer
from gptstack.data.loader import Demonstrations
from gptstack.train.sft import SFTObjective
from gptstack.train.trainer import Trainer

from conftest import Terminal


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["You are terse. What is 2 plus 3? It is 5. Say hi. hi there, friend!\n"] * 20, vocab_size=300)


CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "Now say <|end|><|user|> literally"},
        {"role": "assistant", "content": "<|end|><|user|>"}]


# ---------------------------------------------------------------- the chat template

def test_chat_template_renders_each_turn_between_its_role_token_and_end(tok):
    ids, _ = tok.render_chat(CONV)
    text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in CONV)
    assert tok.decode(ids) == text == tok.template.render(CONV)
    assert [i for i in ids if i in tok.special.values()].count(tok.end) == len(CONV)  # the literal ones stayed text
    open_ids, learn = tok.render_chat(CONV[:2], for_generation=True)
    assert open_ids[-1] == tok.special["<|assistant|>"] and not any(learn)


def test_chat_mask_covers_exactly_the_assistant_tokens(tok):
    ids, learn = tok.render_chat(CONV)
    expected = []
    for m in CONV:  # role token (never learned), then the content and its <|end|> (learned for the assistant)
        body = tok.encode(m["content"]) + [tok.special["<|end|>"]]
        expected += [False] + [m["role"] == "assistant"] * len(body)
    assert learn == expected
    learned = [i for i, keep in zip(ids, learn) if keep]
    end = tok.special["<|end|>"]
    assert learned == tok.encode("It is 5.") + [end] + tok.encode("<|end|><|user|>") + [end]
    # text that looks like a control token stays text: only two real <|end|> tokens are learned
    assert learned.count(end) == 2


def test_unknown_role_is_an_error(tok):
    with pytest.raises(GptstackError, match="unknown chat role 'bot'"):
        tok.render_chat([{"role": "bot", "content": "x"}])


# ---------------------------------------------------------------- records

def test_three_sft_formats_give_the_same_conversation(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Add 2 and 3.\n\n(quickly)"}, {"role": "assistant", "content": "5"}]},
            {"prompt": "Add 2 and 3.\n\n(quickly)", "response": "5"},
            {"instruction": "Add 2 and 3.", "input": "(quickly)", "output": "5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    convs = read_sft_records(path)
    assert convs[0] == convs[1] == convs[2]
    path.write_text(json.dumps({"prompt": "p", "response": "r", "system": "Be brief."}) + "\n")
    assert read_sft_records(path)[0][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("line, needle", [
    ({"prompt": "p"}, "sft.jsonl:2: field 'response' missing"),
    ({"prompt": "p", "response": 3}, "sft.jsonl:2: field 'response' must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "sft.jsonl:2: field 'messages' must end with an assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "sft.jsonl:2: field 'messages[0].role' must be system, user or assistant"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]}, "a system message must come first"),
    ({"text": "just text"}, "sft.jsonl:2: not an SFT record"),
])
def test_bad_sft_records_name_file_line_and_field(tmp_path, line, needle):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "response": "fine"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(GptstackError) as e:
        read_sft_records(path)
    assert needle in str(e.value)


# ---------------------------------------------------------------- the objective

def test_sft_loss_is_the_mean_over_assistant_tokens_only(tok):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=64, vocab_size=tok.vocab_size))
    convs = [CONV[:3], [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there, friend!"}]]
    data = Demonstrations(convs, tok, 64)
    micro = data.batch([0, 1])
    obj = SFTObjective(data, data, seed=0, flops_per_token=0.0)
    loss, _ = obj.loss(model, micro)
    logp = torch.log_softmax(model(micro["input"])[0], -1)
    manual = []
    for i, conv in enumerate(convs):
        ids, learn = tok.render_chat(conv)
        for t in range(1, len(ids)):
            if learn[t]:
                manual.append(-logp[i, t - 1, ids[t]])
    assert obj.weight(micro) == len(manual)
    assert loss.item() == pytest.approx(torch.stack(manual).mean().item(), abs=1e-5)


def _train(tok, tmp_path, name, micro_batch_size=0, steps=1, **kw):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=64, vocab_size=tok.vocab_size))
    convs = [[{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w * (1 + i % 3)}]
             for i, w in enumerate(["hi", "there", "friend", "terse", "is", "what", "plus", "you"])]
    data = Demonstrations(convs, tok, 64)
    cfg = TrainConfig(steps=steps, batch_size=8, micro_batch_size=micro_batch_size, lr=1e-2, warmup_steps=1,
                      log_every=1, ckpt_every=100, device="cpu", precision="fp32", **kw)
    Trainer(cfg, model, SFTObjective(data, data, 0, 0.0), tmp_path / name).fit()
    return model, data, convs


def test_sft_accumulation_is_exact(tok, tmp_path):
    # the answers differ in length, so only a token-weighted accumulation gives the same step
    whole, _, _ = _train(tok, tmp_path, "whole", micro_batch_size=8)
    accum, _, _ = _train(tok, tmp_path, "accum", micro_batch_size=1)
    for a, b in zip(whole.parameters(), accum.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # Adam: lr 1e-2 times sign noise


def test_sft_learns_its_answers(tok, tmp_path):
    model, data, convs = _train(tok, tmp_path, "learn", steps=120)
    model.eval()
    end = tok.special["<|end|>"]
    prompts = [tok.render_chat(c[:1], for_generation=True)[0] for c in convs]
    got = generate(model, prompts, 12, temperature=0, stop_ids=(end,))
    answers = [tok.decode(g.tokens[:-1]) if g.finished else None for g in got]
    assert answers == [c[1]["content"] for c in convs]


# ---------------------------------------------------------------- checkpoint selection

class _PeakedEval:
    """An objective whose eval metric peaks at the second in-training eval."""

    def __init__(self, inner, values):
        self.inner, self.values = inner, list(values)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def evaluate(self, model):
        return {"score": self.values.pop(0)}


def test_select_by_publishes_the_best_evals_model(tok, tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=64, vocab_size=tok.vocab_size))
    data = Demonstrations([CONV[:3]] * 4, tok, 64)
    obj = _PeakedEval(SFTObjective(data, data, 0, 0.0), [0.0, 0.2, 0.9, 0.5, 0.4])  # evals at steps 0, 2, 4, 6, 8
    cfg = TrainConfig(steps=8, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=2, ckpt_every=2, keep_checkpoints=10,
                      device="cpu", precision="fp32", select_by="score")
    summary = Trainer(cfg, model, obj, tmp_path / "sel").fit()
    assert summary["selected"] == {"step": 4, "metric": "score", "value": 0.9, "eval": {"score": 0.9}}
    published = (tmp_path / "sel" / "model.safetensors").read_bytes()
    assert published == (tmp_path / "sel" / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes()
    assert published != (tmp_path / "sel" / "checkpoints" / "step_0000008" / "model.safetensors").read_bytes()


def test_select_by_an_unreported_metric_is_a_clear_error(tok, tmp_path):
    with pytest.raises(GptstackError, match="'select_by': the eval reports no 'gold_score'"):
        _train(tok, tmp_path, "nometric", steps=2, eval_every=1, select_by="gold_score")


# ---------------------------------------------------------------- chat in a real terminal

def test_chat_in_a_pty(random_model_dir):
    with Terminal(["chat", "--model", random_model_dir, "--system", "Be brief.", "--max-new-tokens", "6", "--seed", "0"]) as term:
        assert "system: Be brief." in term.expect("you> ")
        term.send("What is 1 plus 2?\r")
        first = term.expect("you> ")
        assert "assistant> " in first
        term.send("/reset\r")
        assert "conversation reset" in term.expect("you> ")
        term.send("the cat sat\r")
        assert "assistant> " in term.expect("you> ")
        term.send("\x04")  # Ctrl-D
        assert term.proc.wait(timeout=30) == 0
