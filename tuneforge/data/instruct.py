"""Supervised rows (instructions, chats, completions) to examples whose loss is on what users mean.

Every row becomes one or more conversations (``chat.py`` reads each published form), rendered with
the tokenizer's chat template or, without one, a plain "### Instruction / ### Response" layout. The
loss goes on each answer (an assistant turn, tool calls included, and its end-of-turn token) so
the model learns to answer and to stop; never on tool results, on turns of weight 0, or (with
``mask_reasoning``) on <think>...</think> spans. With ``train_on_turns: last`` only the last answer
is trained; with ``train_on_prompt`` everything but the never-trained pieces is.

The prompt/answer boundary comes from the template itself: the conversation up to a turn, rendered
with the generation prompt, must be a prefix of the conversation including that turn; the text in
between is the answer. Each piece is tokenized on its own, exactly as generation will see it: the
prompt's tokens first, then whatever the model produces.

A chat template is code from the model's folder. jinja's sandbox keeps it from Python's internals
(reaching past it is a SecurityError, refused naming the template's file), but not from looping:
every render here runs within ``RENDER_SECONDS``, and a template that runs longer is stopped and
refused (``apply_template``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from jinja2.exceptions import SecurityError

from tuneforge.data.chat import PROMPT_FIELD, Conversation, conversations, form, prompt_completion
from tuneforge.data.collate import IGNORE, Example
from tuneforge.data.readers import Row, field, text_field
from tuneforge.data.text import eos_id
from tuneforge.core.errors import UserError

# What a piece's tokens do for the loss. False and True (what classify.py passes) read as PROMPT and ANSWER.
PROMPT, ANSWER, NEVER = 0, 1, 2  # trained only with train_on_prompt / always / never
Pieces = list[tuple[list[int], int]]  # (token ids, loss kind) in order
REASONING = re.compile(r"<think>.*?</think>", re.DOTALL)
# Why an example is dropped (counted by reason in the data report)
TOO_LONG = "its last answer does not fit in max_length"
NO_ANSWER = "no answer carries loss (no assistant turn, or only turns of weight 0)"


def uses_template(tokenizer, chat_template: bool) -> bool:
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def tokens(tokenizer, text: str) -> list[int]:
    # No BOS/EOS added here: a chat template writes its own special tokens into the text.
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def special_ids(tokenizer) -> set[int]:
    """Every special token id, including template tokens such as <|im_end|> or <|eot_id|>."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, tok in added.items() if getattr(tok, "special", False)}


RENDER_SECONDS = 10.0  # a chat template renders in milliseconds; nested loops over the messages can take hours


class RenderTimeout(Exception):
    """Raised inside a render that ran past its time limit."""


class _Watchdog:
    """One daemon thread that sends RenderTimeout into each thread whose render passed its deadline. A
    trace function could stop a loop too, but it slows every render threefold; this costs a lock."""

    def __init__(self):
        self.cond = threading.Condition()
        self.deadlines: dict[int, float] = {}  # thread id -> when the render that thread is in must stop
        self.fired: set[int] = set()  # threads a RenderTimeout was sent to
        self.thread: threading.Thread | None = None
        self.idle = True  # waiting for no deadline: a new one must wake it

    def run(self) -> None:
        with self.cond:
            while True:
                now = time.monotonic()
                for ident, deadline in self.deadlines.items():
                    if deadline <= now and ident not in self.fired:
                        self.fired.add(ident)
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                                   ctypes.py_object(RenderTimeout))
                waiting = [d for ident, d in self.deadlines.items() if ident not in self.fired]
                self.idle = not waiting
                self.cond.wait(min(waiting) - now if waiting else None)

    @contextlib.contextmanager
    def limit(self, seconds: float) -> Iterator[None]:
        """Raise RenderTimeout in the block once it has run ``seconds`` (when it next runs Python code)."""
        ident = threading.get_ident()
        with self.cond:
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="tuneforge-render-limit", daemon=True)
                self.thread.start()
            self.fired.discard(ident)
            self.deadlines[ident] = time.monotonic() + seconds
            if self.idle:
                self.cond.notify()
        try:
            yield
        finally:
            with self.cond:
                self.deadlines.pop(ident, None)
                fired = ident in self.fired
                self.fired.discard(ident)
                if fired:  # an exception sent but not yet raised must not surface after the block
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)
            if fired:
                raise RenderTimeout


_watchdog = _Watchdog()
os.register_at_fork(after_in_child=_watchdog.__init__)  # a forked child has no watchdog thread, maybe a held lock
time_limit = _watchdog.limit


