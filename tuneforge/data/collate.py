"""Examples to batches: the Example row, right padding into tensors, length-grouped batch order, and
examples packed several to a row (each attending only to itself)."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

IGNORE = -100  # the label value cross-entropy skips (torch's and transformers' ignore_index)


@dataclass(frozen=True)
class Example:
    """One supervised or language-modelling training row."""

    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE where no loss
    source: str = ""  # where it came from ("file:line"), for messages about it

    def __post_init__(self):
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} input ids but {len(self.labels)} labels")

    def rows(self) -> list[Example]:
        """The batch rows it makes: itself (a preference pair makes two)."""
        return [self]


@dataclass(frozen=True)
class Collator:
    """list[Example] -> {input_ids, attention_mask, labels}, each (batch, longest), right-padded.

    ``pad_id`` is the tokenizer's pad token (its EOS when it has none); padded positions have
    attention_mask 0 and label IGNORE, so the pad value itself never matters to the loss.
    """

    pad_id: int
    pad_to_multiple_of: int = 1  # round the width up (tensor cores like multiples of 8)

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        longest = max(len(e.input_ids) for e in examples)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)  # (batch, width)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (batch, width)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (batch, width)
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
            labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           group_batches: int = 50) -> list[list[int]]:
    """Batches of indices into ``lengths``: every index once, similar lengths together.

    A seeded shuffle, then windows of ``group_batches`` batches each sorted by length, cut into
    batches, and the batch order shuffled: little padding, yet no fixed short-to-long curriculum.
    The batch holding the longest example goes first, so running out of memory happens at step 1
    rather than hours in. The same (seed, epoch) always gives the same batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group_batches
    batches = []
    for start in range(0, len(order), window):
        group = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def best_fit_rows(lengths: list[int], capacity: int, order: list[int] | None = None) -> list[list[int]]:
    """Indices into ``lengths`` packed into rows of at most ``capacity`` tokens, by best-fit decreasing:
    longest first (ties in ``order``), each into the row it leaves least room in, else a new row.

    Rows come in the order they were opened, each with its indices in the order they went in; so an
    opener never fits in an earlier row, and cutting the concatenation of any rows taken in that order
    with ``next_fit_rows`` gives back exactly those rows (``PackingCollator`` relies on it). A length
    over ``capacity`` gets a row of its own.
    """
    order = list(range(len(lengths))) if order is None else order
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: rows that can still take something
    for i in sorted(order, key=lambda i: -lengths[i]):  # stable: ties keep ``order``
        at = bisect.bisect_left(room, (lengths[i], -1))  # the fullest row with room for it
        if at == len(room):
            rows.append([])
            free, row = capacity, len(rows) - 1
        else:
            free, row = room.pop(at)
        rows[row].append(i)
        free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, row))
    return rows


def next_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Positions 0..len(lengths)-1 cut, in order, into rows of at most ``capacity`` tokens: a new row
    whenever the next length does not fit in the current one (a length over ``capacity`` alone)."""
    rows: list[list[int]] = []
    used = capacity
    for i, n in enumerate(lengths):
        if used + n > capacity and (not rows or rows[-1]):
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def packed_batches(lengths: list[int], capacity: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of indices into ``lengths`` for ``PackingCollator(capacity)``: every index once, each
    batch the examples of ``batch_size`` rows of at most ``capacity`` tokens, row after row.

    A seeded shuffle breaks ties in length, best-fit decreasing packs the rows, and the rows go into
    batches as ``length_grouped_batches`` deals examples (similar fill together, the fullest batch first,
    the order shuffled), each batch's rows in the order they were opened, so that the collator's cut
    finds them again. The same (seed, epoch) always gives the same batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows = best_fit_rows(lengths, capacity, order)
    fill = [sum(lengths[i] for i in row) for row in rows]
    groups = length_grouped_batches(fill, batch_size, seed, epoch)
    return [[i for r in sorted(group) for i in rows[r]] for group in groups]


def padded_positions(lengths: list[int], batches: list[list[int]], capacity: int | None = None) -> tuple[int, int]:
    """(padding positions, rows) that ``batches`` make: each batch's rows times its longest row, less
    the tokens. ``capacity`` set: the rows ``PackingCollator(capacity)`` cuts; else one per example."""
    pad, n_rows = 0, 0
    for batch in batches:
        sizes = [lengths[i] for i in batch]
        rows = next_fit_rows(sizes, capacity) if capacity else [[k] for k in range(len(sizes))]
        widths = [sum(sizes[k] for k in row) for row in rows]
        pad += len(rows) * max(widths, default=0) - sum(widths)
        n_rows += len(rows)
    return pad, n_rows


@dataclass(frozen=True)
class PackingCollator:
    """list[Example] -> {input_ids, attention_mask, position_ids, labels}, each (rows, longest row): the
    examples laid end to end, in the order given, into rows of at most ``max_length`` tokens (a new row
    whenever the next one does not fit: ``packed_batches`` orders them so that these are its rows).

    No example sees another: each one's position ids restart at 0, and from where they restart the model
    masks attention to each example's own causal block (``eval.lm`` passes them without a padding mask:
    transformers' packed-sequence path). Each example's first label is IGNORE, since in a row it would be
    predicted by the previous example's last token; alone it is never predicted either (position t
    predicts label t + 1), so the loss has the same terms as unpacked. A row's padding holds positions 0..
    of its own, a block no example attends to; attention_mask is 1 on the examples' tokens (for counting).
    """

    pad_id: int
    max_length: int
    pad_to_multiple_of: int = 1

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        rows = next_fit_rows([len(e.input_ids) for e in examples], self.max_length)
        lengths = [sum(len(examples[k].input_ids) for k in row) for row in rows]
        width = -(-max(lengths) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (rows, width)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (rows, width)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (rows, width)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (rows, width)
        for r, row in enumerate(rows):
            start = 0
            for k in row:
                example, n = examples[k], len(examples[k].input_ids)
                input_ids[r, start:start + n] = torch.tensor(example.input_ids, dtype=torch.long)
                labels[r, start + 1:start + n] = torch.tensor(example.labels[1:], dtype=torch.long)
                position_ids[r, start:start + n] = torch.arange(n)
                start += n
            attention_mask[r, :start] = 1
            position_ids[r, start:] = torch.arange(width - start)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "labels": labels}
