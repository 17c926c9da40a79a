"""In-context learning, scored as an evaluation harness scores it: k demonstrations and the query in
one prompt, and the prediction is the label whose answer word is most likely after it (never free
text). k = 0 is zero-shot, and in the chat mode its prompt is exactly the one fine-tuning trains on.

Modes, that is, where the demonstrations go:
    chat        the instruction as the system message, then one user message: k "Text: ...\\nAnswer: word"
                blocks and "Text: <query>"; the answer starts the assistant turn (k = 0: ``classification_prompt``)
    chat_turns  the instruction as the system message, each demonstration an earlier user/assistant turn
                pair; the answer starts the last assistant turn
    raw         plain text without a template, "...Text: <query>\\nAnswer:", the word scored after a space

Contextual calibration (Zhao et al. 2021): a model brings a prior over the label words, and the
demonstrations shift it (majority label, the most recent label). Its probabilities p_cf on
content-free inputs ("N/A", "", "[MASK]") with the same demonstrations, averaged, measure that
prior; the prediction is argmax p / p_cf, with p renormalized over the label words.
"""

from __future__ import annotations

import random
import time
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from tuneforge.data import load_datasets
from tuneforge.data.classify import default_instruction, word_ids
from tuneforge.data.instruct import render, tokens, uses_template
from tuneforge.core.errors import UserError
from tuneforge.eval.classify import classification_metrics, score_labels
from tuneforge.methods import feature_cache
from tuneforge.io.load import load_model
from tuneforge.methods import features
from tuneforge.model.families import context_length

Mode = Literal["chat", "raw", "chat_turns"]
MODES = ("chat", "raw", "chat_turns")
CONTENT_FREE = ("N/A", "", "[MASK]")


def build_prompt(tokenizer, text: str, demos: list[tuple[str, str]], instruction: str | None = None,
                 label_words: list[str] | None = None, mode: Mode = "chat") -> list[int]:
    """Token ids of the prompt up to where the answer starts. ``demos`` are (text, answer) pairs; without
    an ``instruction``, the label words give the default question (no label words: no instruction)."""
    if instruction is None and label_words:
        instruction = default_instruction(label_words)
    head = f"{instruction}\n\n" if instruction else ""
    shots = "".join(f"Text: {t}\nAnswer: {answer}\n\n" for t, answer in demos)
    if mode == "raw":
        return tokens(tokenizer, f"{head}{shots}Text: {text}\nAnswer:")
    if mode not in MODES:
        raise UserError(f"unknown few-shot mode {mode!r}", "mode", fix=f"use one of {', '.join(MODES)}")
    if not uses_template(tokenizer, True):
        raise UserError(f"the {mode} mode needs a chat template, and this tokenizer has none", "mode",
                        fix='use mode "raw"')
    system = [{"role": "system", "content": instruction}] if instruction else []  # as classification_prompt
    if mode == "chat":
        messages = [*system, {"role": "user", "content": f"{shots}Text: {text}"}]
    else:
        messages = system + [m for t, answer in demos for m in ({"role": "user", "content": f"Text: {t}"},
                                                                {"role": "assistant", "content": answer})]
        messages.append({"role": "user", "content": f"Text: {text}"})
    return tokens(tokenizer, render(tokenizer, messages, True, "chat template"))


