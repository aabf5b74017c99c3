"""A model's chat template, as data: the text around each turn.

    begin + [prefix[role] + content + suffix[role]] for each turn (+ prefix["assistant"] to generate)

gptstack's own models use `<|user|>…<|end|>`; an imported model keeps its own (SmolLM2's ChatML:
`<|im_start|>user\\n…<|im_end|>\\n`). Models ship their template as Jinja; `from_jinja` reads that Jinja
once, by rendering conversations whose contents are markers and cutting the text around them, and checks
that the data renders exactly what the Jinja renders. As data, the template gives the tokenizer what Jinja
cannot: which tokens are the assistant's (the SFT mask) and the token that ends a turn (the stop token).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import GptstackError

ROLES = ("system", "user", "assistant")


@dataclass
class ChatTemplate:
    prefix: dict[str, str]  # role -> text before the content (may hold special tokens)
    suffix: dict[str, str]  # role -> text after it
    stop: str  # the special token that closes the assistant's turn: learned in SFT, stops generation
    eos: str  # the model's end-of-text token (documents, sampling without a prompt)
    bos: str | None = None
    begin: str = ""  # text before the first turn (Llama 3's <|begin_of_text|>)
    default_system: str | None = None  # the system message the template adds when a conversation has none
    trim: bool = False  # the content is stripped of surrounding whitespace (Llama 3's template does this)
    source: str | None = field(default=None, repr=False)  # the model's own Jinja, exported as it came

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text (what the Jinja renders); the tokenizer renders the same pieces as ids."""
        text = self.begin
        for m in self.turns(messages):
            text += self.prefix[m["role"]] + self.content(m) + self.suffix[m["role"]]
        return text + (self.prefix["assistant"] if add_generation_prompt else "")

    def turns(self, messages: list[dict]) -> list[dict]:
        """The messages with the default system message in front when the template adds one."""
        for m in messages:
            if m.get("role") not in ROLES:
                raise GptstackError(f"unknown chat role {m.get('role')!r} (roles: {', '.join(ROLES)})")
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.default_system}] + list(messages)
        return list(messages)

    def content(self, message: dict) -> str:
        """The message's text; content given as parts (text and images) reads with <|image|> for each image."""
        content = message["content"]
        if not isinstance(content, str):
            content = "".join(p["text"] if p["type"] == "text" else "<|image|>" for p in content)
        return content.strip() if self.trim else content

    @property
    def jinja(self) -> str:
        """The Jinja a Hugging Face tokenizer or llama.cpp renders: the model's own, or one written from the data."""
        if self.source is not None:
            return self.source
        lit = json.dumps  # a JSON string is a Jinja string literal
        pieces = ", ".join(f"{lit(r)}: [{lit(self.prefix[r])}, {lit(self.suffix[r])}]" for r in ROLES)
        default = ("" if self.default_system is None else
                   "{%- if messages and messages[0]['role'] != 'system' -%}"
                   f"{{{{ {lit(self.prefix['system'] + self.default_system + self.suffix['system'])} }}}}{{%- endif -%}}")
        return (f"{{%- set t = {{{pieces}}} -%}}{{{{ {lit(self.begin)} }}}}{default}"
                "{%- for m in messages -%}{{ t[m['role']][0] + " + ("m['content'] | trim" if self.trim else "m['content']")
                + " + t[m['role']][1] }}{%- endfor -%}"
                f"{{%- if add_generation_prompt -%}}{{{{ {lit(self.prefix['assistant'])} }}}}{{%- endif -%}}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "chat template") -> "ChatTemplate":
        try:
            return cls(**data)
        except TypeError as e:
            raise GptstackError(f"{where}: not a chat template ({e})") from None

    @classmethod
    def from_jinja(cls, source: str, specials: list[str], bos: str | None, eos: str, where: str) -> "ChatTemplate":
        """The data form of a model's Jinja template (see the module docstring). `specials`: the tokenizer's
        special tokens, the first of which in the assistant's suffix is the stop token."""
        B = "\x02B\x03"  # bos_token as a marker, to see where the template puts it
        render = jinja_renderer(source, B, eos, where)
        S, U, A, U2, A2 = (f"\x02{c}\x03" for c in "SUXYZ")
        user = [{"role": "user", "content": U}]
        plain = render(user, False)
        generation = render(user, True)[len(plain):]
        user_suffix = plain.split(U, 1)[1]
        two = render(user + [{"role": "assistant", "content": A}, {"role": "user", "content": U2},
                             {"role": "assistant", "content": A2}], False)
        assistant_suffix = two.split(A2, 1)[1]
        user_prefix = two.split(A, 1)[1].split(U2, 1)[0][len(assistant_suffix):]
        head = plain.split(U, 1)[0][:-len(user_prefix) or None]  # begin, and a default system turn if any
        with_system = render([{"role": "system", "content": S}] + user, False)
        system_head, rest = with_system.split(S, 1)  # begin + the system prefix
        system_suffix = rest.split(U, 1)[0][:-len(user_prefix) or None]
        default = None
        if len(head) > len(system_head) and head.startswith(system_head) and head.endswith(system_suffix):
            default = head[len(system_head):len(head) - len(system_suffix)]  # the template adds a system turn of its own
            begin = B if system_head.startswith(B) else ""
        elif system_head.startswith(head):
            begin = head
        else:
            raise GptstackError(f"{where}: the chat template's text before the first turn is not the same with and without a system message")
        system_prefix = system_head[len(begin):]
        pieces = [begin, system_prefix, system_suffix, user_prefix, user_suffix, generation, assistant_suffix]
        begin, system_prefix, system_suffix, user_prefix, user_suffix, generation, assistant_suffix = (
            p.replace(B, bos or "") for p in pieces)
        stop = next((t for t in sorted(specials, key=lambda t: assistant_suffix.find(t)) if t in assistant_suffix), eos)
        template = cls(prefix={"system": system_prefix, "user": user_prefix, "assistant": generation},
                       suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
                       stop=stop, eos=eos, bos=bos, begin=begin, default_system=default, source=source)
        render = jinja_renderer(source, bos, eos, where)
        for trim in (False, True):  # the data must say exactly what the Jinja says
            template.trim = trim
            if all(template.render(c, gen) == render(c, gen) for c in PROBES for gen in (False, True)):
                return template
        raise GptstackError(f"{where}: the chat template renders something gptstack's turn-by-turn form cannot "
                            "(e.g. text that depends on the content or on the turn's position)")


BUILTIN = ChatTemplate(prefix={r: f"<|{r}|>" for r in ROLES}, suffix={r: "<|end|>" for r in ROLES},
                       stop="<|end|>", eos="<|endoftext|>")

PROBES = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": " a\n"}, {"role": "assistant", "content": "b "}, {"role": "user", "content": "c"}],
]


def jinja_renderer(source: str, bos: str | None, eos: str, where: str):
    """render(messages, add_generation_prompt) -> text, in the sandbox Hugging Face renders chat templates in."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(source)
    except TemplateError as e:
        raise GptstackError(f"{where}: the chat template is not valid Jinja ({e})") from None

    def render(messages, add_generation_prompt):
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=bos or "", eos_token=eos)
        except TemplateError as e:
            raise GptstackError(f"{where}: the chat template fails on a plain conversation ({e})") from None
    return render
