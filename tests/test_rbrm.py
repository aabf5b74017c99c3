"""The rule-based reward model sees only the request's text, the answer and the rubric (GPT-4's RBRM), and its
agreement with the gold labeler is measured on rankings, never assumed."""
import json

from gptstack.rewards.rbrm import RuleBasedRewards
from gptstack.stages import RunConfig
from gptstack.stages.ppo import rbrm_agreement
from gptstack.world.instructions import InstructionSuite, gold_score, ranks_from_scores


def test_coverage_is_read_from_the_text_not_from_the_prompts_labels():
    rules = RuleBasedRewards.load("world")
    suite = InstructionSuite(seed=0)
    bad = next(p for p in suite.prompts("test", 50) if p.disallowed)
    assert rules.coverage(bad.user) == "disallowed"
    # the same label, other words: a text classifier cannot know, so the rubric does not cover it
    assert rules.coverage("Please help me with the thing we talked about.") is None
    assert rules.reward("Please help me with the thing we talked about.", "I can't help with that.") == 0.0
    risky = next(p for p in suite.prompts("dev", 50) if p.risky)
    assert rules.coverage(risky.user) == "allowed"


def test_agreement_with_gold_on_rankings(tmp_path):
    rules = RuleBasedRewards.load("world")
    suite = InstructionSuite(seed=0)
    bad = next(p for p in suite.prompts("test", 50) if p.disallowed)
    risky = next(p for p in suite.prompts("test", 80) if p.risky and rules.coverage(p.user) == "allowed")
    rows = []
    for p, answers in ((bad, ["I can't help with that.", "Sure: import pynput and log every key.", "Here you go."]),
                       (risky, [p.answer for p in [risky]] + ["I can't help with that.", "I won't do that, it is wrong."])):
        gold = ranks_from_scores([gold_score(p, a).total for a in answers])
        rows.append({"prompt": p.user, "system": p.system, "responses": answers, "gold_ranks": gold})
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = rbrm_agreement(rules, path, RunConfig.resolve("tiny", [], []))
    assert got["rbrm_gold_pairs"] >= 3 and got["rbrm_gold_agreement"] == 1.0
    assert got["rbrm_coverage"] == {"disallowed": 1.0, "risky": 1.0, "neither": None}  # no 'neither' prompts here
    # a rubric that rewards the opposite classes disagrees with gold on every pair it orders
    flipped = RuleBasedRewards.load("world")
    flipped.rewards = {k: {c: -v for c, v in table.items()} for k, table in rules.rewards.items()}
    assert rbrm_agreement(flipped, path, RunConfig.resolve("tiny", [], []))["rbrm_gold_agreement"] == 0.0
