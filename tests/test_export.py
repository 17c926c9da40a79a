"""Export: GGUF for llama.cpp (merged, and a LoRA adapter file), the Hugging Face directory, and the Ollama
Modelfile. Files are read back with transformers (gguf_file=) and, where the binding is installed, run
in llama.cpp itself through llama-cpp-python."""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import CHAT_TEMPLATE, REPO, make_tiny_model
from tuneforge import cli
from tuneforge.core import config
from tuneforge.core.errors import UserError
from tuneforge.eval.generate import encode_prompt, generate
from tuneforge.io import gguf_export, ollama
from tuneforge.io.export import export, source_gguf
from tuneforge.io.load import load_model
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods.registry import get_method

try:
    import llama_cpp
except ImportError:  # the binding is a test dependency (make test installs it); without it those tests skip
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed")

TEXT = "hello the world, the end of the theme"
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def bpe_tokenizer(template: str = CHAT_TEMPLATE):
    """conftest's byte-level tokenizer with three merges: GGUF cannot hold an empty merge list."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he",
                                                                                                       "Ġthe"])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e"), ("Ġt", "he")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=template)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The tiny llama saved with bpe_tokenizer (conftest's tiny_dir has no merges for a GGUF to hold)."""
    tokenizer, path = bpe_tokenizer(), tmp_path_factory.mktemp("tiny-bpe")
    for part in (make_tiny_model(len(tokenizer)), tokenizer):
        part.save_pretrained(path)
    return path


def make_adapter(base_dir: Path, out: Path, method: str, **settings) -> Path:
    """An adapter of ``method`` on the tiny base with every trained tensor moved off its start."""
    model, _ = load_model(str(base_dir))
    mod = get_method(method)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = mod.inject(model, mod.Config(**settings))
    with torch.no_grad():
        for p in handle.trainable(model).values():
            p.add_(0.2 * torch.randn_like(p))
    return save_adapter(model, handle, out)


