"""The Ollama Modelfile for each family's chat template: its TEMPLATE, rendered as Ollama renders the plain
form (once per turn, .System on the first, the last turn cut after .Response), equals the Jinja template's
rendering (less a leading BOS, which the runtime adds), and its PARAMETER stop lines name the tokens that
end an answer. The templates are short ones in each family's published shape; SmolLM2's is read from its
GGUF file, and gemma3-270m's GGUF (a base model) shows the Modelfile of a tokenizer with none."""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, replace

import pytest
from test_export import SMOL_TEMPLATE, bpe_tokenizer, go_render, modelfile_template
from tokenizers.processors import TemplateProcessing

from tuneforge.core.errors import UserError
from tuneforge.io import ollama

QUESTION, TEXT, ANSWER, NEXT_TEXT = "Is it positive?", "Text: a fine film.", "positive", "Text: a dull one."

LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
          "{% set messages = messages[1:] %}{% endif %}{% for m in messages %}{% if m['role'] == 'user' %}"
          "{% set content = m['content'] %}{% if loop.first and system is defined %}"
          "{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content %}{% endif %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
LLAMA3 = ("{% for m in messages %}{% set content = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
          "{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
           "{% set messages = messages[1:] %}{% endif %}{{ bos_token }}{% for m in messages %}"
           "{% if m['role'] == 'user' %}{% if loop.first and system is defined %}"
           "{{ '[INST] ' + system + '\n\n' + m['content'] + ' [/INST]' }}{% else %}"
           "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}{% else %}{{ m['content'] + eos_token }}{% endif %}"
           "{% endfor %}")
QWEN2 = SMOL_TEMPLATE  # ChatML that writes "You are a helpful assistant." when given no system message
PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
OLMO2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
         "{{ '<|system|>\n' + m['content'] + '\n' }}{% elif m['role'] == 'user' %}"
         "{{ '<|user|>\n' + m['content'] + '\n' }}{% elif not loop.last %}"
         "{{ '<|assistant|>\n' + m['content'] + eos_token + '\n' }}{% else %}"
         "{{ '<|assistant|>\n' + m['content'] + eos_token }}{% endif %}"
         "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}")
GEMMA3 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
          "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
          "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
          "{% for m in loop_messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
          "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}{{ m['content'] | trim }}"
          "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
          "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
GEMMA3_TEMPLATE = ("<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
                   "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n")


@dataclass(frozen=True)
class Family:
    template: str
    bos: str | None
    eos: str
    specials: tuple[str, ...] = ()
    adds_bos: bool = False  # the tokenizer puts BOS before a text (and the GGUF then has llama.cpp do so)
    stops: tuple[str, ...] = ()
    left_out: str = ""  # the BOS text the Jinja rendering begins with and the TEMPLATE leaves out


FAMILIES = {
    "llama2": Family(LLAMA2, "<s>", "</s>", (), True, ("</s>",), "<s>"),
    "llama3": Family(LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", ("<|start_header_id|>", "<|end_header_id|>",
                                                                       "<|eot_id|>"), True,
                     ("<|eot_id|>", "<|end_of_text|>"), "<|begin_of_text|>"),
    "mistral": Family(MISTRAL, "<s>", "</s>", (), True, ("</s>",), "<s>"),
    "qwen2": Family(QWEN2, None, "<|im_end|>", ("<|im_start|>",), False, ("<|im_end|>",)),
    "phi3": Family(PHI3, "<s>", "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), False,
                   ("<|end|>", "<|endoftext|>")),
    "olmo2": Family(OLMO2, "<|endoftext|>", "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>"), False,
                    ("<|endoftext|>",), "<|endoftext|>"),
    "gemma3": Family(GEMMA3, "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), True,
                     ("<end_of_turn>", "<eos>"), "<bos>"),
}


def family_tokenizer(family: Family):
    """test_export's byte-level tokenizer with the family's template, special tokens, BOS and EOS."""
    tok = bpe_tokenizer(family.template)
    tok.add_tokens([t for t in (family.bos, family.eos, *family.specials) if t], special_tokens=True)
    tok.bos_token, tok.eos_token = family.bos, family.eos
    if family.adds_bos:
        tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{family.bos} $A",
                                                                  special_tokens=[(family.bos, tok.bos_token_id)])
    assert (tok("a")["input_ids"][0] == tok.bos_token_id) == family.adds_bos
    return tok


