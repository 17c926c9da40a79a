"""Data files beyond text: Parquet, Arrow IPC and `datasets` folders read into rows; binary files
refused in one line; plain text and tables caught in the wrong format; mixtures of sources by weight."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tuneforge import cli
from tuneforge.core.config import DataCfg
from tuneforge.core.config.run import SourceCfg, from_dict, from_yaml, to_yaml
from tuneforge.data import load_datasets, mixture_counts, read_rows
from tuneforge.core.errors import UserError

CHATS = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} it is"}],
          "id": i} for i in range(12)]


def write_datasets_folder(folder, rows, dict_of=None):
    """The layout `datasets.Dataset.save_to_disk` writes (an Arrow stream per shard, state.json,
    dataset_info.json); ``dict_of``: a DatasetDict of these split names instead."""
    if dict_of:
        folder.mkdir()
        (folder / "dataset_dict.json").write_text(json.dumps({"splits": dict_of}))
        for split in dict_of:
            write_datasets_folder(folder / split, rows if split == "train" else rows[:2])
        return folder
    folder.mkdir()
    table = pa.Table.from_pylist(rows)
    halves = [table.slice(0, len(rows) // 2), table.slice(len(rows) // 2)]  # two shards, read in state.json's order
    names = [f"data-0000{k}-of-00002.arrow" for k in (0, 1)]
    for name, part in zip(names, halves):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(part)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names], "_split": None}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def write_file(tmp_path, kind, rows=CHATS):
    table = pa.Table.from_pylist(rows)
    if kind == "parquet":
        pq.write_table(table, tmp_path / "d.parquet", row_group_size=5)
        return tmp_path / "d.parquet"
    if kind == "arrow":  # the IPC file layout (Feather v2)
        feather.write_feather(table, tmp_path / "d.arrow")
        return tmp_path / "d.arrow"
    if kind == "datasets":
        return write_datasets_folder(tmp_path / "saved", rows)
    return write_datasets_folder(tmp_path / "saved_dict", rows, dict_of=["test", "train"])


KINDS = ["parquet", "arrow", "datasets", "dataset_dict"]


@pytest.mark.parametrize("kind", KINDS)
def test_columnar_files_give_rows_with_nested_messages(kind, tmp_path, capsys):
    path = write_file(tmp_path, kind)
    rows = read_rows(path, DataCfg(format="instruction"))
    assert rows == CHATS and isinstance(rows[0]["messages"][0], dict)
    label = path / "train" if kind == "dataset_dict" else path
    assert [r.where for r in rows[:2]] == [f"{label}:row 1", f"{label}:row 2"] and rows[-1].where.endswith("row 12")
    if kind == "dataset_dict":
        assert "reading its 'train' split" in capsys.readouterr().err


def test_a_real_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    split = datasets.Dataset.from_list(CHATS)
    datasets.DatasetDict({"validation": split}).save_to_disk(str(tmp_path / "only"))
    assert read_rows(tmp_path / "only", DataCfg(format="instruction")) == CHATS  # the only split


@pytest.mark.parametrize("kind", ["parquet", "arrow", "datasets"])
def test_each_trains_on_the_tiny_model(kind, tmp_path, tiny_dir):
    path = write_file(tmp_path, kind)
    summary = train(tmp_path, tiny_dir, str(path))
    assert summary["steps"] == 2 and summary["train_examples"] + summary["eval_examples"] == len(CHATS)


@pytest.mark.parametrize("packing", [False, True])  # packing's check runs a forward of its own, in float32
def test_a_bf16_run_holds_its_frozen_layers_in_bf16_and_trains(tmp_path, tiny_dir, capsys, packing):
    summary = train(tmp_path, tiny_dir, str(write_file(tmp_path, "parquet")), precision="bf16", packing=packing)
    assert "frozen linear layers held in train.precision's dtype" in capsys.readouterr().err
    assert summary["steps"] == 2 and 0 < summary["after"]["loss"] < 100


def test_full_fine_tuning_in_bf16_saves_its_frozen_blocks_as_they_were(tmp_path, tiny_dir, capsys):
    """A whole model is saved as it is held: its frozen blocks stay float32, equal to the base's."""
    from safetensors.torch import load_file

    train(tmp_path, tiny_dir, str(write_file(tmp_path, "parquet")), precision="bf16",
          method={"name": "full", "freeze_layers": 1})
    assert "frozen linear layers held" not in capsys.readouterr().err
    saved, base = load_file(tmp_path / "out" / "final" / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    frozen = [k for k in saved if k.startswith("model.layers.0.")]
    assert frozen and all(saved[k].dtype == torch.float32 and torch.equal(saved[k], base[k]) for k in frozen)


def train(tmp_path, tiny_dir, path, precision: str = "auto", method: dict | None = None, **data) -> dict:
    cfg = {"model": str(tiny_dir), "method": method or {"name": "lora", "r": 2},
           "data": {"path": path, "format": "instruction", "max_length": 64, "val_fraction": 0.25, **data},
           "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "batch_size": 4, "precision": precision}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(tmp_path / "run.yaml")]) == 0
    return json.loads((tmp_path / "out" / "summary.json").read_text())


# --- refusals: one line each, naming the file and what to do ---

def test_a_binary_file_is_refused_in_one_line_through_the_cli(tmp_path, tiny_dir, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(gzip.compress(b'{"instruction": "a", "output": "b"}\n' * 20))
    cfg = {"model": str(tiny_dir), "data": {"path": str(path), "format": "instruction"},
           "train": {"output_dir": str(tmp_path / "out"), "max_steps": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{path}: this is a binary file (gzip)" in err and ".parquet, .arrow" in err and "UTF-8 text" in err
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(range(256)) * 4)  # no magic number: NUL bytes give it away
    with pytest.raises(UserError, match="this is a binary file, not a data file"):
        read_rows(noise, DataCfg())


def test_parquet_named_txt_is_refused_with_the_name_it_should_have(tmp_path):
    pq.write_table(pa.Table.from_pylist(CHATS), tmp_path / "chats.txt")
    with pytest.raises(UserError) as info:
        read_rows(tmp_path / "chats.txt", DataCfg())
    assert "this is a Parquet file, but its name ends in '.txt'" in info.value.line()
    assert "rename it to chats.parquet" in info.value.line() and "UTF-8" not in info.value.line()
    (tmp_path / "notes.parquet").write_text("just text\n")
    with pytest.raises(UserError, match="this is not a Parquet file"):
        read_rows(tmp_path / "notes.parquet", DataCfg())


def test_text_in_another_encoding_keeps_the_utf8_advice(tmp_path):
    (tmp_path / "l.txt").write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8; re-save the file as UTF-8"):
        read_rows(tmp_path / "l.txt", DataCfg())


def test_plain_text_as_instruction_data_says_it_needs_rows(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("one long document\n" * 10)
    with pytest.raises(UserError) as info:
        load_datasets(DataCfg(path=str(path), format="instruction"), None)
    line = info.value.line()
    assert line.startswith(f"{path}: this is plain text") and "instruction data needs rows" in line
    assert "data.format: text" in line and "val_fraction" not in line


def test_a_table_read_as_text_says_it_is_a_table(tmp_path, tiny_tokenizer):
    path = tmp_path / "reviews.tsv"
    path.write_text("text\tlabel\ngood film\tpos\nbad film\tneg\nfine\tpos\n")
    with pytest.raises(UserError) as info:  # too little text for one block: not "raise max_length"
        load_datasets(DataCfg(path=str(path), format="text", max_length=64), tiny_tokenizer)
    assert "this file is a table of" in info.value.line() and "set data.format" in info.value.line()
    assert "raise data.max_length" not in info.value.line()
    path.write_text("1\t2.5\tgood film\n2\t-1.0\tbad film\n")  # no header, no 'text' column
    with pytest.raises(UserError) as info:
        load_datasets(DataCfg(path=str(path), format="text", max_length=4), tiny_tokenizer)
    assert "this file is a table (columns: 1, 2.5, good film)" in info.value.line()
    assert "data.format" in info.value.line() and "data.text_column" in info.value.line()


def test_a_table_without_a_header_row_is_pointed_at_data_columns(tmp_path, tiny_tokenizer):
    """Its first line's values are taken for the column names: the error said "the row has: 1, 2.5, good
    film" as if they were the row's fields, and pointed nowhere near data.columns."""
    path = tmp_path / "scores.tsv"
    path.write_text("".join(f"{i}\t{i % 3 - 1}.5\tfilm {i}\n" for i in range(1, 30)))
    with pytest.raises(UserError) as info:
        load_datasets(DataCfg(path=str(path), format="classification", label_column="score",
                              score_thresholds=[0.0, 0.0]), tiny_tokenizer)
    line = info.value.line()
    assert "missing field" in line and "the fields the file's first line names: 1, 0.5, film 1" in line
    assert "a file without a header row needs data.columns" in line


# --- mixtures ---

def test_mixture_counts_keep_the_weights_without_repeating():
    assert mixture_counts([100, 1000], [1, 1]) == [100, 100]
    assert mixture_counts([100, 1000], [1, 3]) == [100, 300]
    assert mixture_counts([40, 100], [1, 3]) == [33, 100]  # the second source is the scarce one
    assert mixture_counts([7], [0.5]) == [7]


def test_a_mixture_keeps_each_source_s_format_and_the_weights(tmp_path, tiny_tokenizer):
    chats = write_file(tmp_path, "parquet", [{"messages": [{"role": "user", "content": f"say {i}"},
                                                           {"role": "assistant", "content": f"{i} it is"}]}
                                             for i in range(60)])  # 60 chats, none twice
    pairs = tmp_path / "pairs.csv"  # no header: the columns are named by the source
    pairs.write_text("".join(f"count to {i},{i + 1}\n" for i in range(30)))
    cfg = DataCfg(path=[SourceCfg(str(chats), weight=1), SourceCfg(str(pairs), weight=2, format="completion",
                                                                  columns=["prompt", "completion"], max_rows=25)],
                  format="instruction", max_length=64, val_fraction=0.2)
    data = load_datasets(cfg, tiny_tokenizer, seed=3)
    # 48 chats and 20 pairs to train on (25 pairs read, 5 held out): the pairs are scarce at weight 2
    # of 3, so 20 pairs and 10 chats; held out: 12 chats and 5 pairs give 2 and 5
    report = data.report["train"]
    assert report.sources == {str(chats): 10, str(pairs): 20} and report.left_out == 38
    assert data.report["eval"].sources == {str(chats): 2, str(pairs): 5}
    assert f"from {chats} 10, {pairs} 20 (38 left out to keep the weights)" in report.line()
    from_pairs = [e for e in data.train if e.source.startswith(str(pairs))]
    assert len(from_pairs) == 20 and len(data.train) == 30
    assert len({e.source for e in data.train}) == 30  # no row twice
    assert tiny_tokenizer.decode(from_pairs[0].input_ids).startswith("count to")  # completion format, own columns
    again = load_datasets(cfg, tiny_tokenizer, seed=3)
    assert [e.source for e in again.train] == [e.source for e in data.train]  # seeded


def test_a_mixture_trains_and_the_summary_counts_each_source(tmp_path, tiny_dir):
    a = write_file(tmp_path, "parquet")
    b = write_datasets_folder(tmp_path / "b", CHATS)
    summary = train(tmp_path, tiny_dir, [{"path": str(a), "weight": 2}, {"path": str(b)}], val_fraction=0.0)
    assert summary["train_examples"] == 18  # 12 of a, 6 of b: a is the scarce one at 2 of 3
    assert summary["data"]["train"]["sources"] == {str(a): 12, str(b): 6}


def test_mixture_config_parses_from_yaml_and_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  path: [{path: a.jsonl, weight: 2}, {path: b.parquet, max_rows: 5}]\n")
    cfg = from_yaml(path)
    assert cfg.data.path == [SourceCfg("a.jsonl", weight=2.0), SourceCfg("b.parquet", max_rows=5)]
    assert from_yaml(path, ["data.path=x.jsonl"]).data.path == "x.jsonl"
    assert from_yaml(path, ["data.path=[{path: c.jsonl, weight: 3}]"]).data.path == [SourceCfg("c.jsonl", weight=3.0)]
    both = from_yaml(path, ["data.path=[c.jsonl, {path: d.parquet, weight: 2}]"]).data.path  # a path alone is a source
    assert both == [SourceCfg("c.jsonl"), SourceCfg("d.parquet", weight=2.0)]
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg  # a run's config.yaml reads back the same
