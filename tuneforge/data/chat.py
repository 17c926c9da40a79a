"""Rows to conversations: the chat forms people publish, each told apart by a row's keys.

- ``conversations``: ShareGPT, turns of {from, value}; ``data.roles`` extends its role names.
- ``messages``: OpenAI chat (also TRL's conversational language modelling): string or text-part
  contents, assistant ``tool_calls``, ``tool`` results, a per-turn ``weight`` of 0 or 1.
- ``prompt`` and ``completion`` as message lists: TRL's conversational prompt/completion; only the
  completion's assistant turns are answers. As strings they are a raw prompt and its completion.
- ``instruction``: Alpaca (``input``, ``output``) or Self-Instruct (``instances``).
- ``chosen`` and ``rejected``: preference rows, read by ``tuneforge.data.preference``.

A conversation is what a chat template takes: {role, content} messages, assistant messages with
``tool_calls`` (OpenAI's shape, ``arguments`` parsed to an object as templates expect), tool
messages with ``tool_call_id`` / ``name``, and the row's ``tools``. Which turns carry loss is
decided in ``instruct.py`` from ``weights`` and ``start``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tuneforge.data.readers import Row, as_text, text_field
from tuneforge.core.errors import UserError

# ShareGPT's role names (and those of the datasets derived from it) -> chat roles; "tool_call" makes
# the turn an assistant message calling tools (its value is the call as JSON).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "tool": "tool", "function": "tool",
                  "observation": "tool", "function_call": "tool_call"}
ROLE_TARGETS = ("user", "assistant", "system", "tool", "tool_call")
# The roles a message list (OpenAI's form) may hold as they are: OpenAI's, and those real chat templates know
# (gpt-oss's developer, Llama 3.1's ipython for a tool's output). Any other role is mapped by data.roles or by
# ShareGPT's names (gpt, model: assistant; human: user; ...), or refused: a role no template knows was rendered
# as text, and an answer under it ('assistent') trained nothing.
MESSAGE_ROLES = ("system", "user", "assistant", "tool", "developer", "ipython")

# The keys of an OpenAI chat message that are read; any other (not null) is refused, naming what to do
MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name", "weight"}
THINK_FIX = "fold it into 'content' as <think>...</think> (data.mask_reasoning keeps it out of the loss)"
UNKNOWN_FIX = {"reasoning_content": THINK_FIX, "thinking": THINK_FIX, "reasoning": THINK_FIX,
               "function_call": "write it as 'tool_calls': [{\"type\": \"function\", \"function\": {...}}]"}
PROMPT_FIELD = "prompt"  # a row's prompt (TRL's forms); a constant, as "prompt" is also a method's name


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]  # as a chat template takes them
    weights: list[int]  # per message: 0 where the row says the turn is not trained, else 1
    start: int = 0  # messages before this one are the prompt (TRL's prompt/completion): no answers there
    tools: list | None = None  # tool definitions, passed to the chat template as `tools`


def form(row: Row) -> str:
    """Which form a row is in: sharegpt, messages, preference, prompt_completion or alpaca. A key holding
    null counts as absent (a table mixing forms, read from Parquet or Arrow, fills the others' keys so)."""
    has = {key for key, value in row.items() if value is not None}
    for key, name in (("conversations", "sharegpt"), ("messages", "messages"), ("chosen", "preference"),
                      ("rejected", "preference")):
        if key in has:
            return name
    if {PROMPT_FIELD, "completion"} <= has:
        return "prompt_completion"
    if "instruction" not in has:
        raise UserError(f"missing field 'instruction' (the row has: {', '.join(map(str, row)) or 'none'})", row.where,
                        fix="give each row 'instruction' and 'output' (optionally 'input' or 'instances'), "
                            "'messages', 'conversations', or 'prompt' and 'completion' (docs/formats.md)")
    return "alpaca"


def conversations(row: Row, roles: dict[str, str] | None = None) -> list[Conversation]:
    """The conversations in one row (several for Self-Instruct's instances)."""
    kind = form(row)
    if kind == "sharegpt":
        return [sharegpt(row, roles)]
    if kind == "messages":
        messages, weights = chat_messages(row["messages"], "messages", row.where, roles)
        return [Conversation(messages, weights, 0, tools_of(row))]
    if kind == "preference":
        raise UserError("this is a preference row (chosen/rejected), not a conversation to imitate", row.where,
                        fix="train on it with data.format: preference and train.objective: dpo (or orpo, simpo, "
                            "kto); to imitate the chosen answers, write them as 'messages' rows")
    if kind == "prompt_completion":
        return [prompt_completion(row, row[PROMPT_FIELD], row["completion"], roles)]
    return alpaca(row)


def prompt_completion(row: Row, prompt: Any, completion: Any, roles: dict[str, str] | None = None) -> Conversation:
    """TRL's conversational prompt/completion: both message lists; the answers are the completion's."""
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise UserError("'prompt' and 'completion' must both be message lists, or both strings", row.where,
                        fix="write both as [{\"role\": ..., \"content\": ...}] lists, or both as text")
    head, head_weights = chat_messages(prompt, PROMPT_FIELD, row.where, roles)
    tail, tail_weights = chat_messages(completion, "completion", row.where, roles)
    return Conversation(head + tail, head_weights + tail_weights, len(head), tools_of(row))


def alpaca(row: Row) -> list[Conversation]:
    """One Alpaca triple (instruction, optional input, output), or one conversation per Self-Instruct instance."""
    instruction = text_field(row, "instruction")
    if row.get("instances") is None:
        extra = row.get("input")
        return [_pair(instruction, None if extra is None else text_field(row, "input"), text_field(row, "output"))]
    instances = row["instances"]
    if not isinstance(instances, list):
        raise UserError("'instances' must be a list of {input, output}", row.where)
    out = []
    for k, instance in enumerate(instances):
        if not isinstance(instance, dict) or instance.get("output") is None:
            raise UserError(f"missing field 'instances[{k}].output'", row.where,
                            fix="give every instance an 'output' (and optionally an 'input')")
        extra = instance.get("input")
        out.append(_pair(instruction, None if extra is None else as_text(extra, f"'instances[{k}].input'", row.where),
                         as_text(instance["output"], f"'instances[{k}].output'", row.where)))
    return out


def _pair(instruction: str, extra: str | None, output: str) -> Conversation:
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return Conversation([{"role": "user", "content": user}, {"role": "assistant", "content": output}], [1, 1])


def chat_messages(messages: Any, key: str, where: str, roles: dict[str, str] | None = None
                  ) -> tuple[list[dict], list[int]]:
    """OpenAI chat messages, checked, with their weights: (messages for the template, weights). Each role is
    one of MESSAGE_ROLES, or a name ``roles`` (data.roles) or ShareGPT's names map to one."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"'{key}' must be a non-empty list of {{role, content}}", where)
    out, weights = [], []
    for k, message in enumerate(messages):
        at = f"{key}[{k}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise UserError(f"{at} needs a string 'role' and a string 'content'", where,
                            fix="write each message as {\"role\": \"user\", \"content\": \"...\"}")
        unknown = [name for name, value in message.items() if name not in MESSAGE_KEYS and value is not None]
        if unknown:  # read nothing silently: a key left out here would be left out of training
            raise UserError(f"{at} has '{unknown[0]}', which tuneforge does not train on", where,
                            fix=UNKNOWN_FIX.get(unknown[0], f"remove '{unknown[0]}', or fold it into 'content'"))
        role, calls = message_role(message["role"], roles, f"{at}.role", where), message.get("tool_calls")
        if calls is not None and role != "assistant":
            raise UserError(f"{at} is a {role} message with 'tool_calls'; only assistant messages call tools", where)
        content = message.get("content")
        if content is None and calls is None:
            raise UserError(f"{at} needs a string 'role' and a string 'content'", where,
                            fix="write each message as {\"role\": \"user\", \"content\": \"...\"}")
        checked = {"role": role, "content": text_of(content, at, where)}
        if calls is not None:
            checked["tool_calls"] = tool_calls(calls, f"{at}.tool_calls", where)
        for name in ("tool_call_id", "name"):
            if isinstance(message.get(name), str):
                checked[name] = message[name]
        out.append(checked)
        weights.append(weight_of(message, at, where))
    return out, weights


def message_role(name: str, roles: dict[str, str] | None, at: str, where: str) -> str:
    """The chat role of a message's ``name``: data.roles' mapping first, then the name itself where a template
    knows it, then ShareGPT's names; a role that is none of these is refused."""
    mapping = role_map(roles)
    role = mapping[name] if name in (roles or {}) else name if name in MESSAGE_ROLES else mapping.get(name)
    if role is None:
        raise UserError(f"unknown role {name!r} in {at} (known: {', '.join(MESSAGE_ROLES)})", where,
                        fix=f"correct it, or map it in data.roles, for example data.roles: {{{name}: user}}")
    if role == "tool_call":
        raise UserError(f"{at} maps {name!r} to tool_call, which names a ShareGPT turn", where,
                        fix="write the call as the assistant message's 'tool_calls'")
    return role


def text_of(content: Any, at: str, where: str) -> str:
    """A message's text: a string, null (a tool call's empty content), or text parts joined by newlines
    (as vLLM joins them); any other part (an image, audio) cannot be trained on here and is refused."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise UserError(f"{at}.content must be a string or a list of text parts, got {type(content).__name__}",
                        where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise UserError(f"{at}.content[{j}] is a {kind!r} part; only text parts can be trained on", where,
                            fix="remove the part, or write it as {\"type\": \"text\", \"text\": \"...\"}")
        texts.append(part["text"])
    return "\n".join(texts)


def weight_of(message: dict, at: str, where: str) -> int:
    """OpenAI's fine-tuning key: 0 leaves an assistant turn out of the loss, 1 (the default) keeps it."""
    value = message.get("weight")
    if value is None:  # absent, or null in a table where other turns have one
        return 1
    if isinstance(value, bool) or value not in (0, 1):
        raise UserError(f"{at}.weight must be 0 or 1, got {value!r}", where, fix="use 0 (not trained) or 1")
    return int(value)


def tool_calls(calls: Any, at: str, where: str) -> list[dict]:
    """OpenAI's tool calls, ``arguments`` parsed from its JSON string: chat templates write it with tojson."""
    shape = "write [{\"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": \"{...}\"}}]"
    if not isinstance(calls, list) or not calls:
        raise UserError(f"{at} must be a non-empty list of tool calls", where, fix=shape)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UserError(f"{at}[{j}] needs 'function' with a string 'name'", where, fix=shape)
        checked = {"type": "function", "function": {"name": function["name"],
                                                    "arguments": arguments(function.get("arguments", {}),
                                                                           f"{at}[{j}].function.arguments", where)}}
        if isinstance(call.get("id"), str):
            checked["id"] = call["id"]
        out.append(checked)
    return out


def arguments(value: Any, at: str, where: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise UserError(f"{at} is not JSON ({exc.msg})", where, fix="write the arguments as a JSON object") from None


def tools_of(row: Row) -> list | None:
    """The row's tool definitions: a list, or (as LLaMA-Factory writes them) a JSON string of one."""
    tools = row.get("tools")
    if isinstance(tools, str):
        tools = arguments(tools, "tools", row.where) if tools.strip() else None
    if tools is not None and not isinstance(tools, list):
        raise UserError("'tools' must be a list of tool definitions", row.where)
    return tools or None


def role_map(roles: dict[str, str] | None) -> dict[str, str]:
    for name, target in (roles or {}).items():
        if target not in ROLE_TARGETS:
            raise UserError(f"role {name!r} maps to {target!r}", "data.roles",
                            fix=f"map each role name to one of {', '.join(ROLE_TARGETS)}")
    return {**SHAREGPT_ROLES, **(roles or {})}


def sharegpt(row: Row, roles: dict[str, str] | None) -> Conversation:
    """ShareGPT's {from, value} turns; a row-level 'system' string becomes the system message."""
    turns, mapping = row["conversations"], role_map(roles)
    if not isinstance(turns, list) or not turns:
        raise UserError("'conversations' must be a non-empty list of {from, value}", row.where)
    messages, weights = [], []
    system = row.get("system")
    if isinstance(system, str) and system and not (isinstance(turns[0], dict) and
                                                   mapping.get(turns[0].get("from")) == "system"):
        messages, weights = [{"role": "system", "content": system}], [1]
    for k, turn in enumerate(turns):
        at = f"conversations[{k}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or "value" not in turn:
            raise UserError(f"{at} needs 'from' and 'value'", row.where,
                            fix="write each turn as {\"from\": \"human\", \"value\": \"...\"}")
        name, value = turn["from"], turn["value"]
        role = mapping.get(name)
        if role is None:
            raise UserError(f"unknown role {name!r} in {at}.from (known: {', '.join(sorted(mapping))})", row.where,
                            fix=f"map it in data.roles, for example data.roles: {{{name}: user}}")
        if role == "tool_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": sharegpt_calls(value, at, row.where)})
        elif isinstance(value, str):
            messages.append({"role": role, "content": value})
        else:
            raise UserError(f"{at}.value must be a string, got {type(value).__name__}", row.where)
        weights.append(weight_of(turn, at, row.where))
    return Conversation(messages, weights, 0, tools_of(row))


def sharegpt_calls(value: Any, at: str, where: str) -> list[dict]:
    """A ShareGPT function_call turn's value: {"name", "arguments"} (or a list of them), often as a JSON string."""
    calls = arguments(value, f"{at}.value", where)
    calls = calls if isinstance(calls, list) else [calls]
    return tool_calls([{"type": "function", "function": call} for call in calls], f"{at}.value", where)