def messages(system: str | None, *turns: str) -> list[dict]:
    roles = ["user", "assistant"] * len(turns)
    return ([{"role": "system", "content": system}] if system else []) + [{"role": r, "content": c}
                                                                          for r, c in zip(roles, turns)]


def jinja(tok, system: str | None, *turns: str, left_out: str = "") -> str:
    """The Jinja rendering up to the answer, less the BOS text the TEMPLATE leaves out."""
    text = tok.apply_chat_template(messages(system, *turns), tokenize=False, add_generation_prompt=True)
    assert text.startswith(left_out)
    return text[len(left_out):]


def go_whole(template: str, values: dict[str, str]) -> str:
    """A history turn: the whole template, not cut after {{ .Response }}."""
    text = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", lambda m: m[2] if values.get(m[1]) else "", template,
                  flags=re.S)
    return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values[m[1]], text)


def ollama_prompt(template: str, system: str, *turns: str) -> str:
    """What Ollama sends for a chat of user/assistant turns ending with a user message: each answered
    turn whole, .System set on the first only, then the turn being answered cut after .Response."""
    pairs = [(turns[i], turns[i + 1] if i + 1 < len(turns) else None) for i in range(0, len(turns), 2)]
    out = []
    for i, (prompt, response) in enumerate(pairs):
        values = {"System": system if i == 0 else "", "Prompt": prompt, "Response": response or ""}
        out.append(go_render(template, values) if response is None else go_whole(template, values))
    return "".join(out)


def modelfile_system(text: str) -> str:
    found = re.search(r'^SYSTEM """(.*)"""$', text, re.M | re.S)
    return found[1] if found else ""


def stop_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("PARAMETER stop")]


def modelfiles(name: str):
    """(family, tokenizer, system, Modelfile text) for the family's template, with and without a system message."""
    family = FAMILIES[name]
    tok = family_tokenizer(family)
    for system in (QUESTION, None):
        yield family, tok, system, ollama.modelfile(tok, "./m.gguf", system=system)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_turn_renders_as_the_chat_template(name):
    for family, tok, system, text in modelfiles(name):
        template = modelfile_template(text)
        # Only the Go forms the renderer above knows, which Ollama's plain form reads the same way.
        assert "{{" not in re.sub(r"\{\{ (if \.\w+|\.\w+|end) \}\}", "", template)
        if system:
            assert modelfile_system(text) == QUESTION
        # Without a system message Ollama uses the SYSTEM line: the template's default, if it has one.
        said = go_render(template, {"System": modelfile_system(text), "Prompt": TEXT})
        assert said == jinja(tok, system, TEXT, left_out=family.left_out)
        assert (QUESTION in said) == (system is not None)


@pytest.mark.parametrize("name", FAMILIES)
def test_two_turns_render_as_the_chat_template(name):
    for family, tok, system, text in modelfiles(name):
        said = ollama_prompt(modelfile_template(text), modelfile_system(text), TEXT, ANSWER, NEXT_TEXT)
        assert said == jinja(tok, system, TEXT, ANSWER, NEXT_TEXT, left_out=family.left_out)


@pytest.mark.parametrize("name", FAMILIES)
def test_stop_tokens_are_what_ends_an_answer(name):
    family = FAMILIES[name]
    text = ollama.modelfile(family_tokenizer(family), "./m.gguf")
    assert stop_lines(text) == [f'PARAMETER stop "{token}"' for token in family.stops]


def test_gemma3_puts_the_system_message_inside_the_first_user_turn():
    tok = family_tokenizer(FAMILIES["gemma3"])
    text = ollama.modelfile(tok, "./m.gguf", system=QUESTION)
    assert modelfile_template(text) == GEMMA3_TEMPLATE
    assert go_render(GEMMA3_TEMPLATE, {"System": QUESTION, "Prompt": TEXT}) == \
        f"<start_of_turn>user\n{QUESTION}\n\n{TEXT}<end_of_turn>\n<start_of_turn>model\n"


def test_a_system_message_the_template_trims_is_written_trimmed():
    tok = family_tokenizer(FAMILIES["llama3"])  # Llama 3 trims every message
    text = ollama.modelfile(tok, "./m.gguf", system=QUESTION + " \n")
    assert modelfile_system(text) == QUESTION
    assert go_render(modelfile_template(text), {"System": QUESTION, "Prompt": TEXT}) == \
        jinja(tok, QUESTION + " \n", TEXT, left_out="<|begin_of_text|>")
    assert modelfile_system(ollama.modelfile(bpe_tokenizer(), "./m.gguf", system=QUESTION + " ")) == QUESTION + " "


