"""Hostile files and data (docs/reliability.md): adapter configs, GGUF files, chat templates, target
patterns and data rows made to hang, to allocate without end, or to train on the wrong thing. Each is
refused in one line naming the file, row or key, within seconds."""

from __future__ import annotations

import json
import re
import struct
import time

import pytest
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model
from test_reliability import config, one_line, trained_adapter
from test_run import sentiment_rows, write_jsonl
from tuneforge import cli
from tuneforge.core.config import DataCfg
from tuneforge.core.errors import UserError
from tuneforge.data import instruct, load_datasets
from tuneforge.data.readers import Row
from tuneforge.io import load
from tuneforge.io.peft_format import load_adapter
from tuneforge.model import targets


# -- adapters ----------------------------------------------------------------------------------------

def edit_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("key,value,said", [("lora_alpha", float("nan"), "lora_alpha is nan"),
                                            ("lora_alpha", 1e30, "lora_alpha=1e+30 here, but the weights file "
                                                                 "records lora_alpha=16"),
                                            ("peft_type", "BOGUS", "peft_type='BOGUS' here"),
                                            ("method", "ia3", "the weights file records method 'lora'")])
def test_a_nonfinite_planted_or_unknown_adapter_setting_is_refused(tmp_path, key, value, said):
    trained_adapter(tmp_path)
    edit_config(tmp_path / "a", **{key: value})
    with pytest.raises(UserError, match="adapter_config.json: key") as caught:
        load_adapter(make_tiny_model(259), tmp_path / "a")
    assert said in str(caught.value) and f"key '{key}'" in str(caught.value)


def test_an_adapter_config_that_does_not_fit_its_weights_is_refused_before_allocating(tmp_path):
    """A PEFT-made file (no tuneforge record to compare with) whose r is 10^8: LoRA's A alone would
    take 25.6 GB on the 64-wide model."""
    trained_adapter(tmp_path)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})  # as PEFT writes it
    edit_config(tmp_path / "a", r=10 ** 8)
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"key 'r'.*\(r=100000000\) makes .*lora_A.weight of shape \(100000000, 64\), "
                                        r"but the weights file holds \(4, 64\)"):
        load_adapter(make_tiny_model(259), tmp_path / "a")
    assert time.perf_counter() - start < 10


# -- target patterns ---------------------------------------------------------------------------------

def test_a_backtracking_target_modules_regex_is_stopped_in_one_line(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(targets, "MATCH_SECONDS", 0.2)
    model = make_tiny_model(259)
    assert len(targets.find(model, r".*\.(q|v)_proj")) == 4  # a plain expression matches as PEFT's re.fullmatch
    cfg = config(tmp_path, tiny_dir, method={"target_modules": r"(.*?){20}\d{5}"})  # hours in Python's re
    start = time.perf_counter()
    assert cli.main(["train", str(cfg)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "target_modules" in line and "did not finish matching" in line and time.perf_counter() - start < 30


# -- data rows ---------------------------------------------------------------------------------------

def classification(tmp_path, rows: list[dict], **cfg) -> DataCfg:
    return DataCfg(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), format="classification", max_length=256, **cfg)


@pytest.mark.parametrize("spellings", [("positive", "Positive"), (1, 1.0), (1, True)])
def test_one_label_written_two_ways_is_refused_naming_both_rows(tmp_path, tiny_tokenizer, spellings):
    rows = [{"text": f"review {i}", "label": "negative" if i % 2 else spellings[0]} for i in range(40)]
    rows[7]["label"] = rows[9]["label"] = spellings[1]  # two rows: not caught as a stray label
    cfg = classification(tmp_path, rows)
    with pytest.raises(UserError, match=r"d\.jsonl:8: label .* here and label .* \(.*d\.jsonl:1, 20 rows\) are one "
                                        r"label written two ways"):
        load_datasets(cfg, tiny_tokenizer)
    if isinstance(spellings[0], str):  # two classes on purpose: the verbalizer lists both
        verbalizer = {"negative": "no", spellings[0]: "yes", spellings[1]: "also"}
        assert load_datasets(classification(tmp_path, rows, verbalizer=verbalizer), tiny_tokenizer).train


@pytest.mark.parametrize("text,said", [(None, "field 'text' is null"), (["a", "b"], "field 'text' is a list"),
                                       (5, "field 'text' is a number (5), not text")])
def test_a_text_that_is_not_a_string_is_refused_at_its_row(tmp_path, tiny_tokenizer, text, said):
    rows = sentiment_rows(24)
    rows[5]["text"] = text
    with pytest.raises(UserError, match=rf"d\.jsonl:6: {re.escape(said)}"):
        load_datasets(classification(tmp_path, rows), tiny_tokenizer)
    alpaca = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Add.", "output": "2"}, {"instruction": "Add.",
                                                                                        "output": ["2"]}])
    with pytest.raises(UserError, match=r"i\.jsonl:2: field 'output' is a list, not text"):
        load_datasets(DataCfg(path=str(alpaca), eval_path=str(alpaca), format="instruction"), tiny_tokenizer)


def test_held_out_examples_that_are_also_training_examples_are_dropped_and_counted(tmp_path, tiny_tokenizer):
    """Every row three times: a plain split would hold out rows it also trains on (the same text under
    another label leaks as well)."""
    rows = [dict(row) for row in sentiment_rows(20) for _ in range(3)]
    rows[1]["label"] = "negative" if rows[0]["label"] == "positive" else "positive"
    data = load_datasets(classification(tmp_path, rows, val_fraction=0.25), tiny_tokenizer)
    trained = {tuple(item.prompt_ids) for item in data.train_items}
    assert not [item for item in data.eval_items if tuple(item.prompt_ids) in trained]
    report = data.report["eval"]
    assert report.rows == 30 and report.dropped_why["also a training example"] == report.rows - report.examples > 0
    assert "also a training example" in report.line()


