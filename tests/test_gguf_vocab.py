"""SentencePiece-style tokenizers (Llama 2, Mistral, Gemma) written to GGUF as llama.cpp's ``llama``
tokenizer model: tiny ones built in code and read back by llama.cpp, whose tokens must be the Hugging
Face tokenizer's; and Gemma 3 270M's, rebuilt from its Hugging Face tokenizer and set against the GGUF
file it came from (marked `real`)."""

from __future__ import annotations

import ctypes
import random

import gguf
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_model
from families import tiny_model
from tuneforge.core.errors import UserError
from tuneforge.io import gguf_export, gguf_vocab

try:
    import llama_cpp
except ImportError:  # the binding is a test dependency (make test installs it); without it those tests skip
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed")

SPACE = "\u2581"
BYTES = [f"<0x{b:02X}>" for b in range(256)]
CHARS = list(SPACE + "abcdefghilnorstuwyTH.,!é日本")
# Pieces best first, as SentencePiece ranks them. "ll" before "el": "cello" is "▁", "c", "e", "llo" for the
# BPE, where joining left to right (llama.cpp with equal scores) gives "▁", "c", "ell", "o".
PIECES = ["▁t", "ll", "he", "▁the", "el", "▁h", "er", "▁w", "or", "lo", "▁▁", "▁he", "llo", "▁hello", "ld", "▁wor",
          "▁world", "in", "is", "▁is", "▁i", "it", "▁th", "is▁", "▁▁▁", "es", "st", "est", "▁b", "▁be", "ell", "日本",
          "▁日本", "ow", "▁lo", "▁low", "▁lower", "ne", "▁ne", "new", "▁new", "▁newest"]
TEXTS = ["hello world", "the world is new", "Hello World", "hello", "bell yell", " hello", "hello ", "  two  spaces",
         "a   b", "lower newest lowest", "line\nbreak\n\nend", "tab\there", "héllo 日本 日本語", "emoji 🦙!",
         "ünïcödé ÿ", "T.H., is it?", "x", "", " ", "\n", "is is is", "the<s>end", "end of text</s>", "</s>hello"]


def sentencepiece_merges(pieces: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merges a converter from SentencePiece writes: every split of every piece into two tokens,
    piece by piece in rank order."""
    return [(piece[:k], piece[k:]) for piece in pieces for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab]


def build(kind: str, pieces: list[str] = PIECES, merges: list[tuple[str, str]] | None = None):
    """A tiny SentencePiece-style fast tokenizer. kind: ``llama2`` (Llama 2's tokenizer.json: a normalizer
    that prefixes "▁"), ``metaspace`` (a Metaspace that always prefixes), ``mistral`` (Metaspace,
    prefix at the start only) or ``gemma`` (no prefix; its ids and added tokens)."""
    if kind == "gemma":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
        user = ["\n", "\n\n", "<b>"]  # Gemma's vocabulary holds newline runs and HTML tags as plain added tokens
        head = specials + user
    else:
        specials, user = ["<unk>", "<s>", "</s>"], []
        head = specials
    vocab: dict[str, int] = {}
    for token in head + BYTES + CHARS + pieces:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=sentencepiece_merges(pieces, vocab) if merges is None else merges,
                                unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if kind in ("llama2", "gemma"):
        steps = [normalizers.Replace(" ", SPACE)]
        core.normalizer = normalizers.Sequence(([normalizers.Prepend(SPACE)] if kind == "llama2" else []) + steps)
        if kind == "gemma":  # as transformers builds Gemma's: a no-op after the normalizer
            core.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        core.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                         + ([decoders.Strip(" ", 1, 0)] if kind == "llama2" else []))
    else:
        scheme = "first" if kind == "mistral" else "always"
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=scheme, split=False)
        core.decoder = decoders.Sequence([decoders.Metaspace(replacement=SPACE, prepend_scheme=scheme, split=False),
                                          decoders.ByteFallback(), decoders.Fuse()])
    core.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    core.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    bos, eos = ("<bos>", "<eos>") if kind == "gemma" else ("<s>", "</s>")
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    extra = {"pad_token": "<pad>"} if kind == "gemma" else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, unk_token="<unk>", **extra)


def write_gguf(tokenizer, path, family: str = "llama"):
    """The tokenizer in a GGUF file with a tiny model of ``family`` (llama or Gemma 3)."""
    model = tiny_model("gemma3_text", len(tokenizer)) if family == "gemma" else make_tiny_model(len(tokenizer))
    return gguf_export.write_model(model, tokenizer, path)


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def load_vocab(path):
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def detokenize(llm, ids: list[int]) -> str:
    """llama.cpp's own detokenizer (llama_detokenize: the space prefix removed, special tokens not
    rendered); llama-cpp-python's detokenize also drops a leading space after BOS, which Gemma keeps."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buffer = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_detokenize(vocab, (llama_cpp.llama_token * len(ids))(*ids), len(ids), buffer, len(buffer),
                                   False, False)
    assert n >= 0
    return buffer.raw[:n].decode("utf-8")


