"""An Ollama Modelfile beside an exported GGUF: FROM, the chat template as Ollama's TEMPLATE, PARAMETER
stop for the end-of-turn tokens, and SYSTEM.

Ollama's templates are Go templates, the tokenizer's are Jinja, and there is no general translation.
What is translated is what a chat needs: the text the Jinja template puts around a system message,
a user message and an assistant message, found by rendering it with marker contents and cutting at
the markers. The Go template is Ollama's plain form (``.System``, ``.Prompt``, ``.Response``), which
Ollama renders once per turn (a user message and its answer), with ``.System`` set only for the turn
after a system message (the first), cutting the turn being answered after ``.Response``. A system
message is said in one of three shapes:

- a turn of its own (ChatML of Qwen2/Qwen3 and SmolLM, Llama 3, Phi-3, OLMo 2):
  ``{{ if .System }}...{{ end }}`` before the user turn;
- folded into the first user turn (Gemma 3's ``content + "\\n\\n"``, Llama 2's ``<<SYS>>``, Mistral's
  ``[INST]``): the same block inside the user turn, before ``.Prompt``;
- not at all, where the template raises on a system message (Gemma 1 and 2): the TEMPLATE has no
  ``.System``, and a system message to write is refused.

A default system message the template writes when given none (Qwen2, SmolLM2) becomes SYSTEM.

BOS: a template that begins a conversation with the BOS token (``{{ bos_token }}``: Llama, Mistral,
Gemma, OLMo 2) has it left out of the TEMPLATE. A per-turn template cannot write text once, and
llama.cpp, so Ollama, puts BOS before the prompt itself where the GGUF's tokenizer.ggml.add_bos_token
says so (the export sets it from the tokenizer): the TEMPLATE holding it too would give the model two.
Where the tokenizer does not add BOS (OLMo 2), the Modelfile says in a comment that its prompts start
without one. A BOS the template writes before every later user turn (Llama 2) stays, at the end of
the answer before it.

Everything is checked before anything is written, by rendering the Go template as Ollama does (one
turn and two, with and without a system message) against the Jinja template: a template the pieces
cannot reproduce (one that puts the system message in the last user turn, say) is refused in one line.

A tokenizer with no chat template (a base model: StarCoder2, Gemma 3 270M) gets a Modelfile without
TEMPLATE: Ollama's default, ``{{ .Prompt }}``, sends the prompt as written, which is how such a model
was trained. It has no SYSTEM either (that default does not read one); a comment names the question a
run trained with, for the prompt to carry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tuneforge.core.errors import UserError
from tuneforge.data.instruct import RENDER_SECONDS, time_limit

SYSTEM, USER, ASSISTANT, NEXT = "SYSTEM-MARK-7f3", "USER-MARK-7f3", "ASSISTANT-MARK-7f3", "NEXT-MARK-7f3"
BOS = "BOS-MARK-7f3"  # passed as bos_token, to tell the template's {{ bos_token }} from text that merely equals it
RESPONSE = "{{ .Response }}"


@dataclass(frozen=True)
class ChatParts:
    """The text the chat template puts around each kind of message, and its default system message."""

    system: tuple[str, str] | None  # around a system message; None: the template takes none
    user: tuple[str, str]  # around a user message; user[1] runs up to where the answer starts
    answer: tuple[str, str]  # before a written answer beyond the generation prompt (Llama 2's space); what ends it
    default_system: str | None = None
    folded: bool = False  # the system message sits inside the first user turn, after user[0]
    bos: str = ""  # the BOS text the template begins a conversation with, left out of the TEMPLATE

    def template(self) -> str:
        system = f"{{{{ if .System }}}}{self.system[0]}{{{{ .System }}}}{self.system[1]}{{{{ end }}}}" \
            if self.system else ""
        head = f"{self.user[0]}{system}" if self.folded else f"{system}{self.user[0]}"
        # Only a history turn has a .Response: the turn being answered ends with the generation prompt.
        lead = f"{{{{ if .Response }}}}{self.answer[0]}{{{{ end }}}}" if self.answer[0] else ""
        return f"{head}{{{{ .Prompt }}}}{self.user[1]}{lead}{RESPONSE}{self.answer[1]}"


def _go(template: str, values: dict[str, str]) -> str:
    """The forms ChatParts.template writes ({{ if .X }}...{{ end }}, unnested, and {{ .X }}), rendered."""
    text = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", lambda m: m[2] if values.get(m[1]) else "", template,
                  flags=re.S)
    return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values.get(m[1], ""), text)


def render_turns(template: str, messages: list[tuple[str, str]]) -> str:
    """``messages`` ((role, content), ending with a user message) rendered with a ChatParts template as
    Ollama renders its plain form: once per turn, ``.System`` set only for the turn after a system
    message, the last turn cut after ``.Response``."""
    turns, values = [], {"System": "", "Prompt": "", "Response": ""}
    for role, content in messages:
        if (role == "system" and (values["Prompt"] or values["Response"])) or (role == "user" and values["Response"]):
            turns.append(_go(template, values))
            values = dict.fromkeys(values, "")
        values[{"system": "System", "user": "Prompt", "assistant": "Response"}[role]] = content
    return "".join(turns) + _go(template[:template.index(RESPONSE) + len(RESPONSE)], values)


def _refuse(why: str) -> UserError:
    return UserError(f"the chat template cannot be written as an Ollama TEMPLATE: {why}", "--ollama",
                     fix="export without --ollama and write the Modelfile's TEMPLATE by hand")


class _Failed(Exception):
    """The Jinja template raised (its own raise_exception, or an error in it)."""


def _cut(text: str, *marks: str) -> list[str]:
    """``text`` split at each of ``marks``, which must each appear once, in order."""
    pieces = []
    for mark in marks:
        if text.count(mark) != 1:
            raise _refuse("it does not write each message once, in the order given (it moves the system message "
                          "into a later turn, say)")
        head, text = text.split(mark)
        pieces.append(head)
    return pieces + [text]


def added_ends(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS before a text and EOS after it, seen by encoding a word with and
    without its special tokens (what its post-processor does); the GGUF export writes them as
    add_bos_token and add_eos_token."""
    ids, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    added = len(ids) > len(plain)
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    return added and bos is not None and ids[0] == bos, added and eos is not None and ids[-1] == eos


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS before a text (the runtime then adds it to a Modelfile's prompt)."""
    return added_ends(tokenizer)[0]


def _jinja(tokenizer, messages: list[tuple[str, str]], generation: bool = True, **kwargs) -> str:
    try:
        with time_limit(RENDER_SECONDS):  # a template that loops is refused as a failed render
            return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                                 add_generation_prompt=generation, **kwargs)
    except Exception as exc:  # jinja2's own errors, and those the template raises itself
        raise _Failed(" ".join(f"{type(exc).__name__}: {exc}".split())) from None


