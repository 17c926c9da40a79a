"""The fault matrix of docs/reliability.md for the commands, on the tiny model: what merge and export write
(an output that holds something, the base itself or a user's files, is moved aside, never replaced or
deleted; a bad output path, a full disk or a file-size limit is one line and leaves nothing half-written;
the base comes from the adapter's own record; a dtype is taken in either spelling), a device torch cannot
see, and generation settings out of range."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_export import bpe_tokenizer
from test_reliability import finish, one_line, tuneforge
from conftest import make_tiny_model
from tuneforge import cli
from tuneforge.core.errors import UserError
from tuneforge.io.load import load_model
from tuneforge.io.peft_format import save_adapter
from tuneforge.methods import ia3, lora
from tuneforge.model.devices import resolve_device


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The tiny llama with a tokenizer GGUF can hold (byte-level BPE with merges)."""
    tokenizer, path = bpe_tokenizer(), tmp_path_factory.mktemp("base")
    for part in (make_tiny_model(len(tokenizer)), tokenizer):
        part.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    """A LoRA adapter on ``base``, B moved off zero, that records its base as training does."""
    model, _ = load_model(str(base))
    handle = lora.inject(model, lora.Config(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for layer in lora.layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    return save_adapter(model, handle, tmp_path_factory.mktemp("adapter") / "final", base_model_name=str(base))


def copy_of(base: Path, where: Path) -> Path:
    shutil.copytree(base, where)
    return where


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_into_an_existing_model_folder_is_refused_and_overwrite_moves_it_aside(base, adapter, tmp_path,
                                                                                        capsys):
    own = copy_of(base, tmp_path / "base")
    before = snapshot(own)
    args = ["merge", "--model", str(own), "--adapter", str(adapter), "--out", str(own)]
    assert cli.main(args) == 2  # the base itself, as the output
    assert "the output exists" in one_line(capsys.readouterr().err) and snapshot(own) == before
    assert cli.main([*args, "--overwrite"]) == 0
    aside = next(tmp_path.glob("base.previous-*"))
    assert snapshot(aside) == before  # the base, whole, beside the merged model
    merged = load_file(own / "model.safetensors")
    original = load_file(aside / "model.safetensors")
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           original["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("fmt", ["hf", "hf-merged", "gguf", "gguf-lora"])
def test_export_overwrite_moves_the_users_files_aside_and_deletes_nothing(base, adapter, tmp_path, capsys, fmt):
    out = tmp_path / ("out" if fmt.startswith("hf") else "model.gguf")
    if fmt.startswith("hf"):
        (out / "photos").mkdir(parents=True)
        (out / "photos" / "cat.jpg").write_bytes(b"a cat")
        (out / "thesis.txt").write_text("four years of work")
    else:
        out.write_bytes(b"an earlier export")
        (tmp_path / "Modelfile").write_text("FROM ./mine.gguf")
    before = snapshot(tmp_path)
    args = ["export", "--model", str(base), "--format", fmt.removesuffix("-merged"), "--out", str(out)]
    args += ["--adapter", str(adapter)] if fmt != "hf" else []
    args += ["--ollama"] if fmt == "gguf" else []
    assert cli.main(args) == 2
    assert "the output exists" in one_line(capsys.readouterr().err) and snapshot(tmp_path) == before
    assert cli.main([*args, "--overwrite"]) == 0
    aside = next(tmp_path.glob(f"{out.name}.previous-*"))
    if fmt.startswith("hf"):
        assert snapshot(aside) == {"photos/cat.jpg": b"a cat", "thesis.txt": b"four years of work"}
        assert (out / "config.json").is_file() and not (out / "thesis.txt").exists()
    else:
        assert aside.read_bytes() == b"an earlier export" and out.read_bytes()[:4] == b"GGUF"
    if fmt == "gguf":  # the Modelfile beside it too
        assert next(tmp_path.glob("Modelfile.previous-*")).read_text() == "FROM ./mine.gguf"


@pytest.mark.parametrize("command", ["export", "merge"])
def test_an_output_that_is_the_current_folder_is_one_line(base, adapter, tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    args = [command, "--model", str(base), "--out", "."]
    args += ["--format", "hf"] if command == "export" else ["--adapter", str(adapter)]
    for extra in ([], ["--overwrite"]):
        assert cli.main([*args, *extra]) == 2
        assert "take the place of the current folder" in one_line(capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("command", ["export", "merge", "eval"])
def test_an_output_under_a_file_or_a_json_that_is_a_folder_is_one_line_before_any_work(base, adapter, tmp_path,
                                                                                        monkeypatch, capsys, command):
    """Found after the work once: merge merged, then said "cannot write: File exists"; eval printed its
    figures, then refused a --json that named a folder."""
    (tmp_path / "afile").write_text("mine")
    loads = []
    monkeypatch.setattr("tuneforge.io.load.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loads.append(a))
    if command == "eval":
        rows = tmp_path / "d.txt"
        rows.write_text("some text " * 100)
        args = ["eval", "--model", str(base), "--data", str(rows), "--json"]
        outs = {str(tmp_path / "afile" / "m.json"): "afile is a file, so no folder can be made under it",
                str(tmp_path): "--json names a folder"}
    else:
        args = [command, "--model", str(base), "--adapter", str(adapter), "--out"]
        outs = {str(tmp_path / "afile" / "x" / ("m.gguf" if command == "export" else "m")):
                "afile is a file, so no folder can be made under it"}
    for out, words in outs.items():
        assert cli.main([*args, out]) == 2
        assert words in one_line(capsys.readouterr().err)
    assert not loads and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "d.txt"][:1 + (command == "eval")]


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_a_full_disk_or_size_limit_during_export_is_one_line_and_leaves_the_old_output(base, tmp_path, fmt):
    """The tiny model's weights (360 kB) outgrow a 50 kB file-size limit: safetensors' own error (hf) and
    numpy's short write, which carries no error number (gguf), are the one line a full disk is."""
    out = tmp_path / ("out" if fmt == "hf" else "model.gguf")
    if fmt == "hf":
        out.mkdir()
        (out / "thesis.txt").write_text("mine")
    else:
        out.write_bytes(b"an earlier export")
    before = snapshot(tmp_path)
    code, err = finish(tuneforge("export", "--model", str(base), "--format", fmt, "--out", str(out), "--overwrite",
                                 limit_bytes=50_000))
    line = one_line(err)
    assert code == 3 and "size limit" in line and str(out) in line, err
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_merge_and_export_take_the_base_the_adapter_records(base, adapter, tmp_path, capsys):
    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert f"the base is {base}, as the adapter records it" in capsys.readouterr().err
    assert cli.main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
    moved = copy_of(adapter, tmp_path / "run" / "final")
    config = moved / "adapter_config.json"
    config.write_text(config.read_text().replace(str(base), str(tmp_path / "gone")))
    assert cli.main(["merge", "--adapter", str(moved), "--out", str(tmp_path / "again")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "was trained on" in line and "gone" in line and "--model" in line and not (tmp_path / "again").exists()


def test_merge_and_export_take_either_dtype_spelling_and_merge_has_no_device(base, adapter, tmp_path, capsys):
    def dtypes(folder: Path) -> set:
        return {t.dtype for t in load_file(folder / "model.safetensors").values()}

    merge = ["merge", "--model", str(base), "--adapter", str(adapter)]
    assert cli.main([*merge, "--out", str(tmp_path / "a"), "--dtype", "bf16"]) == 0
    assert cli.main([*merge, "--out", str(tmp_path / "b"), "--dtype", "auto"]) == 0  # float32, as its help says
    assert cli.main(["export", "--model", str(base), "--format", "hf", "--dtype", "bfloat16",
                     "--out", str(tmp_path / "c")]) == 0
    assert cli.main(["export", "--model", str(base), "--dtype", "float16", "--out", str(tmp_path / "d.gguf")]) == 0
    assert dtypes(tmp_path / "a") == dtypes(tmp_path / "c") == {torch.bfloat16}
    assert dtypes(tmp_path / "b") == {torch.float32}
    assert cli.main([*merge, "--out", str(tmp_path / "e"), "--dtype", "q8_0"]) == 2
    assert "f32, f16 or bf16" in one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exc:  # accepted and ignored before; now refused as any unknown option
        cli.main([*merge, "--out", str(tmp_path / "f"), "--device", "cuda"])
    assert exc.value.code == 2 and "unrecognized arguments: --device" in capsys.readouterr().err


def test_targets_that_match_only_some_names_warn_naming_them():
    """IA3 given llama's names on a Phi-3 (fused qkv_proj): only down_proj exists there."""
    from transformers import Phi3Config, Phi3ForCausalLM

    model = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=0,
                                       eos_token_id=1, bos_token_id=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = ia3.inject(model, ia3.Config(target_modules=["k_proj", "v_proj", "down_proj"]))
    assert [str(w.message) for w in caught if "k_proj" in str(w.message)] == [
        "target_modules: ['k_proj', 'v_proj'] match no Linear/Conv1D/NF4Linear module of this model; only "
        "['down_proj'] are targeted"]
    assert list(handle.trainable(model)) == ["model.layers.0.mlp.down_proj.ia3_l"]


@pytest.mark.parametrize("visible", [0, 1])
def test_a_cuda_device_torch_cannot_see_is_one_line_before_anything_loads(visible, monkeypatch, tmp_path, tiny_dir,
                                                                          capsys):
    from test_run import sentiment_rows, write_config, write_jsonl

    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    device = "cuda:1" if visible else "cuda"
    with pytest.raises(UserError) as err:
        resolve_device(device)
    assert err.value.line().startswith(f"device '{device}': ")
    assert ("torch sees 1 CUDA device" in err.value.line()) if visible else ("auto or cpu" in err.value.line())
    config = write_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", sentiment_rows(4)), model=tiny_dir,
                          device=device)
    assert cli.main(["train", str(config)]) == 2
    assert f"device '{device}'" in one_line(capsys.readouterr().err) and not (tmp_path / "out").exists()
    assert cli.main(["generate", "--model", str(tiny_dir), "--device", device, "--prompt", "hi"]) == 2
    assert f"device '{device}'" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("args,words", [
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: 0: it must be 1 or more"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature: -1: it must be at least 0"),
    (["generate", "--prompt", "hi", "--top-p", "2"], "--top-p: 2: it must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-p", "nan"], "--top-p: nan: it must be in (0, 1]"),
    (["train", "run.yaml", "--nproc", "0"], "--nproc: 0: it must be 1 or more"),
    (["data", "run.yaml", "--examples", "-1"], "--examples: -1: it must be 0 or more"),
    (["icl", "--shots", "-1"], "--shots: -1: it must be 0 or more")])
def test_command_line_numbers_out_of_range_are_refused_by_the_parser(args, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_top_p_without_a_temperature_is_one_line_before_the_model_loads(capsys):
    assert cli.main(["generate", "--model", "/no/such/model", "--prompt", "hi", "--top-p", "0.9"]) == 2
    assert "--top-p: top-p 0.9 is for sampling, and temperature 0 decodes greedily" in one_line(capsys.readouterr().err)


def test_an_eval_file_with_nothing_to_score_is_one_line(tmp_path, tiny_dir, capsys):
    """Twelve short rows read as text (no --config, no run beside the model) fill no block of 512 tokens."""
    from test_run import sentiment_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(6))
    assert cli.main(["eval", "--model", str(tiny_dir), "--data", str(data)]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{data}: nothing to score: as text data the file gives no example" in line and "--config" in line