def random_texts(count: int = 300, seed: int = 0) -> list[str]:
    """Strings of the tiny vocabulary's letters, spaces, newlines and characters it lacks (byte fallback)."""
    rng = random.Random(seed)
    alphabet = list("abdehilnorstwy") * 4 + [" "] * 8 + ["\n", "é", "日", "本", "ß", "🦙"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) for _ in range(count)]


def assert_same_tokens(llm, tokenizer, texts: list[str]) -> None:
    for text in texts:
        for add in (True, False):
            want = tokenizer(text, add_special_tokens=add)["input_ids"]
            got = llm.tokenize(text.encode(), add_bos=add, special=True)
            assert got == want, (text, add, tokenizer.convert_ids_to_tokens(want), tokenizer.convert_ids_to_tokens(got))


# -- the fields ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, prefix", [("llama2", True), ("metaspace", True), ("mistral", True), ("gemma", False)])
def test_a_sentencepiece_tokenizer_is_written_as_llama_cpps_llama_model(kind, prefix, tmp_path):
    tokenizer = build(kind)
    got = fields(write_gguf(tokenizer, tmp_path / "m.gguf"))
    vocab = tokenizer.get_vocab()
    assert got["tokenizer.ggml.model"] == "llama" and got["tokenizer.ggml.pre"] == "default"
    assert got["tokenizer.ggml.add_space_prefix"] is prefix
    assert got["tokenizer.ggml.add_bos_token"] is True and got["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.ggml.merges" not in got
    tokens, types, scores = got["tokenizer.ggml.tokens"], got["tokenizer.ggml.token_type"], got["tokenizer.ggml.scores"]
    assert len(tokens) == len(types) == len(scores) == len(tokenizer)
    assert all(types[vocab[b]] == gguf.TokenType.BYTE and tokens[vocab[b]] == b for b in BYTES)
    assert types[tokenizer.unk_token_id] == gguf.TokenType.UNKNOWN
    assert types[tokenizer.bos_token_id] == types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert got["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert got["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    if kind == "gemma":
        ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id)
        assert ids == (0, 1, 2, 3)
        assert [types[vocab[t]] for t in ("\n", "\n\n", "<b>")] == [gguf.TokenType.USER_DEFINED] * 3
        assert types[vocab["<start_of_turn>"]] == gguf.TokenType.CONTROL
    # Each piece outranks the pieces after it, as the merges order them.
    ranked = [scores[vocab[p]] for p in PIECES]
    assert ranked == sorted(ranked, reverse=True) and len(set(ranked)) == len(ranked)
    assert all(types[vocab[p]] == gguf.TokenType.NORMAL for p in PIECES)


def test_a_user_defined_token_is_written_with_spaces_for_the_sentencepiece_space(tmp_path):
    tokenizer = build("gemma")
    tokenizer.add_tokens([AddedToken(SPACE * 4, normalized=True, special=False)])
    got = fields(write_gguf(tokenizer, tmp_path / "m.gguf"))
    i = tokenizer.convert_tokens_to_ids(SPACE * 4)
    assert got["tokenizer.ggml.tokens"][i] == "    "
    assert got["tokenizer.ggml.token_type"][i] == gguf.TokenType.USER_DEFINED


def test_a_byte_level_bpe_is_still_written_as_the_gpt2_model(tmp_path):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<|endoftext|>"] + alphabet + ["Ġt", "he", "Ġthe"])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e"), ("Ġt", "he")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.add_special_tokens(["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    got = fields(write_gguf(tokenizer, tmp_path / "m.gguf"))
    assert got["tokenizer.ggml.model"] == "gpt2" and got["tokenizer.ggml.pre"] == "gpt-2"
    assert got["tokenizer.ggml.merges"] == ["Ġ t", "h e", "Ġt he"]
    assert "tokenizer.ggml.scores" not in got and "tokenizer.ggml.add_space_prefix" not in got


# -- refusals and notes -------------------------------------------------------------------------------


def test_missing_byte_tokens_are_refused(tmp_path):
    tokenizer = build("llama2")
    backend = tokenizer.backend_tokenizer
    vocab = {t: i for t, i in backend.get_vocab().items() if t != "<0x0A>"}
    vocab = {t: n for n, (t, _) in enumerate(sorted(vocab.items(), key=lambda kv: kv[1]))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=sentencepiece_merges(PIECES, vocab), unk_token="<unk>",
                                byte_fallback=True))
    core.normalizer = backend.normalizer
    broken = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    with pytest.raises(UserError, match="byte tokens <0x0A>"):
        write_gguf(broken, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("normalizer", [normalizers.NFKC(), normalizers.Sequence([normalizers.Lowercase(),
                                                                                  normalizers.Replace(" ", SPACE)])])
def test_a_normalizer_llama_cpp_does_not_apply_is_refused(normalizer, tmp_path):
    tokenizer = build("gemma")
    tokenizer.backend_tokenizer.normalizer = normalizer
    with pytest.raises(UserError, match="normalizer or pre-tokenizer"):
        write_gguf(tokenizer, tmp_path / "m.gguf")


def test_a_metaspace_that_splits_is_refused_when_tokens_hold_the_space_inside(tmp_path):
    tokenizer = build("metaspace")  # "is▁" holds the space after its first character
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, prepend_scheme="always", split=True)
    with pytest.raises(UserError, match="Metaspace cuts the text"):
        write_gguf(tokenizer, tmp_path / "m.gguf")
    pieces = [p for p in PIECES if SPACE not in p[1:]]
    fine = build("metaspace", pieces=pieces)
    fine.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, prepend_scheme="always", split=True)
    assert fields(write_gguf(fine, tmp_path / "n.gguf"))["tokenizer.ggml.model"] == "llama"


