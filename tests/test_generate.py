import pytest
import torch

from tuneforge import cli
from tuneforge.eval.generate import encode_prompt, generate


def test_chat_template_is_applied_unless_raw(tiny_tokenizer):
    templated = tiny_tokenizer.decode(encode_prompt(tiny_tokenizer, "hi")["input_ids"][0])
    assert templated == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.decode(encode_prompt(tiny_tokenizer, "hi", raw=True)["input_ids"][0]) == "hi"
    with_system = tiny_tokenizer.decode(encode_prompt(tiny_tokenizer, "hi", system="Be brief.")["input_ids"][0])
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def greedy_by_hand(model, tok, prompt: str, n: int) -> str:
    """n steps of argmax over the whole sequence so far, without a cache."""
    ids = encode_prompt(tok, prompt)["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tok.decode(ids[0, start:], skip_special_tokens=True)


def test_greedy_is_the_argmax_at_every_step_and_streams_the_same_text(tiny):
    model, tok = tiny
    pieces = []
    text = generate(model, tok, "hello", max_new_tokens=8, on_text=pieces.append)
    assert text == greedy_by_hand(model, tok, "hello", 8) and "".join(pieces) == text


def test_sampling_is_seeded_and_is_not_greedy(tiny):
    model, tok = tiny
    a = generate(model, tok, "hello", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, tok, "hello", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    others = {generate(model, tok, "hello", max_new_tokens=8, temperature=1.0, seed=s) for s in range(4)}
    assert a == b and len(others) > 1 and others != {greedy_by_hand(model, tok, "hello", 8)}


def test_cli_generate_on_a_model_directory_prints_the_reply(tiny_dir, capsys):
    from tuneforge.io.load import load_model

    assert cli.main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "4"]) == 0
    model, tok = load_model(str(tiny_dir))
    assert capsys.readouterr().out == greedy_by_hand(model, tok, "hi", 4) + "\n"


def test_cli_unknown_model_is_one_line_and_exit_2(capsys):
    assert cli.main(["generate", "--model", "does-not-exist", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does-not-exist" in err and "Traceback" not in err


def test_cli_debug_shows_the_traceback_and_keeps_the_line_and_exit_code(capsys):
    assert cli.main(["--debug", "generate", "--model", "does-not-exist", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "UserError" in err
    assert err.splitlines()[-1].startswith("tuneforge: error: ") and "does-not-exist" in err.splitlines()[-1]


@pytest.mark.real
def test_real_model_knows_the_capital_of_france(real_model):
    model, tok = real_model
    assert "Paris" in generate(model, tok, "What is the capital of France?", max_new_tokens=24)
