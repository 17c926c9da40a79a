"""The chat forms people publish (ShareGPT, OpenAI chat with parts, tools and weights, TRL's conversational
prompt/completion, preference pairs): exactly which tokens carry the loss, each against a hand-written
expectation, the refusals, and a short training run per form on the tiny model."""

from __future__ import annotations

import json
import math

import pytest

from conftest import CHAT_TEMPLATE, make_tiny_model, make_tiny_tokenizer
from tuneforge.core import config
from tuneforge.core.config import DataCfg
from tuneforge.data import IGNORE, Example
from tuneforge.data.instruct import supervised_examples
from tuneforge.data.preference import preference_examples
from tuneforge.data.readers import Row
from tuneforge.core.errors import UserError

END = "<|im_end|>"  # the tiny tokenizer's end-of-turn token (and its EOS)

# ChatML with tools as Qwen2.5 writes them: the tools in the system turn, each call as
# <tool_call>\n{json}\n</tool_call> in the assistant turn, tool results as their own turn.
TOOL_TEMPLATE = (
    "{% if tools or messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{% if tools %}{{ '\\n\\n# Tools\\n<tools>' }}{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools>' }}{% endif %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{{ call['function']['arguments'] | tojson }}{{ '}\\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'tool' %}{{ '<|im_start|>tool\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% elif not (message['role'] == 'system' and loop.first) %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                  "parameters": {"type": "object",
                                                                 "properties": {"city": {"type": "string"}}}}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def tool_tokenizer():
    tok = make_tiny_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    return tok


def rows_of(*rows) -> list[Row]:
    return [Row(r, f"d.jsonl:{i + 1}") for i, r in enumerate(rows)]


def build(tok, *rows, **cfg) -> list[Example]:
    examples, dropped, _ = supervised_examples(rows_of(*rows), tok, DataCfg(**{"format": "instruction", **cfg}))
    assert not dropped
    return examples


