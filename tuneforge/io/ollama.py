"""An Ollama Modelfile beside an exported GGUF: FROM, the chat template as Ollama's TEMPLATE, PARAMETER
stop for the end-of-turn tokens, and SYSTEM.

Ollama's templates are Go templates, the tokenizer's are Jinja, and there is no general translation.
What is translated is what a chat needs: the text the Jinja template puts around a system message,
a user message and an assistant message, found by rendering it with marker contents and cutting at
the markers. The Go template is Ollama's plain form (``.System``, ``.Prompt``, ``.Response``), which
Ollama renders once per turn and cuts after ``.Response`` for the turn being answered. The pieces
are checked against the Jinja template before anything is written: a template they cannot
reproduce (a system message folded into the first user turn, say) is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.errors import UserError

SYSTEM, USER, ASSISTANT, NEXT = "SYSTEM-MARK-7f3", "USER-MARK-7f3", "ASSISTANT-MARK-7f3", "NEXT-MARK-7f3"


@dataclass(frozen=True)
class ChatParts:
    """The text the chat template puts around each kind of message, and its default system message."""

    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]  # assistant[0] is the generation prompt
    default_system: str | None

    def render(self, system: str | None, prompt: str) -> str:
        """One turn up to where the answer starts, as Ollama renders the Go template."""
        head = f"{self.system[0]}{system}{self.system[1]}" if system else ""
        return f"{head}{self.user[0]}{prompt}{self.user[1]}{self.assistant[0]}"

    def template(self) -> str:
        return (f"{{{{ if .System }}}}{self.system[0]}{{{{ .System }}}}{self.system[1]}{{{{ end }}}}"
                f"{{{{ if .Prompt }}}}{self.user[0]}{{{{ .Prompt }}}}{self.user[1]}{{{{ end }}}}"
                f"{self.assistant[0]}{{{{ .Response }}}}{self.assistant[1]}")


def _refuse(why: str) -> UserError:
    return UserError(f"the chat template cannot be written as an Ollama TEMPLATE: {why}", "--ollama",
                     fix="export without --ollama and write the Modelfile's TEMPLATE by hand")


def _cut(text: str, *marks: str) -> list[str]:
    """``text`` split at each of ``marks``, which must each appear once, in order."""
    pieces = []
    for mark in marks:
        if text.count(mark) != 1:
            raise _refuse("a message's content does not appear exactly once where the template renders it")
        head, text = text.split(mark)
        pieces.append(head)
    return pieces + [text]


def chat_parts(tokenizer) -> ChatParts:
    """Render the template on marker messages and cut it into the pieces around each message."""
    if not getattr(tokenizer, "chat_template", None):
        raise _refuse("the tokenizer has none")

    def render(messages: list[tuple[str, str]], generation: bool) -> str:
        try:
            return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                                 add_generation_prompt=generation)
        except Exception as exc:  # jinja2's own errors, raised by the template itself
            raise _refuse(f"it fails on a system, user and assistant turn ({type(exc).__name__}: {exc})") from None

    turns = [("system", SYSTEM), ("user", USER), ("assistant", ASSISTANT), ("user", NEXT)]
    sys_pre, between, after_user, after_answer, user_post = _cut(render(turns, False), SYSTEM, USER, ASSISTANT, NEXT)
    generated = _cut(render(turns[:2], True), SYSTEM, USER)[2]
    if not generated.startswith(user_post) or not after_user.startswith(user_post):
        raise _refuse("a user turn does not end the same way each time")
    gen_prompt = generated[len(user_post):]
    if after_user[len(user_post):] != gen_prompt:
        raise _refuse("an answer does not start with the generation prompt")
    closed = _cut(render(turns[:3], False), SYSTEM, USER, ASSISTANT)[3]  # what ends an answer
    if not after_answer.startswith(closed) or not between.endswith(after_answer[len(closed):]):
        raise _refuse("a user turn does not start the same way after a system message and after an answer")
    user_pre = after_answer[len(closed):]
    parts = ChatParts((sys_pre, between[:len(between) - len(user_pre)]), (user_pre, user_post), (gen_prompt, closed),
                      None)
    alone = _cut(render([("user", USER)], True), USER)[0]  # what the template puts first when there is no system
    if alone != user_pre:
        lead = alone[:len(alone) - len(user_pre)] if alone.endswith(user_pre) else None
        if lead is None or not (lead.startswith(parts.system[0]) and lead.endswith(parts.system[1])):
            raise _refuse("without a system message it renders something other than a default system message")
        parts = ChatParts(parts.system, parts.user, parts.assistant, lead[len(parts.system[0]):-len(parts.system[1])])
    for text in (*parts.system, *parts.user, *parts.assistant):
        if "{{" in text or '"""' in text:
            raise _refuse("its text holds {{ or \"\"\", which a Modelfile cannot quote")
    return parts


def stop_tokens(tokenizer, parts: ChatParts) -> list[str]:
    """The special tokens that end an answer: those the template puts after one, and the EOS token."""
    special = [t for t in tokenizer.all_special_tokens if t and t in parts.assistant[1]]
    eos = tokenizer.eos_token
    return list(dict.fromkeys(special + ([eos] if eos else [])))


def modelfile(tokenizer, model_from: str, adapter: str | None = None, system: str | None = None) -> str:
    """The Modelfile text. ``model_from``: the GGUF (or Ollama model) FROM names; ``adapter``: a GGUF
    LoRA adapter for ADAPTER; ``system``: the system message the run trained with (else the template's
    default, if it has one)."""
    parts = chat_parts(tokenizer)
    system = system if system is not None else parts.default_system
    for name, check in (("with", system), ("without", None)):
        jinja = tokenizer.apply_chat_template(([{"role": "system", "content": check}] if check else []) +
                                              [{"role": "user", "content": USER}], tokenize=False,
                                              add_generation_prompt=True)
        if parts.render(check or parts.default_system, USER) != jinja:
            raise _refuse(f"the pieces found do not render a turn {name} a system message as the template does")
    lines = ["# Written by tuneforge export. Create the model with: ollama create NAME -f Modelfile",
             f"FROM {model_from}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f'TEMPLATE """{parts.template()}"""')
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(tokenizer, parts)]
    if system:
        if '"""' in system:
            raise UserError('the system message holds """, which a Modelfile cannot quote', "--ollama")
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