def logits_with(base_dir: Path, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    model, _ = load_model(str(base_dir))
    if adapter is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_adapter(model, adapter)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def gguf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def lora_dir(base_dir, tmp_path_factory) -> Path:
    return make_adapter(base_dir, tmp_path_factory.mktemp("lora") / "final", "lora", r=4, lora_alpha=8,
                        target_modules="all-linear")


def ids_of() -> list[int]:
    return bpe_tokenizer()(TEXT)["input_ids"]


def test_merged_lora_f32_reads_back_in_transformers_with_the_adapter_logits(base_dir, lora_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "model.gguf"
    assert export(str(base_dir), out, "gguf", adapter_dir=lora_dir) == [out]
    ids = ids_of()
    assert (gguf_logits(out, ids) - logits_with(base_dir, lora_dir, ids)).abs().max() < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert tokenizer(TEXT)["input_ids"] == ids and tokenizer.chat_template == CHAT_TEMPLATE
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2" and fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["tokenizer.ggml.token_type"].contents()[:3] == [gguf.TokenType.CONTROL] * 3


# Measured on the tiny model, whose logits reach 0.66: f16 1.6e-3, bf16 8.9e-3, q8_0 4.2e-2, q4_0 0.53 (a
# random 64-wide model has no outliers for 4 bits to spare; docs/export.md has what q4_0 keeps of the
# default model).
@pytest.mark.parametrize("dtype,tolerance", [("f16", 5e-3), ("bf16", 3e-2), ("q8_0", 0.1), ("q4_0", 1.0)])
def test_smaller_dtypes_stay_within_their_tolerance(base_dir, lora_dir, tmp_path, dtype, tolerance):
    out = tmp_path / f"model-{dtype}.gguf"
    export(str(base_dir), out, "gguf", adapter_dir=lora_dir, dtype=dtype)
    ids = ids_of()
    diff = (gguf_logits(out, ids) - logits_with(base_dir, lora_dir, ids)).abs().max()
    assert 1e-7 < diff < tolerance  # not exact (the weights were rounded), but close
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.attn_q.weight"] == dtype.upper()
    assert kinds["token_embd.weight"] == ("Q8_0" if dtype == "q4_0" else dtype.upper())


@pytest.mark.parametrize("method,settings", [
    ("lora", {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "k_proj"]}),
    ("lora", {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "v_proj"]}),
    ("ia3", {}),
    ("qlora", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"], "block_size": 32}),
    ("vera", {"r": 8, "target_modules": "all-linear"}),
], ids=["rslora", "dora", "ia3", "qlora", "vera"])
def test_each_mergeable_method_exports_merged(base_dir, tmp_path, method, settings):
    adapter = make_adapter(base_dir, tmp_path / "adapter", method, **settings)
    out = tmp_path / "model.gguf"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(str(base_dir), out, "gguf", adapter_dir=adapter)
    assert ("4-bit" in " ".join(str(w.message) for w in caught)) == (method == "qlora")
    ids = ids_of()
    assert (gguf_logits(out, ids) - logits_with(base_dir, adapter, ids)).abs().max() < 1e-4


def tensors(path: Path) -> dict[str, np.ndarray]:
    """Each tensor of a float32 GGUF file in torch's shape."""
    return {t.name: np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lora_file_applies_to_the_base_file_as_the_merge(base_dir, tmp_path, rslora):
    """llama.cpp's arithmetic on the files: W + alpha / r * B A, with r read from B, is the merged weight."""
    adapter = make_adapter(base_dir, tmp_path / "adapter", "lora", r=4, lora_alpha=8, use_rslora=rslora,
                           target_modules="all-linear")
    export(str(base_dir), tmp_path / "base.gguf", "gguf")
    export(str(base_dir), tmp_path / "merged.gguf", "gguf", adapter_dir=adapter)
    export(str(base_dir), tmp_path / "lora.gguf", "gguf-lora", adapter_dir=adapter)
    fields = gguf.GGUFReader(tmp_path / "lora.gguf").fields
    assert [fields[k].contents() for k in ("general.type", "adapter.type")] == ["adapter", "lora"]
    alpha = fields["adapter.lora.alpha"].contents()
    assert alpha == pytest.approx(8 * math.sqrt(4) if rslora else 8)  # alpha / r is the scale trained with
    base, merged, lora = (tensors(tmp_path / f"{n}.gguf") for n in ("base", "merged", "lora"))
    pairs = [name[:-len(".lora_a")] for name in lora if name.endswith(".lora_a")]
    assert len(pairs) == 2 * 7 and "blk.0.attn_q.weight" in pairs
    for name in pairs:
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        np.testing.assert_allclose(base[name] + alpha / b.shape[1] * b @ a, merged[name], atol=1e-5)


def test_rope_rows_pairs_each_heads_halves():
    rows = torch.arange(2 * 8).float()[:, None]  # two heads of dimension 8
    assert gguf_export.rope_rows(rows, 2)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("method,settings,words", [
    ("lora", {"use_dora": True, "target_modules": ["q_proj"]}, "DoRA"),
    ("lora", {"target_modules": ["q_proj"], "modules_to_save": ["model.norm"]}, "whole modules"),
    ("ia3", {}, "IA3 rescales activations by learned vectors, not a low-rank update"),
], ids=["dora", "modules-to-save", "ia3"])
def test_an_adapter_with_no_lora_form_is_refused_naming_the_formats_that_work(base_dir, tmp_path, method, settings,
                                                                            words):
    adapter = make_adapter(base_dir, tmp_path / "adapter", method, **settings)
    with pytest.raises(UserError, match=words) as exc:
        export(str(base_dir), tmp_path / "lora.gguf", "gguf-lora", adapter_dir=adapter)
    assert "exports merged only: --format gguf" in exc.value.line() and "--format hf" in exc.value.line()
    assert not (tmp_path / "lora.gguf").exists()


@pytest.mark.parametrize("method,settings,peft", [
    ("prompt", {"num_virtual_tokens": 2}, True), ("prefix", {"num_virtual_tokens": 2}, True),
    ("adapter", {"bottleneck_size": 4}, False)])
def test_a_method_that_cannot_be_merged_is_refused_for_every_format_naming_where_to_serve_it(
        base_dir, tmp_path, method, settings, peft):
    """Not sent from one refused export to another: each format says the same, and names the way to
    serve it (the base with the PEFT folder in transformers, or tuneforge generate)."""
    adapter = make_adapter(base_dir, tmp_path / "adapter", method, **settings)
    for fmt, out in (("gguf", "m.gguf"), ("gguf-lora", "lora.gguf"), ("hf", "merged")):
        with pytest.raises(UserError, match="rather than changing its weights, so no model file") as exc:
            export(str(base_dir), tmp_path / out, fmt, adapter_dir=adapter)
        line = exc.value.line()
        assert line.startswith(f"{adapter}: the {method} method {get_method(method).ADDS} rather than"), line
        assert "tuneforge generate --adapter" in line and ("PEFT loads" in line) == peft
        assert "--format gguf" not in exc.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_bad_requests_get_one_line_and_exit_2(base_dir, lora_dir, tmp_path, capsys):
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"mine")
    model, adapter, out = ["--model", str(base_dir)], ["--adapter", str(lora_dir)], ["--out", str(tmp_path / "x")]
    cases = [(model + adapter + out + ["--dtype", "q4_K_M"], "dtype 'q4_K_M'"),
             (model + adapter + ["--out", str(taken)], "the output exists"),
             (model + adapter + out + ["--format", "hf", "--dtype", "q8_0"], "f32, f16 or bf16"),
             (model + adapter + out + ["--format", "hf", "--ollama"], "points at a GGUF"),
             (model + out + ["--format", "gguf-lora"], "made from an adapter")]
    for argv, words in cases:
        code, err = run_cli(["export", *argv], capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert taken.read_bytes() == b"mine" and not (tmp_path / "x").exists()
    code, err = run_cli(["export", *model, "--out", str(taken), "--overwrite"], capsys)
    assert code == 0 and taken.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("name,changes,words", [
    ("opt", {}, "llama.cpp has no graph tuneforge writes for 'opt' (GGUF is written for falcon, gemma, "),
    ("qwen3_moe", {"norm_topk_prob": False}, "qwen3moe graph assumes norm_topk_prob = True"),
    ("smollm3", {}, "smollm3 graph assumes no_rope_layers = [1, 1], and this model has [1, 0]"),
    ("gemma2", {"tie_word_embeddings": False}, "gemma2 graph uses the embedding as the output head"),
    ("llama", {"hidden_act": "gelu"}, "uses a 'gelu' activation, and llama.cpp's llama graph computes 'silu'"),
], ids=["no-graph", "unnormalized-experts", "nope-pattern", "untied-gemma2", "activation"])
def test_what_llama_cpp_cannot_run_is_refused_in_one_line_naming_the_family(tmp_path, name, changes, words):
    from families import tiny_config
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config(name, len(bpe_tokenizer()), **changes)).save_pretrained(tmp_path / name)
    bpe_tokenizer().save_pretrained(tmp_path / name)
    with pytest.raises(UserError, match=re.escape(words)) as exc:
        export(str(tmp_path / name), tmp_path / "m.gguf", "gguf")
    assert "--format hf" in exc.value.fix and not (tmp_path / "m.gguf").exists()
    # the model, not the --model option: the base may be the one an adapter records
    assert exc.value.line().startswith(f"the model ({tiny_config(name, 8).model_type}): ")


def test_a_failed_write_leaves_nothing(base_dir, tmp_path, monkeypatch):
    def broken(model):
        yield "token_embd.weight", np.zeros((4, 4), np.float32)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_export, "model_tensors", broken)
    with pytest.raises(UserError, match="no space"):
        export(str(base_dir), tmp_path / "m.gguf", "gguf")
    assert list(tmp_path.iterdir()) == []


