"""What a run will learn from its data, before it trains: ``tuneforge data CONFIG``.

It builds the examples exactly as training does (``load_datasets``) and prints, for each split, the
counts (rows, examples, tokens, trained tokens, truncated, dropped and why) and then whole examples as the
model sees them, with the tokens that carry loss marked. A user should not have to guess what the
model learns.
"""

from __future__ import annotations

from tuneforge.data import IGNORE, Datasets, Example

# Around the trained spans: ANSI bold green on a terminal, else brackets that chat text rarely holds.
MARKS = {True: ("\033[1;32m", "\033[0m"), False: ("⟦", "⟧")}


def spans(example: Example) -> list[tuple[list[int], bool]]:
    """The example's tokens as runs of (ids, carries loss)."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return runs


def marked(example: Example, tokenizer, color: bool = False) -> str:
    """The example's text, each run decoded on its own, with the trained runs between the marks."""
    start, end = MARKS[color]
    return "".join(f"{start}{text}{end}" if trained else text
                   for ids, trained in spans(example)
                   for text in [tokenizer.decode(ids, skip_special_tokens=False)])


def describe(data: Datasets, tokenizer, count: int = 1, split: str = "train", color: bool = False) -> str:
    """Both splits' counts, then ``count`` examples of ``split`` with their trained tokens marked."""
    start, end = MARKS[color]
    lines = [f"{name}: {report.line()}" for name, report in data.report.items()]
    examples = data.train if split == "train" else data.eval
    if not examples:
        return "\n".join(lines + [f"the {split} split has no examples"]) + "\n"
    how = f"are {start}marked{end}" if color else f"are between {start} and {end}"
    shown = min(count, len(examples))
    lines.append(f"\n{shown} of {len(examples)} {split} examples; the tokens that carry loss {how}:")
    for example in examples[:count]:
        for row in example.rows():  # a preference pair shows its chosen row, then its rejected one
            trained = sum(label != IGNORE for label in row.labels)
            lines += [f"\n--- {row.source or 'example'} ({len(row.input_ids)} tokens, {trained} trained)",
                      marked(row, tokenizer, color)]
    return "\n".join(lines) + "\n"
