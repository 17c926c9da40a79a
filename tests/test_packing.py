"""Packing (data.packing): examples several to a row, each attending only to itself.

The packed batch must be the examples run one by one: the same loss and the same gradients, on tiny
models of families whose attention differs (llama; qwen2 and gemma2 with a 16-token sliding window,
gemma2 also through its own head for its softcap; gpt2 with learned positions). Where a model cannot
keep the examples of a row apart, the run refuses packing before it trains.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import yaml

from conftest import REPO
from families import tiny_model
from tuneforge import cli
from tuneforge.data import IGNORE, Collator, Example
from tuneforge.data.collate import PackingCollator, best_fit_rows, next_fit_rows, packed_batches, padded_positions
from tuneforge.core.errors import UserError
from tuneforge.eval.lm import label_loss
from tuneforge.training.loop import shuffled_batches
from tuneforge.training.run import check_packing

VOCAB = 300
LENGTHS = (21, 9, 30, 14, 25, 11, 4, 17)  # longer than the 16-token windows; 48 tokens to a row: 3 rows


def examples(lengths=LENGTHS, seed=0) -> list[Example]:
    """Random examples, the loss on the second half of each (the "answer")."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2:], f"row {len(out)}"))
    return out


def packed(rows: list[Example], width: int = 48) -> dict:
    order = [i for row in best_fit_rows([len(e.input_ids) for e in rows], width) for i in row]
    return PackingCollator(0, width)([rows[i] for i in order])


def loss_and_grads(model, batches, packed_rows: bool) -> tuple[float, dict]:
    """The loop's step: every micro-batch's summed loss over the step's loss tokens, one backward each."""
    model.zero_grad(set_to_none=True)
    n_loss = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total = 0.0
    for b in batches:
        loss_sum, _ = label_loss(model, b["input_ids"], b["attention_mask"], b["labels"],
                                 position_ids=b["position_ids"] if packed_rows else None)
        (loss_sum / n_loss).backward()
        total += loss_sum.item() / n_loss
    return total, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2"])
def test_a_packed_batch_has_the_loss_and_gradients_of_its_examples_one_by_one(family):
    model = tiny_model(family, VOCAB)
    rows = examples()
    batch = packed(rows)
    assert batch["input_ids"].shape == (3, 47) and batch["attention_mask"].sum() == sum(LENGTHS)
    packed_loss, packed_grads = loss_and_grads(model, [batch], packed_rows=True)
    alone_loss, alone_grads = loss_and_grads(model, [Collator(0)([e]) for e in rows], packed_rows=False)
    assert packed_loss == pytest.approx(alone_loss, abs=1e-5)
    assert packed_grads.keys() == alone_grads.keys() and len(packed_grads) > 5
    worst = max((packed_grads[k] - alone_grads[k]).abs().max().item() for k in packed_grads)
    assert worst < 1e-5, f"{family}: gradients differ by {worst:.2e}"
    check_packing(model, "full")  # the run's own probe agrees


def test_position_ids_restart_and_no_label_crosses_an_example():
    rows = [Example([5, 6, 7], [IGNORE, 6, 7]), Example([8, 9], [8, 9]), Example([10, 11, 12, 13], [10, 11, 12, 13])]
    batch = PackingCollator(pad_id=1, max_length=6)(rows)  # 3 + 2 tokens, then 4 (as wide as the longest row)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]  # padding: a block of its own
    # the label of example 2's first token would be predicted by example 1's last: never
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9], [IGNORE, 11, 12, 13, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # the same loss terms as unpacked: position t predicts label t + 1
    unpacked = Collator(1)(rows)["labels"]
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) == int((unpacked[:, 1:] != IGNORE).sum()) == 6


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_no_attention_crosses_the_examples_of_a_row(family):
    model = tiny_model(family, VOCAB)
    rows = examples((20, 20))
    changed = [Example([3] * 20, rows[0].labels), rows[1]]
    with torch.no_grad():
        def logits(rs, restart=True):
            b = PackingCollator(0, 40)(rs)
            positions = b["position_ids"] if restart else torch.arange(40)[None]
            return model(input_ids=b["input_ids"], position_ids=positions, use_cache=False).logits[0]

        first, second = logits(rows), logits(changed)
        assert (first[:20] - second[:20]).abs().max() > 1e-2  # example 1 did change
        assert (first[20:] - second[20:]).abs().max() < 1e-5  # example 2 did not see it
        # the control: one causal sequence, and example 2 does see example 1
        assert (logits(rows, restart=False)[20:] - logits(changed, restart=False)[20:]).abs().max() > 1e-2


