"""The reward model: the K-way loss is the explicit per-prompt loop over pairs (InstructGPT's normalisation),
accumulation-invariant, and records are validated."""
import json

import pytest
import torch
import torch.nn.functional as F

from gptstack.chat_template import ROLES, ChatTemplate
from gptstack.model import ModelConfig
from gptstack.data.records import read_rankings
from gptstack.errors import GptstackError
from gptstack.model import GPT
from gptstack.tokenizer import Tokenizer, chat_messages
from gptstack.train.rm import RewardModel, Rankings, RMObjective, comparisons, encode_answer
from gptstack.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["What is 2 plus 3? It is 5. Five. I think 6. Say hi. hi there, friend!\n"] * 20, vocab_size=300)


RECORDS = [
    {"prompt": "What is 2 plus 3?", "responses": ["It is 5.", "5", "I think 6.", "Five. It is five."], "ranks": [2, 1, 4, 2]},
    {"prompt": "Say hi.", "system": "Be brief.", "responses": ["hi", "hi there, friend!", "hi"], "ranks": [1, 2, 1]},
    {"prompt": "Say hi.", "responses": ["hi", "there"], "ranks": [1, 1]},  # a full tie: no pair
    {"prompt": "What is 2 plus 3?", "responses": ["6", "5"], "ranks": [2, 1]},
]


def test_comparisons_skip_ties():
    assert comparisons([2, 1, 4, 2]) == [(0, 2), (1, 0), (1, 2), (1, 3), (3, 2)]
    assert comparisons([1, 1]) == []


def tiny_rm(tok) -> RewardModel:
    torch.manual_seed(0)
    # float64, so 1e-6 measures the algebra rather than fp32 rounding
    model = RewardModel(GPT(ModelConfig(n_layer=2, n_embd=32, n_head=2, n_ctx=64, vocab_size=tok.vocab_size))).double()
    model.head.proj.weight.data.normal_(0, 1.0)  # rewards far apart, so a wrong pairing shows
    return model


def per_prompt_loop(model, tok, records) -> tuple[torch.Tensor, float, float]:
    """InstructGPT's loss one pair at a time, each answer encoded on its own (no padding, no batching): for each
    prompt with a pair, −mean over its pairs of log σ(r_w − r_l); then the mean over those prompts.
    Returns (loss, that mean of per-prompt accuracies, the accuracy over all pairs)."""
    losses, accuracies, right, pairs = [], [], 0, 0
    for rec in records:
        terms, correct = [], []
        for w, l in comparisons(rec["ranks"]):
            r = []
            for y in (rec["responses"][w], rec["responses"][l]):
                ids = torch.tensor([encode_answer(tok, chat_messages(rec["prompt"], rec.get("system"), y), 64)])
                r.append(model(ids, torch.tensor([ids.size(1) - 1]))[0])
            terms.append(-F.logsigmoid(r[0] - r[1]))
            correct.append(float(r[0] > r[1]))
        if terms:  # a full tie does not count
            losses.append(torch.stack(terms).mean())
            accuracies.append(sum(correct) / len(correct))
            right, pairs = right + sum(correct), pairs + len(correct)
    return torch.stack(losses).mean(), sum(accuracies) / len(accuracies), right / pairs


def test_the_reward_reads_the_stop_token_that_closes_the_answer_as_ppo_does(tok):
    """A template whose turns end in text after the stop token (ChatML's newline after <|im_end|>): PPO's sampled
    answers end at the stop, so the answer the reward model learns on ends there too."""
    lined = Tokenizer(tok.hf, ChatTemplate(prefix={r: f"<|{r}|>" for r in ROLES}, suffix={r: "<|end|>\n" for r in ROLES},
                                           stop="<|end|>", eos="<|endoftext|>"))
    conv = chat_messages("Say hi.", "Be brief.", "hi there")
    for t in (tok, lined):
        assert encode_answer(t, conv, 64) == t.render_chat(conv[:-1], for_generation=True)[0] + t.encode("hi there") + [t.end]
    assert encode_answer(tok, conv, 64) == tok.render_chat(conv)[0]  # gptstack's own template: the whole conversation
    assert encode_answer(lined, conv, 5) == encode_answer(lined, conv, 64)[-5:]


def test_k_way_loss_and_gradients_equal_the_explicit_per_prompt_loop(tok):
    # mixed K (4, 3, 2, 2: the batch pads to K = 4 with rank-0 slots) and ties (within a ranking, and a full tie)
    model = tiny_rm(tok)
    data = Rankings(RECORDS, tok, 64)
    obj = RMObjective(data, data, seed=0, flops_per_token=0.0)

    batch = data.batch(range(len(RECORDS)))
    loss, metrics = obj.loss(model, batch)
    loss.backward()
    batched = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    explicit, accuracy, _ = per_prompt_loop(model, tok, RECORDS)
    explicit.backward()
    assert obj.weight(batch) == 3  # the prompts with a pair: the full tie does not count
    assert loss.item() == pytest.approx(explicit.item(), abs=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(accuracy, abs=1e-9)  # accuracy: the same mean over prompts
    for n, p in model.named_parameters():
        torch.testing.assert_close(batched[n], p.grad, atol=1e-6, rtol=0, msg=n)


def test_val_loss_is_the_per_prompt_mean_and_val_accuracy_is_over_pairs(tok):
    model = tiny_rm(tok).eval()
    data = Rankings(RECORDS, tok, 64)
    got = RMObjective(data, data, seed=0, flops_per_token=0.0).evaluate(model)
    with torch.no_grad():
        loss, _, accuracy = per_prompt_loop(model, tok, RECORDS)
    assert got["val_loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert got["val_accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_rm_accumulation_is_invariant(tok, tmp_path):
    """batch 8 x accumulation 1 == micro-batch 1 x accumulation 8: micro-batches count by their ranked prompts,
    whatever their K, ties and number of pairs."""
    data = Rankings(RECORDS + [{**r, "ranks": r["ranks"][::-1]} for r in RECORDS], tok, 64)
    trainers = []
    for micro in (8, 1):
        cfg = TrainConfig(steps=1, batch_size=8, micro_batch_size=micro, device="cpu", precision="fp32")
        trainers.append(Trainer(cfg, tiny_rm(tok), RMObjective(data, data, 0, 0.0), tmp_path / str(micro)))
    for t in trainers:
        t._step(t.model, step=0)
    whole, accumulated = trainers
    for (name, a), b in zip(whole.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-7, msg=name)


def test_pairs_are_rankings_of_two(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}) + "\n")
    (rec,) = read_rankings(path)
    assert rec["responses"] == ["good", "bad"] and rec["ranks"] == [1, 2]


@pytest.mark.parametrize("line, needle", [
    ({"responses": ["a", "b"], "ranks": [1, 2]}, "r.jsonl:2: field 'prompt' missing"),
    ({"prompt": "p", "responses": ["a"], "ranks": [1]}, "r.jsonl:2: field 'responses' must be a list of at least two"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1]}, "r.jsonl:2: field 'ranks' must be a list with one rank per response"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}, "r.jsonl:2: field 'ranks' must be integers >= 1"),
    ({"prompt": "p", "chosen": "a"}, "r.jsonl:2: field 'rejected' must be a string"),
])
def test_bad_rankings_name_file_line_and_field(tmp_path, line, needle):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(GptstackError) as e:
        read_rankings(path)
    assert needle in str(e.value)