def select_demos(pool: tuple[list[str], list[int]], k: int, strategy: Literal["random", "nearest"] = "random",
                 seed: int = 0, query_embeddings=None, pool_embeddings=None) -> list[int] | list[list[int]]:
    """Indices into ``pool`` (texts, labels).

    random: one set for every query (as Zhao et al.), the same for the same seed, balanced across the
        labels: they take turns in a seeded order, so each gets k // n_labels and the first k % n_labels
        one more, and a label with too few examples leaves its turns to the others; the set comes in a
        shuffled order. Returns list[int].
    nearest: for each row of ``query_embeddings`` (m, d), the k pool items of highest cosine similarity
        to it, the most similar last, next to the query (Liu et al. 2022). Returns m lists.
    """
    labels = list(pool[1])
    if not 0 <= k <= len(labels):
        raise UserError(f"k={k} demonstrations, but the pool holds {len(labels)}", "k", fix="lower k or add examples")
    if strategy == "nearest":
        if query_embeddings is None or pool_embeddings is None:
            raise UserError("the nearest strategy needs query and pool embeddings")
        q, p = (np.asarray(e, np.float64) for e in (query_embeddings, pool_embeddings))
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        top = np.argsort(-(q @ p.T), axis=1, kind="stable")[:, :k]  # (m, k), most similar first
        return [row[::-1].tolist() for row in top]
    if strategy != "random":
        raise UserError(f"unknown strategy {strategy!r}", "strategy", fix="use random or nearest")
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for members in by_label.values():
        rng.shuffle(members)
    turns = sorted(by_label)
    rng.shuffle(turns)
    chosen: list[int] = []
    while len(chosen) < k:
        for label in turns:
            if by_label[label] and len(chosen) < k:
                chosen.append(by_label[label].pop())
    rng.shuffle(chosen)
    return chosen


def calibrate(scores, cf_scores) -> Tensor:
    """log p - log p_cf (n, L): ``scores`` (n, L) are the label words' log-likelihoods, renormalized over
    the words into p; ``cf_scores`` (m, L) the same for m content-free inputs, p_cf the mean of their p."""
    log_p = torch.as_tensor(scores, dtype=torch.float64).log_softmax(-1)
    p_cf = torch.as_tensor(cf_scores, dtype=torch.float64).softmax(-1).mean(0)  # (L,)
    return log_p - p_cf.log()


_calibrate = calibrate  # run_icl's flag of the same name hides the function there


def run_icl(model: nn.Module, tokenizer, eval_items: tuple[list[str], list[int]],
            pool: tuple[list[str], list[int]], label_words: list[str], k: int = 0, mode: Mode = "chat",
            strategy: Literal["random", "nearest"] = "random", calibrate: bool = False, seed: int = 0,
            instruction: str | None = None, batch_size: int = 8, cache_dir=None, batch_tokens: int | None = None
            ) -> dict:
    """Accuracy and macro-F1 of k-shot prediction on ``eval_items`` (texts, label indices), with the
    demonstrations drawn from ``pool``. Calibrated runs also report the uncalibrated figures; with nearest
    demonstrations every query has its own set, so calibration costs three more prompts per query."""
    start = time.perf_counter()
    texts, gold = list(eval_items[0]), list(eval_items[1])
    if k == 0:
        sets = [()] * len(texts)
    elif strategy == "nearest":  # mean-pooled last hidden states, cached, as the texts' embeddings
        embed = features.Config(pooling="mean", batch_size=batch_size)  # the last hidden state
        query = feature_cache.extract(model, tokenizer, texts, embed, cache_dir=cache_dir)[0][0]
        demos = feature_cache.extract(model, tokenizer, list(pool[0]), embed, cache_dir=cache_dir)[0][0]
        sets = [tuple(s) for s in select_demos(pool, k, "nearest", seed, query, demos)]
    else:
        sets = [tuple(select_demos(pool, k, strategy, seed))] * len(texts)

    def prompt(text: str, demo_set: tuple[int, ...]) -> list[int]:
        demos = [(pool[0][i], label_words[pool[1][i]]) for i in demo_set]
        return build_prompt(tokenizer, text, demos, instruction, label_words, mode)

    answers = [word_ids(tokenizer, w, chat_template=mode != "raw") for w in label_words]
    score = lambda prompts: score_labels(model, prompts, answers, batch_size, tokenizer.pad_token_id,  # noqa: E731
                                         batch_tokens)
    prompts = [prompt(t, s) for t, s in zip(texts, sets)]
    limit, longest = context_length(model.config), max(map(len, prompts)) + max(map(len, answers))
    if limit and longest > limit:
        raise UserError(f"a {k}-shot prompt with its answer is {longest} tokens, and the model takes at most {limit}",
                        "--shots", fix="give fewer shots, or use a model with a longer context")
    scores = score(prompts)  # (n, L) log-likelihoods
    result = {"k": k, "mode": mode, "strategy": strategy, "calibrated": calibrate, "seed": seed}
    if calibrate:
        plain = classification_metrics(scores.argmax(1).tolist(), gold, len(label_words))
        result.update(accuracy_uncalibrated=plain.accuracy, macro_f1_uncalibrated=plain.macro_f1)
        distinct = list(dict.fromkeys(sets))  # one content-free measurement per demonstration set
        cf = score([prompt(c, s) for s in distinct for c in CONTENT_FREE]).view(len(distinct), len(CONTENT_FREE), -1)
        row_of = {s: j for j, s in enumerate(distinct)}
        scores = torch.stack([_calibrate(scores[i:i + 1], cf[row_of[s]])[0] for i, s in enumerate(sets)])
    metrics = classification_metrics(scores.argmax(1).tolist(), gold, len(label_words))
    return {**metrics.as_dict(), **result, "seconds": time.perf_counter() - start}