def test_a_leading_bos_is_left_out_and_a_bos_before_a_later_turn_kept():
    llama3 = modelfile_template(ollama.modelfile(family_tokenizer(FAMILIES["llama3"]), "./m.gguf"))
    assert llama3.startswith("{{ if .System }}<|start_header_id|>system") and "<|begin_of_text|>" not in llama3
    llama2 = modelfile_template(ollama.modelfile(family_tokenizer(FAMILIES["llama2"]), "./m.gguf"))
    assert llama2.startswith("[INST] {{ if .System }}<<SYS>>\n") and llama2.endswith("{{ .Response }} </s><s>")
    # A template that writes the BOS text itself (not {{ bos_token }}) before a tokenizer that adds BOS.
    literal = Family(MISTRAL.replace("{{ bos_token }}", "<s>"), "<s>", "</s>", (), True)
    assert modelfile_template(ollama.modelfile(family_tokenizer(literal), "./m.gguf")).startswith("[INST] ")
    # ChatML's <|im_start|> is test_export's tokenizer's BOS, which it does not add: it is text to keep.
    chatml = modelfile_template(ollama.modelfile(bpe_tokenizer(), "./m.gguf"))
    assert chatml.startswith("{{ if .System }}<|im_start|>system\n")


def test_a_bos_the_runtime_does_not_add_is_noted():
    olmo = ollama.modelfile(family_tokenizer(FAMILIES["olmo2"]), "./m.gguf")
    assert modelfile_template(olmo).startswith("{{ if .System }}<|system|>\n")
    assert "# The chat template begins a conversation with <|endoftext|>" in olmo
    assert "# The chat template begins" not in ollama.modelfile(family_tokenizer(FAMILIES["llama3"]), "./m.gguf")


def test_a_template_with_no_system_role_has_no_system_in_its_template():
    tok = family_tokenizer(Family(GEMMA2, "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), True))
    text = ollama.modelfile(tok, "./m.gguf")
    template = modelfile_template(text)
    assert ".System" not in template and "SYSTEM" not in text
    assert go_render(template, {"Prompt": TEXT}) == jinja(tok, None, TEXT, left_out="<bos>")
    assert ollama_prompt(template, "", TEXT, ANSWER, NEXT_TEXT) == jinja(tok, None, TEXT, ANSWER, NEXT_TEXT,
                                                                         left_out="<bos>")
    with pytest.raises(UserError, match="takes no system message") as refused:
        ollama.modelfile(tok, "./m.gguf", system=QUESTION)
    assert "\n" not in str(refused.value)


def test_a_tokenizer_without_a_chat_template_gets_a_modelfile_without_one():
    tok = bpe_tokenizer(None)
    text = ollama.modelfile(tok, "./m.gguf", system=QUESTION)
    lines = text.splitlines()
    assert lines[1] == "FROM ./m.gguf" and not any(line.startswith(("TEMPLATE", "SYSTEM")) for line in lines)
    assert f"#   {QUESTION}" in lines and stop_lines(text) == ['PARAMETER stop "<|im_end|>"']


@pytest.mark.parametrize("template, why", [
    # Mistral v0.3's shape: the system message goes in the last user turn, which the plain form cannot say.
    ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
     "{% set messages = messages[1:] %}{% endif %}{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
     "{% if loop.last and system is defined %}{{ '[INST] ' + system + '\n\n' + m['content'] + '[/INST]' }}"
     "{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}{% else %}{{ ' ' + m['content'] + eos_token }}"
     "{% endif %}{% endfor %}", "in the order given"),
    ("{{ raise_exception('no chat here') }}", "fails on"),
    # The generation prompt is not how an answer starts.
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ 'bot:' }}{% endif %}", "generation prompt"),
], ids=["mistral-v0.3", "raises", "generation-prompt"])
def test_a_template_that_cannot_be_said_is_refused_in_one_line(template, why):
    with pytest.raises(UserError, match=f"Ollama TEMPLATE: .*{why}") as refused:
        ollama.modelfile(family_tokenizer(Family(template, "<s>", "</s>", (), True)), "./m.gguf")
    assert "\n" not in str(refused.value)


