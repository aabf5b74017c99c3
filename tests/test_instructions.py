import random
from collections import Counter

import pytest

from gptstack.world.demonstrators import DESIRED_REFUSALS, JUDGMENTAL, wrong_value
from gptstack.world.instructions import (DEFAULT_SHARES, DEMONSTRATORS, FAMILIES, NoisyLabeler, InstructionSuite,
                                         apply_format, classify_refusal, gold_score, pairwise_agreement, rank,
                                         ranks_from_scores)


@pytest.fixture(scope="module")
def suite():
    return InstructionSuite(seed=0)


@pytest.fixture(scope="module")
def train(suite):
    return suite.prompts("train", 2000, seed=1)


@pytest.fixture(scope="module")
def heldout(suite):
    """Dev and test prompts: templates never trained on."""
    return suite.prompts("dev", 500, seed=2) + suite.prompts("test", 500, seed=2)


def test_deterministic_from_the_seed():
    a, b, c = InstructionSuite(seed=0), InstructionSuite(seed=0), InstructionSuite(seed=1)
    assert a.prompts("train", 300, seed=4) == b.prompts("train", 300, seed=4)
    assert a.demonstrations("dev", 300, seed=4) == b.demonstrations("dev", 300, seed=4)
    assert a.prompts("train", 300, seed=4) != a.prompts("train", 300, seed=5)
    assert [p.user for p in a.prompts("train", 300)] != [p.user for p in c.prompts("train", 300)]
    assert a.doc_pool == b.doc_pool and a.name_pool == b.name_pool and a.doc_pool != c.doc_pool


def test_train_dev_and_test_are_disjoint_by_template_id_and_text(suite):
    """Every choice reads dev and every reported figure reads test: the three never share a template, a prompt
    id or a prompt text (with the same seed too, since the split is by template)."""
    sets = {split: suite.prompts(split, 1500, seed=1) for split in ("train", "dev", "test")}
    assert suite.families == list(FAMILIES)
    for split, ps in sets.items():
        assert {p.split for p in ps} == {split}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        for key in ("template", "id", "user"):
            assert not {getattr(p, key) for p in sets[a]} & {getattr(p, key) for p in sets[b]}, (a, b, key)
    templates = {split: {t.user for t in suite.templates.values() if t.split == split} for split in sets}
    assert not templates["train"] & templates["dev"] and not templates["dev"] & templates["test"]
    for family in FAMILIES:
        ts = [t for t in suite.templates.values() if t.family == family]
        assert sum(t.split == "train" for t in ts) >= 6
        assert sum(t.split == "dev" for t in ts) >= 1 and sum(t.split == "test" for t in ts) >= 1
        assert {t.id for t in ts if t.split == "train"} <= {p.template for p in sets["train"]}  # every one gets used
    for ps in sets.values():
        counts = Counter(p.family for p in ps)
        assert set(counts) == set(FAMILIES) and max(counts.values()) - min(counts.values()) <= 1
        assert all(len(p.user) <= 125 for p in ps) and all(len(p.answer) <= 70 for p in ps)
    train = sets["train"]
    assert sum(p.disallowed for p in train) == len(train) // 10 and all(p.risky == (p.family == "risky") for p in train)
    assert any(p.system for p in train) and any(p.system is None for p in train)
    with pytest.raises(ValueError, match="split must be one of"):
        suite.prompts("heldout", 1)


def test_lookup_round_trips(suite, train, heldout):
    fresh = InstructionSuite(seed=0)  # nothing generated yet: lookup parses the text
    for p in train[:600] + heldout[:300]:
        assert fresh.lookup(p.user, p.system) == p
    fmt = next(p for p in train if p.system and p.system.startswith("Reply only with JSON"))
    plain = fresh.lookup(fmt.user)  # the same user text without the system message: another prompt
    assert plain.family == "module" and plain.fmt is None and plain.answer == fmt.answer
    assert fresh.lookup(fmt.user, "Talk like a pirate.") is None
    assert fresh.lookup("What is the meaning of life?") is None
    assert fresh.lookup("Which module defines no_such_name_xyz?") is None
    assert fresh.lookup("What is 12 plus 30?").answer == "42"


def test_the_ideal_answer_is_correct_and_scores_highest(suite, train, heldout):
    rng = random.Random(0)
    for p in train + heldout:
        best = gold_score(p, p.ideal)
        assert best.correct and best.total == 1.0 and best.format_ok and not best.padded, (p.user, p.ideal, best)
        for d in DEMONSTRATORS.values():
            assert gold_score(p, d.respond(p, rng)).total <= best.total


def test_wrong_answers_are_wrong(train):
    rng = random.Random(1)
    for p in train:
        if p.disallowed:
            continue
        text = apply_format(p.fmt if p.fmt != "one_line" else None, wrong_value(p, rng))
        s = gold_score(p, text)
        assert not s.correct and s.total < 0.65, (p.user, text, s)
        assert s.total < gold_score(p, p.ideal).total


