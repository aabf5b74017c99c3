"""The reward model: the K-way loss is the explicit loop over all pairs, and records are validated."""
import json

import pytest
import torch
import torch.nn.functional as F

from gptstack.model import ModelConfig
from gptstack.data.records import read_rankings
from gptstack.errors import GptstackError
from gptstack.model import GPT
from gptstack.tokenizer import Tokenizer, chat_messages
from gptstack.train.rm import RewardModel, Rankings, RMObjective, comparisons, encode_answer


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


def test_k_way_loss_and_gradients_equal_the_explicit_pair_loop(tok):
    torch.manual_seed(0)
    # float64, so 1e-6 measures the algebra rather than fp32 rounding
    model = RewardModel(GPT(ModelConfig(n_layer=2, n_embd=32, n_head=2, n_ctx=64, vocab_size=tok.vocab_size))).double()
    model.head.proj.weight.data.normal_(0, 1.0)  # rewards far apart, so a wrong pairing shows
    data = Rankings(RECORDS, tok, 64)
    obj = RMObjective(data, data, seed=0, flops_per_token=0.0)

    loss, _ = obj.loss(model, data.batch(range(len(RECORDS))))
    loss.backward()
    batched = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    terms = []  # one pair at a time, each answer encoded on its own (no padding, no batching)
    for rec in RECORDS:
        for w, l in comparisons(rec["ranks"]):
            r = []
            for y in (rec["responses"][w], rec["responses"][l]):
                ids = torch.tensor([encode_answer(tok, chat_messages(rec["prompt"], rec.get("system"), y), 64)])
                r.append(model(ids, torch.tensor([ids.size(1) - 1]))[0])
            terms.append(-F.logsigmoid(r[0] - r[1]))
    explicit = torch.stack(terms).mean()
    explicit.backward()
    assert len(terms) == obj.weight(data.batch(range(len(RECORDS)))) == 5 + 2 + 0 + 1
    assert loss.item() == pytest.approx(explicit.item(), abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(batched[n], p.grad, atol=1e-6, rtol=0, msg=n)


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