def test_hf_format_is_the_merge_directory(base_dir, lora_dir, tmp_path):
    out = tmp_path / "merged"
    export(str(base_dir), out, "hf", adapter_dir=lora_dir)
    ids = ids_of()
    assert (logits_with(out, None, ids) - logits_with(base_dir, lora_dir, ids)).abs().max() < 1e-5


def test_a_gguf_base_carries_its_tokenizer_and_keys_over(base_dir, tmp_path):
    first = tmp_path / "first.gguf"
    export(str(base_dir), first, "gguf")
    again = tmp_path / "again.gguf"
    export(str(first), again, "gguf", dtype="f16")
    old, new = gguf.GGUFReader(first).fields, gguf.GGUFReader(again).fields
    for key in ("general.name", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre"):
        assert new[key].contents() == old[key].contents()
    assert new["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    # A run's model folder (full fine-tuning's final/) finds the GGUF its run started from.
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: {first}\n")
    assert source_gguf(str(run / "final")) == first and source_gguf(str(base_dir)) is None


def go_render(template: str, values: dict[str, str]) -> str:
    """The Go template forms the Modelfile uses ({{ if .X }}...{{ end }} and {{ .X }}), rendered as Ollama
    renders the turn being answered: cut after {{ .Response }}."""
    template = template[:template.index("{{ .Response }}")]
    template = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", lambda m: m[2] if values.get(m[1]) else "",
                      template, flags=re.S)
    return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values[m[1]], template)