def test_merges_llama_cpp_cannot_follow_get_a_note(tmp_path, capsys):
    write_gguf(build("llama2"), tmp_path / "m.gguf")
    assert "may cut some words otherwise" not in capsys.readouterr().err
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + BYTES + CHARS + PIECES)}
    gapped = [m for m in sentencepiece_merges(PIECES, vocab) if m != ("▁he", "llo")]  # "▁hello"'s only split
    write_gguf(build("llama2", merges=gapped), tmp_path / "n.gguf")
    assert "1 pairs of this tokenizer make a token without being a merge" in capsys.readouterr().err


def test_gpt2_refusal_names_both_kinds(tmp_path):
    core = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    with pytest.raises(UserError, match="SentencePiece-style BPE"):
        gguf_vocab.tokenizer_fields(gguf.GGUFWriter(tmp_path / "m.gguf", "llama"), tokenizer, 8)


# -- llama.cpp reads them ----------------------------------------------------------------------------


def plain(texts: list[str]) -> list[str]:
    """The texts a Metaspace tokenizer and llama.cpp cut alike: no special token, no leading space."""
    return [t for t in texts if "<" not in t and not t.startswith(" ")]


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["llama2", "metaspace", "mistral", "gemma"])
def test_llama_cpp_tokenizes_as_the_hugging_face_tokenizer(kind, tmp_path):
    tokenizer = build(kind)
    texts = TEXTS + random_texts()
    if kind == "gemma":
        texts += ["a<start_of_turn>b\n<end_of_turn>", "x\n\n\ny", "<b>bold</b>", "<eos> hello", "<bos>  two"]
    if kind == "metaspace":
        texts = [t for t in texts if not t.startswith(" ")]
    if kind == "mistral":
        texts = plain(texts)
    llm = load_vocab(write_gguf(tokenizer, tmp_path / "m.gguf", family="gemma" if kind == "gemma" else "llama"))
    assert_same_tokens(llm, tokenizer, texts)


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["llama2", "metaspace", "mistral", "gemma"])
def test_llama_cpp_detokenizes_to_the_text(kind, tmp_path):
    tokenizer = build(kind)
    llm = load_vocab(write_gguf(tokenizer, tmp_path / "m.gguf"))
    texts = [t for t in TEXTS if "<" not in t] + random_texts(100, seed=1)
    for text in plain(texts) if kind in ("metaspace", "mistral") else texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert detokenize(llm, ids) == tokenizer.decode(ids) == text, (text, tokenizer.convert_ids_to_tokens(ids))


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["metaspace", "mistral"])
def test_a_metaspace_tokenizer_differs_where_the_note_says(kind, tmp_path, capsys):
    """A Metaspace adds no "▁" to text that starts with a space, and with prepend_scheme "first" none
    after a special token; llama.cpp adds one to both (as Llama 2's normalizer does)."""
    tokenizer = build(kind)
    llm = load_vocab(write_gguf(tokenizer, tmp_path / "m.gguf"))
    note = capsys.readouterr().err
    assert "does not prefix text that starts with a space" in note
    assert ("nor text after a special token" in note) is (kind == "mistral")
    vocab = tokenizer.get_vocab()
    assert tokenizer(" hello", add_special_tokens=False)["input_ids"] == [vocab["▁hello"]]
    assert llm.tokenize(b" hello", add_bos=False, special=True) == [vocab["▁▁"], vocab["he"], vocab["llo"]]
    after = tokenizer("the</s>hello", add_special_tokens=False)["input_ids"][2:]
    assert after == ([vocab["he"], vocab["llo"]] if kind == "mistral" else [vocab["▁hello"]])
    assert llm.tokenize(b"the</s>hello", add_bos=False, special=True)[2:] == [vocab["▁hello"]]


