"""tuneforge's GGUF writer against llama.cpp's own converter (convert_hf_to_gguf.py): each family written,
as a tiny random model saved in Hugging Face's format, is converted by both (f32) and the two files must
hold the same tensors (names, shapes, types, values) and the same keys. The converter is a reference for
this test only, never a dependency of tuneforge: `make llama-cpp-converter` (part of `make test`) takes
it from the llama-cpp-python source distribution into .venv, and without it the module is skipped."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import REPO
from families import FAMILIES as BUILDABLE, tiny_config
from test_export import GGUF_FAMILIES, bpe_tokenizer
from tuneforge.io import gguf_export

CONVERTER = REPO / ".venv" / "llama.cpp-converter"
pytestmark = pytest.mark.skipif(not (CONVERTER / "convert_hf_to_gguf.py").is_file(),
                                reason="llama.cpp's converter is not in .venv (make llama-cpp-converter)")

# The converter as a library, with three changes for these test models, which carry a made-up byte-level
# BPE tokenizer rather than a real model's: its table of known pre-tokenizers (a hash of one text's token
# ids, so of the vocabulary) cannot know ours, which is GPT-2's byte-level pre-tokenizer ("gpt-2"); a
# missing tokenizer.model raises FileNotFoundError (its cue to try the next kind of tokenizer) without
# importing sentencepiece, which is not installed; and Gemma 1 and 2 and Phi-3, which read only a
# SentencePiece tokenizer.model, take the BPE path that Gemma 3 and Phi-4 take (which also leaves out
# Gemma 1's CodeGemma token ids and Gemma's `add_space_prefix = false`).
WORKER = """
import contextlib, json, sys, traceback
sys.argv[0] = "convert_hf_to_gguf.py"
import convert_hf_to_gguf
from conversion.base import TextModel
from conversion.gemma import Gemma2Model, GemmaModel
from conversion.phi import Phi3MiniModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sentencepiece = TextModel._create_vocab_sentencepiece
def spm_or_none(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(self.dir_model / "tokenizer.model")
    return sentencepiece(self)
TextModel._create_vocab_sentencepiece = spm_or_none
GemmaModel.set_vocab = Gemma2Model.set_vocab = Phi3MiniModel.set_vocab = TextModel._set_vocab_gpt2
# One conversion a line of arguments (importing torch and the converter takes longer than converting a
# tiny model); each answered on stdout with a line: null, or the traceback.
for line in sys.stdin:
    sys.argv[1:] = json.loads(line)
    error = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            convert_hf_to_gguf.main()
    except BaseException:
        error = traceback.format_exc()
    print(json.dumps(error), flush=True)
"""
# config.json keys the converter reads that transformers 5 no longer saves (real checkpoints have them).
OLD_KEYS = {"gpt2": lambda config: {"n_ctx": config["n_positions"]}}
# Families the converter cannot convert under transformers 5, and why.
UNCONVERTIBLE = {"gpt_neox": "its converter reads config['rotary_pct'], which transformers 5's GPTNeoXConfig neither "
                             "saves nor keeps when loaded (KeyError: 'rotary_pct')"}
# Config changes, beyond test_export's, for what the converter does not read: it writes GPT-2's
# feed_forward_length as 4 * n_embd whatever n_inner says.
# Phi-2's and Falcon's converters also write it as 4 * hidden_size, whatever intermediate_size and
# ffn_hidden_size say; Falcon's writes the context length as 2048, whatever max_position_embeddings says.
CHANGES = {"gpt2": {"n_inner": None}, "phi": {"intermediate_size": 256},
           "falcon": {"ffn_hidden_size": 256, "max_position_embeddings": 2048}}

# Never compared: what follows from the rest, or describes the file.
UNCOMPARED = {
    "GGUF.kv_count", "GGUF.tensor_count",  # the keys and tensors are compared one by one
    "general.name",  # ours: the output file's stem; the converter's: the folder's
    "general.basename", "general.size_label", "general.finetune",  # the converter's guesses from names and sizes
    "general.quantization_version",  # the converter writes it for every file; it means something only when quantized
}
# Keys one file may leave out where its value is what llama.cpp assumes when the key is absent: that
# assumption, from the file's other keys (named without the "<arch>." prefix).
DEFAULTS = {
    "vocab_size": lambda f: len(f["tokenizer.ggml.tokens"]),
    "rope.dimension_count": lambda f: f.get("attention.key_length", f["embedding_length"] // f["attention.head_count"]),
    "rope.freq_base": lambda f: 10000.0,
    "attention.head_count_kv": lambda f: f["attention.head_count"],
    "attention.key_length": lambda f: f["embedding_length"] // f["attention.head_count"],
    "attention.value_length": lambda f: f["embedding_length"] // f["attention.head_count"],
    "attention.sliding_window": lambda f: 0,  # no window
    "rope.scaling.original_context_length": lambda f: f["context_length"],
    # llama.cpp's for the "gpt-2" pre-tokenizer; the converter copies only an add_bos_token that
    # tokenizer_config.json states (transformers 5 saves none), where ours states the tokenizer's own.
    "tokenizer.ggml.add_bos_token": lambda f: False,
    "tokenizer.ggml.add_eos_token": lambda f: False,
}
# Keys only ours holds, as a deliberate choice: the layer kinds of the model's own layer_types, where the
# converter leaves llama.cpp's fixed pattern for the architecture (Gemma 3: five sliding layers to one).
OURS_ONLY = {"attention.sliding_window_pattern"}
# Keys only the converter writes, which llama.cpp does not read (it names them, and loads nothing by them):
# Falcon's note that its q/k/v rows were regrouped.
THEIRS_ONLY = {"tensor_data_layout"}


def written_and_variants() -> list[str]:
    """The model types written, and test_export's variants of them (llama3: Llama 3's RoPE, a tied head)."""
    names = set(gguf_export.written())
    return sorted(names | {name for name in GGUF_FAMILIES if name not in names and name in BUILDABLE
                           and tiny_config(name).model_type in names})


@pytest.fixture(scope="module")
def convert(tmp_path_factory):
    """convert(hf, out): the Hugging Face folder ``hf`` as an f32 GGUF file by the converter."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CONVERTER / "gguf-py"), str(CONVERTER)])}
    log = tmp_path_factory.mktemp("converter") / "log.txt"
    with open(log, "w") as err, subprocess.Popen([sys.executable, "-c", WORKER], cwd=CONVERTER, env=env, text=True,
                                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err) as worker:
        def run(hf: Path, out: Path) -> None:
            start = log.stat().st_size
            worker.stdin.write(json.dumps([str(hf), "--outtype", "f32", "--outfile", str(out)]) + "\n")
            worker.stdin.flush()
            ready, _, _ = select.select([worker.stdout], [], [], 300)
            answer = worker.stdout.readline() if ready else ""
            said = log.read_bytes()[start:].decode(errors="replace")[-4000:]
            assert answer, f"the converter stopped or hung:\n{said}"
            assert json.loads(answer) is None, f"the converter failed:\n{said}\n{json.loads(answer)}"

        yield run
        worker.stdin.close()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()