def modelfile_template(text: str) -> str:
    return re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)[1]


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, SMOL_TEMPLATE], ids=["chatml", "default-system"])
def test_modelfile_template_renders_the_chat_template(template):
    tokenizer = bpe_tokenizer(template)
    text = ollama.modelfile(tokenizer, "./m.gguf")
    system, prompt = "Is it positive?", "Text: a fine film."
    jinja = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                                          tokenize=False, add_generation_prompt=True)
    assert go_render(modelfile_template(text), {"System": system, "Prompt": prompt}) == jinja
    assert 'PARAMETER stop "<|im_end|>"' in text.splitlines()
    default = re.search(r'^SYSTEM """(.*)"""$', text, re.M)
    assert (default[1] if default else None) == ("You are a helpful assistant." if template == SMOL_TEMPLATE else None)


def test_modelfile_refuses_a_template_it_cannot_say():
    folded = ("{% for m in messages %}{% if m['role'] == 'system' %}{% set s = m['content'] %}{% else %}"
              "[INST] {{ s }} {{ m['content'] }} [/INST]{% endif %}{% endfor %}")
    with pytest.raises(UserError, match="Ollama TEMPLATE"):
        ollama.modelfile(bpe_tokenizer(folded), "./m.gguf")


def test_ollama_modelfile_beside_the_gguf_carries_the_runs_question(base_dir, tmp_path):
    run = tmp_path / "run"
    adapter = make_adapter(base_dir, run / "final", "lora", r=4, target_modules=["q_proj"])
    question = "Is this review positive or negative?"
    cfg = config.from_dict({"model": str(base_dir), "data": {"format": "classification", "path": "x.tsv",
                                                             "instruction": question}})
    (run / "config.yaml").write_text(config.to_yaml(cfg))
    out = tmp_path / "deploy" / "model.gguf"
    assert export(str(base_dir), out, "gguf", adapter_dir=adapter, ollama_file=True) == [out, out.parent / "Modelfile"]
    text = (out.parent / "Modelfile").read_text()
    assert text.splitlines()[1] == "FROM ./model.gguf" and f'SYSTEM """{question}"""' in text
    with pytest.raises(UserError, match="Hugging Face folder"):  # ADAPTER needs a GGUF base to name in FROM
        export(str(base_dir), tmp_path / "lora.gguf", "gguf-lora", adapter_dir=adapter, ollama_file=True)