def spans(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of consecutive loss tokens, in order."""
    out, run = [], []
    for t, label in zip(ids, labels):
        if label != IGNORE:
            run.append(t)
        elif run:
            out, run = out + [tok.decode(run)], []
    return out + ([tok.decode(run)] if run else [])


def loss_spans(tok, example: Example) -> list[str]:
    return spans(tok, example.input_ids, example.labels)


def text(tok, example: Example) -> str:
    return tok.decode(example.input_ids)


def refusal(tok, *rows, **cfg) -> str:
    with pytest.raises(UserError) as info:
        build(tok, *rows, **cfg)
    return str(info.value)


def weather_chat(content):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": content, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"},
            {"role": "assistant", "content": "18C and sunny."}]


# --- ShareGPT ---

def test_sharegpt_loss_on_every_gpt_turn(tiny_tokenizer):
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "2+2?"},
                             {"from": "gpt", "value": "4"}]}
    example, = build(tiny_tokenizer, row)
    assert loss_spans(tiny_tokenizer, example) == ["Hello!" + END, "4" + END]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    assert text(tiny_tokenizer, example) == tiny_tokenizer.apply_chat_template(messages, tokenize=False)


def test_sharegpt_custom_roles_and_an_unknown_role_refused(tiny_tokenizer):
    turns = [("person", "Hi"), ("bot", "Yo"), ("human", "Bye"), ("gpt", "Ciao")]
    row = {"system": "Be brief.", "conversations": [{"from": who, "value": what} for who, what in turns]}
    example, = build(tiny_tokenizer, row, roles={"person": "user", "bot": "assistant", "gpt": "user"})
    assert loss_spans(tiny_tokenizer, example) == ["Yo" + END]  # gpt overridden to a user turn
    assert text(tiny_tokenizer, example).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    message = refusal(tiny_tokenizer, {"instruction": "x", "output": "y"},
                      {"conversations": [{"from": "human", "value": "Hi"}, {"from": "narrator", "value": "..."}]})
    assert message.startswith("d.jsonl:2: unknown role 'narrator'") and "data.roles" in message
    assert "\n" not in message
    assert "data.roles" in refusal(tiny_tokenizer, row, roles={"bot": "robot"})


def test_a_message_role_no_template_knows_is_refused_or_mapped(tiny_tokenizer):
    """A message list's roles: 'usr' was rendered as text and trained, an answer under 'assistent' trained
    nothing (the row dropped as having no answer). Now they stop the run with the row's line, data.roles maps
    them, ShareGPT's names (model, gpt) are the roles they name, and preference rows are checked alike."""
    def chat(user_role, answer_role):
        return {"messages": [{"role": user_role, "content": "Hi"}, {"role": answer_role, "content": "Yo"}]}

    message = refusal(tiny_tokenizer, chat("user", "assistant"), chat("usr", "assistant"))
    assert message.startswith("d.jsonl:2: unknown role 'usr' in messages[0].role") and "data.roles" in message
    assert "unknown role 'assistent'" in refusal(tiny_tokenizer, chat("user", "assistent"))
    plain, = build(tiny_tokenizer, chat("user", "assistant"))
    for mapped in (build(tiny_tokenizer, chat("usr", "model"), roles={"usr": "user"})[0],
                   build(tiny_tokenizer, {"prompt": [{"role": "human", "content": "Hi"}],
                                          "completion": [{"role": "gpt", "content": "Yo"}]})[0]):
        assert mapped.input_ids == plain.input_ids and mapped.labels == plain.labels
    with pytest.raises(UserError, match="unknown role 'usr' in prompt"):
        preference_examples(rows_of({"prompt": [{"role": "usr", "content": "Hi"}],
                                     "chosen": [{"role": "assistant", "content": "Yo"}],
                                     "rejected": [{"role": "assistant", "content": "No"}]}), tiny_tokenizer,
                            DataCfg(format="preference"))


def test_sharegpt_function_call_trained_and_observation_not():
    tok = tool_tokenizer()
    row = {"tools": json.dumps([WEATHER_TOOL]),
           "conversations": [{"from": "human", "value": "Weather in Paris?"},
                             {"from": "function_call",
                              "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                             {"from": "observation", "value": "18C, sunny"},
                             {"from": "gpt", "value": "18C and sunny."}]}
    example, = build(tok, row)
    assert loss_spans(tok, example) == [CALL_TEXT + END, "18C and sunny." + END]
    assert "<|im_start|>tool\n18C, sunny<|im_end|>" in text(tok, example)
    assert '"name": "get_weather", "description": "Weather in a city"' in text(tok, example)


# --- OpenAI chat: content parts, tool calls, tool results, weights ---

def test_content_parts_are_joined_and_an_image_part_refused(tiny_tokenizer):
    parts = [{"type": "text", "text": "Name this"}, {"type": "text", "text": "colour."}]
    row = {"messages": [{"role": "user", "content": parts},
                        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}
    example, = build(tiny_tokenizer, row)
    assert loss_spans(tiny_tokenizer, example) == ["Blue." + END]
    assert "<|im_start|>user\nName this\ncolour.<|im_end|>" in text(tiny_tokenizer, example)
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    message = refusal(tiny_tokenizer, {"messages": [{"role": "user", "content": parts + [image]},
                                                    {"role": "assistant", "content": "Blue."}]})
    assert message.startswith("d.jsonl:1: messages[0].content[2] is a 'image_url' part") and "\n" not in message


@pytest.mark.parametrize("content", [None, ""])
def test_tool_calls_are_trained_and_tool_results_are_not(content):
    tok = tool_tokenizer()
    example, = build(tok, {"messages": weather_chat(content), "tools": [WEATHER_TOOL]})
    assert loss_spans(tok, example) == [CALL_TEXT + END, "18C and sunny." + END]
    rendered = text(tok, example)
    assert CALL_TEXT in rendered and "<|im_start|>tool\n18C, sunny<|im_end|>" in rendered
    assert rendered.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\n" + json.dumps(WEATHER_TOOL))


def test_a_template_without_tool_support_refuses_a_tool_call(tiny_tokenizer):
    for content in ("", None):  # the plain ChatML template renders the call as nothing at all
        message = refusal(tiny_tokenizer, {"messages": weather_chat(content)})
        assert message.startswith("d.jsonl:1: the chat template leaves out the tool call to get_weather")
        assert "data.chat_template: false" in message and "\n" not in message
    raising = make_tiny_tokenizer()
    raising.chat_template = CHAT_TEMPLATE.replace("message['content']", "message['content'] + message['tool_calls']")
    message = refusal(raising, {"messages": weather_chat("")})
    assert message.startswith("d.jsonl:1: the chat template cannot render the tool call to get_weather")


def test_tool_calls_without_a_template_are_json_text(tiny_tokenizer):
    example, = build(tiny_tokenizer, {"messages": weather_chat(None), "tools": [WEATHER_TOOL]}, chat_template=False)
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert text(tiny_tokenizer, example) == (
        f"### Tools:\n{json.dumps(WEATHER_TOOL)}\n\nBe brief.\n\n### Instruction:\nWeather in Paris?\n\n"
        f"### Response:\n{call}{END}\n\n### Tool result:\n18C, sunny\n\n### Response:\n18C and sunny.{END}")
    assert loss_spans(tiny_tokenizer, example) == [call + END, "18C and sunny." + END]


@pytest.mark.parametrize("template", [True, False], ids=["template", "plain"])
def test_tool_results_carry_no_loss_even_with_train_on_prompt(tiny_tokenizer, template):
    tok = tool_tokenizer() if template else tiny_tokenizer
    example, = build(tok, {"messages": weather_chat(None), "tools": [WEATHER_TOOL]}, train_on_prompt=True,
                     chat_template=template)
    trained = "".join(loss_spans(tok, example))
    assert "Weather in Paris?" in trained and "18C and sunny." in trained  # the prompt and the answers
    assert "18C, sunny" in text(tok, example) and "18C, sunny" not in trained  # never the tool's words


def test_message_keys_that_are_not_read_are_refused_not_dropped(tiny_tokenizer):
    for key, words in (("reasoning_content", "<think>"), ("function_call", "tool_calls"), ("audio", "remove")):
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo.", key: {"x": 1}}]
        message = refusal(tiny_tokenizer, {"messages": messages})
        assert message.startswith(f"d.jsonl:1: messages[1] has '{key}'") and words in message
    assert build(tiny_tokenizer, {"messages": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Yo.", "refusal": None}]})


def test_a_template_that_renders_only_the_first_of_several_calls_refuses(tiny_tokenizer):
    tok = tool_tokenizer()
    tok.chat_template = tok.chat_template.replace("message['tool_calls'] or []", "(message['tool_calls'] or [])[:1]")
    messages = weather_chat(None)
    messages[2]["tool_calls"] = messages[2]["tool_calls"] * 2
    assert "(message['tool_calls'] or [])[:1]" in tok.chat_template
    assert refusal(tok, {"messages": messages, "tools": [WEATHER_TOOL]}).startswith(
        "d.jsonl:1: the chat template leaves out the tool call to get_weather")


def test_a_null_field_is_missing_never_the_text_none(tiny_tokenizer):
    message = refusal(tiny_tokenizer, {"instruction": "Say hi.", "output": None})
    assert message.startswith("d.jsonl:1: field 'output' is null")


def test_weight_zero_turn_carries_no_loss_even_with_train_on_prompt(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away.", "weight": 0},
                {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!", "weight": 1}]
    example, = build(tiny_tokenizer, {"messages": messages})
    assert loss_spans(tiny_tokenizer, example) == ["Hello!" + END]
    everything, = build(tiny_tokenizer, {"messages": messages}, train_on_prompt=True)
    assert "Go away." not in "".join(loss_spans(tiny_tokenizer, everything))
    assert "Hi?" in "".join(loss_spans(tiny_tokenizer, everything))
    assert "weight must be 0 or 1" in refusal(tiny_tokenizer, {"messages": [messages[0], {**messages[1], "weight": 2}]})


def test_mask_reasoning_when_the_generation_prompt_opens_think(tiny_tokenizer):
    # A template whose generation prompt opens <think> (as some reasoning models' do): the answer text
    # has no opening tag, and its reasoning up to </think> is still kept out of the loss.
    tok = make_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>'")
    assert "assistant\n<think>" in tok.chat_template
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "<think>2 and 2 make 4.</think>The answer is 4."}]}
    masked, = build(tok, row, mask_reasoning=True)
    assert loss_spans(tok, masked) == ["The answer is 4." + END]


def test_train_on_turns_last(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    example, = build(tiny_tokenizer, {"messages": messages}, train_on_turns="last")
    assert loss_spans(tiny_tokenizer, example) == ["4" + END]
    plain, = build(tiny_tokenizer, {"messages": messages}, train_on_turns="last", chat_template=False)
    assert loss_spans(tiny_tokenizer, plain) == ["4" + END]


def test_mask_reasoning_keeps_think_spans_out_of_the_loss(tiny_tokenizer):
    answer = "<think>2 and 2 make 4.</think>The answer is 4."
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": answer}]}
    assert loss_spans(tiny_tokenizer, build(tiny_tokenizer, row)[0]) == [answer + END]
    masked, = build(tiny_tokenizer, row, mask_reasoning=True)
    assert loss_spans(tiny_tokenizer, masked) == ["The answer is 4." + END]
    # the masked tokens are exactly the span's, tags included
    hidden = [t for t, label in zip(masked.input_ids, masked.labels) if label == IGNORE]
    think = tiny_tokenizer("<think>2 and 2 make 4.</think>", add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(hidden).endswith("<|im_start|>assistant\n<think>2 and 2 make 4.</think>\n")
    assert think == hidden[-len(think) - 1:-1]
    plain, = build(tiny_tokenizer, row, mask_reasoning=True, chat_template=False)
    assert loss_spans(tiny_tokenizer, plain) == ["The answer is 4." + END]


# --- TRL's conversational prompt/completion ---

def test_trl_conversational_prompt_completion(tiny_tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    completion = [{"role": "assistant", "content": "4"}]
    expected = tiny_tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    for cfg in ({"format": "instruction"}, {"format": "completion"}):
        example, = build(tiny_tokenizer, {"prompt": prompt, "completion": completion}, **cfg)
        assert loss_spans(tiny_tokenizer, example) == ["4" + END]  # the prompt's assistant turn is context
        assert text(tiny_tokenizer, example) == expected and "{'role'" not in text(tiny_tokenizer, example)
    raw, = build(tiny_tokenizer, {"prompt": "2+2=", "completion": "4"})
    assert text(tiny_tokenizer, raw) == "2+2=4" + END and loss_spans(tiny_tokenizer, raw) == ["4" + END]
    mixed = {"prompt": "2+2=", "completion": completion}
    assert "both be message lists, or both strings" in refusal(tiny_tokenizer, mixed)


# --- preference pairs ---

def pairs_of(tok, *rows, **cfg):
    return preference_examples(rows_of(*rows), tok, DataCfg(format="preference", **cfg))


def test_preference_string_forms(tiny_tokenizer):
    explicit = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    implicit = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    (a, b), dropped, truncated = pairs_of(tiny_tokenizer, explicit, implicit)
    assert (sum(dropped.values()), truncated) == (0, 0)
    for pair in (a, b):
        assert tiny_tokenizer.decode(pair.prompt_ids) == "The sky is"
        assert spans(tiny_tokenizer, pair.chosen_ids, pair.chosen_labels) == [" blue." + END]
        assert spans(tiny_tokenizer, pair.rejected_ids, pair.rejected_labels) == [" green." + END]
        assert pair.source in ("d.jsonl:1", "d.jsonl:2")


def test_preference_message_list_forms(tiny_tokenizer):
    prompt = [{"role": "user", "content": "Sky colour?"}]
    chosen, rejected = [{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "Green."}]
    explicit = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    implicit = {"chosen": prompt + chosen, "rejected": prompt + rejected}
    (a, b), _, _ = pairs_of(tiny_tokenizer, explicit, implicit)
    for pair in (a, b):
        assert tiny_tokenizer.decode(pair.prompt_ids) == tiny_tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True)
        assert spans(tiny_tokenizer, pair.chosen_ids, pair.chosen_labels) == ["Blue." + END]
        assert spans(tiny_tokenizer, pair.rejected_ids, pair.rejected_labels) == ["Green." + END]
        assert tiny_tokenizer.decode(pair.chosen_ids) == "Blue." + END + "\n"  # the layout after it: no loss
    reasoning = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "<think>sky</think>Blue."}],
                 "rejected": rejected}
    (pair,), _, _ = pairs_of(tiny_tokenizer, reasoning, mask_reasoning=True, chat_template=False)
    assert tiny_tokenizer.decode(pair.prompt_ids) == "### Instruction:\nSky colour?\n\n### Response:\n"
    assert spans(tiny_tokenizer, pair.chosen_ids, pair.chosen_labels) == ["Blue." + END]
    (cut,), _, truncated = pairs_of(tiny_tokenizer, {**explicit, "prompt": [{"role": "user", "content": "x" * 200}]},
                                    max_length=64)
    assert truncated == 1 and len(cut.prompt_ids) + len(cut.rejected_ids) == 64


def test_preference_rows_refused_where_they_cannot_be_used(tiny_tokenizer):
    row = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert "data.format: preference" in refusal(tiny_tokenizer, row)
    with pytest.raises(UserError, match="train under a preference objective"):
        config.from_dict({"data": {"path": "pairs.jsonl", "format": "preference"}})
    with pytest.raises(UserError, match="trains on preference rows"):
        config.from_dict({"data": {"path": "pairs.jsonl"}, "train": {"objective": "dpo"}})
    with pytest.raises(UserError, match="must all be strings or all message lists"):
        pairs_of(tiny_tokenizer, {**row, "chosen": [{"role": "assistant", "content": "Blue."}]})


# --- each form trains ---

FORMS = {
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi {i}"}, {"from": "gpt", "value": "Hello {i}"}]},
    "tools": {"messages": weather_chat(None), "tools": [WEATHER_TOOL]},
    "parts_weights_reasoning": {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Q {i}"}]},
        {"role": "assistant", "content": "skip", "weight": 0}, {"role": "user", "content": "again"},
        {"role": "assistant", "content": "<think>hmm</think>A {i}"}]},
    "prompt_completion": {"prompt": [{"role": "user", "content": "Hi {i}"}],
                          "completion": [{"role": "assistant", "content": "Hello {i}"}]},
}


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-tools")
    tok = tool_tokenizer()
    make_tiny_model(len(tok), layers=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", list(FORMS))
def test_each_form_trains(name, tool_model_dir, tmp_path):
    import tuneforge

    rows = [json.loads(json.dumps(FORMS[name]).replace("{i}", str(i))) for i in range(6)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = config.from_dict({"model": str(tool_model_dir), "method": {"name": "full"},
                            "data": {"path": str(data), "format": "instruction", "val_fraction": 0.34,
                                     "mask_reasoning": True, "train_on_turns": "last", "max_length": 256},
                            "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "batch_size": 2,
                                      "device": "cpu", "logging_steps": 1}})
    summary = tuneforge.train(cfg, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert summary["steps"] == 2 and losses and all(math.isfinite(x) for x in losses)
