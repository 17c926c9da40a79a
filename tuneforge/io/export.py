"""Standalone models for the runtimes people deploy on: a whole model (full fine-tuning's result) or
an adapter folded into its base, as a Hugging Face directory (``hf``) or one GGUF file for llama.cpp
(``gguf``); a LoRA adapter as a GGUF adapter file (``gguf-lora``); and an Ollama Modelfile beside a
GGUF. docs/export.md says which method can use which format.

Without a base named, an adapter's own record names it. An output that holds something is refused
unless ``overwrite``, which moves it aside to ``OUT.previous-<time>`` (nothing is deleted), and a failed
write leaves what was there in its place."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import yaml
from safetensors import SafetensorError
from torch import nn

from tuneforge.core import config as config_mod
from tuneforge.core.atomic import atomic_dir, disk_error, file_on_the_way, write_text
from tuneforge.data.classify import default_instruction, label_names, label_words
from tuneforge.data.readers import read_rows
from tuneforge.model.devices import resolve_dtype
from tuneforge.core.errors import UserError
from tuneforge.io import gguf_export, ollama
from tuneforge.io.load import DEFAULT_MODEL, NAMED_MODELS, find_named_gguf, load_model
from tuneforge.io.peft_format import CONFIG, load_adapter, read_config
from tuneforge.methods._shared import Injected

FORMATS = ("gguf", "gguf-lora", "hf")
# The dtypes a model folder holds, by GGUF's name (export's --dtype) with torch's names (merge's) beside:
# either spelling is taken everywhere.
SPELLINGS = {"f32": ("float32", "fp32"), "f16": ("float16", "fp16"), "bf16": ("bfloat16",)}
SHORT = {name: short for short, names in SPELLINGS.items() for name in (short, *names)}
HF_DTYPES = {short: names[0] for short, names in SPELLINGS.items()}


def short_dtype(dtype: str) -> str:
    """``dtype`` by its GGUF name (f32, bf16, q8_0, ...) however it was spelt; ``auto`` is f32, the dtype a
    merge computes in on the CPU."""
    return "f32" if dtype == "auto" else SHORT.get(dtype.lower(), dtype)


def hf_dtype(dtype: str) -> str:
    """The torch name of a model folder's dtype (``bf16`` or ``bfloat16`` give bfloat16), or a UserError."""
    short = short_dtype(dtype)
    if short not in HF_DTYPES:
        raise UserError(f"a Hugging Face directory holds f32, f16 or bf16 weights, not {dtype!r}", "--dtype",
                        fix="use f32 (float32), f16 (float16) or bf16 (bfloat16); for q8_0, write a GGUF file with "
                            "tuneforge export --format gguf")
    return HF_DTYPES[short]