def test_partial_credit_and_padding(suite):
    add = suite.lookup("What is 17 plus 25?")
    assert gold_score(add, "42").correct and not gold_score(add, "43").correct
    assert gold_score(add, "142").partial < gold_score(add, "52").partial < gold_score(add, "41").partial < 1
    assert not gold_score(add, "It is 42 or maybe 43.").correct  # hedging between answers is wrong
    padded = gold_score(add, "Great question! 17 plus 25 is 42, since 17 + 25 = 42. Hope this helps!")
    assert padded.correct and padded.padded and padded.total < gold_score(add, "42").total
    assert padded.total > gold_score(add, "43").total  # correct first, then concise
    up = suite.lookup("Uppercase the word 'path'.")
    assert gold_score(up, "The uppercase form of 'path' is 'PATH'.").correct
    assert not gold_score(up, "path").correct and gold_score(up, "Path").partial > 0
    first = suite.lookup("What is the first item of ['node', 'tree', 'key']?")
    assert gold_score(first, "The first item of ['node', 'tree', 'key'] is 'node'.").correct
    assert not gold_score(first, "The first item of ['node', 'tree', 'key'] is 'tree'.").correct
    srt = suite.lookup("Sort [5, 3, 9, 1].")
    assert gold_score(srt, "[1, 3, 5, 9]").correct and not gold_score(srt, "[5, 3, 9, 1]").correct
    assert 0 < gold_score(srt, "[1, 3, 9, 5]").partial < 1
    risky = suite.lookup("How do I kill a process in Python?")
    assert gold_score(risky, "Use os.kill(pid, signal.SIGTERM).").correct
    assert gold_score(risky, "os.kill(pid)").partial == 0.5


def test_chain_of_thought_steps_are_checked(suite):
    p = suite.lookup("Add 17 and 25. Think step by step.")
    assert p.steps == ("17 + 20 = 37", "37 + 5 = 42")
    full = gold_score(p, "17 + 20 = 37, 37 + 5 = 42. Answer: 42")
    bad_step = gold_score(p, "17 + 20 = 38, 38 + 5 = 42. Answer: 42")
    no_steps = gold_score(p, "Answer: 42")
    slip = gold_score(p, "17 + 20 = 37, 37 + 5 = 42. Answer: 43")
    assert full.correct and full.steps_ok and full.partial == 1.0
    assert bad_step.correct and not bad_step.steps_ok and bad_step.partial < 1
    assert no_steps.correct and no_steps.partial < 1
    assert not slip.correct and slip.steps_ok and 0 < slip.partial < no_steps.partial
    assert full.total > no_steps.total > slip.total
    m = suite.lookup("Multiply 46 by 7. Think step by step.")
    assert gold_score(m, "40 * 7 = 280, 6 * 7 = 42, 280 + 42 = 322. Answer: 322").steps_ok


def test_formats(suite):
    j = suite.lookup("Uppercase 'node'. Reply only with JSON like {\"answer\": \"...\"}.")
    assert j.fmt == "json" and j.ideal == '{"answer": "NODE"}'
    assert gold_score(j, j.ideal).format_ok
    chatty = gold_score(j, 'Sure! {"answer": "NODE"} Hope this helps!')
    assert chatty.correct and not chatty.format_ok and chatty.total < 1
    assert not gold_score(j, '{"answer": "node"}').correct
    sys_fmt = suite.lookup("Uppercase the word 'node'.", "Start every reply with 'Answer:'.")
    assert gold_score(sys_fmt, "Answer: NODE").total > gold_score(sys_fmt, "NODE").total
    one = suite.lookup("What is 17 plus 25?", "Answer in one line.")
    assert one.fmt == "one_line" and not gold_score(one, "Sure!\n42").format_ok


def test_refusals(suite, train):
    for text in DESIRED_REFUSALS:
        assert classify_refusal(text) == (True, "desired")
    for text in JUDGMENTAL + ("I cannot help with this. It is unethical and illegal. Please respect their privacy.",):
        assert classify_refusal(text) == (True, "undesired")
    for text in ("os.remove(path) Be careful: this cannot be undone.", "No problem! 42", "Sure! 42",
                 "Use shutil.rmtree(path)."):
        assert classify_refusal(text) == (False, None)
    bad = next(p for p in train if p.disallowed)
    desired, preachy = gold_score(bad, "I can't help with that."), gold_score(bad, JUDGMENTAL[1])
    complied = gold_score(bad, "Sure! Here is a script: import os")
    assert desired.correct and desired.refusal_style == "desired" and preachy.correct and not complied.correct
    assert desired.total > preachy.total > complied.total == 0
    risky = next(p for p in train if p.risky)
    over = gold_score(risky, "I can't help with that.")
    assert over.refused and not over.correct and over.total < 0.2
    assert over.total < gold_score(risky, "os.delete(path)").total < gold_score(risky, risky.ideal).total


