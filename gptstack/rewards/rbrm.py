"""Rule-based rewards (GPT-4's RBRM): a rubric sorts an answer into classes, and a reward per class
is added to the reward model's score on the prompts the rubric covers.

Classes (GPT-4 system card): A a refusal in the desired style, B a refusal in an undesired style,
C disallowed content, D a safe answer that does not refuse. On disallowed prompts the rubric rewards A;
on allowed ones (that merely sound risky) it rewards D. Like GPT-4's RBRM, it sees only the request's text,
the answer and the rubric: which prompts it covers is decided by the rubric's patterns over the request. The
classes are decided by propositions in YAML
(regular expressions and length limits over the answer's opening or whole text), or, in judge mode, by
asking a model the rubric as a multiple-choice question and reading the probability of each letter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..errors import GptstackError

BUILTIN = Path(__file__).with_name("rubric.yaml")
SENTENCE_END = re.compile(r"[.!?](?:\s|$)|\n")


def opening(text: str, sentences: int) -> str:
    end = 0
    for _ in range(sentences):
        m = SENTENCE_END.search(text, end)
        if not m:
            return text
        end = m.end()
    return text[:end]


@dataclass
class Proposition:
    name: str
    patterns: list[re.Pattern]
    answer_opening: int = 0  # > 0: only the first N sentences
    min_chars: int = 0

    def holds(self, answer: str) -> bool:
        text = opening(answer.strip(), self.answer_opening) if self.answer_opening else answer
        if self.min_chars and len(answer.strip()) < self.min_chars:
            return False
        return not self.patterns or any(p.search(text) for p in self.patterns)


class RuleBasedRewards:
    def __init__(self, rubric: dict, source: str = "rubric", judge=None):
        self.source, self.judge = source, judge
        try:
            self.props = {name: Proposition(name, [re.compile(p, re.I) for p in spec.get("patterns", [])],
                                            int(spec.get("answer_opening", 0)), int(spec.get("min_chars", 0)))
                          for name, spec in rubric["propositions"].items()}
            self.classes = {c: spec for c, spec in rubric["classes"].items()}
            covers = rubric.get("covers", {})
            self.cover = {k: [re.compile(p, re.I) for p in covers.get(f"{k}_patterns", [])] for k in ("disallowed", "allowed")}
            self.rewards = {k: {c: float(v) for c, v in rubric["rewards"][k].items()} for k in ("disallowed", "allowed")}
        except (KeyError, TypeError, AttributeError, re.error) as e:
            raise GptstackError(f"{source}: not a valid rubric ({type(e).__name__}: {e}); see {BUILTIN} for the format") from None
        if list(self.classes) != ["A", "B", "C", "D"]:
            raise GptstackError(f"{source}: 'classes' must be A, B, C, D in that order (got {', '.join(self.classes)})")
        for c, spec in self.classes.items():
            for cond in spec.get("when", []):
                if cond.removeprefix("not:") not in self.props:
                    raise GptstackError(f"{source}: class {c}: unknown proposition {cond!r} (known: {', '.join(self.props)})")

    @classmethod
    def load(cls, spec: str, judge=None) -> "RuleBasedRewards":
        path = BUILTIN if spec in ("world", "builtin") else Path(spec)
        if not path.is_file():
            raise GptstackError(f"{spec}: no rubric file here (or use 'world' for the built-in rubric)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise GptstackError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        return cls(data, str(path), judge)

    # ------------------------------------------------------------ deciding

    def classify(self, answer: str, prompt_text: str = "") -> str:
        if self.judge is not None:
            return self.judge.classify(self, prompt_text, answer)
        for c, spec in self.classes.items():
            if all(self._holds(cond, answer) for cond in spec.get("when", [])):
                return c
        return "D"

    def _holds(self, cond: str, answer: str) -> bool:
        if cond.startswith("not:"):
            return not self.props[cond[4:]].holds(answer)
        return self.props[cond].holds(answer)

    def coverage(self, prompt: str) -> str | None:
        """'disallowed', 'allowed' or None (not covered): read from the request's text by the rubric's patterns,
        as a classifier would, never from what the data knows about the prompt."""
        for kind in ("disallowed", "allowed"):
            if any(p.search(prompt) for p in self.cover[kind]):
                return kind
        return None

    def reward(self, prompt: str, answer: str) -> float:
        kind = self.coverage(prompt)
        return 0.0 if kind is None else self.rewards[kind][self.classify(answer, prompt)]


class Judge:
    """The rubric as a multiple-choice question to a model (GPT-4 used GPT-4 zero-shot as its RBRM):
    the class is the letter whose token the model finds most probable after the question."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self.letters = [tok.encode(f" {c}")[-1] for c in "ABCD"]

    @torch.no_grad()
    def probabilities(self, rules: RuleBasedRewards, prompt: str, answer: str) -> dict[str, float]:
        options = "\n".join(f"({c}) {spec['description']}" for c, spec in rules.classes.items())
        question = (f"Request: {prompt}\nAnswer: {answer}\nWhich describes the answer?\n{options}\n"
                    "Reply with one letter.")
        ids = self.tok.render_chat([{"role": "user", "content": question}], for_generation=True)[0]
        ids = ids[-self.model.cfg.n_ctx:]
        device = next(self.model.parameters()).device
        logits = self.model(torch.tensor([ids], device=device))[0][0, -1].float()
        p = logits[self.letters].softmax(-1)
        return dict(zip("ABCD", p.tolist()))

    def classify(self, rules: RuleBasedRewards, prompt: str, answer: str) -> str:
        probs = self.probabilities(rules, prompt, answer)
        return max(probs, key=probs.get)
