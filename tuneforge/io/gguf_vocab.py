"""The tokenizer of a GGUF file, as llama.cpp reads it (``tokenizer.ggml.*``): built from a Hugging Face
fast tokenizer, or carried over from the GGUF file the base came from.

Two kinds of tokenizer.json are written, told apart by the BPE model's ``byte_fallback``:

A byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) is llama.cpp's ``gpt2`` tokenizer model: its tokens,
their types, the merges and the name of the pre-tokenizer, which llama.cpp implements by name
(``tokenizer.ggml.pre``), so only a pre-tokenizer it names is written.

A SentencePiece-style BPE (Llama 2, Mistral, Gemma: ``byte_fallback`` with the tokens ``<0x00>``..
``<0xFF>``, spaces written "▁") is llama.cpp's ``llama`` model (SPM). That tokenizer reads no merges:
it joins any two neighbouring pieces whose join is a token, the one with the highest *score* first
(the leftmost among equals), and writes what stays unknown as byte tokens. So the scores here rank
each token by the first merge that makes it, which gives the merge order back for a tokenizer
converted from SentencePiece (its merges list every split of every token, grouped by token); for
one whose merges do not (a BPE trained as such), a note says llama.cpp may cut some words otherwise.
llama.cpp's own converter, given a tokenizer.json without tokenizer.model, scores every token the
same (-1000), which makes it join pieces left to right instead. The space rule is
``tokenizer.ggml.add_space_prefix``: Llama 2's normalizer (prepend "▁", spaces to "▁") and a
Metaspace that prepends are True, Gemma's (spaces to "▁" only) False. llama.cpp prefixes a space to
the text and to the text after every special token, always, as Llama 2's normalizer does; a
Metaspace prefixes none where the text starts with a space, and with ``prepend_scheme: first``
(Mistral's) none after a special token, so there (and only there) llama.cpp's tokens differ from the
tokenizer's, of which a note tells. Added tokens are CONTROL when special and USER_DEFINED
otherwise (written with spaces for "▁": llama.cpp finds them in the raw text), the unknown token is
UNKNOWN, and ``<0xXX>`` tokens are BYTE.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import gguf

from tuneforge.core.errors import UserError
from tuneforge.io.ollama import added_ends

# Keys a copied file describes itself with, which the new file states for itself.
OWN_KEYS = ("general.architecture", "general.type", "general.file_type", "general.quantization_version",
            "general.alignment")
# The pre-tokenizers of tokenizer.json that llama.cpp knows by name (its tokenizer.ggml.pre).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen's: one digit at a time
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}  # a Split's regex -> llama.cpp's pre-tokenizer
SPACE = "\u2581"  # SentencePiece's space, "▁"
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece's byte tokens, as llama.cpp looks them up
ADDED_SCORE = -1000.0  # what llama.cpp's converters score added and unused tokens: matched whole, never joined


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
    """The tokenizer as llama.cpp reads it: a SentencePiece-style BPE (byte fallback) as its ``llama``
    model, a byte-level BPE as its ``gpt2`` model; then the special ids and the add-BOS/EOS flags."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError("the tokenizer is a slow (Python) one, whose vocabulary tuneforge does not read for GGUF",
                        "--model", fix="save the model with a fast tokenizer (tokenizer.json), or use --format hf")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        sentencepiece_fields(writer, tokenizer, backend, vocab_size)
    else:
        byte_level_fields(writer, tokenizer, backend, vocab_size)
    special_fields(writer, tokenizer)


def tokens_by_id(tokenizer, vocab_size: int) -> dict[int, str]:
    """{id: token}, or a UserError when an id lies past the model's embeddings (llama.cpp would index
    outside them)."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has token ids up to {max(by_id)}, past the model's {vocab_size} embeddings",
                        "--model", fix="resize the model's embeddings to the tokenizer")
    return by_id


def byte_level_fields(writer: gguf.GGUFWriter, tokenizer, backend: dict, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` model: tokens (padded to the model's vocabulary
    size), their types, the merges and the pre-tokenizer's name."""
    pre = pre_tokenizer(backend)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend.get("model", {}).get("merges") or []]
    if backend.get("model", {}).get("type") != "BPE" or pre is None or not merges:
        raise UserError("the tokenizer is neither a byte-level BPE with merges and a pre-tokenizer llama.cpp names "
                        "(gpt-2, smollm, llama-bpe, qwen2) nor a SentencePiece-style BPE (byte fallback)", "--model",
                        fix="export from the model's GGUF file, whose tokenizer is carried over, or use --format hf")
    by_id = tokens_by_id(tokenizer, vocab_size)
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


def space_rule(backend: dict) -> tuple[bool, bool] | None:
    """How a SentencePiece-style tokenizer writes spaces, as (add_space_prefix, splits at "▁"); None when
    it does more than llama.cpp's ``llama`` model can (which only turns spaces into "▁", prefixing one
    or not). Llama 2 and Gemma do it in the normalizer (transformers adds to Gemma's a Split on " ",
    which finds no space left), later converters in a Metaspace pre-tokenizer."""
    def step(part: dict) -> str:
        if part.get("type") == "Replace" and part.get("pattern") == {"String": " "} and part.get("content") == SPACE:
            return "replace"
        if part.get("type") == "Prepend" and part.get("prepend") == SPACE:
            return "prepend"
        return str(part.get("type"))

    norm, pre = backend.get("normalizer"), backend.get("pre_tokenizer")
    steps = sorted(step(part) for part in (norm.get("normalizers", []) if norm and norm.get("type") == "Sequence"
                                           else [norm] if norm else []))
    if not steps and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE:
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        return scheme != "never", pre.get("split", True)
    no_space_left = pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "})
    if steps in (["replace"], ["prepend", "replace"]) and no_space_left:
        return "prepend" in steps, False
    return None