def template_source(tokenizer) -> str:
    """The file of the folder the tokenizer came from that holds its chat template ("" if none)."""
    folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
    return next((str(folder / name) for name in ("chat_template.jinja", "tokenizer_config.json")
                 if (folder / name).is_file()), "")


def apply_template(tokenizer, messages: list[dict], generation_prompt: bool = False, tools: list | None = None,
                   where: str | None = None, source: str | None = None) -> str:
    """The chat template applied to ``messages``, within RENDER_SECONDS. A template that runs longer or
    reaches past jinja's sandbox is a UserError naming its file (``source``) and ``where``; its own
    errors (roles must alternate, ...) propagate for the caller to word."""
    try:
        with time_limit(RENDER_SECONDS):
            return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
    except RenderTimeout:
        what = f"did not finish rendering in {RENDER_SECONDS:g} s (it loops too long)"
        fix = "fix or replace the template, or set data.chat_template: false"
    except SecurityError as exc:
        what, fix = f"reaches past jinja's sandbox ({exc})", "replace the template with one that only formats messages"
    source = source or template_source(tokenizer)
    raise UserError(f"the chat template{f' in {source}' if source else ''} {what}", where, fix=fix)


def check_template(tokenizer, source: str | None = None) -> None:
    """Render the chat template once as the tokenizer loads: a template that loops without end or
    reaches past the sandbox is refused then, naming its file (``source``), whatever command uses it."""
    if not getattr(tokenizer, "chat_template", None):
        return
    try:
        apply_template(tokenizer, [{"role": "user", "content": "Hello"}], True, source=source)
    except UserError:
        raise
    except Exception:  # a template's own refusals (a system turn it needs, ...) concern conversations, not it
        return


def render(tokenizer, messages: list[dict], generation_prompt: bool, where: str, tools: list | None = None) -> str:
    try:
        return apply_template(tokenizer, messages, generation_prompt, tools, where)
    except UserError:
        raise
    except Exception as exc:  # a template raises its own errors (roles must alternate, ...)
        raise UserError(f"the chat template cannot render this conversation: {exc}", where,
                        fix="check the roles and their order, or set data.chat_template: false") from None


def split_end_of_turn(ids: list[int], specials: set[int], kind: int = ANSWER) -> Pieces:
    """An assistant turn's tokens as (answer up to and including the last special token, the rest).

    What follows the end-of-turn token (a template's newline) is layout, not something to learn.
    """
    ends = [i for i, t in enumerate(ids) if t in specials]
    cut = ends[-1] + 1 if ends else len(ids)
    return [(ids[:cut], kind), (ids[cut:], PROMPT)]


def turn_losses(conv: Conversation, train_on_turns: str) -> list[int]:
    """Per message: ANSWER for the assistant turns that are trained, NEVER for weight-0 ones, else PROMPT."""
    answers = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant" and i >= conv.start]
    out = []
    for i, message in enumerate(conv.messages):
        if message["role"] == "assistant" and conv.weights[i] == 0:
            out.append(NEVER)
        elif i in answers and (train_on_turns == "all" or i == answers[-1]):
            out.append(ANSWER)
        else:
            out.append(PROMPT)
    return out


def answer_pieces(tokenizer, text: str, kind: int, mask_reasoning: bool, opened: bool = False) -> Pieces:
    """An assistant turn's text, its reasoning spans (tags included) NEVER when masked; ``opened``: the
    prompt before it ends inside a <think> (a template whose generation prompt opens one).

    The text is split at the span edges and each piece tokenized on its own, so the boundary is
    exact whatever the tokenizer merges (offsets would leave a token straddling an edge to guess).
    """
    if not mask_reasoning:
        return [(tokens(tokenizer, text), kind)]
    pieces, at = [], 0
    if opened and "</think>" in text:  # the generation prompt opened <think>: the answer starts inside it
        at = text.index("</think>") + len("</think>")
        pieces.append((tokens(tokenizer, text[:at]), NEVER))
    for span in REASONING.finditer(text, at):
        pieces += [(tokens(tokenizer, text[at:span.start()]), kind), (tokens(tokenizer, span.group()), NEVER)]
        at = span.end()
    return pieces + [(tokens(tokenizer, text[at:]), kind)]