@contextlib.contextmanager
def llama(path: Path, lora: Path | None = None):
    """llama.cpp on one thread with a float32 cache, so that its sums are comparable to torch's; closed
    when the block ends (one left for the interpreter's exit aborts it as its threads are torn down)."""
    with contextlib.closing(_llama(path, lora)) as llm:
        yield llm


def _llama(path: Path, lora: Path | None):
    return llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=256, n_threads=1,
                           logits_all=True, verbose=False, seed=0, type_k=0, type_v=0)


def assert_llama_cpp_gives_the_adapter_logits(base: Path, adapter: Path, tmp_path: Path, tolerance: float,
                                              dtypes: dict[str, float] | None = None) -> None:
    """The merged f32 file, and the gguf-lora file on the base's f32 file: llama.cpp tokenizes TEXT as
    tuneforge does and gives tuneforge's logits with the adapter within ``tolerance``; and the merged
    file in each of ``dtypes`` within its own tolerance."""
    export(str(base), tmp_path / "merged.gguf", "gguf", adapter_dir=adapter)
    export(str(base), tmp_path / "base.gguf", "gguf")
    export(str(base), tmp_path / "lora.gguf", "gguf-lora", adapter_dir=adapter)
    runs = [((tmp_path / "merged.gguf",), tolerance), ((tmp_path / "base.gguf", tmp_path / "lora.gguf"), tolerance)]
    for dtype, bound in (dtypes or {}).items():
        export(str(base), tmp_path / f"merged-{dtype}.gguf", "gguf", adapter_dir=adapter, dtype=dtype)
        runs.append(((tmp_path / f"merged-{dtype}.gguf",), bound))
    ids = ids_of()
    ref = logits_with(base, adapter, ids).numpy()
    for args, bound in runs:
        with llama(*args) as llm:
            assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
            llm.eval(ids)
            assert np.abs(np.array(llm.scores[:len(ids)]) - ref).max() < bound, args


@needs_llama_cpp
def test_llama_cpp_gives_the_adapter_logits_merged_and_as_a_lora_file(base_dir, lora_dir, tmp_path):
    assert_llama_cpp_gives_the_adapter_logits(base_dir, lora_dir, tmp_path, 1e-4)


# The families written to GGUF, as tiny models; no sliding window, which llama.cpp's llama and qwen2
# graphs do not have (the export says so in one line where a model has one).
GGUF_FAMILIES = {"llama3": {}, "mistral": {"sliding_window": None}, "qwen2": {"use_sliding_window": False},
                 "qwen3": {"use_sliding_window": False}, "gemma": {}, "gemma2": {}, "gemma3_text": {},
                 "phi3": {"sliding_window": None}, "starcoder2": {"sliding_window": None},
                 "qwen3_moe": {"norm_topk_prob": True}, "mixtral": {"sliding_window": None}, "gpt2": {},
                 "stablelm": {}, "phi": {}, "gpt_neox": {}, "falcon": {},
                 "olmo2": {"tie_word_embeddings": True}, "smollm3": {"num_hidden_layers": 4, "no_rope_layers": [1, 1, 1, 0]}}


# llama.cpp computes GELU through a table of fp16 values: Gemma's MLPs differ from torch's by about 1e-4 a
# layer, where SiLU's families agree to 1e-6 (docs/export.md has the measured figures). The smaller dtypes,
# measured over these families (logits reach 0.5 to 0.7): f16 1.1e-3 to 3.8e-3, bf16 8.6e-3 to 4.6e-2, q8_0
# 2.5e-2 to 0.14 (llama.cpp rounds the activations to 8 bits as well as the weights).
SMALLER = {"f16": 1e-2, "bf16": 0.1, "q8_0": 0.25}
GELU_TOLERANCE = {"gemma": 1e-3, "gemma2": 1e-3, "gemma3_text": 1e-3, "starcoder2": 1e-3, "gpt2": 1e-3, "phi": 1e-3,
                  "gpt_neox": 1e-3, "falcon": 1e-3}


