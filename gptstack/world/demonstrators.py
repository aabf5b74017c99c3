"""Simulated demonstrators: several writers with different habits, as InstructGPT's were.

- concise: the ideal answer, in the requested format; refuses in the desired short style.
- verbose: restates the question around a correct answer (padded); refusals preachy.
- chatty: wraps a correct answer in pleasantries ("Sure! ... Hope this helps!"), which breaks
  strict formats; refusals short and apologetic (the desired style).
- sloppy: concise, but wrong half the time and ignores the format half the time; cot sometimes
  skips the steps; refusals judgmental.
- cautious: concise, but on risky-looking allowed requests refuses half the time (over-refusal) and
  otherwise adds a caveat; refusals preachy.

The gold labeler prefers concise+correct+desired refusal throughout, so these habits leave headroom
that a reward model can learn and RL can close: padding, refusal style, over-refusal, format, and
(sloppy's) correctness. Default shares: DEFAULT_SHARES.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from .prompt import Prompt

DESIRED_REFUSAL = "I can't help with that."
DESIRED_REFUSALS = (DESIRED_REFUSAL, "I can't help with that request.", "Sorry, I can't help with that.",
                    "Sorry, but I can't assist with that.")
PREACHY_OPEN = ("I cannot help with this.", "I won't help with that.")
PREACHY_REASON = ("Accessing someone's device without consent is unethical and illegal.",
                  "It would violate their privacy and could cause real harm.",
                  "Tampering with other people's computers is wrong.")
PREACHY_ADVICE = ("Please respect other people's privacy.", "I urge you to reconsider.",
                  "Think about the consequences for them.")
JUDGMENTAL = ("No. That is a terrible thing to ask for.", "No way. You should be ashamed of asking that.",
              "Absolutely not! What an awful idea.", "I won't help with that. Shame on you.")
OVER_REFUSALS = ("I can't help with that. It could damage your system, so please be careful.",
                 "I cannot help with this, as it sounds dangerous. Please be careful.")
CAVEATS = ("Be careful: this cannot be undone.", "Use it with care.", "Double-check before running it.")
CHATTY_OPEN = ("Sure!", "Happy to help!", "Great question!", "Of course!", "Absolutely!")
CHATTY_CLOSE = ("Hope this helps!", "Let me know if you need anything else.", "Have a great day!", "Happy coding!")
WRONG_CODE = ("os.delete(path)", "process.stop()", "sys.quit()", "os.terminate(pid)", "file.destroy()")
VERBOSE = {
    "add": "{a} plus {b} is {v}, since {a} + {b} = {v}.",
    "sub": "{a} minus {b} is {v}, since {a} - {b} = {v}.",
    "upper": "The uppercase form of '{w}' is '{v}'.",
    "lower": "The lowercase form of '{w}' is '{v}'.",
    "capitalize": "Capitalized, the word '{w}' becomes '{v}'.",
    "first": "The first item of the list {items} is '{v}'.",
    "last": "The last item of the list {items} is '{v}'.",
    "reverse": "Reversed, the list {items} becomes {v}.",
    "asc": "Sorted from smallest to largest, {nums} becomes {v}.",
    "desc": "Sorted from largest to smallest, {nums} becomes {v}.",
    "doc": "According to its docstring, {qual} does this: {v}",
    "module": "{name} is defined in the {v} module, so you can write: from {v} import {name}",
    "risky": "To {task} in Python, you can use {v}, which is in the standard library.",
}


def apply_format(fmt: str | None, value: str) -> str:
    """The answer value written in the requested format."""
    if fmt == "json":
        return json.dumps({"answer": value})
    if fmt == "backticks":
        return f"`{value}`"
    if fmt == "answer_prefix":
        return f"Answer: {value}"
    return value


def wrong_value(prompt: Prompt, rng: random.Random) -> str:
    """A plausible wrong answer: off by one or ten, the wrong case or item, a near-sorted list, half a docstring."""
    op, answer = prompt.op, prompt.answer
    if prompt.kind in ("number", "cot"):
        n = int(answer)
        delta = rng.choice([d for d in (-10, -1, 1, 10) if n + d >= 0])
        return str(n + delta)
    if prompt.kind == "list":
        items = answer[1:-1].split(", ")
        i = rng.randrange(len(items) - 1)
        items[i], items[i + 1] = items[i + 1], items[i]
        return "[" + ", ".join(items) + "]"
    if prompt.kind == "doc":
        words = answer.rstrip(".").split()
        return " ".join(words[:len(words) // 2]) + "."
    if prompt.kind == "code":
        return rng.choice(WRONG_CODE)
    if prompt.distractors and op != "refuse":
        return rng.choice(prompt.distractors)
    return answer


@dataclass(frozen=True)
class Demonstrator:
    name: str
    style: str = "concise"        # concise | verbose | chatty
    refusal: str = "desired"      # desired | apologetic | preachy | judgmental
    p_wrong: float = 0.0          # chance of a wrong answer on an allowed request
    p_ignore_format: float = 0.0  # chance of ignoring the requested format
    p_over_refuse: float = 0.0    # chance of refusing an allowed request that sounds risky
    caveats: bool = False         # adds a safety caveat to risky-sounding answers

    def refuse(self, rng: random.Random) -> str:
        if self.refusal == "desired":
            return DESIRED_REFUSAL
        if self.refusal == "apologetic":
            return rng.choice(DESIRED_REFUSALS[1:])
        if self.refusal == "preachy":
            return " ".join([rng.choice(PREACHY_OPEN), rng.choice(PREACHY_REASON), rng.choice(PREACHY_ADVICE)])
        return rng.choice(JUDGMENTAL)

    def respond(self, prompt: Prompt, rng: random.Random) -> str:
        if prompt.disallowed:
            return self.refuse(rng)
        if prompt.risky and self.p_over_refuse and rng.random() < self.p_over_refuse:
            return rng.choice(OVER_REFUSALS)
        wrong = self.p_wrong > 0 and rng.random() < self.p_wrong
        fmt = prompt.fmt
        if fmt and self.p_ignore_format and rng.random() < self.p_ignore_format:
            fmt = None
        if prompt.kind == "cot":
            return self._cot(prompt, wrong, rng)
        value = wrong_value(prompt, rng) if wrong else prompt.answer
        core = apply_format(fmt if fmt != "one_line" else None, value)
        if self.style == "verbose":
            if prompt.family == "format":
                return f"Here is the answer, formatted as you asked:\n{core}"
            return VERBOSE["risky" if prompt.risky else prompt.op].format(v=value, **dict(prompt.slots))
        if self.style == "chatty":
            return f"{rng.choice(CHATTY_OPEN)} {core} {rng.choice(CHATTY_CLOSE)}"
        if self.caveats and prompt.risky:
            return f"{core} {rng.choice(CAVEATS)}"
        return core

    def _cot(self, prompt: Prompt, wrong: bool, rng: random.Random) -> str:
        steps, answer = list(prompt.steps), prompt.answer
        if wrong and rng.random() < 0.5:
            return f"Answer: {answer}"  # the right answer without the steps asked for
        if wrong:  # a slip in the last step carries into the answer
            answer = wrong_value(prompt, rng)
            steps[-1] = steps[-1].rsplit("= ", 1)[0] + "= " + answer
        worked = ", ".join(steps)
        if self.style == "verbose":
            return f"Let's work it out step by step. {worked}. So the result is {answer}. Answer: {answer}"
        if self.style == "chatty":
            return f"{rng.choice(CHATTY_OPEN)} {worked}. Answer: {answer} {rng.choice(CHATTY_CLOSE)}"
        return f"{worked}. Answer: {answer}"


DEMONSTRATORS: dict[str, Demonstrator] = {d.name: d for d in [
    Demonstrator("concise"),
    Demonstrator("verbose", style="verbose", refusal="preachy"),
    Demonstrator("chatty", style="chatty", refusal="apologetic"),
    Demonstrator("sloppy", refusal="judgmental", p_wrong=0.5, p_ignore_format=0.5),
    Demonstrator("cautious", refusal="preachy", p_over_refuse=0.5, caveats=True),
]}
DEFAULT_SHARES = {"concise": 0.25, "verbose": 0.2, "chatty": 0.2, "sloppy": 0.15, "cautious": 0.2}
