from pathlib import Path

import pytest
import yaml

from tuneforge import cli
from tuneforge.apps import compare
from tuneforge.core import config
from tuneforge.core.errors import UserError


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_is_read_into_typed_frozen_sections(tmp_path):
    cfg = config.from_yaml(write(tmp_path, """
model: smollm2-135m
method: {name: full, freeze_layers: 2}
data: {path: d.jsonl, format: instruction, max_length: 128}
train: {learning_rate: 1e-4, max_steps: 10, output_dir: out}
"""))
    assert cfg.data.format == "instruction" and cfg.data.max_length == 128
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.method.name == "full" and cfg.method.args == {"freeze_embeddings": False, "freeze_layers": 2}
    assert config.method_config(cfg).freeze_layers == 2
    with pytest.raises(Exception):
        cfg.train.max_steps = 3  # frozen


def test_overrides_take_the_field_type(tmp_path):
    path = write(tmp_path, "model: smollm2-135m\n")
    cfg = config.from_yaml(path, ["train.learning_rate=3e-5", "train.max_steps=7", "model=123",
                                  "data.path=null", "method.freeze_embeddings=true", "data.columns=[id, score, text]"])
    assert cfg.train.learning_rate == 3e-5 and cfg.train.max_steps == 7
    assert cfg.model == "123"  # a string field keeps the text as typed
    assert cfg.data.path is None and cfg.method.args["freeze_embeddings"] is True
    assert cfg.data.columns == ["id", "score", "text"]


def test_unknown_key_names_the_key_file_and_line_and_suggests(tmp_path):
    path = write(tmp_path, "model: smollm2-135m\ntrain:\n  lerning_rate: 0.1\n")
    with pytest.raises(UserError) as err:
        config.from_yaml(path)
    line = err.value.line()
    assert "train.lerning_rate" in line and f"{path}:3" in line and "train.learning_rate" in line


def test_wrong_type_and_bad_literal(tmp_path):
    with pytest.raises(UserError, match="train.max_steps.*expected int"):
        config.from_yaml(write(tmp_path, "train: {max_steps: ten}\n"))
    with pytest.raises(UserError, match="data.format.*use one of text, instruction"):
        config.from_yaml(write(tmp_path, "data: {format: tabular}\n"))
    with pytest.raises(UserError, match="--set train.epochs"):
        config.from_yaml(write(tmp_path, "{}\n"), ["train.epochs=many"])


def test_unknown_method_and_method_key(tmp_path):
    with pytest.raises(UserError, match="unknown method 'lorax'"):
        config.from_yaml(write(tmp_path, "method: {name: lorax}\n"))
    with pytest.raises(UserError, match="unknown key 'method.rank'"):
        config.from_yaml(write(tmp_path, "method: {name: full, rank: 8}\n"))


def test_missing_required_field():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Needs:
        path: str

    with pytest.raises(UserError, match="missing required key 'path'"):
        config.build(Needs, {})


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"run.yaml:\d+: invalid YAML"):
        config.from_yaml(write(tmp_path, "model: a\ntrain: [unclosed\n"))
    with pytest.raises(UserError, match="no such config file"):
        config.from_yaml(tmp_path / "absent.yaml")
    with pytest.raises(UserError, match="a folder, not a config file"):
        config.from_yaml(tmp_path)


def test_saved_config_round_trips(tmp_path):
    cfg = config.from_yaml(write(tmp_path, "method: {name: full, freeze_layers: 1}\ntrain: {seed: 5}\n"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text(config.to_yaml(cfg))
    again = config.from_yaml(tmp_path / "out" / "config.yaml")
    assert again == cfg


def test_cli_unknown_key_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, "model: smollm2-135m\nbogus: 1\n")
    assert cli.main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'bogus'" in err and "Traceback" not in err


def test_cli_config_prints_the_resolved_config(tmp_path, capsys):
    assert cli.main(["config", str(write(tmp_path, "model: m\n")), "--set", "train.seed=4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["seed"] == 4


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_resolves(path):
    """Each example config reads, its method's keys are valid, and its data files ship in the repository."""
    cfg = config.from_yaml(path)
    rows = cfg.compare.methods or [{"name": cfg.method.name}]
    for row in rows:
        if row["name"] not in ("zero-shot", "few-shot"):
            config.method_config(compare.row_config(cfg, row, Path("unused")))
    repo = Path(__file__).parents[1]
    for data_path in (cfg.data.path, cfg.data.eval_path, cfg.compare.transfer_path):
        assert data_path is None or (repo / data_path).is_file(), data_path


def test_a_step_of_more_micro_batches_than_an_epoch_holds_is_refused():
    """grad_accum x processes above the epoch's micro-batches: each step would pass over the data more than once
    (a run of epochs: 1 trained 5 epochs in one step)."""
    from tuneforge.core.config.run import TrainCfg

    assert TrainCfg(batch_size=2, grad_accum=20).steps(20) == 1
    with pytest.raises(UserError, match=r"takes 100 micro-batches and an epoch has 20: each step would pass over the "
                                        r"data 5.0 times; set grad_accum to 20 or less"):
        TrainCfg(batch_size=2, grad_accum=100).steps(20)
    with pytest.raises(UserError, match=r"2 micro-batches on each of 4 processes and an epoch has 3: .* use fewer "
                                        r"processes or a smaller train.batch_size"):
        TrainCfg(grad_accum=2, max_steps=5).steps(3, world=4)


def test_a_method_switched_by_set_names_the_files_key_it_does_not_take(tmp_path):
    """The file's method is LoRA with r: 4; --set method.name=ia3 left 'r' behind, and the error blamed the file
    ("unknown key 'method.r'") with no word of the --set that changed the method."""
    path = write(tmp_path, "method: {name: lora, r: 4}\n")
    with pytest.raises(UserError) as info:
        config.from_yaml(path, ["method.name=ia3"])
    line = info.value.line()
    assert line.startswith(f"{path}:1: key 'method.r': --set method.name=ia3 changed the method") and "drop r" in line
    assert config.from_yaml(path, ["method.name=qlora"]).method.args["r"] == 4  # a key both take stays
