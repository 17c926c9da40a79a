"""The tokenizer of a GGUF file, as llama.cpp reads it (``tokenizer.ggml.*``): built from a Hugging Face
fast tokenizer, or carried over from the GGUF file the base came from.

A byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) is llama.cpp's ``gpt2`` tokenizer model: its tokens,
their types, the merges and the name of the pre-tokenizer, which llama.cpp implements by name
(``tokenizer.ggml.pre``), so only a pre-tokenizer it names is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf

from tuneforge.errors import UserError

# Keys a copied file describes itself with, which the new file states for itself.
OWN_KEYS = ("general.architecture", "general.type", "general.file_type", "general.quantization_version",
            "general.alignment")
# The pre-tokenizers of tokenizer.json that llama.cpp knows by name (its tokenizer.ggml.pre).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen's: one digit at a time
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}  # a Split's regex -> llama.cpp's pre-tokenizer


def carried_fields(source: Path, vocab_size: int) -> dict | None:
    """The keys of ``source`` to copy, {key: (value, type, array element type)}; None (with a note) when
    its vocabulary is not the model's, so the tokenizer is rebuilt instead."""
    reader = gguf.GGUFReader(source)
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in OWN_KEYS:
            continue
        vtype = field.types[0]
        fields[key] = (field.contents(), vtype, field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    tokens = fields.get("tokenizer.ggml.tokens", ([],))[0]
    if len(tokens) != vocab_size:
        print(f"tuneforge: {source.name} has {len(tokens)} tokens and the model {vocab_size}; the tokenizer is "
              "rebuilt from the model's", file=sys.stderr)
        return None
    return fields


def pre_tokenizer(backend: dict) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for a tokenizer.json pre-tokenizer it implements, else None."""
    def byte_level(part: dict, regex: bool) -> bool:
        return (part.get("type") == "ByteLevel" and part.get("use_regex", True) == regex
                and not part.get("add_prefix_space", False))

    pre = backend.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(parts) == 1 and byte_level(parts[0], True):
        return "gpt-2"
    if len(parts) == 2 and byte_level(parts[1], True) and parts[0] == {"type": "Digits", "individual_digits": True}:
        return "smollm"
    if len(parts) == 2 and byte_level(parts[1], False) and parts[0].get("type") == "Split" \
            and parts[0].get("behavior") == "Isolated":
        return SPLITS.get(parts[0].get("pattern", {}).get("Regex"))
    return None


def tokenizer_fields(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` model: tokens (padded to the model's vocabulary
    size), their types, the merges, the pre-tokenizer's name, the special ids and the add-BOS flag."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError("the tokenizer is a slow (Python) one, whose vocabulary tuneforge does not read for GGUF",
                        "--model", fix="save the model with a fast tokenizer (tokenizer.json), or use --format hf")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = pre_tokenizer(backend)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend.get("model", {}).get("merges") or []]
    if backend.get("model", {}).get("type") != "BPE" or pre is None or not merges:
        raise UserError("the tokenizer is not a byte-level BPE with merges and a pre-tokenizer llama.cpp names "
                        "(gpt-2, smollm, llama-bpe, qwen2)", "--model",
                        fix="export from the model's GGUF file, whose tokenizer is carried over, or use --format hf")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has token ids up to {max(by_id)}, past the model's {vocab_size} embeddings",
                        "--model", fix="resize the model's embeddings to the tokenizer")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for set_id, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            set_id(token_id)
    ids, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(len(ids) > len(plain) and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(ids) > len(plain) and ids[-1] == tokenizer.eos_token_id)
