"""Supervised rows (instructions, chats, completions) to examples with the prompt masked out of the loss.

Every row becomes a conversation (a list of {role, content} messages), rendered either with the
tokenizer's chat template or with a plain "### Instruction / ### Response" template. The loss
goes on each assistant turn and on its end-of-turn token, so the model learns to answer and to
stop. The prompt/answer boundary comes from the template itself: the conversation up to a turn,
rendered with the generation prompt, must be a prefix of the conversation including that turn;
the tokens in between are the answer. Each piece is tokenized on its own, exactly as generation
will see it: the prompt's tokens first, then whatever the model produces.
"""

from __future__ import annotations

from tuneforge.data.collate import IGNORE, Example
from tuneforge.data.readers import Row, field
from tuneforge.data.text import eos_id
from tuneforge.errors import UserError

Pieces = list[tuple[list[int], bool]]  # (token ids, is_answer) in order; answers carry the loss


def uses_template(tokenizer, chat_template: bool) -> bool:
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def tokens(tokenizer, text: str) -> list[int]:
    # No BOS/EOS added here: a chat template writes its own special tokens into the text.
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def special_ids(tokenizer) -> set[int]:
    """Every special token id, including template tokens such as <|im_end|> or <|eot_id|>."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, tok in added.items() if getattr(tok, "special", False)}


def render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # a template raises its own errors (roles must alternate, ...)
        raise UserError(f"the chat template cannot render this conversation: {exc}", where,
                        fix="check the roles and their order, or set data.chat_template: false") from None


def split_end_of_turn(ids: list[int], specials: set[int]) -> Pieces:
    """An assistant turn's tokens as (answer up to and including the last special token, the rest).

    What follows the end-of-turn token (a template's newline) is layout, not something to learn.
    """
    ends = [i for i, t in enumerate(ids) if t in specials]
    cut = ends[-1] + 1 if ends else len(ids)
    return [(ids[:cut], True), (ids[cut:], False)]


def template_pieces(tokenizer, messages: list[dict], where: str) -> Pieces:
    full = render(tokenizer, messages, False, where)
    specials, pieces, cursor = special_ids(tokenizer), [], 0
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:turn], True, where)
        upto = render(tokenizer, messages[:turn + 1], False, where)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise UserError("the chat template renders earlier turns differently once later turns follow, so the "
                            "answer cannot be located", where, fix="set data.chat_template: false")
        pieces.append((tokens(tokenizer, full[cursor:len(prompt)]), False))
        pieces += split_end_of_turn(tokens(tokenizer, upto[len(prompt):]), specials)
        cursor = len(upto)
    pieces.append((tokens(tokenizer, full[cursor:]), False))
    return pieces


def plain_pieces(tokenizer, messages: list[dict]) -> Pieces:
    """The Alpaca-style layout, for tokenizers without a chat template: the answer ends with EOS."""
    pieces, context = [], ""
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            pieces.append((tokens(tokenizer, context + "### Response:\n"), False))
            pieces.append((tokens(tokenizer, content) + [eos_id(tokenizer)], True))
            context = "\n\n"
        elif role == "system":
            context += f"{content}\n\n"
        else:
            context += f"### Instruction:\n{content}\n\n"
    if context.strip():  # trailing turns with no answer after them
        pieces.append((tokens(tokenizer, context), False))
    return pieces


def conversation_pieces(tokenizer, messages: list[dict], chat_template: bool, where: str) -> Pieces:
    if uses_template(tokenizer, chat_template):
        return template_pieces(tokenizer, messages, where)
    return plain_pieces(tokenizer, messages)


def to_example(pieces: Pieces, max_length: int, train_on_prompt: bool, source: str = "") -> tuple[Example | None, bool]:
    """(the example, whether it was truncated); None when it has no answer or its last answer
    does not fit in ``max_length``. A long prompt is cut from the left so the answer survives."""
    ids = [t for piece, _ in pieces for t in piece]
    answer = [is_answer for piece, is_answer in pieces for _ in piece]
    if not any(answer):
        return None, False
    truncated = len(ids) > max_length
    if truncated:
        end = max(i for i, a in enumerate(answer) if a) + 1  # nothing after the last answer is learned
        start = end - 1
        while start > 0 and answer[start - 1]:
            start -= 1
        if end - start > max_length:
            return None, True
        ids, answer = ids[:end][-max_length:], answer[:end][-max_length:]
    labels = list(ids) if train_on_prompt else [t if a else IGNORE for t, a in zip(ids, answer)]
    return Example(ids, labels, source), truncated


def user_content(instruction: str, extra: str | None) -> str:
    return f"{instruction}\n\n{extra}" if extra else instruction


def conversations(row: Row) -> list[list[dict]]:
    """The conversations in one row: a chat (``messages``), one per Self-Instruct instance, or
    one Alpaca triple (``instruction``, optional ``input``, ``output``)."""
    if "messages" in row:
        return [checked_messages(row["messages"], row.where)]
    if "instruction" not in row:
        raise UserError(f"missing field 'instruction' (the row has: {', '.join(map(str, row)) or 'none'})", row.where,
                        fix="give each row 'instruction' and 'output' (optionally 'input' or 'instances'), "
                            "or 'messages'")
    instruction = str(row["instruction"])
    if "instances" in row:
        instances = row["instances"]
        if not isinstance(instances, list):
            raise UserError("'instances' must be a list of {input, output}", row.where)
        out = []
        for k, instance in enumerate(instances):
            if not isinstance(instance, dict) or "output" not in instance:
                raise UserError(f"missing field 'instances[{k}].output'", row.where,
                                fix="give every instance an 'output' (and optionally an 'input')")
            out.append(_pair(instruction, instance.get("input"), instance["output"]))
        return out
    return [_pair(instruction, row.get("input"), field(row, "output"))]


def _pair(instruction: str, extra, output) -> list[dict]:
    return [{"role": "user", "content": user_content(instruction, str(extra or ""))},
            {"role": "assistant", "content": str(output)}]


def checked_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError("'messages' must be a non-empty list of {role, content}", where)
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise UserError(f"messages[{k}] needs a string 'role' and a string 'content'", where,
                            fix="write each message as {\"role\": \"user\", \"content\": \"...\"}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def completion_pieces(row: Row, tokenizer, prompt_column: str, completion_column: str,
                      text_column: str) -> Pieces:
    """A raw prompt then its completion and EOS; the loss is on the completion and EOS."""
    column = prompt_column if prompt_column in row or text_column not in row else text_column
    prompt, completion = field(row, column), field(row, completion_column)
    return [(tokens(tokenizer, str(prompt)), False),
            (tokens(tokenizer, str(completion)) + [eos_id(tokenizer)], True)]


def supervised_examples(rows: list[Row], tokenizer, cfg) -> tuple[list[Example], int, int]:
    """(examples, dropped, truncated) for the instruction and completion formats."""
    examples, dropped, truncated = [], 0, 0
    for row in rows:
        if cfg.format == "completion":
            all_pieces = [completion_pieces(row, tokenizer, cfg.prompt_column, cfg.completion_column,
                                            cfg.text_column)]
        else:
            all_pieces = [conversation_pieces(tokenizer, messages, cfg.chat_template, row.where)
                          for messages in conversations(row)]
        for pieces in all_pieces:
            example, was_truncated = to_example(pieces, cfg.max_length, cfg.train_on_prompt, row.where)
            truncated += was_truncated and example is not None
            if example is None:
                dropped += 1
            else:
                examples.append(example)
    return examples, dropped, truncated
