"""Data loading: each format's loss masking, blocks, splits, labels, errors, collation, batch order."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import torch

from tuneforge.core.config import DataCfg
from tuneforge.data import (IGNORE, Collator, Example, answer_ids, classification_prompt, length_grouped_batches,
                            load_datasets, read_rows)
from tuneforge.data.classify import label_of
from tuneforge.core.errors import UserError

END = "<|im_end|>"  # the tiny tokenizer's end-of-turn token (and its EOS)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def loss_text(tok, example: Example) -> str:
    return tok.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


def loss_spans(tok, example: Example) -> list[str]:
    """The decoded runs of consecutive loss tokens, in order."""
    spans, run = [], []
    for t, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            run.append(t)
        elif run:
            spans, run = spans + [tok.decode(run)], []
    return spans + ([tok.decode(run)] if run else [])


def only(example_rows, tmp_path, tok, **cfg):
    """Load rows written to a JSONL file as a training set with one held-out row."""
    path = write_jsonl(tmp_path / "d.jsonl", example_rows)
    return load_datasets(DataCfg(path=str(path), eval_path=str(path), **cfg), tok)


# --- reading ---

def test_read_rows_formats(tmp_path):
    cfg = DataCfg()
    (tmp_path / "a.csv").write_text('text,label\n"a, quoted",pos\nplain,neg\n', encoding="utf-8")
    assert read_rows(tmp_path / "a.csv", cfg) == [{"text": "a, quoted", "label": "pos"},
                                                  {"text": "plain", "label": "neg"}]
    (tmp_path / "b.tsv").write_text('1\t2.5\t"quoted" start\n', encoding="utf-8")
    rows = read_rows(tmp_path / "b.tsv", DataCfg(columns=["id", "score", "text"]))
    assert rows == [{"id": "1", "score": "2.5", "text": '"quoted" start'}] and rows[0].where.endswith("b.tsv:1")
    (tmp_path / "c.txt").write_text("line one\n\nline two\n", encoding="utf-8")
    assert read_rows(tmp_path / "c.txt", cfg) == [{"text": "line one\n\nline two\n"}]
    (tmp_path / "d.json").write_text('[\n  {"text": "x"},\n  {"text": "y"}\n]\n', encoding="utf-8")
    assert [r.where.rsplit(":", 1)[1] for r in read_rows(tmp_path / "d.json", cfg)] == ["2", "3"]


# --- errors: each names the file and the line ---

def error_of(path, cfg=None, tok=None) -> str:
    with pytest.raises(UserError) as info:
        load_datasets(cfg or DataCfg(path=str(path), format="instruction"), tok)
    return str(info.value)


def test_bad_json_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n', encoding="utf-8")
    assert f"{path}:2" in error_of(path) and "bad JSON" in error_of(path)


def test_missing_field_names_field_line_and_fields_present(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "a", "output": "b"}] * 3 + [{"instruction": "a", "out": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    message = error_of(path, DataCfg(path=str(path), eval_path=str(path), format="instruction"), tiny_tokenizer)
    assert f"{path}:4" in message and "'output'" in message and "instruction, out" in message


def test_empty_and_missing_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n", encoding="utf-8")
    assert "empty" in error_of(tmp_path / "empty.jsonl") and "empty.jsonl" in error_of(tmp_path / "empty.jsonl")
    assert "no such data file" in error_of(tmp_path / "nope.jsonl")


def test_non_utf8_names_line_and_byte(tmp_path):
    path = tmp_path / "latin.tsv"
    path.write_bytes(b"1\t2.0\tfine\n2\t-2.0\tcaf\xe9\n")
    message = error_of(path, DataCfg(path=str(path), columns=["id", "label", "text"]))
    assert f"{path}:2" in message and "byte 21" in message  # 11 bytes of line 1, then "2\t-2.0\tcaf"


def test_csv_wrong_column_count_names_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nok,pos\ntoo,many,fields\n", encoding="utf-8")
    message = error_of(path, DataCfg(path=str(path), format="classification"))
    assert f"{path}:3" in message and "3 columns" in message


def test_label_outside_verbalizer_names_line_and_allowed(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "t", "label": "pos"}, {"text": "t", "label": "meh"}])
    cfg = DataCfg(path=str(path), eval_path=str(path), format="classification",
                  verbalizer={"neg": "bad", "pos": "good"})
    message = error_of(path, cfg, tiny_tokenizer)
    assert f"{path}:2" in message and "'meh'" in message and "neg, pos" in message


# --- text blocks ---

def test_text_blocks_are_full_and_labels_are_inputs(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "abcdefghij" * (i + 1)} for i in range(10)])
    data = load_datasets(DataCfg(path=str(path), format="text", max_length=16, val_fraction=0.2), tiny_tokenizer)
    assert data.train and data.eval
    assert all(len(e.input_ids) == 16 and e.labels == e.input_ids for e in data.train + data.eval)
    report = data.report["train"]
    assert report.rows == 8 and report.examples == len(data.train) and report.tokens == 16 * len(data.train)
    # 8 documents of 10*k bytes plus one EOS each, cut into blocks of 16: the partial tail is counted
    assert sum(e.input_ids.count(tiny_tokenizer.eos_token_id) for e in data.train) >= 7


def test_one_document_splits_by_block_deterministically(tmp_path, tiny_tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i} of the play\n" for i in range(200)), encoding="utf-8")
    cfg = DataCfg(path=str(path), format="text", max_length=32, val_fraction=0.1)
    a, b, c = (load_datasets(cfg, tiny_tokenizer, seed=s) for s in (0, 0, 1))
    blocks = lambda d: {tuple(e.input_ids) for e in d}  # noqa: E731
    assert a.train == b.train and a.eval == b.eval and a.eval != c.eval
    assert not blocks(a.train) & blocks(a.eval)
    stream_blocks = (len(tiny_tokenizer(path.read_text())["input_ids"]) + 1) // 32
    assert len(a.train) + len(a.eval) == stream_blocks and a.report["train"].dropped == 1
    assert a.report["train"].dropped_why == {"a partial last block": 1}


# --- instructions ---

def test_alpaca_loss_is_output_and_end_of_turn(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    data = only(rows, tmp_path, tiny_tokenizer, format="instruction")
    example = data.train[0]
    assert loss_text(tiny_tokenizer, example) == "5" + END
    assert "Add the numbers.\n\n2 and 3" in tiny_tokenizer.decode(example.input_ids)
    # the prompt is exactly what generation is given: the template with the generation prompt
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Add the numbers.\n\n2 and 3"}],
                                                tokenize=False, add_generation_prompt=True)
    assert tiny_tokenizer.decode(example.input_ids).startswith(prompt)


def test_plain_template_without_chat_template(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "Say hi.", "output": "hi"}]
    example = only(rows, tmp_path, tiny_tokenizer, format="instruction", chat_template=False).train[0]
    assert tiny_tokenizer.decode(example.input_ids) == "### Instruction:\nSay hi.\n\n### Response:\nhi" + END
    assert loss_text(tiny_tokenizer, example) == "hi" + END


def test_self_instruct_instances_expand(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "Double it.", "instances": [{"input": "1", "output": "2"}, {"input": "", "output": "4"}],
             "is_classification": False}]
    data = only(rows, tmp_path, tiny_tokenizer, format="instruction")
    assert [loss_text(tiny_tokenizer, e) for e in data.train] == ["2" + END, "4" + END]
    assert "Double it.<|im_end|>" in tiny_tokenizer.decode(data.train[1].input_ids)  # empty input: no "\n\n"
    assert data.report["train"].rows == 1 and data.report["train"].examples == 2


def test_chat_multi_turn_loss_on_every_assistant_turn(tmp_path, tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    example = only([{"messages": messages}], tmp_path, tiny_tokenizer, format="instruction").train[0]
    assert loss_spans(tiny_tokenizer, example) == ["Hello!" + END, "4" + END]
    assert tiny_tokenizer.decode(example.input_ids) == tiny_tokenizer.apply_chat_template(messages, tokenize=False)


def test_train_on_prompt_puts_loss_everywhere(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "Say hi.", "output": "hi"}]
    example = only(rows, tmp_path, tiny_tokenizer, format="instruction", train_on_prompt=True).train[0]
    assert example.labels == example.input_ids


def test_long_prompt_cut_from_left_and_long_answer_dropped(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "x" * 200, "output": "kept"}, {"instruction": "q", "output": "y" * 200}]
    data = only(rows, tmp_path, tiny_tokenizer, format="instruction", max_length=64)
    assert len(data.train) == 1 and len(data.train[0].input_ids) == 64
    assert loss_text(tiny_tokenizer, data.train[0]) == "kept" + END
    assert data.report["train"].truncated == 1 and data.report["train"].dropped == 1
    assert data.report["train"].dropped_why == {"its last answer does not fit in max_length": 1}


def test_completion_loss_on_completion_and_eos(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "The capital of France is", "completion": " Paris."}, {"text": "2+2=", "completion": "4"}]
    data = only(rows, tmp_path, tiny_tokenizer, format="completion")
    assert [loss_text(tiny_tokenizer, e) for e in data.train] == [" Paris." + END, "4" + END]
    assert tiny_tokenizer.decode(data.train[1].input_ids) == "2+2=4" + END


# --- splits and caps ---

def test_row_split_is_deterministic_disjoint_and_capped(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"task {i}", "output": str(i)} for i in range(40)])
    cfg = DataCfg(path=str(path), format="instruction", val_fraction=0.25)
    answers = lambda ds: [loss_text(tiny_tokenizer, e) for e in ds]  # noqa: E731
    a, b, c = (load_datasets(cfg, tiny_tokenizer, seed=s) for s in (3, 3, 4))
    assert answers(a.train) == answers(b.train) and answers(a.eval) == answers(b.eval)
    assert answers(a.eval) != answers(c.eval)
    assert len(a.eval) == 10 and not set(answers(a.train)) & set(answers(a.eval))
    assert len(set(answers(a.train)) | set(answers(a.eval))) == 40
    capped = load_datasets(DataCfg(path=str(path), format="instruction", max_examples=5, max_eval_examples=2),
                           tiny_tokenizer, seed=3)
    assert len(capped.train) == 5 and len(capped.eval) == 2 and capped.report["train"].examples == 5


# --- classification ---

def test_score_thresholds_cut_and_drop_the_middle(tmp_path, tiny_tokenizer):
    path = tmp_path / "s.tsv"
    scores = [-2.0, -1.0, -0.5, 0.0, 0.99, 1.0, 3.1]
    path.write_text("".join(f"{i}\t{s}\tText &amp; ''quote'' {i}\n" for i, s in enumerate(scores)), encoding="utf-8")
    cfg = DataCfg(path=str(path), eval_path=str(path), format="classification", columns=["id", "label", "text"],
                  score_thresholds=[-1.0, 1.0])
    data = load_datasets(cfg, tiny_tokenizer)
    assert data.label_words == ["negative", "positive"]
    assert sorted(item.label for item in data.train_items) == [0, 0, 1, 1]
    assert data.report["train"].dropped == 3 and data.report["train"].rows == 7
    assert "3 dropped (3 a score between the thresholds)" in data.report["train"].line()
    assert all('Text & "quote"' in item.text for item in data.train_items)
    for example, item in zip(data.train, data.train_items):
        word = data.label_words[item.label]
        assert loss_text(tiny_tokenizer, example) == word + END
        assert example.input_ids == item.prompt_ids + answer_ids(tiny_tokenizer, word)
        assert tiny_tokenizer.decode(item.prompt_ids).endswith("<|im_start|>assistant\n")
        assert "Is the sentiment of this text positive or negative?" in tiny_tokenizer.decode(item.prompt_ids)


def test_verbalizer_words_order_and_default_question(tmp_path, tiny_tokenizer):
    rows = [{"text": "a cat", "label": "b"}, {"text": "a car", "label": "a"}, {"text": "a dog", "label": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataCfg(path=str(path), eval_path=str(path), format="classification",
                  verbalizer={"b": "animal", "a": "vehicle"})
    data = load_datasets(cfg, tiny_tokenizer)
    assert data.label_words == ["vehicle", "animal"]  # sorted label names: a=0, b=1
    assert sorted(i.label for i in data.train_items) == [0, 1, 1]
    assert {loss_text(tiny_tokenizer, e) for e in data.train} == {"animal" + END, "vehicle" + END}
    prompt = tiny_tokenizer.decode(data.train_items[0].prompt_ids)
    assert "Classify the text. Answer with one word: vehicle or animal." in prompt


def test_classification_text_is_cut_to_fit_and_question_kept(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "long " * 100, "label": "x"}, {"text": "short", "label": "y"}])
    data = load_datasets(DataCfg(path=str(path), eval_path=str(path), format="classification", max_length=128),
                         tiny_tokenizer)
    assert all(len(e.input_ids) <= 128 for e in data.train) and data.report["train"].truncated == 1
    assert all("Classify the text" in tiny_tokenizer.decode(i.prompt_ids) for i in data.train_items)


def test_prompt_helpers_without_template(tiny_tokenizer):
    ids = classification_prompt(tiny_tokenizer, "fine", None, ["negative", "positive"], chat_template=False)
    assert tiny_tokenizer.decode(ids).endswith("Text: fine\nAnswer:")
    assert tiny_tokenizer.decode(answer_ids(tiny_tokenizer, "positive", chat_template=False)) == " positive" + END


def test_shared_sentiment_binary_cut(data_dir):
    cfg = DataCfg(columns=["id", "score", "text"], label_column="score", score_thresholds=[-1.0, 1.0])
    rows = read_rows(data_dir / "sentiment" / "movie_review_snippets.tsv", cfg)
    counts = Counter(label_of(row, cfg, ["negative", "positive"]) for row in rows)
    assert len(rows) == 10605 and counts == {1: 4598, 0: 4575, None: 1432}


# --- batching ---

def test_collator_right_pads():
    batch = Collator(pad_id=7)([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert batch["input_ids"].dtype == torch.long
    assert Collator(pad_id=0, pad_to_multiple_of=8)([Example([1], [1])])["input_ids"].shape == (1, 8)


def test_length_grouped_batches_cover_once_and_are_deterministic():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    batches = length_grouped_batches(lengths, 8, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == length_grouped_batches(lengths, 8, seed=0, epoch=0)
    assert batches != length_grouped_batches(lengths, 8, seed=0, epoch=1)
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the largest batch first
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches of 8 would spread about 80


def test_the_render_limit_leaves_no_exception_behind():
    """A block that ends as its time limit passes raises nothing later: an exception the watchdog sent
    but the thread had not yet raised is withdrawn. A block past its limit is stopped."""
    from tuneforge.data import instruct

    for _ in range(200):
        try:
            with instruct.time_limit(0.001):
                sum(range(20_000))
        except instruct.RenderTimeout:
            pass
        time.sleep(0.002)  # where a late exception would surface
    with pytest.raises(instruct.RenderTimeout):
        with instruct.time_limit(0.05):
            while True:
                pass