def test_the_llama2_normalizer_gets_no_note(tmp_path, capsys):
    write_gguf(build("llama2"), tmp_path / "m.gguf")
    assert "tuneforge:" not in capsys.readouterr().err


@needs_llama_cpp
def test_equal_scores_as_llama_cpps_converter_writes_them_would_cut_words_otherwise(tmp_path, monkeypatch):
    """Why the scores rank the merges: llama.cpp's converter for a tokenizer.json scores every token
    -1000, and llama.cpp then joins left to right: "▁", "c", "ell", "o" where the BPE, which joins "ll"
    and then "llo" first, gives "▁", "c", "e", "llo"."""
    tokenizer = build("llama2")
    monkeypatch.setattr(gguf_vocab, "merge_scores", lambda merges, normal: {t: -1000.0 for t in normal})
    llm = load_vocab(write_gguf(tokenizer, tmp_path / "m.gguf"))
    texts = ["hello world", "cello", "lower newest lowest"]
    differ = [t for t in texts if llm.tokenize(t.encode(), add_bos=False, special=True)
              != tokenizer(t, add_special_tokens=False)["input_ids"]]
    assert differ


# -- Gemma 3 270M, rebuilt from its Hugging Face tokenizer --------------------------------------------


@pytest.fixture(scope="module")
def gemma_files(tmp_path_factory):
    """(the original GGUF file, one with the tokenizer rebuilt from the Hugging Face tokenizer, that tokenizer)."""
    from tuneforge.io.load import find_named_gguf, load_model

    model, tokenizer = load_model("gemma3-270m", dtype="float32", device="cpu")
    rebuilt = gguf_export.write_model(model, tokenizer, tmp_path_factory.mktemp("gemma") / "rebuilt.gguf")
    return find_named_gguf("gemma3-270m"), rebuilt, tokenizer


