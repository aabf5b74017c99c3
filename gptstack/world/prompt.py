"""A prompt of the instruction suite: its text and everything the gold labeler and the demonstrators need to
know about it (a module of its own, so the suite, the labeler and the demonstrators share it without a cycle)."""
from __future__ import annotations

from dataclasses import dataclass

from ..tokenizer import chat_messages


@dataclass(frozen=True)
class Prompt:
    id: str
    family: str
    template: str           # template id, "family.N"
    split: str              # "train" | "dev" | "test" (the template's)
    system: str | None
    user: str
    answer: str             # the canonical correct answer (disallowed: the desired refusal)
    disallowed: bool
    risky: bool             # allowed, but sounds risky
    kind: str               # how the labeler checks it: number | text | list | doc | code | cot | refusal
    op: str                 # the template's operation (add, upper, first, asc, module, ...)
    fmt: str | None         # json | backticks | answer_prefix | one_line | None
    ideal: str              # the ideal (concise, correct, formatted) response
    steps: tuple[str, ...] = ()         # cot: the expected worked steps
    echoes: tuple[str, ...] = ()        # parts of the prompt a response may repeat (removed before checking)
    distractors: tuple[str, ...] = ()   # competing answers: naming one too makes a text answer wrong
    alternatives: tuple[str, ...] = ()  # other accepted answers
    key: str = ""                       # code: the call that earns partial credit
    slots: tuple[tuple[str, str], ...] = ()

    def slot(self, name: str) -> str:
        return dict(self.slots)[name]

    def messages(self) -> list[dict]:
        """The chat messages (system if any, then user) in the SFT record format."""
        return chat_messages(self.user, self.system)
