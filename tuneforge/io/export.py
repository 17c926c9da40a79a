"""Standalone models for the runtimes people deploy on: a whole model (full fine-tuning's result) or
an adapter folded into its base, as a Hugging Face directory (``hf``) or one GGUF file for llama.cpp
(``gguf``); a LoRA adapter as a GGUF adapter file (``gguf-lora``); and an Ollama Modelfile beside a
GGUF. docs/export.md says which method can use which format."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from torch import nn

from tuneforge.core import config as config_mod
from tuneforge.core.atomic import atomic_dir, write_text
from tuneforge.data.classify import default_instruction, label_names, label_words
from tuneforge.data.readers import read_rows
from tuneforge.model.devices import resolve_dtype
from tuneforge.core.errors import UserError
from tuneforge.io import gguf_export, ollama
from tuneforge.io.load import NAMED_MODELS, find_named_gguf, load_model
from tuneforge.io.peft_format import load_adapter
from tuneforge.methods._shared import Injected

FORMATS = ("gguf", "gguf-lora", "hf")
HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def save_model(model: nn.Module, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """A Hugging Face model directory (safetensors, config, tokenizer), written atomically;
    ``state_dict``: the weights to write instead of the model's own (a sharded model's, gathered)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def merge_adapter(model_spec: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "auto",
                  force: bool = False, allow_pickle: bool = False) -> Path:
    """Load the base, apply the adapter, fold it in, and save a model directory that transformers
    loads without tuneforge. A method whose math cannot be folded (bottleneck adapters, virtual
    tokens, a feature classifier) raises a UserError that says so."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise UserError("the output folder exists and is not a model directory", str(out_dir),
                        fix="choose a new folder for --out")
    model, tokenizer = load_model(model_spec, dtype="float32", device="cpu", allow_pickle=allow_pickle)
    gradient_adapter(model, adapter_dir, force).merge(model)
    target = resolve_dtype(dtype if dtype != "auto" else "float32")
    model.to(target)
    if target != torch.float32:
        print(f"tuneforge: merged weights saved as {target}", file=sys.stderr)
    return save_model(model, tokenizer, out_dir)


def source_gguf(spec: str) -> Path | None:
    """The GGUF file a model spec came from: a named model's, a .gguf path, or (for a run's model folder,
    such as full fine-tuning's final/) the one its run's config.yaml names. None for a plain HF folder."""
    if spec in NAMED_MODELS:
        return find_named_gguf(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    run_config = path.parent / "config.yaml"
    if path.is_dir() and run_config.is_file():
        try:
            base = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("model")
        except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
            return None
        if isinstance(base, str) and (base in NAMED_MODELS or base.endswith(".gguf")):
            return source_gguf(base)
    return None


def trained_system(result_dir: Path) -> str | None:
    """The system message a classification run trained with (its question), from the run's config.yaml
    beside its result folder (an adapter, or full fine-tuning's model); None when there is no such run or
    it trained without one."""
    path = result_dir.parent / "config.yaml"
    if not path.is_file():
        return None
    data = config_mod.from_yaml(path).data
    if data.format != "classification" or not data.chat_template:
        return None
    if data.instruction:
        return data.instruction
    try:
        rows = [] if data.score_thresholds or data.verbalizer else read_rows(data.path, data)
    except UserError as exc:
        print(f"tuneforge: the run's data cannot be read to name its labels ({exc.line()}); the Modelfile has no "
              "SYSTEM line", file=sys.stderr)
        return None
    return default_instruction(label_words(label_names(rows, data), data.verbalizer))


def _check_out(out: Path, overwrite: bool, folder: bool) -> None:
    if out.is_dir() != folder and out.exists():
        raise UserError(f"the output exists and is {'a file' if folder else 'a folder'}", str(out),
                        fix=f"give {'a folder' if folder else 'a file name'} for --out")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise UserError("the output exists", str(out), fix="choose another --out, or pass --overwrite to replace it")


def export(model_spec: str, out: str | Path, fmt: str = "gguf", adapter_dir: str | Path | None = None,
           dtype: str = "f32", ollama_file: bool = False, overwrite: bool = False, force: bool = False,
           allow_pickle: bool = False) -> list[Path]:
    """Load the base, apply the adapter and write it as ``fmt`` (see FORMATS) to ``out``; with
    ``ollama_file``, a Modelfile beside it. Returns the paths written. A bad request (a format, a dtype,
    an output that exists, a method with no such form, a chat template Ollama cannot say) is refused
    before anything is written."""
    out = Path(out)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}", "--format", fix=f"use one of {', '.join(FORMATS)}")
    if fmt == "hf" and dtype not in HF_DTYPES:
        raise UserError(f"a Hugging Face directory holds f32, f16 or bf16 weights, not {dtype!r}", "--dtype",
                        fix="use f32, f16 or bf16, or --format gguf for q8_0")
    if fmt != "hf":
        gguf_export.check_dtype(dtype)
    if fmt == "gguf-lora" and adapter_dir is None:
        raise UserError("a GGUF LoRA file is made from an adapter", "--adapter", fix="give the adapter folder")
    if ollama_file and fmt == "hf":
        raise UserError("an Ollama Modelfile points at a GGUF file", "--ollama", fix="use --format gguf")
    targets = [out] + ([out.parent / "Modelfile"] if ollama_file else [])
    for target in targets:
        _check_out(target, overwrite, folder=fmt == "hf" and target == out)
    if fmt == "hf":
        if adapter_dir is None:
            model, tokenizer = load_model(model_spec, dtype=HF_DTYPES[dtype], device="cpu", allow_pickle=allow_pickle)
            return [save_model(model, tokenizer, out)]
        return [merge_adapter(model_spec, adapter_dir, out, dtype=HF_DTYPES[dtype], force=force,
                              allow_pickle=allow_pickle)]
    source = source_gguf(model_spec)
    if fmt == "gguf-lora" and ollama_file and source is None:
        raise UserError("Ollama's ADAPTER needs the base as a GGUF file for FROM, and this base is a Hugging Face "
                        "folder", "--ollama", fix="export the merged model instead: --format gguf --ollama")
    model, tokenizer = load_model(model_spec, dtype="float32", device="cpu", allow_pickle=allow_pickle)
    gguf_export.architecture(model.config)  # refused before the adapter loads
    handle = gradient_adapter(model, adapter_dir, force) if adapter_dir is not None else None
    if ollama_file:  # made first: a template it cannot say is refused before any file is written
        model_from, adapter = (f"./{out.name}", None) if fmt == "gguf" else (str(source.resolve()), f"./{out.name}")
        run_dir = Path(adapter_dir if adapter_dir is not None else model_spec)
        text = ollama.modelfile(tokenizer, model_from, adapter=adapter,
                                system=trained_system(run_dir) if run_dir.is_dir() else None)
    if fmt == "gguf-lora":
        gguf_export.write_lora(model, lora_form(handle, model, adapter_dir), out, dtype)
    else:
        if handle is not None:
            handle.merge(model)
        gguf_export.write_model(model, tokenizer, out, dtype, source=source)
    if ollama_file:
        write_text(targets[1], text)
    return targets


def gradient_adapter(model: nn.Module, adapter_dir: str | Path, force: bool) -> Injected:
    """Load the adapter onto ``model`` to be folded in or exported; a method whose change is no change of
    weights (a feature classifier, a bottleneck adapter, a prefix, a soft prompt) is refused, naming
    where it can be served instead."""
    loaded = load_adapter(model, adapter_dir, force=force)
    if not isinstance(loaded, Injected):
        raise UserError("a feature classifier reads the model's hidden states; there are no weights to merge or "
                        "export", str(adapter_dir), fix="use it with tuneforge eval --adapter")
    if not loaded.method.MERGES:
        served = ("serve the base (tuneforge export --format hf, without --adapter) with this folder beside it, which "
                  "PEFT loads in transformers, or" if loaded.method.PEFT_TYPE else "serve it with")
        raise UserError(f"a {loaded.method.NAME} adapter is no change of the model's weights, so it cannot be folded "
                        "into a model file (GGUF or a merged folder)", str(adapter_dir),
                        fix=f"{served} tuneforge generate --adapter {adapter_dir}")
    return loaded


def lora_form(handle: Injected, model: nn.Module, adapter_dir: str | Path) -> dict:
    """The adapter's per-layer (A, B, scale), or a UserError naming the formats that can hold it: only a
    method with a ``lora_form`` (LoRA, rsLoRA, QLoRA) has one; DoRA and IA3 export merged only."""
    fix = "it exports merged only: --format gguf (one GGUF file), or --format hf (a model folder)"
    try:
        return handle.lora_form(model)
    except UserError as exc:
        raise UserError(f"{exc.what}, so llama.cpp's LoRA format cannot hold it", str(adapter_dir), fix=fix) from None