def evaluate_icl(cfg, k: int = 0, mode: Mode = "chat", strategy: Literal["random", "nearest"] = "random",
                 calibrate: bool = False, seed: int = 0) -> dict:
    """`tuneforge icl`: k-shot on the run's held-out split (data.max_eval_examples of it), with the
    demonstrations drawn from its training split, as ``load_datasets`` makes them."""
    if cfg.data.format != "classification":
        raise UserError("in-context classification needs classification data", "data.format",
                        fix="set data.format: classification")
    model, tokenizer = load_model(cfg.model, device=cfg.train.device, allow_pickle=cfg.allow_pickle)
    data = load_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    split = lambda items: ([it.text for it in items], [it.label for it in items])  # noqa: E731
    return run_icl(model, tokenizer, split(data.eval_items), split(data.train_items), data.label_words, k, mode,
                   strategy, calibrate, seed, cfg.data.instruction, cfg.eval.batch_size,
                   batch_tokens=cfg.eval_batch_tokens)


def _words(text: str) -> list[str]:
    return text.lower().split()


def exact_match(prediction: str, reference: str) -> bool:
    """Equal up to case and whitespace."""
    return _words(prediction) == _words(reference)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased whitespace tokens: from the longest common subsequence (LCS),
    precision LCS / len(prediction), recall LCS / len(reference)."""
    a, b = _words(prediction), _words(reference)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)  # prev[j]: LCS of the prediction so far and b[:j]
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))  # 2PR / (P + R), simplified


@torch.no_grad()
def run_generation_icl(model: nn.Module, tokenizer, eval_items: tuple[list[str], list[str]],
                       pool: tuple[list[str], list[str]], k: int = 0, mode: Mode = "chat", seed: int = 0,
                       instruction: str | None = None, max_new_tokens: int = 64) -> dict:
    """k-shot generation: greedy answers to ``eval_items`` (inputs, references), scored by exact match
    and ROUGE-L F1; the demonstrations are one seeded random set of (input, output) pairs from ``pool``."""
    start = time.perf_counter()
    demos = [(pool[0][i], pool[1][i]) for i in select_demos((pool[0], [0] * len(pool[0])), k, "random", seed)]
    device = next(model.parameters()).device
    predictions = []
    for text in eval_items[0]:
        ids = torch.tensor([build_prompt(tokenizer, text, demos, instruction, None, mode)], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        predictions.append(answer.split("\nText:")[0].strip())  # raw text runs on into another demonstration
    refs = list(eval_items[1])
    return {"exact_match": float(np.mean([exact_match(p, r) for p, r in zip(predictions, refs)])),
            "rouge_l": float(np.mean([rouge_l(p, r) for p, r in zip(predictions, refs)])), "n": len(refs), "k": k,
            "mode": mode, "seed": seed, "seconds": time.perf_counter() - start, "predictions": predictions}