def test_models_that_cannot_keep_examples_apart_are_refused():
    with pytest.raises(UserError, match="data.packing"):
        check_packing(tiny_model("opt", VOCAB), "full")  # its learned positions come from the padding mask
    from tuneforge.methods.registry import get_method

    model = tiny_model("llama", VOCAB)
    prompt = get_method("prompt")
    prompt.inject(model, prompt.Config(num_virtual_tokens=4))
    with pytest.raises(UserError, match="virtual tokens"):  # only the row's first example would follow them
        check_packing(model, "prompt")


def test_packed_batches_cover_each_example_once_in_rows_the_collator_finds_again():
    rng = random.Random(0)
    lengths = [rng.randint(3, 256) for _ in range(700)] + [300]  # one over the row: a row of its own
    batches = packed_batches(lengths, 256, 4, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches == packed_batches(lengths, 256, 4, seed=0, epoch=0)
    assert batches != packed_batches(lengths, 256, 4, seed=0, epoch=1)
    for b in batches:
        rows = next_fit_rows([lengths[i] for i in b], 256)
        assert len(rows) == 4 or b is batches[-1]
        assert all(sum(lengths[b[k]] for k in row) <= 256 or len(row) == 1 for row in rows)
    def fullest_row(batch):
        return max(sum(lengths[batch[k]] for k in row) for row in next_fit_rows([lengths[i] for i in batch], 256))

    assert fullest_row(batches[0]) == max(map(fullest_row, batches))  # the widest batch first: out of memory at once
    padding, rows = padded_positions(lengths, batches, 256)
    assert rows < len(lengths) * 0.6 and sum(lengths) > 0.95 * rows * 256  # rows of about 2 examples, 97% full
    shuffled, _ = padded_positions(lengths, shuffled_batches(len(lengths), 4, 0)(0))
    assert padding < shuffled / 10


def test_the_loop_takes_the_same_step_packed_or_one_batch_padded(tmp_path):
    """One step over all examples: packed rows (the loop passes the position ids) and padded rows give
    the same loss, tokens and loss tokens."""
    from tuneforge.core.config import TrainCfg
    from tuneforge.methods import full
    from tuneforge.training.loop import train

    rows, results = examples(), []
    n = len(rows)
    for name, collate, order in (("packed", PackingCollator(0, 48), packed_batches([len(e.input_ids) for e in rows],
                                                                                    48, n, 0, 0)),
                                 ("padded", Collator(0), [list(range(n))])):
        model = tiny_model("qwen2", VOCAB)
        params = full.inject(model, full.Config()).trainable(model)
        cfg = TrainCfg(batch_size=n, max_steps=1, learning_rate=1e-3, device="cpu")
        results.append(train(model, params, rows, collate, cfg, tmp_path / name, batch_order=lambda e, o=order: o,
                             progress=False))
    packed_run, padded_run = results
    assert packed_run.final_loss == pytest.approx(padded_run.final_loss, abs=1e-5)
    assert (packed_run.tokens, packed_run.loss_tokens) == (padded_run.tokens, padded_run.loss_tokens) == (
        sum(LENGTHS), sum(n - n // 2 - (n // 2 == 0) for n in LENGTHS))
    assert packed_run.shared_prefix_tokens == 0


def test_a_run_with_packing_on_instruction_data(tmp_path, tiny_dir, capsys):
    data = tmp_path / "seed_tasks.jsonl"
    shutil.copy(REPO / "data" / "instructions" / "self_instruct_seed_tasks.jsonl", data)
    cfg = {"model": str(tiny_dir), "method": {"name": "lora", "r": 4, "target_modules": "all-linear"},
           "data": {"path": str(data), "format": "instruction", "max_length": 256, "max_examples": 24,
                    "max_eval_examples": 8, "packing": True},
           "train": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "batch_size": 2, "learning_rate": 3e-3,
                     "logging_steps": 1, "device": "cpu"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(path)]) == 0
    err = capsys.readouterr().err
    assert "tuneforge: packing: 24 examples in" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    report = summary["packing"]
    assert report["examples"] == 24 and report["rows"] < 24 and report["padding_packed"] < report["padding_unpacked"]
    assert summary["steps"] == 4 and summary["shared_prefix_tokens"] == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)
