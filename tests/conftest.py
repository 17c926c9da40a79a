"""Shared fixtures: a tiny random llama built in code (unit tests), the real default model (tests
marked `real`), and the repository's data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# An evaluation's timings: measured, so never equal between two runs. Compare {**a, **TIMING} == {**b, **TIMING}.
TIMING = {"seconds": None, "examples_per_second": None}
FULL_THREADS = torch.get_num_threads()

# The default model's chat format, so prompts render the same way on the tiny model.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer():
    """A byte-level tokenizer (256 byte symbols, no merges) with the default model's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def make_tiny_model(vocab_size: int, seed: int = 0, layers: int = 2):
    """A llama like the default model (grouped-query attention, tied embeddings), 64 wide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny(tiny_tokenizer):
    """(model, tokenizer): a fresh tiny random llama for each test."""
    return make_tiny_model(len(tiny_tokenizer)), tiny_tokenizer


def in_peft(base, folder):
    """The adapter in ``folder`` loaded by PEFT onto ``base``, in eval mode; PEFT must know every key of
    its adapter_config.json (an unknown one is only a warning there)."""
    import warnings

    import peft

    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, folder).eval()
    assert not [w for w in log if "Unexpected keyword" in str(w.message)]
    return model


@pytest.fixture
def vocab(tiny):
    return tiny[0].config.vocab_size


@pytest.fixture
def ids(vocab):
    """Two rows of random token ids (a test module may ask for other lengths with its own ``ids``)."""
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny model saved as a Hugging Face model directory (a model spec)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tiny_tokenizer()
    make_tiny_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def real_model():
    """The real default model, loaded once for the tests marked `real`."""
    from tuneforge.io.load import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data that ships in the repository's data/ folder."""
    return REPO / "data"


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny-model tests run on one thread: their matrices are too small to share, and on a busy
    machine a multi-threaded 64-wide matmul can wait milliseconds for a second core. Tests that
    load the real model get every thread."""
    torch.set_num_threads(FULL_THREADS if request.node.get_closest_marker("real") else 1)
    yield


_EXIT = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's own status once it has reported everything. The interpreter's teardown
    after a whole suite (torch, llama.cpp and tokenizers loaded in one process, native threads of
    each still alive) has now and then aborted in a native thread (exit 134), after every test had
    passed and been reported; no test's outcome depends on that teardown."""
    if "status" in _EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])

