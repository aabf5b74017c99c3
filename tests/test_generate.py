import pytest
import torch
import torch.nn.functional as F

from gptstack.model import ModelConfig
from gptstack.generate import filter_logits, generate
from gptstack.model import GPT


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_embd=32, n_head=4, n_ctx=48, vocab_size=50)).eval()


def greedy_uncached(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_uncached(model):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    (g,) = generate(model, [prompt], 20, temperature=0)
    assert g.tokens == greedy_uncached(model, prompt, 20)


def test_ragged_batch_equals_one_by_one(model):
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [5]]
    batched = generate(model, prompts, 12, temperature=0)
    for p, g in zip(prompts, batched):
        (alone,) = generate(model, [p], 12, temperature=0)
        assert g.tokens == alone.tokens
        assert g.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_logprobs_equal_teacher_forced(model):
    prompts = [[1, 2, 3, 4], [9, 8]]
    gens = generate(model, prompts, 10, temperature=1.0, seed=0)
    for p, g in zip(prompts, gens):
        seq = torch.tensor([p + g.tokens])
        logp = F.log_softmax(model(seq)[0][0, :-1], -1)
        ref = logp[len(p) - 1:].gather(1, seq[0, len(p):, None]).squeeze(1)
        assert g.logprobs == pytest.approx(ref.tolist(), abs=1e-4)


def test_stop_tokens_end_rows_independently(model):
    (free,) = generate(model, [[1, 2]], 10, temperature=0)
    stop = free.tokens[3]
    (g,) = generate(model, [[1, 2]], 10, temperature=0, stop_ids=(stop,))
    assert g.finished and g.tokens == free.tokens[:free.tokens.index(stop) + 1]
    assert not free.finished


def test_sampling_is_seeded_and_respects_top_k(model):
    a = generate(model, [[1]] * 4, 15, temperature=1.0, seed=7)
    b = generate(model, [[1]] * 4, 15, temperature=1.0, seed=7)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert len({tuple(g.tokens) for g in a}) > 1
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, :2]).all()
    kept = filter_logits(logits, top_p=0.7)[0]
    assert torch.isfinite(kept).tolist() == [False, False, True, True]


def test_generation_stops_at_the_context(model):
    (g,) = generate(model, [[1] * 40], 100, temperature=0)
    assert len(g.tokens) == 8


def test_a_rows_answer_does_not_depend_on_the_rows_batched_with_it(model):
    """Row i samples with its own random numbers (seed, i): a prompt's answer is the same alone, in any batch padded
    to the same length, and on any number of ranks (`generate_all`, which batches each rank's share so)."""
    from gptstack.generate import row_seed
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [5], [4, 4], [9, 9, 9, 9], [2] * 6, [3, 1], [6] * 5]
    everyone = generate(model, prompts, 12, temperature=1.0, seed=11, pad_to=7)
    assert len({tuple(g.tokens) for g in everyone}) > 4
    for rows in ([0, 2, 4, 6], [1, 3, 5, 7], [7, 6, 5, 4, 3]):  # a rank's share, in any order
        some = generate(model, [prompts[i] for i in rows], 12, temperature=1.0, seed=[row_seed(11, i) for i in rows], pad_to=7)
        assert [g.tokens for g in some] == [everyone[i].tokens for i in rows]
    # each row's uniform number picks its token by the cumulative distribution: top-k 1 leaves only the argmax,
    # and 4000 first tokens follow the softmax
    assert [g.tokens for g in generate(model, prompts, 12, temperature=1.0, top_k=1, seed=3)] == \
        [g.tokens for g in generate(model, prompts, 12, temperature=0)]
    firsts = torch.tensor([g.tokens[0] for g in generate(model, [[1]] * 4000, 1, temperature=1.0, seed=5)])
    probs = F.softmax(model(torch.tensor([[1]]))[0][0, -1], -1)
    assert (torch.bincount(firsts, minlength=50) / 4000 - probs).abs().max() < 0.03


def test_sequences_joining_a_running_batch_answer_as_they_do_alone(model):
    """Continuous batching: sequences join between steps into slots others have left, while the cache's columns are
    dropped and grown under them; each answers as it does alone (greedy and seeded sampling), in fewer steps."""
    from gptstack.generate import Engine, Sequence
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [5], [4, 4], [9, 9, 9, 9], [2] * 6, [3, 1], [6] * 5]
    seqs = [Sequence(p, 5 + 4 * i, temperature=0.9 * (i % 2), seed=i, stop_ids=(49,)) for i, p in enumerate(prompts)]
    alone = [generate(model, [s.prompt], s.max_new_tokens, temperature=s.temperature, seed=[s.seed], stop_ids=(49,))[0]
             for s in seqs]
    engine, waiting, columns = Engine(model, slots=3), list(seqs), set()
    while waiting or engine.busy:
        if waiting and engine.free_slots():
            engine.admit([waiting.pop(0)])  # one newcomer a step
        engine.step()
        columns.add(engine.valid.size(1))
    assert [s.out.tokens for s in seqs] == [g.tokens for g in alone]
    assert [s.out.finished for s in seqs] == [g.finished for g in alone]
    for s, g in zip(seqs, alone):
        assert s.out.logprobs == pytest.approx(g.logprobs, abs=1e-4)
    assert len(columns - {0}) > 1  # the cache grew on the way
    assert engine.steps < sum(len(g.tokens) for g in alone) and engine.cache.k is None  # emptied: its memory freed


def test_a_cancelled_sequence_leaves_at_the_next_step(model):
    from gptstack.generate import Engine, Sequence
    engine = Engine(model, slots=2)
    a, b = Sequence([1, 2], 20, temperature=0), Sequence([3], 20, temperature=0)
    engine.admit([a, b])
    engine.step()
    a.cancelled = True
    assert engine.step() == [a] and engine.free_slots() == 1 and len(a.out.tokens) == 1
    c = Sequence([4, 5, 6], 3, temperature=0)
    engine.admit([c])  # into a's slot
    while engine.busy:
        engine.step()
    assert c.out.tokens == generate(model, [[4, 5, 6]], 3, temperature=0)[0].tokens
    assert b.out.tokens == generate(model, [[3]], 20, temperature=0)[0].tokens
