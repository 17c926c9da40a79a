"""Examples to batches: the Example row, right padding into tensors, and length-grouped batch order."""

from __future__ import annotations

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
