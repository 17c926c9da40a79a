"""Preference rows to token pairs, rendered and masked as supervised rows are.

TRL's forms: ``prompt``/``chosen``/``rejected`` all strings (raw text: the answer ends with EOS) or
all message lists (rendered with the chat template, or the plain layout without one); without
``prompt`` the prompt is implicit, the longest shared start of ``chosen`` and ``rejected`` (whole
messages for lists; characters for strings, a space before the first difference going with the
answers), as TRL's ``extract_prompt`` does. Each answer's labels say which of its tokens carry the
loss, by the same rules as ``instruct.py`` (tool results, weight-0 turns and masked reasoning never).

KTO's unpaired rows (TRL's form: ``prompt``, ``completion`` and a boolean ``label``, desirable or not)
are read as ``Unpaired`` examples; pairs become two of them (``unpaired``), as TRL's
``unpair_preference_dataset`` makes them. The objectives that train on them are in
``training/objectives/``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import torch

from tuneforge.data.chat import PROMPT_FIELD, Conversation, chat_messages, tools_of
from tuneforge.data.collate import IGNORE, Collator, Example
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
    reference: tuple[float, float] | None = None  # the reference model's log-probabilities, when computed ahead

    def __post_init__(self):
        if len(self.chosen_ids) != len(self.chosen_labels) or len(self.rejected_ids) != len(self.rejected_labels):
            raise ValueError("each answer needs one label per token")

    @property
    def length(self) -> int:
        """The longer of its two rows."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    def rows(self) -> list[Example]:
        """The prompt with each answer: [chosen, rejected], loss on the answers' labels."""
        ignored = [IGNORE] * len(self.prompt_ids)
        return [Example(self.prompt_ids + self.chosen_ids, ignored + self.chosen_labels, self.source),
                Example(self.prompt_ids + self.rejected_ids, ignored + self.rejected_labels, self.source)]


@dataclass(frozen=True)
class Unpaired:
    """One prompt and one answer, desirable or not (KTO); ``kl_ids`` is another example's answer put
    after this prompt, from which KTO estimates its KL term."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_labels: list[int]
    desirable: bool
    source: str = ""
    kl_ids: list[int] | None = None
    kl_labels: list[int] | None = None
    reference: tuple[float, float] | None = None  # the reference's log-probabilities: completion, KL row

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.completion_ids), len(self.kl_ids or []))

    def rows(self) -> list[Example]:
        """[the prompt with its answer, the prompt with the mismatched answer (once ``unpaired`` set it)]."""
        ignored = [IGNORE] * len(self.prompt_ids)
        answer = Example(self.prompt_ids + self.completion_ids, ignored + self.completion_labels, self.source)
        if self.kl_ids is None:
            return [answer]
        return [answer, Example(self.prompt_ids + self.kl_ids, ignored + self.kl_labels, self.source)]


def unpaired(examples: list, batch_size: int) -> list[Unpaired]:
    """KTO's examples, in blocks of ``batch_size`` that train as one batch. A pair gives a desirable and an
    undesirable example: a block holds its pairs' chosen answers, then their rejected ones, as TRL's
    ``unpair_preference_dataset`` orders them. Each example's KL answer is the one before it in its
    block (the block's last for the first), as TRL pairs them: every answer of a batch also serves a
    prompt that is not its own (with at least two pairs to a batch: ``train.batch_size`` 4 or more)."""
    out, first, second = [], [], []

    def close() -> None:
        block = first + second
        out.extend(dataclasses.replace(e, kl_ids=block[i - 1].completion_ids, kl_labels=block[i - 1].completion_labels)
                   for i, e in enumerate(block))
        first.clear(), second.clear()

    for e in examples:
        if isinstance(e, PreferencePair):
            first.append(Unpaired(e.prompt_ids, e.chosen_ids, e.chosen_labels, True, e.source))
            second.append(Unpaired(e.prompt_ids, e.rejected_ids, e.rejected_labels, False, e.source))
        else:
            first.append(e)
        if len(first) + len(second) >= batch_size:
            close()
    if first:
        close()
    return out


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
    head, head_weights = chat_messages(prompt, PROMPT_FIELD, row.where, cfg.roles) if prompt else ([], [])
    tail, tail_weights = chat_messages(answer, key, row.where, cfg.roles)
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


def preference_examples(rows: list[Row], tokenizer, cfg) -> tuple[list, Counter, int]:
    """(pairs and unpaired examples, dropped (a count by reason), truncated) for ``data.format: preference``."""
    return tally(pair_of(row, tokenizer, cfg) for row in rows)


def pair_of(row: Row, tokenizer, cfg) -> tuple[PreferencePair | Unpaired | None, bool]:
    """One row's pair (or KTO's unpaired example) and whether it was truncated (None: it does not fit,
    or has no answer)."""
    if "completion" in row and "label" in row and "chosen" not in row:
        return unpaired_of(row, tokenizer, cfg)
    prompt, chosen, rejected = row_parts(row)
    prompt_ids, chosen_pieces = answer_split(row, prompt, chosen, "chosen", tokenizer, cfg)
    rejected_prompt, rejected_pieces = answer_split(row, prompt, rejected, "rejected", tokenizer, cfg)
    if rejected_prompt != prompt_ids:
        raise UserError("the chat template renders the prompt differently before the chosen and the rejected "
                        "answer", row.where, fix="set data.chat_template: false")
    return to_pair(prompt_ids, chosen_pieces, rejected_pieces, cfg.max_length, cfg.train_on_prompt, row.where)


def unpaired_of(row: Row, tokenizer, cfg) -> tuple[Unpaired | None, bool]:
    """A KTO row (prompt, completion, label) as an example and whether it was truncated."""
    label = row["label"]
    if not isinstance(label, bool):
        raise UserError(f"'label' must be true (a desirable completion) or false, not {label!r}", row.where,
                        fix="write the label as true or false")
    prompt, completion = row.get(PROMPT_FIELD), field(row, "completion")
    if type(prompt) is not type(completion) or not isinstance(prompt, (str, list)):
        raise UserError("'prompt' and 'completion' must both be strings or both message lists", row.where,
                        fix="write both as text, or both as [{\"role\": ..., \"content\": ...}] lists")
    prompt_ids, pieces = answer_split(row, prompt, completion, "completion", tokenizer, cfg)
    pair, truncated = to_pair(prompt_ids, pieces, pieces, cfg.max_length, cfg.train_on_prompt, row.where)
    if pair is None:
        return None, truncated
    return Unpaired(pair.prompt_ids, pair.chosen_ids, pair.chosen_labels, label, row.where), truncated


class RowsCollator:
    """A batch of pairs (or KTO's examples): the first row of every example, then the second (chosen
    then rejected; the answer then the KL row), padded as ``Collator`` pads them. ``reference`` holds the
    reference's log-probabilities in the same order when every example carries them; ``desirable``
    KTO's labels."""

    def __init__(self, pad_id: int):
        self.collate = Collator(pad_id)

    def __call__(self, examples: list) -> dict:
        rows = [e.rows() for e in examples]
        batch = self.collate([r[j] for j in range(2) for r in rows])
        if all(e.reference is not None for e in examples):
            batch["reference"] = torch.tensor([e.reference[j] for j in range(2) for e in examples],
                                              dtype=torch.float32)
        if isinstance(examples[0], Unpaired):
            batch["desirable"] = torch.tensor([e.desirable for e in examples])
        return batch