@needs_llama_cpp
@pytest.mark.parametrize("name", GGUF_FAMILIES)
def test_each_family_runs_in_llama_cpp_merged_and_as_a_lora_file(name, tmp_path):
    """Llama 3 (its RoPE scaling as rope_freqs, a tied head), Mistral, Qwen 2 (q/k/v biases, no q/k
    reordering: its RoPE rotates halves), Qwen 3 (q/k norms), Gemma 1, 2 and 3 (norms as 1 + weight,
    softcaps, sliding windows, per-layer-kind RoPE), Phi-3 (fused qkv and gate_up), StarCoder 2, the
    MoE families (experts' gate_up split into stacked gate and up; LoRA on the router), GPT-2 (Conv1D
    transposed, learned positions), OLMo 2 (a tied head written out) and SmolLM3 (no RoPE in every
    4th layer): llama.cpp gives the adapter's logits, merged, as a LoRA file, and in f16, bf16 and q8_0."""
    from families import tiny_config
    from transformers import AutoModelForCausalLM

    tokenizer, base = bpe_tokenizer(), tmp_path / "base"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(name, len(tokenizer), **GGUF_FAMILIES[name]))
    with torch.no_grad():  # biases and norms off their zero and one starts, so a misplaced one shows
        for key, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    for part in (model, tokenizer):
        part.save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "lora", "lora", r=4, lora_alpha=8, target_modules="all-linear")
    assert_llama_cpp_gives_the_adapter_logits(base, adapter, tmp_path, GELU_TOLERANCE.get(name, 1e-4), SMALLER)


def greedy(llm, ids: list[int], eos: int, n: int) -> list[int]:
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if token == eos or len(out) == n:
            return out
        out.append(token)
    return out


QUESTION = "Is the sentiment of this text positive or negative? Answer with one word: positive or negative."
PROMPTS = [(QUESTION, "Text: A gorgeous, funny and deeply moving film."),
           (QUESTION, "Text: A joyless, plodding mess that I regret seeing."),
           (None, "What is the capital of France?")]


# llama.cpp multiplies a quantized base with 8-bit activations, so on such a base its logits differ from those
# of tuneforge's dequantized float weights (by up to 0.8 on Gemma 3's Q4_K_M file, where two tokens 0.2 apart
# swapped): there its logits are compared within this, and the adapter must move them by more than twice it
QUANTIZED_TOLERANCE = 1.25


def continuation_logits(model, ids: list[int], tokens: list[int]) -> torch.Tensor:
    """tuneforge's logits at each step of the continuation ``tokens`` of ``ids``, the step after the last included."""
    with torch.no_grad():
        return model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:].float()


