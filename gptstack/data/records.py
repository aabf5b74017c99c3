"""Validated supervised records (DESIGN §4): each bad record is an error naming file, line and field."""
from __future__ import annotations

from pathlib import Path

from ..errors import GptstackError, where
from ..io import iter_jsonl
from ..tokenizer import chat_messages

TASK_FIELDS = {  # GPT-1 task kinds and the text fields of their records
    "classification": ("text",),
    "entailment": ("premise", "hypothesis"),
    "similarity": ("text_a", "text_b"),
    "multiple_choice": ("context", "choices"),
}


def read_task_records(path: Path, kind: str, labelled: bool = True) -> list[dict]:
    """Records of a GPT-1 task kind, each with '_line'. Multiple-choice labels become choice indices
    (an int index, or the text of one of the choices)."""
    if kind not in TASK_FIELDS:
        raise GptstackError(f"unknown task kind '{kind}' (known: {', '.join(TASK_FIELDS)})")
    out = []
    for lineno, rec in iter_jsonl(path):
        for f in TASK_FIELDS[kind]:
            if f not in rec:
                raise GptstackError(f"{where(path, lineno, f)} missing (a {kind} record has {', '.join(TASK_FIELDS[kind])}, label)")
        for f in TASK_FIELDS[kind]:
            if f == "choices":
                ch = rec[f]
                if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
                    raise GptstackError(f"{where(path, lineno, f)} must be a list of at least two strings")
            elif not isinstance(rec[f], str):
                raise GptstackError(f"{where(path, lineno, f)} must be a string, got {type(rec[f]).__name__}")
        if labelled:
            if "label" not in rec:
                raise GptstackError(f"{where(path, lineno, 'label')} missing")
            label = rec["label"]
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise GptstackError(f"{where(path, lineno, 'label')} must be a string or an integer, got {label!r}")
            if kind == "multiple_choice":
                if isinstance(label, str):
                    if label not in rec["choices"]:
                        raise GptstackError(f"{where(path, lineno, 'label')} {label!r} is not one of the choices")
                    label = rec["choices"].index(label)
                if not 0 <= label < len(rec["choices"]):
                    raise GptstackError(f"{where(path, lineno, 'label')} {label} is out of range for {len(rec['choices'])} choices")
                rec["label"] = label
        rec["_line"] = lineno
        out.append(rec)
    if not out:
        raise GptstackError(f"{path}: no records")
    return out


def label_set(records: list[dict], path: Path) -> list:
    """The sorted labels of a training file; all strings or all integers."""
    labels = {r["label"] for r in records}
    if len({type(l) for l in labels}) > 1:
        raise GptstackError(f"{path}: labels mix strings and integers ({sorted(map(str, labels))[:6]})")
    if len(labels) < 2:
        raise GptstackError(f"{path}: only one label ({next(iter(labels))!r}); a classifier needs at least two")
    return sorted(labels)


def read_records(path: Path, parse) -> list:
    """Every record of a JSONL file through `parse(record, path, line)`, which validates it; an empty file is an error."""
    out = [parse(rec, path, lineno) for lineno, rec in iter_jsonl(path)]
    if not out:
        raise GptstackError(f"{path}: no records")
    return out


# ---------------------------------------------------------------- SFT demonstrations

SFT_FORMATS = "{messages: [{role, content}, ...]}, {prompt, response[, system]} or Alpaca {instruction, input, output}"


def read_sft_records(path: Path) -> list[list[dict]]:
    """Conversations (lists of {role, content}) from any of the SFT formats; each must end with an
    assistant turn, which is what SFT learns."""
    return read_records(path, sft_messages)


def sft_messages(rec: dict, path, lineno) -> list[dict]:
    def text(field: str, optional: bool = False) -> str | None:
        if field not in rec:
            if optional:
                return None
            raise GptstackError(f"{where(path, lineno, field)} missing (SFT records: {SFT_FORMATS})")
        if not isinstance(rec[field], str):
            raise GptstackError(f"{where(path, lineno, field)} must be a string, got {type(rec[field]).__name__}")
        return rec[field]

    if "messages" in rec:
        out = message_list(rec, path, lineno)
    elif "instruction" in rec:  # Alpaca: the input, if any, follows the instruction in the user turn
        extra = text("input", optional=True)
        user = text("instruction") + (f"\n\n{extra}" if extra else "")
        out = [{"role": "user", "content": user}, {"role": "assistant", "content": text("output")}]
    elif "prompt" in rec or "response" in rec:
        out = chat_messages(text("prompt"), text("system", optional=True), text("response"))
    else:
        raise GptstackError(f"{where(path, lineno)}: not an SFT record (expected {SFT_FORMATS})")
    if out[-1]["role"] != "assistant":
        raise GptstackError(f"{where(path, lineno, 'messages')} must end with an assistant turn (that is what SFT learns)")
    return out