def fields(reader: gguf.GGUFReader) -> dict[str, tuple[list, object]]:
    """Each key's (value types, value), the architecture's keys named without their "<arch>." prefix."""
    prefix = reader.fields["general.architecture"].contents() + "."
    return {name.removeprefix(prefix): (list(field.types), field.contents())
            for name, field in reader.fields.items() if name not in UNCOMPARED}


def same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-6 * max(1, abs(b))
    return a == b


def shown(value) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."


def one_sided(key: str, label: str, having: dict, lacking: dict, ours: bool) -> str | None:
    """What is wrong with ``key`` being in one file only (None: nothing)."""
    value = having[key][1]
    if (ours and key in OURS_ONLY) or (not ours and key in THEIRS_ONLY):
        return None
    if key in DEFAULTS:
        assumed = DEFAULTS[key]({k: v for k, (_, v) in lacking.items()})
        return None if same_value(value, assumed) else \
            f"key {label} {'extra' if ours else 'missing'}: {shown(value)}, where llama.cpp assumes {shown(assumed)}"
    return f"key {label} {'extra (ours' if ours else 'missing (converter'}: {shown(value)})"


def differences(ours: Path, theirs: Path) -> list[str]:
    out = []
    mine_r, ref_r = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    mine, ref = fields(mine_r), fields(ref_r)
    arch = ref["general.architecture"][1]
    for key in sorted(mine.keys() | ref.keys()):
        label = key if key.startswith(("general.", "tokenizer.", "GGUF.")) else f"{arch}.{key}"
        if key not in ref:
            out.append(one_sided(key, label, mine, ref, ours=True))
        elif key not in mine:
            out.append(one_sided(key, label, ref, mine, ours=False))
        elif mine[key][0] != ref[key][0]:
            out.append(f"key {label} type {[t.name for t in mine[key][0]]} != converter's "
                       f"{[t.name for t in ref[key][0]]}")
        elif not same_value(mine[key][1], ref[key][1]):
            out.append(f"key {label} = {shown(mine[key][1])} != converter's {shown(ref[key][1])}")
    mine_t, ref_t = {t.name: t for t in mine_r.tensors}, {t.name: t for t in ref_r.tensors}
    if "output.weight" in mine_t.keys() - ref_t.keys() and \
            np.array_equal(mine_t["output.weight"].data, mine_t["token_embd.weight"].data):
        # A tied head, written as a copy of the embedding where llama.cpp's graph requires an output
        # tensor (OLMo 2): the converter writes none, and llama.cpp then refuses its file.
        del mine_t["output.weight"]
    out += [f"tensor {name} missing" for name in sorted(ref_t.keys() - mine_t.keys())]
    out += [f"tensor {name} extra" for name in sorted(mine_t.keys() - ref_t.keys())]
    for name in sorted(mine_t.keys() & ref_t.keys()):
        a, b = mine_t[name], ref_t[name]
        if (a.tensor_type, list(a.shape)) != (b.tensor_type, list(b.shape)):
            out.append(f"tensor {name} {a.tensor_type.name}{list(a.shape)} != converter's "
                       f"{b.tensor_type.name}{list(b.shape)}")
        elif (err := np.abs(np.asarray(a.data, np.float64) - np.asarray(b.data, np.float64)).max()) > 1e-6:
            out.append(f"tensor {name} differs by up to {err:.3g}")
    return [line for line in out if line]


@pytest.mark.parametrize("name", written_and_variants())
def test_gguf_matches_llama_cpps_converter(name, convert, tmp_path):
    from transformers import AutoModelForCausalLM

    if name not in BUILDABLE:
        pytest.skip(f"tests/families.py builds no {name}")
    if name in UNCONVERTIBLE:
        pytest.skip(UNCONVERTIBLE[name])
    tokenizer, hf = bpe_tokenizer(), tmp_path / "hf"
    torch.manual_seed(0)
    changes = {**GGUF_FAMILIES.get(name, {}), **CHANGES.get(name, {})}
    model = AutoModelForCausalLM.from_config(tiny_config(name, len(tokenizer), **changes))
    with torch.no_grad():  # biases and norms off their zero and one starts, so a misplaced one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    for part in (model, tokenizer):
        part.save_pretrained(hf)
    if name in OLD_KEYS:
        config = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps({**OLD_KEYS[name](config), **config}, indent=2))
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    gguf_export.write_model(model.eval(), tokenizer, ours, dtype="f32")
    convert(hf, theirs)
    found = differences(ours, theirs)
    assert not found, f"{name}: {len(found)} differences from llama.cpp's converter:\n" + "\n".join(found)