def chat_parts(tokenizer) -> ChatParts:
    """Render the template on marker messages, cut it into the pieces around each message, and check
    that the Go template made of them renders as the Jinja one does."""
    if not getattr(tokenizer, "chat_template", None):
        raise _refuse("the tokenizer has none")
    bos, bos_added, left_out = tokenizer.bos_token or "", adds_bos(tokenizer), []

    def render(messages: list[tuple[str, str]], generation: bool = True) -> str:
        text = _jinja(tokenizer, messages, generation, bos_token=BOS)
        # The BOS a conversation begins with is left out of the TEMPLATE: llama.cpp (so Ollama) adds it
        # itself where the GGUF's add_bos_token says so, and the per-turn template cannot write it once.
        # Text that merely equals the BOS token (SmolLM2's BOS is <|im_start|>) is left out only where the
        # runtime adds that token. A BOS before a later turn (Llama 2) is kept as the text it is.
        lead = BOS if text.startswith(BOS) else bos if bos and bos_added and text.startswith(bos) else ""
        if lead:
            left_out.append(bos)
        return text[len(lead):].replace(BOS, bos)

    turns = [("system", SYSTEM), ("user", USER), ("assistant", ASSISTANT), ("user", NEXT)]
    try:
        user_pre, prompt_end = _cut(render(turns[1:2]), USER)
        try:
            pieces = _cut(render(turns), SYSTEM, USER, ASSISTANT, NEXT)
            before_system, between, after_user, after_answer, after_next = pieces
            takes_system = True
        except _Failed:  # a template with no system role raises on one (Gemma 2)
            before_system = between = ""
            _, after_user, after_answer, after_next = _cut(render(turns[1:]), USER, ASSISTANT, NEXT)
            takes_system = False
        if after_next != prompt_end:
            raise _refuse("a user turn does not end the same way each time")
        if not after_user.startswith(prompt_end):
            raise _refuse("an answer does not start with the generation prompt")
        default = None
        if takes_system and len(user_pre) > len(before_system) + len(between) and \
                user_pre.startswith(before_system) and user_pre.endswith(between):
            # Without a system message it writes one of its own (Qwen2, SmolLM2): the user turn starts after
            # what ends an answer.
            default = user_pre[len(before_system):len(user_pre) - len(between)]
            closed = _cut(render(turns[:3], False), SYSTEM, USER, ASSISTANT)[3]
            if not after_answer.startswith(closed):
                raise _refuse("an answer does not end the same way each time")
            user_pre = after_answer[len(closed):]
    except _Failed as exc:
        raise _refuse(f"it fails on a user turn, or on a user, assistant and user turn ({exc})") from None
    if not after_answer.endswith(user_pre):
        raise _refuse("a user turn does not start the same way first and after an answer")
    system, folded = None, False
    if takes_system:
        if between.endswith(user_pre):
            system = (before_system, between[:len(between) - len(user_pre)])
        elif before_system.startswith(user_pre):
            system, folded = (before_system[len(user_pre):], between), True
        else:
            raise _refuse("a system message is neither a turn of its own nor inside the first user turn")
    parts = ChatParts(system, (user_pre, prompt_end), (after_user[len(prompt_end):],
                                                       after_answer[:len(after_answer) - len(user_pre)]),
                      default, folded, bos if left_out else "")
    for text in (*(system or ()), *parts.user, *parts.answer):
        if "{{" in text or '"""' in text:
            raise _refuse("its text holds {{ or \"\"\", which a Modelfile cannot quote")
    check(tokenizer, parts, SYSTEM if takes_system else None)
    return parts