def merge_scores(merges: list[tuple[str, str]], normal: set[str]) -> dict[str, float]:
    """{token: score} for each normal token a merge makes, ranked by its first merge (0, -1, -2, ...):
    llama.cpp joins the highest-scored pair first, as the BPE applies its earliest merge first."""
    scores: dict[str, float] = {}
    for left, right in merges:
        piece = left + right
        if piece in normal and piece not in scores:
            scores[piece] = -float(len(scores))
    return scores


def merge_gaps(merges: list[tuple[str, str]], normal: set[str], vocab: set[str]) -> tuple[int, int]:
    """(pairs of tokens that join into a normal token but are no merge, tokens whose merges other
    merges interleave): where llama.cpp, which joins any pair that makes a token and ranks all of a
    token's pairs as one, may cut a word otherwise than the BPE. Both are 0 for a tokenizer converted
    from SentencePiece."""
    pairs = set(merges)
    missing = sum(1 for token in normal for k in range(1, len(token))
                  if token[:k] in vocab and token[k:] in vocab and (token[:k], token[k:]) not in pairs)
    done, last, scattered = set(), None, 0
    for left, right in merges:
        piece = left + right
        if piece != last:
            scattered += piece in done
            done.add(piece)
            last = piece
    return missing, scattered


def sentencepiece_checks(model: dict, by_id: dict[int, str], rule: tuple[bool, bool] | None,
                         normal: set[str]) -> None:
    """A UserError for a SentencePiece-style BPE that llama.cpp's ``llama`` model cannot reproduce."""
    fix = "export from the model's GGUF file, whose tokenizer is carried over, or use --format hf"
    if rule is None:
        raise UserError("the tokenizer's normalizer or pre-tokenizer does more than turn spaces into \"▁\" (and "
                        "prefix one), which is all llama.cpp's SentencePiece tokenizer does", "--model", fix=fix)
    options = [key for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges")
               if model.get(key)]
    if options:
        raise UserError(f"the tokenizer's BPE sets {', '.join(options)}, which llama.cpp's SentencePiece tokenizer "
                        "does not have", "--model", fix=fix)
    present = set(by_id.values())
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in present]
    if missing:
        raise UserError(f"the tokenizer falls back to bytes but lacks the byte tokens {', '.join(missing[:4])}"
                        f"{' ...' if len(missing) > 4 else ''}, which llama.cpp looks up for every unknown character",
                        "--model", fix=fix)
    if rule[1] and any(SPACE in token[1:] for token in normal):
        raise UserError("the tokenizer's Metaspace cuts the text at every \"▁\", and llama.cpp, which does not, "
                        "would join tokens across it (the vocabulary has tokens with \"▁\" inside)", "--model", fix=fix)


def sentencepiece_fields(writer: gguf.GGUFWriter, tokenizer, backend: dict, vocab_size: int) -> None:
    """A SentencePiece-style BPE as llama.cpp's ``llama`` model: tokens (padded to the model's vocabulary
    size), scores that give the merge order back, token types and the space rule."""
    model = backend["model"]
    rule = space_rule(backend)
    by_id = tokens_by_id(tokenizer, vocab_size)
    added = tokenizer.added_tokens_decoder
    unk = tokenizer.unk_token_id
    normal = {token for i, token in by_id.items() if i not in added and i != unk and not BYTE_TOKEN.fullmatch(token)}
    sentencepiece_checks(model, by_id, rule, normal)
    metaspace = backend.get("pre_tokenizer") or {}
    if rule[0] and metaspace.get("type") == "Metaspace":
        after = ", nor text after a special token" if metaspace.get("prepend_scheme") == "first" else ""
        print(f"tuneforge: llama.cpp puts \"{SPACE}\" before the text and after every special token even where a space "
              f"is there, and this tokenizer's Metaspace does not prefix text that starts with a space{after}: there "
              "llama.cpp's tokens differ", file=sys.stderr)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    scores = merge_scores(merges, normal)
    floor = -float(len(scores))  # below every merge: a token no merge makes is one llama.cpp should not make
    missing, scattered = merge_gaps(merges, normal, set(by_id.values()))
    if missing or scattered:
        print(f"tuneforge: llama.cpp joins any two pieces that make a token, ranking all of a token's pairs as one; "
              f"{missing} pairs of this tokenizer make a token without being a merge and {scattered} tokens' merges "
              "are interleaved with others', so llama.cpp may cut some words otherwise", file=sys.stderr)
    tokens, scores_out, types = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            token, score, kind = f"[PAD{i}]", ADDED_SCORE, gguf.TokenType.UNUSED
        elif i == unk:
            score, kind = ADDED_SCORE, gguf.TokenType.UNKNOWN
        elif i in added:
            score = ADDED_SCORE
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            if not added[i].special:
                token = token.replace(SPACE, " ")  # llama.cpp finds it in the text before spaces become "▁"
        elif BYTE_TOKEN.fullmatch(token):
            score, kind = 0.0, gguf.TokenType.BYTE
        else:
            score, kind = scores.get(token, floor), gguf.TokenType.NORMAL
        tokens.append(token)
        scores_out.append(score)
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores_out)
    writer.add_token_types(types)
    writer.add_add_space_prefix(rule[0])


def special_fields(writer: gguf.GGUFWriter, tokenizer) -> None:
    """The special ids, and whether the tokenizer adds BOS and EOS: seen by encoding a word with and
    without its special tokens, which tells what its post-processor does."""
    for set_id, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            set_id(token_id)
    adds_bos, adds_eos = added_ends(tokenizer)
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(adds_eos)