def save_model(model: nn.Module, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """A Hugging Face model directory (safetensors, config, tokenizer), written atomically;
    ``state_dict``: the weights to write instead of the model's own (a sharded model's, gathered)."""
    out_dir = Path(out_dir)
    with write_errors(out_dir), atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def merge_adapter(model_spec: str | None, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "auto",
                  force: bool = False, allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Load the base (``model_spec``, else the one the adapter records), apply the adapter, fold it in,
    and save a model directory that transformers loads without tuneforge. A method whose math cannot be
    folded (bottleneck adapters, virtual tokens, a feature classifier) raises a UserError that says so;
    an output folder that holds anything is refused unless ``overwrite`` moves it aside."""
    out_dir = Path(out_dir)
    target = resolve_dtype(hf_dtype(dtype))
    check_out(out_dir, overwrite, folder=True)
    model, tokenizer = load_model(base_spec(model_spec, adapter_dir), dtype="float32", device="cpu",
                                  allow_pickle=allow_pickle)
    gradient_adapter(model, adapter_dir, force).merge(model)
    model.to(target)
    if target != torch.float32:
        print(f"tuneforge: merged weights saved as {target}", file=sys.stderr)
    with replacing([out_dir], overwrite):
        return save_model(model, tokenizer, out_dir)


def base_spec(model_spec: str | None, adapter_dir: str | Path | None) -> str:
    """The base to load: ``model_spec``; without it, the model the adapter was trained on (its
    adapter_config.json's ``base_model_name_or_path``, else its run's config.yaml), which loading the
    adapter then checks by fingerprint; with no adapter either, the default model."""
    if model_spec is not None:
        return model_spec
    if adapter_dir is None:
        return DEFAULT_MODEL
    adapter_dir = Path(adapter_dir)
    named = read_config(adapter_dir).get("base_model_name_or_path")
    run_config = adapter_dir.parent / "config.yaml"
    if not named and run_config.is_file():
        named = config_mod.from_yaml(run_config).model
    if not isinstance(named, str) or not named:
        raise UserError("the adapter does not record the base it was trained on", str(adapter_dir / CONFIG),
                        fix="give the base with --model")
    if named not in NAMED_MODELS and not Path(named).expanduser().exists():
        raise UserError(f"the adapter was trained on {named!r}, which is not a named model or a path here",
                        str(adapter_dir / CONFIG), fix="give the base with --model")
    print(f"tuneforge: the base is {named}, as the adapter records it", file=sys.stderr)
    return named


def holds(path: Path) -> bool:
    """Whether writing ``path`` would replace something: a file, or a folder that is not empty."""
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def check_out(out: Path, overwrite: bool, folder: bool) -> None:
    """Refuse, before any model loads, an output that cannot be written: the current folder or one that
    holds it, a file where a folder goes (or the reverse), or one that holds something unless ``overwrite``."""
    here = Path.cwd().resolve()
    if Path(os.path.realpath(out)) in (here, *here.parents):
        example = "./merged" if folder else "./model.gguf"
        raise UserError("the output would take the place of the current folder", f"--out {out}",
                        fix=f"give a new {'folder' if folder else 'file'}, such as {example}")
    if blocker := file_on_the_way(out):
        raise UserError(f"{blocker} is a file, so no folder can be made under it", f"--out {out}",
                        fix="give an --out whose parent folders are folders")
    if out.exists() and out.is_dir() != folder:
        raise UserError(f"the output exists and is {'a file' if folder else 'a folder'}", str(out),
                        fix=f"give {'a folder' if folder else 'a file name'} for --out")
    if holds(out) and not overwrite:
        raise UserError("the output exists", str(out),
                        fix=f"choose another --out, or pass --overwrite to move it aside to {out.name}.previous-<time>")


@contextlib.contextmanager
def replacing(paths: list[Path], overwrite: bool) -> Iterator[None]:
    """Write ``paths`` in this context; with ``overwrite``, each that holds something first moves aside to
    ``PATH.previous-<time>`` (as `train --overwrite` moves a folder's files: nothing is deleted), and moves
    back if the write fails."""
    moved = []
    try:
        for path in paths if overwrite else ():
            if holds(path):
                aside = path.with_name(f"{path.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
                while aside.exists():  # a second export within the same second
                    aside = aside.with_name(aside.name + "-1")
                try:
                    os.replace(path, aside)
                except OSError as exc:
                    raise disk_error(exc, path) from exc
                moved.append((path, aside))
        yield
    except BaseException:
        for path, aside in moved:
            if not path.exists():
                os.replace(aside, path)
        raise
    for path, aside in moved:
        print(f"tuneforge: what {path} held is now in {aside}", file=sys.stderr)


@contextlib.contextmanager
def write_errors(out: Path) -> Iterator[None]:
    """A failed write of ``out`` as the one line a failed write of a run gets: a full disk or a file-size
    limit stops with exit 3. safetensors reports them as its own error, the OS's number in its text, and
    numpy (under the GGUF writer) as a short write with no number at all."""
    try:
        yield
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise UserError(f"cannot write the weights ({exc})", str(out)) from exc
        code = int(found.group(1))
        raise disk_error(OSError(code, os.strerror(code)), out) from exc
    except UserError as exc:
        if not (isinstance(exc.__cause__, OSError) and exc.__cause__.errno is None):
            raise
        code = _short_write(out)
        raise disk_error(OSError(code, os.strerror(code)), out) from exc.__cause__


def _short_write(out: Path) -> int:
    """Why a write stopped short when the writer did not say: this process's file-size limit, if it has one
    below the disk's free space, else a full disk."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        free = 0
    return errno.EFBIG if limit != resource.RLIM_INFINITY and free > limit else errno.ENOSPC


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


def export(model_spec: str | None, out: str | Path, fmt: str = "gguf", adapter_dir: str | Path | None = None,
           dtype: str = "f32", ollama_file: bool = False, overwrite: bool = False, force: bool = False,
           allow_pickle: bool = False) -> list[Path]:
    """Load the base (``model_spec``, else the one the adapter records), apply the adapter and write it as
    ``fmt`` (see FORMATS) to ``out``; with ``ollama_file``, a Modelfile beside it. Returns the paths
    written. A bad request (a format, a dtype, an output that exists without ``overwrite``, a method with no
    such form, a chat template Ollama cannot say) is refused before anything is written; ``overwrite``
    moves what is there aside."""
    out = Path(out)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}", "--format", fix=f"use one of {', '.join(FORMATS)}")
    dtype = short_dtype(dtype)
    if fmt == "hf":
        hf_dtype(dtype)
    else:
        gguf_export.check_dtype(dtype)
    if fmt == "gguf-lora" and adapter_dir is None:
        raise UserError("a GGUF LoRA file is made from an adapter", "--adapter", fix="give the adapter folder")
    if ollama_file and fmt == "hf":
        raise UserError("an Ollama Modelfile points at a GGUF file", "--ollama", fix="use --format gguf")
    targets = [out] + ([out.parent / "Modelfile"] if ollama_file else [])
    for target in targets:
        check_out(target, overwrite, folder=fmt == "hf" and target == out)
    model_spec = base_spec(model_spec, adapter_dir)
    if fmt == "hf":
        if adapter_dir is None:
            model, tokenizer = load_model(model_spec, dtype=hf_dtype(dtype), device="cpu", allow_pickle=allow_pickle)
            with replacing(targets, overwrite):
                return [save_model(model, tokenizer, out)]
        return [merge_adapter(model_spec, adapter_dir, out, dtype=dtype, force=force, allow_pickle=allow_pickle,
                              overwrite=overwrite)]
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
    form = lora_form(handle, model, adapter_dir) if fmt == "gguf-lora" else None
    if handle is not None and form is None:
        handle.merge(model)
    with replacing(targets, overwrite):
        with write_errors(out):
            if form is not None:
                gguf_export.write_lora(model, form, out, dtype)
            else:
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
        raise UserError(f"the {loaded.method.NAME} method {loaded.method.ADDS} rather than changing its weights, so "
                        "no model file (GGUF or a merged folder) can hold it", str(adapter_dir),
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