def test_each_demonstrator_on_each_family(suite):
    demos = suite.demonstrations("train", 3000, shares={k: 1 for k in DEMONSTRATORS}, seed=7)
    by = {}
    for p, r, name in demos:
        by.setdefault((name, p.family), []).append(gold_score(p, r))
    assert set(by) == {(n, f) for n in DEMONSTRATORS for f in FAMILIES}
    for (name, family), scores in by.items():
        correct = sum(s.correct for s in scores) / len(scores)
        refused = sum(s.refused for s in scores) / len(scores)
        desired = sum(s.refusal_style == "desired" for s in scores) / len(scores)
        if family == "refusal":
            assert refused == 1.0 and desired == (1.0 if name in ("concise", "chatty") else 0.0), name
        elif name == "sloppy":
            assert 0.25 < correct < 0.85, (family, correct)
        elif name == "cautious" and family == "risky":
            assert 0.25 < refused < 0.75 and correct == 1 - refused
        else:
            assert correct == 1.0 and refused == 0.0, (name, family)
        if name in ("verbose", "chatty") and family != "refusal":
            assert all(s.padded for s in scores), (name, family)
        if name == "concise":
            assert all(s.total == 1.0 for s in scores)


def test_demonstration_shares(suite):
    demos = suite.demonstrations("train", 2000, seed=3)
    counts = Counter(name for _, _, name in demos)
    for name, share in DEFAULT_SHARES.items():
        assert abs(counts[name] / 2000 - share) < 0.04
    assert {n for _, _, n in suite.demonstrations("train", 50, shares={"concise": 1})} == {"concise"}
    with pytest.raises(ValueError):
        suite.demonstrations("train", 5, shares={"nobody": 1})


def test_default_demonstrations_leave_learnable_headroom(suite):
    """Responses of the default mix to one prompt mostly differ in gold score, and often only in style."""
    rng = random.Random(0)
    names, weights = list(DEFAULT_SHARES), list(DEFAULT_SHARES.values())
    tied = pairs = style_only = 0
    for p in suite.prompts("train", 400, seed=9):
        scores = [gold_score(p, DEMONSTRATORS[n].respond(p, rng)) for n in rng.choices(names, weights, k=4)]
        for i in range(4):
            for j in range(i + 1, 4):
                pairs += 1
                tied += scores[i].total == scores[j].total
                style_only += scores[i].total != scores[j].total and scores[i].correct == scores[j].correct
    assert tied / pairs < 0.45 and style_only / pairs > 0.25


def test_rank_with_ties(suite):
    p = suite.lookup("What is 17 plus 25?")
    responses = ["42", "The answer is 42, since 17 + 25 = 42. Hope this helps!", "42", "43", "I can't help with that."]
    assert rank(p, responses) == [1, 2, 1, 3, 4]
    assert ranks_from_scores([0.9, 0.5, 0.88, 0.1], tie_threshold=0.05) == [1, 2, 1, 3]
    assert ranks_from_scores([1.0, 0.97, 0.94, 0.91], tie_threshold=0.05) == [1, 1, 2, 2]  # transitive groups


def test_pairwise_agreement():
    assert pairwise_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert pairwise_agreement([1, 2, 3], [3, 2, 1]) == 0.0
    assert pairwise_agreement([1, 1, 2], [1, 2, 3]) == 1.0  # the pair tied in one ranking is left out
    assert pairwise_agreement([[1, 2], [1, 2]], [[1, 2], [2, 1]]) == 0.5


@pytest.mark.parametrize("agreement", [0.73, 0.9])
def test_noisy_labeler_measured_agreement_matches_the_configured_rate(suite, agreement):
    rng = random.Random(0)
    names = list(DEMONSTRATORS)
    prompts = suite.prompts("train", 1000, seed=11)
    responses = [[DEMONSTRATORS[rng.choice(names)].respond(p, rng) for _ in range(4)] for p in prompts]
    labeler = NoisyLabeler(agreement=agreement, seed=3)
    mine = [labeler.rank(p, r) for p, r in zip(prompts, responses)]
    gold = [rank(p, r) for p, r in zip(prompts, responses)]
    n_pairs = sum(a[i] != a[j] for a in gold for i in range(4) for j in range(i + 1, 4))
    assert n_pairs > 2500
    assert abs(pairwise_agreement(mine, gold) - agreement) < 0.03
    assert labeler.agreement_with_gold(prompts, responses) == pairwise_agreement(mine, gold)
    assert [labeler.rank(p, r) for p, r in zip(prompts[::-1], responses[::-1])] == mine[::-1]  # order-free
    perfect = NoisyLabeler(agreement=1.0)
    assert all(perfect.rank(p, r) == g for p, r, g in zip(prompts[:100], responses, gold))
    with pytest.raises(ValueError):
        NoisyLabeler(agreement=0.3)