def template_pieces(tokenizer, conv: Conversation, losses: list[int], mask_reasoning: bool,
                    where: str) -> tuple[Pieces, int]:
    """(pieces, how many come before the first answer at or after ``conv.start``)."""
    messages, tools = conv.messages, conv.tools
    check_tools_render(tokenizer, conv, where)
    full = render(tokenizer, messages, False, where, tools)
    specials, pieces, cursor, cut = special_ids(tokenizer), [], 0, None
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:turn], True, where, tools)
        upto = render(tokenizer, messages[:turn + 1], False, where, tools)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise UserError("the chat template renders earlier turns differently once later turns follow, so the "
                            "answer cannot be located", where, fix="set data.chat_template: false")
        pieces += prompt_pieces(tokenizer, conv, full, cursor, len(prompt), turn, where)
        if cut is None and turn >= conv.start:
            cut = len(pieces)
        opened = prompt.rfind("<think>") > prompt.rfind("</think>")
        answer = answer_pieces(tokenizer, upto[len(prompt):], losses[turn], mask_reasoning, opened)
        pieces += answer[:-1] + split_end_of_turn(answer[-1][0], specials, answer[-1][1])
        cursor = len(upto)
    pieces += prompt_pieces(tokenizer, conv, full, cursor, len(full), len(messages), where)
    return pieces, len(pieces) if cut is None else cut


def prompt_pieces(tokenizer, conv: Conversation, full: str, cursor: int, end: int, before: int, where: str) -> Pieces:
    """The prompt text ``full[cursor:end]``, each tool result in it (of the messages before ``before``) a
    piece of its own that is never trained, not even with train_on_prompt: a result is the tool's
    words, not the model's."""
    pieces = []
    for k, message in enumerate(conv.messages[:before]):
        if message["role"] != "tool":
            continue
        stop = render(tokenizer, conv.messages[:k + 1], False, where, conv.tools)
        if len(stop) <= cursor:
            continue  # an earlier answer's prompt held it
        head = render(tokenizer, conv.messages[:k], False, where, conv.tools)
        if not (full.startswith(head) and full.startswith(stop) and cursor <= len(head) and len(stop) <= end):
            raise UserError("the chat template renders a tool result differently once later turns follow, so it "
                            "cannot be kept out of the loss", where, fix="set data.chat_template: false")
        pieces += [(tokens(tokenizer, full[cursor:len(head)]), PROMPT),
                   (tokens(tokenizer, full[len(head):len(stop)]), NEVER)]
        cursor = len(stop)
    return pieces + [(tokens(tokenizer, full[cursor:end]), PROMPT)]


def check_tools_render(tokenizer, conv: Conversation, where: str) -> None:
    """Refuse a template that leaves a tool call, a tool result or the tools out of the text (it renders
    the conversation as if they were not there) or cannot render them: nothing is dropped silently."""
    fix = "use a model whose chat template supports tools, or set data.chat_template: false (tool calls as JSON text)"
    messages, tools = conv.messages, conv.tools
    for turn, message in enumerate(messages):
        if message.get("tool_calls"):
            calls = message["tool_calls"]
            # Without its last call: a template that renders only some of a turn's calls shows no change
            bare = {**message, "tool_calls": calls[:-1]} if len(calls) > 1 else \
                {k: v for k, v in message.items() if k != "tool_calls"}
            what = f"the tool call to {calls[-1]['function']['name']}"
        elif message["role"] == "tool":
            bare, what = None, "a tool result"
        else:
            continue
        try:
            shown = apply_template(tokenizer, messages[:turn + 1], tools=tools, where=where)
            hidden = apply_template(tokenizer, messages[:turn] + ([bare] if bare else []), tools=tools, where=where)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"the chat template cannot render {what}: {exc}", where, fix=fix) from None
        if shown == hidden:
            raise UserError(f"the chat template leaves out {what}", where, fix=fix)
    if tools and render(tokenizer, messages, False, where, tools) == render(tokenizer, messages, False, where):
        raise UserError("the chat template leaves out the row's 'tools'", where, fix=fix)


def plain_text(message: dict) -> str:
    """An assistant turn in the plain layout: its content, then each tool call as a JSON line."""
    calls = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
             for c in message.get("tool_calls") or []]
    return "\n".join(([message["content"]] if message["content"] else []) + calls)


