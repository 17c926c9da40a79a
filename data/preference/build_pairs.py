"""Preference pairs from the Self-Instruct seed tasks: the human answer is chosen, the default model's own reply rejected.

Reads  data/instructions/self_instruct_seed_tasks.jsonl (175 tasks, one instance each).
Writes data/preference/self_instruct_pairs_train.jsonl and data/preference/self_instruct_pairs_heldout.jsonl,
one {"id", "prompt", "chosen", "rejected"} object a line, in the source's order, each a message list
(TRL's conversational form: a user message, then an assistant message for each answer). A task is held out when its
number is 4 modulo 5 (seed_task_4, seed_task_9, ..., seed_task_174): the split is fixed by id, not seeded.

- prompt: the instruction, or the instruction, a blank line and the instance's input when it has one
  (as tuneforge's data layer joins an Alpaca or Self-Instruct row).
- chosen: the instance's human-written output.
- rejected: SmolLM2-135M-Instruct's greedy reply to the prompt sent as a user message through its chat
  template (with the template's default system message), fp32 on CPU, at most 160 new tokens, stripped of
  surrounding whitespace. A reply cut at 160 tokens is kept as it is.
A task whose reply is empty or equals the reference (both stripped) is dropped and counted.

Replies are decoded in left-padded batches of prompts of similar length; before writing, a few tasks are
decoded one at a time with ``tuneforge.generate`` and must give the same reply (--check), so the files hold
the plain greedy decode.

Rerun from the repository root (about 9 minutes on 2 CPU cores, 8 of them generation):

    .venv/bin/python data/preference/build_pairs.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tuneforge

DATA = Path(__file__).resolve().parent.parent
SOURCE = DATA / "instructions" / "self_instruct_seed_tasks.jsonl"
OUT = DATA / "preference"
MODEL = "smollm2-135m"
MAX_NEW_TOKENS = 160
HELD_OUT_EVERY = 5  # seed_task_N is held out when N % 5 == 4: 35 of the 175 tasks


def prompt_of(task: dict) -> str:
    instance = task["instances"][0]  # every seed task has exactly one instance
    return f"{task['instruction']}\n\n{instance['input']}" if instance["input"] else task["instruction"]


def held_out(task_id: str) -> bool:
    return int(task_id.rsplit("_", 1)[1]) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[str], batch_size: int) -> list[str]:
    """The chat-templated greedy reply to each prompt, decoded in left-padded batches of similar length."""
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))  # one long prompt pads only its neighbours
    replies = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompts[k]}], tokenize=False,
                                               add_generation_prompt=True) for k in chunk]
        # the template writes its own special tokens; padding on the left keeps every prompt's end at the last column
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id)  # (batch, prompt + new tokens)
        for k, reply in zip(chunk, tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                          skip_special_tokens=True)):
            replies[k] = reply
        print(f"  {start + len(chunk)}/{len(prompts)} replies", flush=True)
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--check", type=int, default=5, help="tasks decoded one at a time to compare (0: none)")
    args = parser.parse_args()

    tasks = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [prompt_of(task) for task in tasks]
    model, tokenizer = tuneforge.load_model(MODEL, dtype="float32", device="cpu")

    began = time.perf_counter()
    replies = greedy_replies(model, tokenizer, prompts, args.batch_size)
    print(f"generated {len(replies)} replies in {time.perf_counter() - began:.0f} s")

    checked = range(0, len(tasks), -(-len(tasks) // args.check)) if args.check else []  # evenly spaced tasks
    for k in checked:
        alone = tuneforge.generate(model, tokenizer, prompts[k], max_new_tokens=MAX_NEW_TOKENS)
        if alone != replies[k]:
            raise SystemExit(f"{tasks[k]['id']}: the batched reply differs from the one-at-a-time reply; "
                             "rerun with --batch-size 1")
    print(f"checked: the batched replies equal the one-at-a-time replies for {len(checked)} tasks")

    splits = {"train": [], "heldout": []}
    dropped = {"empty": [], "equals the reference": []}
    for task, prompt, reply in zip(tasks, prompts, replies):
        chosen, rejected = task["instances"][0]["output"].strip(), reply.strip()
        if not rejected or rejected == chosen:
            dropped["empty" if not rejected else "equals the reference"].append(task["id"])
            continue
        # message lists, so that training renders the prompt through the chat template the replies came from
        pair = {"id": task["id"], "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
        splits["heldout" if held_out(task["id"]) else "train"].append(pair)

    for split, pairs in splits.items():
        path = OUT / f"self_instruct_pairs_{split}.jsonl"
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        print(f"{path.relative_to(DATA.parent)}: {len(pairs)} pairs")
    for reason, ids in dropped.items():
        print(f"dropped, {reason}: {len(ids)} {' '.join(ids)}")


if __name__ == "__main__":
    main()