def message_list(rec: dict, path, lineno) -> list[dict]:
    """A record's `messages`: {role, content} turns, a system message only first."""
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise GptstackError(f"{where(path, lineno, 'messages')} must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(msgs):
        f = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise GptstackError(f"{where(path, lineno, f)} needs a string 'content'")
        if m.get("role") not in ("system", "user", "assistant"):
            raise GptstackError(f"{where(path, lineno, f + '.role')} must be system, user or assistant, got {m.get('role')!r}")
        if m["role"] == "system" and i != 0:
            raise GptstackError(f"{where(path, lineno, f + '.role')} a system message must come first")
        out.append({"role": m["role"], "content": m["content"]})
    return out


# ---------------------------------------------------------------- prompts (PPO rollouts, comparisons)

def prompt_and_system(rec: dict, path, lineno, formats: str) -> tuple[str, str | None]:
    """A record's `prompt` (a string) and its optional `system` (a string, null or absent)."""
    for f in ("prompt", "system"):
        if rec.get(f) is not None and not isinstance(rec[f], str):
            raise GptstackError(f"{where(path, lineno, f)} must be a string, got {type(rec[f]).__name__}")
    if rec.get("prompt") is None:
        raise GptstackError(f"{where(path, lineno, 'prompt')} missing ({formats})")
    return rec["prompt"], rec.get("system")


PROMPT_FORMATS = "{prompt[, system]} or {messages: [{role, content}, ...]} ending with a user turn"


def read_prompt_records(path: Path) -> list[list[dict]]:
    """Conversations that await the assistant's answer: the chat messages of each record."""
    return read_records(path, prompt_messages)


def prompt_messages(rec: dict, path, lineno) -> list[dict]:
    if "messages" in rec:
        out = message_list(rec, path, lineno)
    else:
        out = chat_messages(*prompt_and_system(rec, path, lineno, f"prompts: {PROMPT_FORMATS}"))
    if out[-1]["role"] != "user":
        raise GptstackError(f"{where(path, lineno, 'messages')} must end with a user turn (the prompt the policy answers)")
    return out


# ---------------------------------------------------------------- rankings (reward-model data)

RANKING_FORMATS = "{prompt, responses: [...], ranks: [1, 2, 2, 3]} (1 = best, ties allowed) or pairs {prompt, chosen, rejected}"


def read_rankings(path: Path) -> list[dict]:
    """Rankings as {prompt, system, responses, ranks, _line} (plus any other fields the file carries);
    a pair {prompt, chosen, rejected} is a ranking of K = 2."""
    return read_records(path, ranking)


def ranking(rec: dict, path, lineno) -> dict:
    prompt_and_system(rec, path, lineno, f"rankings: {RANKING_FORMATS}")
    if "chosen" in rec or "rejected" in rec:
        for f in ("chosen", "rejected"):
            if not isinstance(rec.get(f), str):
                raise GptstackError(f"{where(path, lineno, f)} must be a string (a pair has prompt, chosen, rejected)")
        rec = {**rec, "responses": [rec.pop("chosen"), rec.pop("rejected")], "ranks": [1, 2]}
    responses, ranks = rec.get("responses"), rec.get("ranks")
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
        raise GptstackError(f"{where(path, lineno, 'responses')} must be a list of at least two strings (rankings: {RANKING_FORMATS})")
    if not isinstance(ranks, list) or len(ranks) != len(responses):
        raise GptstackError(f"{where(path, lineno, 'ranks')} must be a list with one rank per response ({len(responses)})")
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise GptstackError(f"{where(path, lineno, 'ranks')} must be integers >= 1 (1 = best), got {ranks}")
    return {**rec, "system": rec.get("system"), "_line": lineno}