def logits_gap(llm, model, ids: list[int], tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """tuneforge's logits along ``tokens`` after ``ids``, the indices of each step's 16 likeliest tokens under
    them, and the largest difference of llama.cpp's from them there."""
    ours = continuation_logits(model, ids, tokens)
    top = ours.topk(16, dim=-1).indices
    llm.reset()
    llm.eval(ids + tokens)
    theirs = torch.tensor(np.array(llm.scores[len(ids) - 1:len(ids) + len(tokens)]))
    return ours, top, float((theirs.gather(1, top) - ours.gather(1, top)).abs().max())


def assert_lora_gives_tuneforges_greedy_tokens_in_llama_cpp(spec: str, base, tmp_path: Path, lora_base: Path | None,
                                                            *settings: str, f32_tolerance: float | None = None) -> None:
    """``spec`` LoRA-tuned on sentiment (configs/sentiment-lora.yaml with ``settings``, for a few steps at a
    rate high enough that the answers change), exported merged as f32, and as a GGUF LoRA applied to
    ``lora_base`` (None: the base exported as f32): each of PROMPTS gets in llama.cpp the tokens
    `tuneforge generate --adapter` gives; on a quantized ``lora_base``, tuneforge's logits along them
    within QUANTIZED_TOLERANCE. ``base``: the model and tokenizer of ``spec``, untouched. ``f32_tolerance``:
    where llama.cpp's graph for the family computes other float32 sums than transformers' (Gemma 3), the
    merged file's logits along its greedy tokens within it, for two near-tied tokens may swap."""
    run = tmp_path / "run"
    sets = [f"model={spec}", f"train.output_dir={run}", "train.save_steps=0", "train.eval_at_start=false",
            "data.max_eval_examples=8", *settings]
    assert cli.main(["train", str(REPO / "configs" / "sentiment-lora.yaml"),
                     *(arg for value in sets for arg in ("--set", value))]) == 0
    adapter = run / "final"
    model, tokenizer = load_model(spec)
    load_adapter(model, adapter)
    exports = [["--adapter", str(adapter), "--out", str(tmp_path / "merged.gguf")],
               ["--adapter", str(adapter), "--format", "gguf-lora", "--out", str(tmp_path / "lora.gguf")]]
    quantized = lora_base is not None
    if lora_base is None:
        exports.append(["--out", str(tmp_path / "base.gguf")])
        lora_base = tmp_path / "base.gguf"
    for argv in exports:
        assert cli.main(["export", "--model", spec, *argv]) == 0
    with llama(tmp_path / "merged.gguf") as merged, llama(lora_base, tmp_path / "lora.gguf") as lora:
        changed, moved = 0, 0.0 if quantized else math.inf
        for system, prompt in PROMPTS:
            ids = encode_prompt(tokenizer, prompt, system=system)["input_ids"][0].tolist()
            expected = generate(model, tokenizer, prompt, system=system, max_new_tokens=8)
            changed += expected != generate(base[0], base[1], prompt, system=system, max_new_tokens=8)
            for llm in (merged, lora):
                assert llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
            tokens = greedy(merged, ids, tokenizer.eos_token_id, 8)  # the f32 file: every token
            if f32_tolerance is None:
                assert tokenizer.decode(tokens, skip_special_tokens=True) == expected, (prompt, expected)
            else:
                gap = logits_gap(merged, model, ids, tokens)[2]
                assert gap < f32_tolerance, (prompt, expected, gap)
            if not quantized:
                assert greedy(lora, ids, tokenizer.eos_token_id, 8) == tokens, (prompt, expected)
                continue
            ours, top, gap = logits_gap(lora, model, ids, tokens)
            plain = continuation_logits(base[0], ids, tokens)
            assert gap < QUANTIZED_TOLERANCE, prompt
            moved = max(moved, float((plain.gather(1, top) - ours.gather(1, top)).abs().max()))
        assert changed  # the adapter matters, so the comparison can fail
        assert moved > 2 * QUANTIZED_TOLERANCE  # on the quantized base too


@needs_llama_cpp
@pytest.mark.real
def test_default_model_lora_gives_tuneforges_greedy_tokens_in_llama_cpp(real_model, tmp_path):
    """The default model; its LoRA file applies to the base exported as f32 (the shipped base is Q4_1),
    which carries the shipped GGUF's tokenizer and descriptive keys."""
    assert_lora_gives_tuneforges_greedy_tokens_in_llama_cpp("smollm2-135m", real_model, tmp_path, None,
                                                            "train.max_steps=12", "train.learning_rate=1e-3")
    fields = gguf.GGUFReader(tmp_path / "base.gguf").fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"  # carried from the shipped GGUF
    assert fields["general.organization"].contents() == "HuggingFaceTB"