def check(tokenizer, parts: ChatParts, system: str | None, written: str | None = None) -> None:
    """The Go template, rendered as Ollama does (one turn and two, with ``system``, or ``written`` for it
    in the Modelfile, and without one, where Ollama then uses the default system message), against the
    Jinja template; a difference refuses."""
    template = parts.template()
    for head in ([("system", system)] if system else []), []:
        for turns in [("user", USER)], [("user", USER), ("assistant", ASSISTANT), ("user", NEXT)]:
            try:
                jinja = _jinja(tokenizer, head + turns)
            except _Failed as exc:
                raise _refuse(f"it fails on a conversation ({exc})") from None
            if not jinja.startswith(parts.bos):
                raise _refuse("it does not begin each conversation the same way")
            said = [("system", system if written is None else written)] if head else \
                [("system", parts.default_system)] if parts.default_system else []
            if render_turns(template, said + turns) != jinja[len(parts.bos):]:
                raise _refuse(f"the pieces found do not render {'two turns' if len(turns) > 1 else 'a turn'} "
                              f"{'with' if head else 'without'} a system message as the template does")


def stop_tokens(tokenizer, parts: ChatParts | None) -> list[str]:
    """The special tokens that end an answer: those the template puts after one (a BOS there starts the
    next turn), and the EOS token."""
    special = set(tokenizer.all_special_ids) | {i for i, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or
                                                                 {}).items() if getattr(tok, "special", False)}
    ids = tokenizer(parts.answer[1], add_special_tokens=False)["input_ids"] if parts and parts.answer[1] else []
    ends = [tokenizer.convert_ids_to_tokens(i) for i in ids if i in special and i != tokenizer.bos_token_id]
    eos = tokenizer.eos_token
    return list(dict.fromkeys(ends + ([eos] if eos else [])))


def modelfile(tokenizer, model_from: str, adapter: str | None = None, system: str | None = None) -> str:
    """The Modelfile text. ``model_from``: the GGUF (or Ollama model) FROM names; ``adapter``: a GGUF
    LoRA adapter for ADAPTER; ``system``: the system message the run trained with (else the template's
    default, if it has one)."""
    lines = ["# Written by tuneforge export. Create the model with: ollama create NAME -f Modelfile",
             f"FROM {model_from}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if not getattr(tokenizer, "chat_template", None):
        lines.append("# No TEMPLATE: the tokenizer has no chat template, so Ollama sends each prompt as written.")
        if system:
            lines += ["# The run trained with this question before each text; a prompt carries it itself:"]
            lines += [f"#   {line}" for line in system.splitlines()]
        lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(tokenizer, None)]
        return "\n".join(lines) + "\n"
    parts = chat_parts(tokenizer)
    system = system if system is not None else parts.default_system
    if system and parts.system is None:
        raise UserError("the chat template takes no system message, and the run trained with one", "--ollama",
                        fix="export without --ollama and write the Modelfile by hand")
    if system:
        try:
            check(tokenizer, parts, system)
        except UserError:
            if system.strip() == system:
                raise
            # A template that trims messages (Llama 3) gave the model the system message without them.
            check(tokenizer, parts, system, written=system.strip())
            system = system.strip()
    if parts.bos and not adds_bos(tokenizer):
        lines.append(f"# The chat template begins a conversation with {parts.bos}, which a per-turn TEMPLATE cannot "
                     "write once, and this tokenizer does not add it: Ollama's prompts start without it.")
    lines.append(f'TEMPLATE """{parts.template()}"""')
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(tokenizer, parts)]
    if system:
        if '"""' in system:
            raise UserError('the system message holds """, which a Modelfile cannot quote', "--ollama")
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
