"""Preference rows (prompt, chosen, rejected) to token pairs, rendered and masked as supervised rows are.

TRL's forms: ``prompt``/``chosen``/``rejected`` all strings (raw text: the answer ends with EOS) or
all message lists (rendered with the chat template, or the plain layout without one); without
``prompt`` the prompt is implicit, the longest shared start of ``chosen`` and ``rejected`` (whole
messages for lists; characters for strings, a space before the first difference going with the
answers), as TRL's ``extract_prompt`` does. Each answer's labels say which of its tokens carry the
loss, by the same rules as ``instruct.py`` (tool results, weight-0 turns and masked reasoning never).
Only reading is here; no method trains on pairs yet.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tuneforge.data.chat import PROMPT_FIELD, Conversation, chat_messages, tools_of
from tuneforge.data.instruct import ANSWER, Pieces, conversation_pieces, labels_of, tally, tokens
from tuneforge.data.readers import Row, field
from tuneforge.data.text import eos_id
from tuneforge.core.errors import UserError


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred and a dispreferred answer; an answer's ids follow the prompt's."""

    prompt_ids: list[int]  # the rendered prompt, up to where the answers start
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_labels: list[int]  # same length as chosen_ids; IGNORE where no loss
    rejected_labels: list[int]  # same length as rejected_ids
    source: str = ""  # "file:line"

    def __post_init__(self):
        if len(self.chosen_ids) != len(self.chosen_labels) or len(self.rejected_ids) != len(self.rejected_labels):
            raise ValueError("each answer needs one label per token")


def implicit_prompt(chosen, rejected) -> int:
    """How much of ``chosen`` and ``rejected`` (strings or message lists) is their shared prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1  # TRL's rule: the space before the first difference starts the answers
    return n


def row_parts(row: Row) -> tuple[object, object, object]:
    """(prompt, chosen, rejected): all strings or all message lists."""
    chosen, rejected = field(row, "chosen"), field(row, "rejected")
    if row.get(PROMPT_FIELD) is not None:
        prompt = row[PROMPT_FIELD]
    elif type(chosen) is type(rejected) and isinstance(chosen, (str, list)):
        n = implicit_prompt(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        prompt = None
    if not (all(isinstance(v, str) for v in (prompt, chosen, rejected))
            or all(isinstance(v, list) for v in (prompt, chosen, rejected))):
        raise UserError("'prompt', 'chosen' and 'rejected' must all be strings or all message lists", row.where,
                        fix="write them all as text, or all as [{\"role\": ..., \"content\": ...}] lists")
    return prompt, chosen, rejected


def answer_split(row: Row, prompt, answer, key: str, tokenizer, cfg) -> tuple[list[int], Pieces]:
    """(the prompt's tokens, the answer's pieces) for one of chosen/rejected."""
    if isinstance(answer, str):
        return tokens(tokenizer, prompt), [(tokens(tokenizer, answer) + [eos_id(tokenizer)], ANSWER)]
    if not answer or not isinstance(answer[0], dict) or answer[0].get("role") != "assistant":
        raise UserError(f"'{key}' must start with an assistant message after the prompt", row.where,
                        fix="give the answer as [{\"role\": \"assistant\", \"content\": ...}]")
    head, head_weights = chat_messages(prompt, PROMPT_FIELD, row.where) if prompt else ([], [])
    tail, tail_weights = chat_messages(answer, key, row.where)
    conv = Conversation(head + tail, head_weights + tail_weights, len(head), tools_of(row))
    pieces, cut = conversation_pieces(tokenizer, conv, cfg, row.where)
    return [t for piece, _ in pieces[:cut] for t in piece], pieces[cut:]


def has_answer(pieces: Pieces) -> bool:
    return any(kind == ANSWER and piece for piece, kind in pieces)


def to_pair(prompt_ids: list[int], chosen: Pieces, rejected: Pieces, max_length: int, train_on_prompt: bool,
            source: str) -> tuple[PreferencePair | None, bool]:
    """(the pair, whether it was truncated); None when an answer has no loss or the longer answer leaves
    no room for the prompt. A long prompt is cut from the left, so both answers stay whole."""
    if not (has_answer(chosen) and has_answer(rejected)):
        return None, False
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = (labels_of(chosen, train_on_prompt),
                                                                    labels_of(rejected, train_on_prompt))
    longest = max(len(chosen_ids), len(rejected_ids))
    truncated = len(prompt_ids) + longest > max_length
    if truncated:
        if longest >= max_length:
            return None, True
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - longest):]
    return PreferencePair(prompt_ids, chosen_ids, rejected_ids, chosen_labels, rejected_labels, source), truncated


def preference_examples(rows: list[Row], tokenizer, cfg) -> tuple[list[PreferencePair], Counter, int]:
    """(pairs, dropped (a count by reason), truncated) for ``data.format: preference``."""
    return tally(pair_of(row, tokenizer, cfg) for row in rows)


def pair_of(row: Row, tokenizer, cfg) -> tuple[PreferencePair | None, bool]:
    """One row's pair and whether it was truncated (None: it does not fit, or has no answer)."""
    prompt, chosen, rejected = row_parts(row)
    prompt_ids, chosen_pieces = answer_split(row, prompt, chosen, "chosen", tokenizer, cfg)
    rejected_prompt, rejected_pieces = answer_split(row, prompt, rejected, "rejected", tokenizer, cfg)
    if rejected_prompt != prompt_ids:
        raise UserError("the chat template renders the prompt differently before the chosen and the rejected "
                        "answer", row.where, fix="set data.chat_template: false")
    return to_pair(prompt_ids, chosen_pieces, rejected_pieces, cfg.max_length, cfg.train_on_prompt, row.where)