def test_pieces_that_render_otherwise_are_refused():
    """The check behind every Modelfile: pieces found wrong (here altered by hand) are refused."""
    tok = family_tokenizer(FAMILIES["gemma3"])
    parts = ollama.chat_parts(tok)
    ollama.check(tok, parts, QUESTION)
    for wrong, turn in ((replace(parts, answer=(parts.answer[0], "<end_of_turn>")), "two turns with"),
                        (replace(parts, system=(parts.system[0], "\n")), "a turn with"),
                        (replace(parts, folded=False), "a turn with"),
                        (replace(parts, bos=""), "a turn with")):
        with pytest.raises(UserError, match=f"do not render {turn} a system message"):
            ollama.check(tok, wrong, QUESTION)


SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(name: str) -> dict:
    """The key/value metadata of a named model's GGUF file, arrays left out: read from its header here,
    as gguf.GGUFReader takes half a minute over Gemma's 262,144 tokens. Skipped where the model's package
    is not installed."""
    from tuneforge.io.load import find_named_gguf

    try:
        path = find_named_gguf(name)
    except UserError as exc:  # its packages are missing (or a chunk is damaged)
        pytest.skip(f"{name}: {exc}")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        assert data[:4] == b"GGUF"
        at, found = 24, {}

        def take(fmt: str):
            nonlocal at
            (value,) = struct.unpack_from("<" + fmt, data, at)
            at += struct.calcsize(fmt)
            return value

        def value(kind: int):
            nonlocal at
            if kind == 8:
                size = take("Q")
                at += size
                return bytes(data[at - size:at]).decode()
            if kind == 9:
                item, count = take("I"), take("Q")
                for _ in range(count):
                    value(item)
                return None
            return take(SCALARS[kind])

        for _ in range(struct.unpack_from("<Q", data, 16)[0]):
            key = value(8)
            found[key] = value(take("I"))
    return found


def test_smollm2s_own_chat_template():
    metadata = gguf_metadata("smollm2-135m")
    tok = bpe_tokenizer(metadata["tokenizer.chat_template"])  # its BOS <|im_start|>, EOS <|im_end|>
    text = ollama.modelfile(tok, "./m.gguf")
    assert modelfile_system(text) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    template = modelfile_template(text)
    for system in (QUESTION, None):
        assert go_render(template, {"System": system or modelfile_system(text), "Prompt": TEXT}) == \
            jinja(tok, system, TEXT)
        assert ollama_prompt(template, system or modelfile_system(text), TEXT, ANSWER, NEXT_TEXT) == \
            jinja(tok, system, TEXT, ANSWER, NEXT_TEXT)
    assert stop_lines(text) == ['PARAMETER stop "<|im_end|>"']


def test_gemma3_270m_is_a_base_model_without_a_chat_template():
    metadata = gguf_metadata("gemma3-270m")
    assert "tokenizer.chat_template" not in metadata and metadata["tokenizer.ggml.add_bos_token"] is True
    assert metadata["general.architecture"] == "gemma3"
    text = ollama.modelfile(bpe_tokenizer(None), "./gemma.gguf")
    lines = text.splitlines()
    assert lines[1] == "FROM ./gemma.gguf" and not any(line.startswith("TEMPLATE") for line in lines)


@pytest.mark.real
def test_gemma3s_template_with_gemma3_270ms_own_tokenizer():
    """The real Gemma 3 tokenizer (it adds BOS; <start_of_turn> and <end_of_turn> are its special tokens)
    with Gemma 3's chat template."""
    gguf_metadata("gemma3-270m")  # skipped where it is not installed
    from transformers import AutoTokenizer

    from tuneforge.io.load import find_named_gguf

    path = find_named_gguf("gemma3-270m")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.chat_template = GEMMA3
    text = ollama.modelfile(tok, "./m.gguf", system=QUESTION)
    assert modelfile_template(text) == GEMMA3_TEMPLATE
    assert stop_lines(text) == ['PARAMETER stop "<end_of_turn>"', 'PARAMETER stop "<eos>"']
    assert go_render(GEMMA3_TEMPLATE, {"System": QUESTION, "Prompt": TEXT}) == jinja(tok, QUESTION, TEXT,
                                                                                      left_out="<bos>")
