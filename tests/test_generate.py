import pytest

from tuneforge import cli
from tuneforge.eval.generate import encode_prompt, generate


def test_chat_template_is_applied_unless_raw(tiny_tokenizer):
    templated = tiny_tokenizer.decode(encode_prompt(tiny_tokenizer, "hi")["input_ids"][0])
    assert templated == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.decode(encode_prompt(tiny_tokenizer, "hi", raw=True)["input_ids"][0]) == "hi"
    with_system = tiny_tokenizer.decode(encode_prompt(tiny_tokenizer, "hi", system="Be brief.")["input_ids"][0])
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_greedy_is_deterministic_and_streams_the_same_text(tiny):
    model, tok = tiny
    pieces = []
    a = generate(model, tok, "hello", max_new_tokens=8, on_text=pieces.append)
    b = generate(model, tok, "hello", max_new_tokens=8)
    assert a == b and "".join(pieces) == a


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    a = generate(model, tok, "hello", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, tok, "hello", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert a == b


def test_cli_generate_on_a_model_directory(tiny_dir, capsys):
    assert cli.main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "4"]) == 0


def test_cli_unknown_model_is_one_line_and_exit_2(capsys):
    assert cli.main(["generate", "--model", "does-not-exist", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does-not-exist" in err and "Traceback" not in err


def test_cli_debug_shows_the_traceback():
    from tuneforge.errors import UserError

    with pytest.raises(UserError):
        cli.main(["--debug", "generate", "--model", "does-not-exist", "--prompt", "hi"])


@pytest.mark.real
def test_real_model_knows_the_capital_of_france(real_model):
    model, tok = real_model
    assert "Paris" in generate(model, tok, "What is the capital of France?", max_new_tokens=24)