# -- GGUF files ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    """A complete GGUF file of the tiny llama."""
    from test_export import bpe_tokenizer
    from tuneforge.io import gguf_export

    tokenizer = bpe_tokenizer()
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    gguf_export.write_model(make_tiny_model(len(tokenizer)), tokenizer, out)
    return out.read_bytes()


def with_u32(data: bytes, key: str, value: int) -> bytes:
    """``data`` with the UINT32 value of ``key`` replaced."""
    at = data.index(key.encode()) + len(key)
    return data[:at + 4] + struct.pack("<I", value) + data[at + 8:]


def with_dims(data: bytes, name: str, dims: list[int]) -> bytes:
    """``data`` with tensor ``name``'s dimensions replaced (as many as it had)."""
    at = data.index(name.encode()) + len(name)
    n = struct.unpack("<I", data[at:at + 4])[0]
    return data[:at + 4] + b"".join(struct.pack("<Q", d) for d in dims) + data[at + 4 + 8 * n:]


def with_array_length(data: bytes, key: str, length: int) -> bytes:
    at = data.index(key.encode()) + len(key) + 8  # the value type (ARRAY), then the item type
    return data[:at] + struct.pack("<Q", length) + data[at + 8:]


def refused_gguf(tmp_path, data: bytes, capsys, monkeypatch) -> str:
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    start = time.perf_counter()
    assert cli.main(["generate", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(path) in line and time.perf_counter() - start < 30 and not list(tmp_path.glob("cache/models/m-*"))
    return line


def test_a_gguf_claiming_more_blocks_than_it_holds_is_refused_at_once(tmp_path, gguf_bytes, capsys, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "intact.gguf").write_bytes(gguf_bytes)
    load.load_model(str(tmp_path / "intact.gguf"))  # the intact file passes every check
    line = refused_gguf(tmp_path, with_u32(gguf_bytes, "llama.block_count", 100_000), capsys, monkeypatch)
    assert "claims 100,000 blocks (llama.block_count), and it holds the tensors of 2" in line


@pytest.mark.parametrize("damage,said", [
    (lambda d: d[:200], "the file has"),
    (lambda d: with_array_length(d, "tokenizer.ggml.tokens", 10 ** 12), "the array tokenizer.ggml.tokens of "
                                                                         "1,000,000,000,000 items needs"),
    (lambda d: with_dims(d, "token_embd.weight", [64, 100_000]), "lie outside the file's"),
    (lambda d: with_u32(d, "llama.embedding_length", 1024), "llama.embedding_length = 1,024, and "
                                                              "token_embd.weight's width are 64"),
    (lambda d: with_u32(d, "llama.feed_forward_length", 160), "llama.feed_forward_length = 160"),
    (lambda d: with_u32(d, "llama.attention.head_count_kv", 4), "the tensor for model.layers.0.self_attn.k_proj"),
])
def test_a_malformed_gguf_is_one_line_naming_the_file(tmp_path, gguf_bytes, capsys, monkeypatch, damage, said):
    assert said in refused_gguf(tmp_path, damage(gguf_bytes), capsys, monkeypatch)


# -- chat templates -----------------------------------------------------------------------------------

def with_template(tmp_path, tiny_dir, template: str):
    """The tiny model's folder with ``template`` as its chat template."""
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    tokenizer_config = folder / "tokenizer_config.json"
    if (folder / "chat_template.jinja").is_file():
        (folder / "chat_template.jinja").write_text(template)
        return folder, folder / "chat_template.jinja"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "chat_template": template}))
    return folder, tokenizer_config


def test_a_chat_template_that_loops_without_end_is_stopped_in_one_line(tmp_path, tiny_dir, tiny_tokenizer, capsys,
                                                                       monkeypatch):
    monkeypatch.setattr(instruct, "RENDER_SECONDS", 0.5)
    loops = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    folder, source = with_template(tmp_path, tiny_dir, loops)
    start = time.perf_counter()
    assert cli.main(["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"the chat template in {source} did not finish rendering in 0.5 s" in line
    # A template that loops only over long conversations passes that check, and is stopped at the row.
    tiny_tokenizer.chat_template = ("{% for m in messages %}{% for a in m.content %}{% for b in m.content %}"
                                    "{% for c in m.content %}{% endfor %}{% endfor %}{% endfor %}{{ m.content }}"
                                    "{% endfor %}")
    instruct.check_template(tiny_tokenizer, "template")
    rows = [Row({"instruction": "x" * 2000, "output": "y"}, "d.jsonl:3")]
    with pytest.raises(UserError, match="d.jsonl:3: the chat template did not finish rendering"):
        instruct.supervised_examples(rows, tiny_tokenizer, DataCfg(path="d.jsonl", format="instruction"))
    assert time.perf_counter() - start < 30


def test_a_chat_template_reaching_past_the_sandbox_is_one_line(tmp_path, tiny_dir, capsys):
    folder, source = with_template(tmp_path, tiny_dir, "{{ messages.__class__.__mro__ }}")
    assert cli.main(["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"the chat template in {source} reaches past jinja's sandbox" in line