def plain_pieces(tokenizer, conv: Conversation, losses: list[int], mask_reasoning: bool) -> tuple[Pieces, int]:
    """The Alpaca-style layout, for tokenizers without a chat template: each answer ends with EOS."""
    pieces, cut, context = [], None, ""
    if conv.tools:
        context = "### Tools:\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in conv.tools) + "\n\n"
    for turn, (message, loss) in enumerate(zip(conv.messages, losses)):
        role, content = message["role"], message["content"]
        if role == "assistant":
            pieces.append((tokens(tokenizer, context + "### Response:\n"), PROMPT))
            if cut is None and turn >= conv.start:
                cut = len(pieces)
            pieces += answer_pieces(tokenizer, plain_text(message), loss, mask_reasoning)
            pieces.append(([eos_id(tokenizer)], loss))
            context = "\n\n"
        elif role == "system":
            context += f"{content}\n\n"
        elif role == "tool":  # never trained (see prompt_pieces)
            result = f"### Tool result:\n{content}\n\n"
            pieces += [(tokens(tokenizer, context), PROMPT), (tokens(tokenizer, result), NEVER)]
            context = ""
        else:
            context += f"### Instruction:\n{content}\n\n"
    if context.strip():  # trailing turns with no answer after them
        pieces.append((tokens(tokenizer, context), PROMPT))
    return pieces, len(pieces) if cut is None else cut


def conversation_pieces(tokenizer, conv: Conversation, cfg, where: str) -> tuple[Pieces, int]:
    """(pieces, how many of them come before the first answer at or after ``conv.start``)."""
    losses = turn_losses(conv, cfg.train_on_turns)
    if uses_template(tokenizer, cfg.chat_template):
        return template_pieces(tokenizer, conv, losses, cfg.mask_reasoning, where)
    return plain_pieces(tokenizer, conv, losses, cfg.mask_reasoning)


def labels_of(pieces: Pieces, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """(ids, labels): a token is labelled when it is an answer, or a prompt token under train_on_prompt."""
    ids = [t for piece, _ in pieces for t in piece]
    labels = [t if kind == ANSWER or (train_on_prompt and kind == PROMPT) else IGNORE
              for piece, kind in pieces for t in piece]
    return ids, labels


def to_example(pieces: Pieces, max_length: int, train_on_prompt: bool, source: str = "") -> tuple[Example | None, bool]:
    """(the example, whether it was truncated); None when it has no answer or its last answer
    does not fit in ``max_length``. A long prompt is cut from the left so the answer survives."""
    ids, labels = labels_of(pieces, train_on_prompt)
    answer = [kind == ANSWER for piece, kind in pieces for _ in piece]
    if not any(answer):
        return None, False
    truncated = len(ids) > max_length
    if truncated:
        end = max(i for i, a in enumerate(answer) if a) + 1  # nothing after the last answer is learned
        start = end - 1
        while start > 0 and answer[start - 1]:
            start -= 1
        if end - start > max_length:
            return None, True
        ids, labels = ids[:end][-max_length:], labels[:end][-max_length:]
    return Example(ids, labels, source), truncated


def completion_pieces(tokenizer, prompt: str, completion: str) -> Pieces:
    """A raw prompt then its completion and EOS; the loss is on the completion and EOS."""
    return [(tokens(tokenizer, prompt), PROMPT), (tokens(tokenizer, completion) + [eos_id(tokenizer)], ANSWER)]


def row_pieces(row: Row, tokenizer, cfg) -> list[Pieces]:
    """Each example of one row, as pieces."""
    if cfg.format == "completion":
        column = cfg.prompt_column if cfg.prompt_column in row or cfg.text_column not in row else cfg.text_column
        names = column, cfg.completion_column
    elif form(row) == "prompt_completion":
        names = PROMPT_FIELD, "completion"
    else:
        return [conversation_pieces(tokenizer, conv, cfg, row.where)[0] for conv in conversations(row, cfg.roles)]
    prompt, completion = field(row, names[0]), field(row, names[1])
    if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational prompt/completion
        return [conversation_pieces(tokenizer, prompt_completion(row, prompt, completion), cfg, row.where)[0]]
    return [completion_pieces(tokenizer, text_field(row, names[0]), text_field(row, names[1]))]


def supervised_examples(rows: list[Row], tokenizer, cfg) -> tuple[list[Example], Counter, int]:
    """(examples, dropped (a count by reason), truncated) for the instruction and completion formats."""
    return tally(to_example(pieces, cfg.max_length, cfg.train_on_prompt, row.where)
                 for row in rows for pieces in row_pieces(row, tokenizer, cfg))


def tally(built: Iterable[tuple[Any, bool]]) -> tuple[list, Counter, int]:
    """(what was kept, the dropped by reason, how many kept were truncated) of (example or None,
    whether it was truncated) pairs, as ``to_example`` gives them."""
    kept, dropped, truncated = [], Counter(), 0
    for item, was_truncated in built:
        if item is None:
            dropped[TOO_LONG if was_truncated else NO_ANSWER] += 1
        else:
            kept.append(item)
            truncated += was_truncated
    return kept, dropped, truncated