@pytest.mark.real
def test_gemma3_tokenizer_fields_rebuilt_match_the_original_file(gemma_files):
    original, rebuilt, _ = gemma_files
    want, got = fields(original), fields(rebuilt)
    for key in ("model", "pre", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
                "add_bos_token", "add_eos_token", "add_space_prefix"):
        assert got[f"tokenizer.ggml.{key}"] == want[f"tokenizer.ggml.{key}"], key
    tokens, types, scores = (got[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    w_tokens, w_types, w_scores = (want[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert len(tokens) == len(w_tokens) == 262144
    differ = [i for i in range(len(tokens)) if (tokens[i], types[i]) != (w_tokens[i], w_types[i])]
    # The file writes Gemma's runs of 2..31 spaces as user-defined "  ".., which transformers' GGUF
    # reader turns into plain "▁▁".. pieces; and its <unk> is CONTROL where ours is UNKNOWN.
    spaces = [i for i in differ if set(w_tokens[i]) == {" "} and tokens[i] == SPACE * len(w_tokens[i])
              and (w_types[i], types[i]) == (gguf.TokenType.USER_DEFINED, gguf.TokenType.NORMAL)]
    unk = [i for i in differ if i == 3 and (w_types[i], types[i]) == (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)]
    assert len(spaces) == 30 and unk == [3] and len(differ) == 31, [(i, w_tokens[i], tokens[i]) for i in differ[:10]]
    # Scores: the same order for every normal token a merge makes (the file's are SentencePiece's).
    normal = [i for i in range(len(tokens)) if w_types[i] == types[i] == gguf.TokenType.NORMAL and len(tokens[i]) > 1]
    assert len(normal) > 200000
    by_ours = sorted(normal, key=lambda i: (-scores[i], i))
    by_file = sorted(normal, key=lambda i: (-w_scores[i], i))
    assert by_ours == by_file
    assert all(scores[i] == w_scores[i] for i in range(len(tokens)) if types[i] == gguf.TokenType.BYTE)


@pytest.mark.real
@needs_llama_cpp
def test_gemma3_rebuilt_tokenizer_cuts_text_as_the_original_file_and_hugging_face(gemma_files):
    original, rebuilt, tokenizer = gemma_files
    texts = TEXTS + ["The quick brown fox jumps over the lazy dog.", "  indented\n\tcode = f(x) # comment",
                     "Здравствуй, мир! Καλημέρα κόσμε. مرحبا بالعالم", "東京都は日本の首都です。🦙🦙 ✅",
                     "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n", "1234567890 3.14159",
                     "https://example.com/a?b=c&d=e", "<b>bold</b> <table><tr><td>x</td></tr></table>",
                     "     five spaces", "tabs\t\t\tand\n\n\n\nnewlines", "CamelCaseIdentifier snake_case_name"]
    texts += random_texts(100)
    file_llm, rebuilt_llm = load_vocab(original), load_vocab(rebuilt)
    assert_same_tokens(rebuilt_llm, tokenizer, texts)
    for text in texts:
        assert rebuilt_llm.tokenize(text.encode(), special=True) == file_llm.tokenize(text.encode(), special=True)
