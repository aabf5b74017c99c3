"""The labelling tool, driven through a real terminal: rank, quit, resume; nothing lost, nothing extra."""
import json

import pytest

from gptstack.label import parse_ranking

from conftest import Terminal

TODO = [{"prompt": "What is 2 plus 3?", "responses": ["5", "It is 5.", "6", "I can't help with that."]},
        {"prompt": "Reverse abc.", "system": "Be brief.", "responses": ["cba", "abc", "c b a"]},
        {"prompt": "Say hi.", "responses": ["hi", "Hello there!"]}]


def test_parse_ranking_forms():
    assert parse_ranking("B > A = C > D", 4) == [2, 1, 2, 3]
    assert parse_ranking("ba=cd", 4) == [2, 1, 2, 3]
    assert parse_ranking("A=B", 2) == [1, 1]
    for bad, needle in (("AB", "missing C"), ("A>B>C>A", "repeated A"), ("A>", "ends with an operator"), ("A>X>B", "unexpected 'X'")):
        with pytest.raises(ValueError, match=needle):
            parse_ranking(bad, 3)


def test_rank_quit_resume_in_a_pty(tmp_path):
    todo, out = tmp_path / "todo.jsonl", tmp_path / "ranked.jsonl"
    todo.write_text("".join(json.dumps(r) + "\n" for r in TODO))
    with Terminal(["label", todo, "--out", out]) as term:
        screen = term.expect("ranking> ")
        assert "0 of 3 already ranked" in screen and "What is 2 plus 3?" in screen and "D) I can't help" in screen
        term.send("A > B > D > C\r")
        screen = term.expect("ranking> ")
        assert "system: Be brief." in screen and "[2/3]" in screen
        term.send("A > C\r")  # B left out: asked again, nothing written
        assert "rank every answer exactly once; missing B" in term.expect("ranking> ")
        term.send("A>C=B\r")
        assert "Say hi." in term.expect("ranking> ")
        term.send("q\r")
        assert "2 rankings saved" in term.expect("run again to resume")
        assert term.proc.wait(timeout=30) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [(r["prompt"], r["ranks"]) for r in rows] == [("What is 2 plus 3?", [1, 2, 4, 3]), ("Reverse abc.", [1, 2, 2])]

    with Terminal(["label", todo, "--out", out]) as term:  # resume: only the third prompt is left
        screen = term.expect("ranking> ")
        assert "2 of 3 already ranked" in screen and "Say hi." in screen and "What is 2 plus 3?" not in screen
        term.send("B>A\r")
        assert "all done: 3 rankings" in term.expect("all done: 3 rankings")
        assert term.proc.wait(timeout=30) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["ranks"] for r in rows] == [[1, 2, 4, 3], [1, 2, 2], [2, 1]]
    assert rows[1]["system"] == "Be brief." and rows[2]["responses"] == ["hi", "Hello there!"]
